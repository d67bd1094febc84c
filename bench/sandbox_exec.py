"""Latency of ``exec true`` in a warm bwrap sandbox against a bare subprocess.

    .venv/bin/python bench/sandbox_exec.py [--runs 300] [--uid 64123]

Starts one sandbox (not timed), warms it up, then times ``helper.exec("true")``
round trips and, for comparison, ``asyncio.create_subprocess_exec("true")``
plus ``wait()`` in the executor's own process. Prints p50/p99 of each and the
ratio. As root the sandbox runs as ``--uid`` (default 64123).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from devsilo.executor._sandbox import BwrapSandbox, prepare_workspace_ownership


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _time(runs: int, call: Callable[[], Awaitable[object]]) -> list[float]:
    for _ in range(10):  # warm-up: imports, page cache, the helper's first spawn
        await call()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def _bare_true() -> None:
    proc = await asyncio.create_subprocess_exec("true")
    await proc.wait()


async def main() -> None:
    """Run the benchmark and print one line per variant plus the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--uid", type=int, default=64123, help="sandbox uid when run as root")
    args = parser.parse_args()
    as_root = os.geteuid() == 0
    uid, gid = (args.uid, args.uid) if as_root else (os.getuid(), os.getgid())
    with tempfile.TemporaryDirectory(prefix="devsilo-bench-") as tmp:
        workspace = Path(tmp) / "ws"
        workspace.mkdir()
        if as_root:
            prepare_workspace_ownership(workspace, uid, gid)
        started = time.perf_counter()
        async with BwrapSandbox(
            workspace, sandbox_uid=uid, sandbox_gid=gid, scratch_root=Path(tmp) / "scratch"
        ) as sandbox:
            start_ms = (time.perf_counter() - started) * 1000
            helper = sandbox.helper
            sandboxed = await _time(args.runs, lambda: helper.exec("true"))
        bare = await _time(args.runs, _bare_true)
    print(f"sandbox start: {start_ms:.1f} ms")
    for name, samples in (("bare create_subprocess_exec", bare), ("sandbox exec", sandboxed)):
        print(
            f"{name:28} p50 {_percentile(samples, 0.5):6.2f} ms   "
            f"p99 {_percentile(samples, 0.99):6.2f} ms   mean {statistics.fmean(samples):6.2f} ms"
        )
    ratio = _percentile(sandboxed, 0.5) / _percentile(bare, 0.5)
    print(f"ratio (p50): {ratio:.1f}x")


if __name__ == "__main__":
    asyncio.run(main())
