"""The coverage-guided harnesses (atheris), a short run in CI.

Every target of :mod:`devsilo.testing._fuzz` is fuzzed under atheris, with
its code instrumented for coverage, in one subprocess (the ``all`` target:
the first byte of an input picks the target, so the start-up is paid once):
the harnesses are exercised for real, none may break its invariant, each
must still serve a good input at the end, and coverage must guide the run
(the corpus grows past the seeds). ``bench/fuzz.py`` runs each harness on
its own for minutes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from devsilo.testing._fuzz import AllTargets, run_target

SECONDS = 5.0
PARTS = sorted(t.name for t in AllTargets.PARTS)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The figures of one atheris run over every target."""
    return run_target("all", SECONDS, tmp_path_factory.mktemp("atheris"))


@pytest.mark.parametrize("name", PARTS)
def test_atheris_finds_no_crash_in(run: dict[str, Any], name: str) -> None:
    crashes = [text for text in (Path(p + ".txt").read_text() for p in run["crash_files"])
               if text.startswith(f"FuzzFailure: [{name}]")]
    assert not crashes, f"{name}: {len(crashes)} crashes:\n" + "\n".join(c[:1500] for c in crashes)
    assert f"[{name}]" not in run["unhealthy"], f"{name} no longer serves a good input: {run['unhealthy']}"
    assert run["per_target"][name] > 0, run["per_target"]


def test_the_run_is_clean_and_coverage_guides_it(run: dict[str, Any]) -> None:
    assert run["crashes"] == 0 and not run["unhealthy"], run
    assert run["corpus"] > run["seeds"], run
