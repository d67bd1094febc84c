"""`silo up` stops everything it started, even with a sandbox busy, and leaves nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from devsilo.testing import Stack, pid_alive


def _children_of(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        kids = []
        try:  # children of every thread: the executor forks sandboxes from a launcher thread
            for task in Path(f"/proc/{p}/task").iterdir():
                kids += (task / "children").read_text().split()
        except OSError:
            continue
        for k in map(int, kids):
            out.add(k)
            todo.append(k)
    return out


def test_sigterm_stops_every_process_including_busy_sandboxes(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "state")
    stack.start()
    try:
        ws = tmp_path / "ws"
        ws.mkdir()
        script = tmp_path / "s.json"
        script.write_text(json.dumps({"responses": [
            {"tool_calls": [{"name": "Bash", "input": {"command": "echo started; sleep 300"}}]}]}))
        run = subprocess.Popen(
            [sys.executable, "-m", "devsilo.cli", "--state-dir", str(stack.state_dir), "run", "--headless",
             "--script", str(script), "--workspace", str(ws), "--prompt", "wait", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert run.stdout is not None
        for line in run.stdout:
            if json.loads(line)["kind"] == "tool_use":
                break
        time.sleep(0.5)
        up_pid = int(stack.stack["pid"])
        everything = _children_of(up_pid)
        names = {Path(f"/proc/{p}/comm").read_text().strip() for p in everything if pid_alive(p)}
        assert "bwrap" in names and "nats-server" in names and "sleep" in names, names
    finally:
        code = stack.stop()
    assert code == 0, stack.output()
    run.communicate(timeout=30)
    left = [p for p in everything if pid_alive(p)]
    assert left == [], f"left behind: {left}"
    assert "devsilo stopped." in stack.output()
    for service in ("gateway", "harness", "executor", "egress"):
        assert f"{service} stopped (0)" in stack.output(), stack.output()
    assert not (stack.state_dir / "run" / "stack.json").exists()


async def test_up_with_an_existing_nats_server_starts_none_of_its_own(tmp_path: Path) -> None:
    import asyncio

    from devsilo.testing import init_state, running_nats

    state = init_state(tmp_path / "state")
    async with running_nats(state, store_dir=tmp_path / "js") as server:
        stack = Stack(state.root, extra_args=["--nats", server.url])
        await asyncio.to_thread(stack.start)
        try:
            assert f"NATS:        {server.url}" in stack.output()
            assert "nats-server started" not in stack.output()
            ws = tmp_path / "ws"
            ws.mkdir()
            script = tmp_path / "s.json"
            script.write_text(json.dumps({"responses": [
                {"tool_calls": [{"name": "Bash", "input": {"command": "echo over-external-nats"}}]},
                {"tool_calls": [{"name": "Exit", "input": {"message": "ok"}}]}]}))
            r = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "devsilo.cli", "--state-dir", str(state.root), "run", "--headless",
                 "--script", str(script), "--workspace", str(ws), "--prompt", "go"],
                capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stdout + r.stderr
            assert "over-external-nats" in r.stdout
        finally:
            await asyncio.to_thread(stack.stop)
        assert server.pid is not None and pid_alive(server.pid)  # ours to stop, not silo up's
