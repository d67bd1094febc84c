"""The long fuzzing run: every atheris harness for minutes, then the Hypothesis tests with many examples.

The harnesses are those of :mod:`devsilo.testing._fuzz` (the CI runs them
all together for seconds in ``tests/test_fuzz_atheris.py``): the signed envelope
parser, client and gateway frames, the helper protocol both ways (a hostile
helper answering the executor; requests into a helper in a bubblewrap
sandbox; raw request lines into the helper's core), raw HTTP into a listening egress proxy, DNS streams into the relay
and the egress, and workspace paths. Each runs in its own subprocess with
its code instrumented for coverage; an input that breaks an invariant is
saved and fuzzing goes on.

Printed per target: executions, exec/s and that rate beside the baseline's
(a trivial harness measured in the same run, so the ratio says what the
target itself costs per input), crashes found (distinct inputs; each saved
with its traceback), and the corpus size (inputs that found new coverage,
kept under ``--workdir`` so that the next run starts from them).

    .venv/bin/python bench/fuzz.py [--minutes N] [--target T ...] [--examples-scale S] [--workdir DIR]

``--minutes`` is per target (default 1). ``--examples-scale`` multiplies the
Hypothesis tests' example counts (default 20; 0 skips them).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from devsilo.testing._fuzz import TARGETS, run_target

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=1.0, help="atheris time per target (default 1)")
    parser.add_argument("--target", action="append", choices=sorted(set(TARGETS) - {"baseline", "all"}),
                        help="fuzz only this target (repeatable; default all)")
    parser.add_argument("--examples-scale", type=float, default=20.0,
                        help="multiply the Hypothesis tests' max_examples by this (0: skip them)")
    parser.add_argument("--workdir", type=Path, default=HERE / ".fuzz",
                        help="where corpora and crashes are kept across runs (default bench/.fuzz)")
    args = parser.parse_args()
    names = args.target or sorted(set(TARGETS) - {"baseline", "all"})
    seconds = args.minutes * 60
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
          f"python {platform.python_version()}")
    print(f"atheris: {seconds:g} s per target, corpora and crashes under {args.workdir}")

    baseline = run_target("baseline", min(seconds, 30.0), args.workdir)
    base_rate = baseline["executions"] / baseline["seconds"]
    print(f"baseline (hash of the input): {baseline['executions']} executions, {base_rate:,.0f} exec/s\n")
    header = f"{'target':<16} {'executions':>11} {'exec/s':>9} {'vs baseline':>12} {'crashes':>8} {'corpus':>7}"
    print(header)
    print("-" * len(header))
    found: list[tuple[str, dict[str, Any]]] = []
    for name in names:
        try:
            figures = run_target(name, seconds, args.workdir)
        except Exception as exc:  # noqa: BLE001 -- a harness that cannot run is reported, the rest go on
            print(f"{name:<16} could not run: {str(exc).splitlines()[0]}")
            found.append((name, {"error": str(exc)}))
            continue
        rate = figures["executions"] / max(figures["seconds"], 1e-9)
        print(f"{name:<16} {figures['executions']:>11,} {rate:>9,.0f} {rate / base_rate:>11.4f}x "
              f"{figures['crashes']:>8} {figures['corpus']:>7}", flush=True)
        if figures["crashes"] or figures["unhealthy"]:
            found.append((name, figures))

    for name, figures in found:
        print(f"\n{name}:")
        if "error" in figures:
            print(figures["error"][-3000:])
            continue
        if figures["unhealthy"]:
            print(f"  no longer served a good input at the end: {figures['unhealthy'].strip()}")
        for path in figures["crash_files"]:
            why = Path(path + ".txt").read_text().splitlines()[0][:300]
            print(f"  {path}\n    {why}")

    failed = bool(found)
    if args.examples_scale > 0:
        print(f"\nHypothesis: tests/test_fuzz.py with {args.examples_scale:g}x the CI's examples")
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_fuzz.py")],
            cwd=REPO, env={**os.environ, "SILO_FUZZ_SCALE": str(args.examples_scale)}, check=False,
            capture_output=True, text=True)
        tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
        print(f"  {tail} ({time.monotonic() - started:.0f} s)")
        if proc.returncode != 0:
            print(proc.stdout[-6000:])
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
