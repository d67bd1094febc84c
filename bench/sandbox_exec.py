"""bwrap sandbox latency: cold start to helper ready, and ``exec true`` round trips.

    .venv/bin/python bench/sandbox_exec.py [--starts 30] [--runs 300] [--uid 64123]

Every figure is printed beside a baseline measured in the same run:

- cold start (``BwrapSandbox.start()`` until the helper answered hello) against
  a bare ``subprocess.run(["true"])``; beside it, to show where the time goes,
  a bare ``bwrap … true`` with the same namespaces, and the helper's own
  start-up outside any sandbox (the sandbox's ``python3`` running the
  compiled helper until it answers hello on a socket pair);
- ``helper.exec("true")`` in a warm sandbox against
  ``asyncio.create_subprocess_exec("true")`` plus ``wait()``.

As root the sandbox runs as ``--uid`` (default 64123).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from devsilo.executor._sandbox import (
    BwrapSandbox,
    _helper_pyc,
    _usr_alias_args,
    prepare_workspace_ownership,
)
from devsilo.executor._spec import SandboxSpec


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _line(name: str, samples: list[float], base: list[float] | None = None) -> str:
    p50, p99 = _percentile(samples, 0.5), _percentile(samples, 0.99)
    text = f"{name:42} p50 {p50:7.2f} ms   p99 {p99:7.2f} ms   mean {statistics.fmean(samples):7.2f} ms"
    if base is not None:
        text += f"   {p50 / _percentile(base, 0.5):6.1f}x"
    return text


async def _time(runs: int, call: Callable[[], Awaitable[object]], warm: int = 10) -> list[float]:
    for _ in range(warm):  # imports, page cache, the helper's first spawn
        await call()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def _time_sync(runs: int, call: Callable[[], object], warm: int = 5) -> list[float]:
    for _ in range(warm):
        call()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def _bare_true() -> None:
    proc = await asyncio.create_subprocess_exec("true")
    await proc.wait()


def _bare_bwrap(uid: int, as_root: bool) -> list[str]:
    """``bwrap … true`` with the sandbox's namespaces and nothing else."""
    # fmt: off
    argv = [
        shutil.which("bwrap") or "bwrap", "--unshare-all", "--unshare-user", "--disable-userns",
        "--die-with-parent", "--cap-drop", "ALL", "--ro-bind", "/usr", "/usr",
        *_usr_alias_args(), "--proc", "/proc", "--dev", "/dev", "--", "/usr/bin/true",
    ]
    # fmt: on
    if as_root:
        argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv]
    return argv


def _helper_alone(pyc: Path, workspace: Path) -> None:
    """Start the compiled helper outside any sandbox and wait for its hello."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [
            "/usr/bin/python3",
            "-I",
            "-S",
            str(pyc),
            "--fd",
            str(theirs.fileno()),
            "--workspace",
            str(workspace),
        ],
        pass_fds=(theirs.fileno(),),
    )
    theirs.close()
    try:
        ours.sendall(json.dumps({"id": 1, "op": "hello"}).encode() + b"\n")
        if not ours.recv(65536):
            raise RuntimeError("the helper closed its socket instead of answering")
    finally:
        ours.close()
        proc.wait()


async def main() -> None:
    """Run the benchmark and print one line per variant with its ratio to the baseline."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=30, help="cold starts to time")
    parser.add_argument("--runs", type=int, default=300, help="exec round trips to time")
    parser.add_argument("--uid", type=int, default=64123, help="sandbox uid when run as root")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    as_root = os.geteuid() == 0
    uid, gid = (args.uid, args.uid) if as_root else (os.getuid(), os.getgid())
    with tempfile.TemporaryDirectory(prefix="devsilo-bench-") as tmp:
        workspace = Path(tmp) / "ws"
        workspace.mkdir()
        if as_root:
            prepare_workspace_ownership(workspace, uid, gid)
        spec = SandboxSpec(
            session_id="bench",
            workspace=workspace,
            sandbox_uid=uid,
            sandbox_gid=gid,
            scratch_root=Path(tmp) / "scratch",
        )
        pyc = Path(tmp) / "helper.pyc"
        pyc.write_bytes(_helper_pyc("/usr/bin/python3"))

        bare_run = _time_sync(args.starts, lambda: subprocess.run(["true"], check=True))
        bwrap_argv = _bare_bwrap(uid, as_root)
        bare_bwrap = _time_sync(args.starts, lambda: subprocess.run(bwrap_argv, check=True))
        helper_alone = _time_sync(args.starts, lambda: _helper_alone(pyc, workspace), warm=3)

        async def cold_start() -> None:
            sandbox = BwrapSandbox(spec)
            started = time.perf_counter()
            await sandbox.start()
            cold.append((time.perf_counter() - started) * 1000)
            await sandbox.close()

        cold: list[float] = []
        await _time(3, cold_start, warm=0)  # builds the filter and compiles the helper once
        cold.clear()
        for _ in range(args.starts):
            await cold_start()

        async with BwrapSandbox(spec) as sandbox:
            helper = sandbox.helper
            sandboxed = await _time(args.runs, lambda: helper.exec("true"))
        bare_exec = await _time(args.runs, _bare_true)

    print(f"cold start, {args.starts} runs (ratios to a bare subprocess.run(['true'])):")
    print(_line("subprocess.run(['true'])", bare_run, bare_run))
    print(_line("bare bwrap … true", bare_bwrap, bare_run))
    print(_line("helper alone: python3 start to hello", helper_alone, bare_run))
    print(_line("BwrapSandbox.start() to helper hello", cold, bare_run))
    launch = _percentile(cold, 0.5) - _percentile(helper_alone, 0.5)
    print(f"{'  of which launch (start - helper alone)':42} p50 {launch:7.2f} ms")
    print(f"\nexec round trip, {args.runs} runs (ratio to create_subprocess_exec):")
    print(_line("asyncio.create_subprocess_exec('true')", bare_exec, bare_exec))
    print(_line("sandbox helper.exec('true')", sandboxed, bare_exec))


if __name__ == "__main__":
    asyncio.run(main())
