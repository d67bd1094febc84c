"""The coverage-guided harnesses (atheris), a short run of each in CI.

Every target of :mod:`devsilo.testing._fuzz` runs under atheris for a couple
of seconds in its own subprocess (two at a time), with its code instrumented
for coverage: the harnesses are exercised for real, each must find new
coverage beyond its seeds, break no invariant, and still serve a good input
at the end. ``bench/fuzz.py`` runs the same harnesses for minutes.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from devsilo.testing._fuzz import TARGETS, run_target

SECONDS = 1.5
CHECKED = sorted(name for name in TARGETS if name != "baseline")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any] | BaseException]:
    """Every target's figures (or why it could not run), fuzzed two at a time."""
    work = tmp_path_factory.mktemp("atheris")

    def one(name: str) -> dict[str, Any] | BaseException:
        try:
            return run_target(name, SECONDS, work)
        except Exception as exc:  # noqa: BLE001 -- reported by that target's test
            return exc

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(CHECKED, pool.map(one, CHECKED), strict=True))


@pytest.mark.parametrize("name", CHECKED)
def test_atheris_finds_no_crash_and_the_target_still_serves(runs: dict[str, Any], name: str) -> None:
    figures = runs[name]
    if isinstance(figures, BaseException):
        raise figures
    crashes = [Path(p).with_name(Path(p).name + ".txt").read_text()[:1500] for p in figures["crash_files"]]
    assert figures["crashes"] == 0 and not crashes, f"{name}: {figures['crashes']} crashes:\n" + "\n".join(crashes)
    assert not figures["unhealthy"], f"{name} no longer serves a good input: {figures['unhealthy']}"
    assert figures["executions"] > 0
    # Coverage feedback works: the corpus grew past the seeds the target started from.
    assert figures["corpus"] > figures["seeds"], figures
