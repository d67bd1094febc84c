"""`silo demo` on a machine with nothing running: starts a stack, runs, stops it again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_writes_and_runs_a_program_in_the_sandbox(tmp_path: Path) -> None:
    ws = tmp_path / "demo-ws"
    ws.mkdir()
    r = subprocess.run([sys.executable, "-m", "devsilo.cli", "--state-dir", str(tmp_path / "state"), "demo",
                        "--workspace", str(ws)], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "primes below 50 : [2, 3, 5, 7, 11, 13" in r.stdout
    assert "No such file or directory" in r.stdout  # /root is not there inside
    assert "network interfaces: ['lo']" in r.stdout
    assert (ws / "primes.py").exists()
    # the workspace was locked for the session and the demo ends with the unlock's report
    assert "locked on executor" in r.stdout
    assert "Changes since lock: 1" in r.stdout and "+limit = 50" in r.stdout
    assert not (ws / ".devsilo-locked").exists()
    assert "stopped the demo's devsilo" in r.stdout
    assert not (tmp_path / "state" / "run" / "stack.json").exists()


def test_demo_uses_a_running_stack_and_leaves_it_running(stack: object, tmp_path: Path) -> None:
    from devsilo.testing import Stack

    assert isinstance(stack, Stack)
    r = subprocess.run([sys.executable, "-m", "devsilo.cli", "--state-dir", str(stack.state_dir), "demo",
                        "--workspace", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "starting devsilo" not in r.stdout
    assert stack.healthy("gateway")
