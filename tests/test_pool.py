"""The executor pool: announcements, fitting leases, limits, and noticing a dead executor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from devsilo.protocol import ExecutorAnnounce
from devsilo.runtime._pool import PoolView
from devsilo.testing import Stack


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ann(eid: str, *, free: int = 2, backends: tuple[str, ...] = ("bwrap",), instance: str = "i1",
        users: dict[str, int] | None = None, stopping: bool = False) -> ExecutorAnnounce:
    return ExecutorAnnounce(executor_id=eid, instance=instance, host="h", backends=backends, capacity=4,
                            free=free, users=users or {}, stopping=stopping)


def test_candidates_fit_backend_room_and_pin() -> None:
    pool = PoolView(FakeClock())
    pool.update(ann("a", free=1))
    pool.update(ann("b", free=3))
    pool.update(ann("c", free=0))
    pool.update(ann("d", backends=("docker",)))
    assert [a.executor_id for a in pool.candidates("bwrap")] == ["b", "a"]
    assert [a.executor_id for a in pool.candidates("bwrap", pinned="a")] == ["a"]
    assert pool.candidates("gvisor") == []


def test_candidates_must_be_where_the_workspace_is() -> None:
    pool = PoolView(FakeClock())
    pool.update(ann("a"))
    assert [a.executor_id for a in pool.candidates("bwrap", host="h")] == ["a"]
    assert pool.candidates("bwrap", host="laptop") == []
    assert "on laptop, where the workspace is," in pool.why_none("bwrap", host="laptop")


def test_silent_executor_expires_after_three_seconds() -> None:
    clock = FakeClock()
    pool = PoolView(clock)
    pool.update(ann("a"))
    clock.now += 2.9
    assert pool.expire() == []
    clock.now += 0.2
    assert pool.expire() == ["a"]
    assert pool.candidates("bwrap") == []


def test_restart_and_stopping_mean_the_old_sandboxes_are_gone() -> None:
    pool = PoolView(FakeClock())
    assert pool.update(ann("a", instance="i1")) is False
    assert pool.update(ann("a", instance="i1")) is False
    assert pool.update(ann("a", instance="i2")) is True
    assert pool.update(ann("a", instance="i2", stopping=True)) is True
    assert len(pool) == 0


def test_user_sandboxes_are_counted_across_the_pool() -> None:
    pool = PoolView(FakeClock())
    pool.update(ann("a", users={"alice": 2}))
    pool.update(ann("b", users={"alice": 1, "bob": 1}))
    assert pool.user_sandboxes("alice") == 3


# -- across real processes ----------------------------------------------------------


@pytest.fixture(scope="module")
def two_executors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("pool") / "state", services={
        "executor": {"options": {"capacity": 1}},
        "executor-2": {"role": "executor", "metrics_port": 0, "options": {"capacity": 1}},
        "harness": {"options": {"lease_wait_s": 2}},
    })
    s.start()
    try:
        yield s
    finally:
        s.stop()


def start_run(stack: Stack, tmp_path: Path, name: str, script: dict[str, object],
              sandbox: str = "bwrap") -> subprocess.Popen[str]:
    ws = tmp_path / name
    ws.mkdir()
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(script))
    return subprocess.Popen(
        [sys.executable, "-m", "devsilo.cli", "--state-dir", str(stack.state_dir), "run", "--headless",
         "--script", str(path), "--workspace", str(ws), "--prompt", "go", "--json", "--sandbox", sandbox],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


SLOW = {"responses": [{"tool_calls": [{"name": "Bash", "input": {"command": "echo up; sleep 60"}}]},
                      {"tool_calls": [{"name": "Exit", "input": {"message": "ok"}}]}]}


def wait_for_tool(proc: subprocess.Popen[str]) -> list[dict[str, object]]:
    assert proc.stdout is not None
    seen: list[dict[str, object]] = []
    for line in proc.stdout:
        seen.append(json.loads(line))
        if seen[-1]["kind"] == "tool_use":
            return seen
    raise AssertionError("session ended before its tool call: " + (proc.stderr.read() if proc.stderr else ""))


def test_sessions_spread_over_executors_with_room_and_a_full_pool_says_so(
        two_executors: Stack, tmp_path: Path) -> None:
    first = start_run(two_executors, tmp_path, "one", SLOW)
    second = start_run(two_executors, tmp_path, "two", SLOW)
    try:
        a = wait_for_tool(first)
        b = wait_for_tool(second)
        executors = {a[0]["data"]["executor"], b[0]["data"]["executor"]}  # type: ignore[index]
        assert executors == {"executor", "executor-2"}
        third = start_run(two_executors, tmp_path, "three", SLOW)
        out, err = third.communicate(timeout=60)
        assert third.returncode == 1
        assert "no executor could run a bwrap sandbox within 2s" in err, err
        assert "every executor offering it is full" in err and "0/1 free" in err, err
    finally:
        for p in (first, second):
            p.kill()
            p.communicate()
        for events in (a, b):
            stop = subprocess.run([sys.executable, "-m", "devsilo.cli", "--state-dir", str(two_executors.state_dir),
                                   "sessions", "stop", str(events[0]["session_id"])],
                                  capture_output=True, text=True, timeout=60)
            assert stop.returncode == 0, stop.stderr


def test_a_backend_no_executor_offers_is_a_clear_error(two_executors: Stack, tmp_path: Path) -> None:
    proc = start_run(two_executors, tmp_path, "gv", SLOW, sandbox="microvm")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "no executor could run a microvm sandbox" in err, err


def test_a_workspace_on_another_machine_is_a_clear_error(two_executors: Stack, tmp_path: Path) -> None:
    import asyncio

    from devsilo.cli._client import GatewayClient, GatewayError
    from devsilo.cli._sessions import local_gateway
    from devsilo.protocol.client import CreateSession
    from devsilo.runtime._state import StateDir

    async def create() -> str:
        target = local_gateway(StateDir(two_executors.state_dir))
        async with GatewayClient(target.url, target.fingerprint) as client:
            await client.connect(target.token)
            await client.send(CreateSession(workspace=str(tmp_path), workspace_host="far-away-laptop",
                                            script=json.dumps(SLOW), headless=True, prompt="go"))
            try:
                async for frame in client.frames():
                    return f"unexpected {frame.type}"
            except GatewayError as exc:
                return str(exc)
        return "closed"

    message = asyncio.run(create())
    assert "no executor on far-away-laptop, where the workspace is, offers it" in message, message


def test_killed_executor_ends_its_sessions_with_a_clear_error(
        two_executors: Stack, tmp_path: Path) -> None:
    proc = start_run(two_executors, tmp_path, "victim", SLOW)
    seen = wait_for_tool(proc)
    eid = str(seen[0]["data"]["executor"])  # type: ignore[index]
    pid = two_executors.live_pid(eid)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    events = [json.loads(x) for x in out.splitlines()]
    errors = [e for e in events if e["kind"] == "error"]
    assert errors and f"executor {eid}" in errors[0]["data"]["message"]
    assert events[-1]["kind"] == "shutdown" and events[-1]["data"]["exit_code"] == 1
    assert proc.returncode == 1
    # The 5 s bound itself is PoolView's (3 s of silence), tested with a fake clock above;
    # here the session only has to end, with the reason, before communicate() times out.
    assert any(e["kind"] == "shutdown" for e in events)
