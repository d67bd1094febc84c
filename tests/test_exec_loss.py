"""A lost executor ends its sessions, and only a lost one: against a real NATS server.

A session whose executor died without the pool's view noticing (it started right around the
kill) ends with an error once nobody has listened for its tool calls past the reconnect grace;
an executor back within that grace keeps it going. The pool's silence check blames no executor
for the harness's own pause (SIGSTOP, a long GC): simulated with the check's clock.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import pytest
import structlog
from devsilo.harness import _session
from devsilo.harness._model import ScriptedModel
from devsilo.harness._service import LATE_WAKE_S, RECONNECT_GRACE_S, WATCH_EVERY_S, SilenceWatch
from devsilo.harness._session import SessionRunner
from devsilo.protocol import (
    AccessReport,
    Envelope,
    ExecutorAnnounce,
    Message,
    RemoteError,
    SessionEvent,
    SessionGrant,
    ToolCall,
    ToolResult,
    subjects,
)
from devsilo.runtime import Bus
from devsilo.runtime._metrics import ServiceMetrics
from devsilo.runtime._natsconn import connect_nats
from devsilo.runtime._natsserver import NatsServer
from devsilo.runtime._pool import SILENCE_S, PoolView
from devsilo.runtime._state import StateDir
from nats.aio.msg import Msg
from nats.js.api import StorageType, StreamConfig

EXECUTOR = "executor"
SCRIPT = {"responses": [{"text": "look", "tool_calls": [{"name": "Bash", "input": {"command": "ls"}}]},
                        {"text": "done", "tool_calls": [{"name": "Exit", "input": {"message": "all fine"}}]}]}


class WatchedBus(Bus):
    """A harness bus that keeps the session events it stores and counts requests nobody heard."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[SessionEvent] = []
        self.unanswered = 0
        self.nobody = asyncio.Event()

    async def js_publish(self, subject: str, body: Message, **kw: Any) -> Any:
        ack = await super().js_publish(subject, body, **kw)
        if isinstance(body, SessionEvent):
            self.events.append(body)
        return ack

    async def request(self, subject: str, body: Message, expect: type[Any], **kw: Any) -> Any:
        try:
            return await super().request(subject, body, expect, **kw)
        except RemoteError as exc:
            if exc.code == "no_responders":
                self.unanswered += 1
                if self.unanswered >= 2:  # asked again at least once: the grace is running
                    self.nobody.set()
            raise


async def service_bus(state: StateDir, server: NatsServer, service: str, stack: AsyncExitStack,
                      cls: type[Bus] = Bus) -> Bus:
    nc = await connect_nats(state, service, server.url)
    stack.push_async_callback(nc.close)
    return cls(nc, state.identity(service), state.roster(), ServiceMetrics(service, service),
               log=structlog.get_logger())


@pytest.fixture
async def harness(state_dir: StateDir, nats_server: NatsServer) -> AsyncIterator[tuple[WatchedBus, AsyncExitStack]]:
    async with AsyncExitStack() as stack:
        bus = await service_bus(state_dir, nats_server, "harness", stack, WatchedBus)
        await bus.js.add_stream(StreamConfig(name=subjects.EVENTS_STREAM, subjects=[subjects.EVENTS_SUBJECTS],
                                             storage=StorageType.MEMORY, duplicate_window=120.0))
        yield bus, stack  # type: ignore[misc]


def session_on(bus: WatchedBus, sid: str) -> tuple[SessionRunner, list[SessionEvent]]:
    """A session leased on EXECUTOR (scripted: one Bash call, then Exit), and its stored events."""
    grant = SessionGrant(grant_id="g-" + sid, session_id=sid, user="u", workspace="/w", issued_at=0.0,
                         expires_at=1.0)
    runner = SessionRunner(bus, grant, EXECUTOR, AccessReport(backend="bwrap", workspace="/w"),
                           ScriptedModel(json.dumps(SCRIPT)), headless=True, log=structlog.get_logger())
    return runner, bus.events


async def test_a_session_whose_executor_nobody_listens_for_past_the_grace_ends_with_an_error(
        harness: tuple[WatchedBus, AsyncExitStack], monkeypatch: pytest.MonkeyPatch) -> None:
    """The executor died as the session started: the pool never told it; its tool call finds nobody."""
    bus, _ = harness
    monkeypatch.setattr(_session, "NO_RESPONDERS_GRACE_S", 0.5)
    runner, events = session_on(bus, "s1")
    await asyncio.wait_for(runner.run("go"), 30)
    kinds = [e.kind for e in events]
    assert kinds[-3:] == ["tool_result", "error", "shutdown"], kinds
    result, error, shutdown = events[-3:]
    assert result.data["is_error"] and "no_responders" in result.data["content"]
    assert error.data["message"].startswith(f"executor {EXECUTOR} stopped responding")
    assert "cannot continue" in error.data["message"]
    assert shutdown.data["exit_code"] == 1 and runner.exit_code == 1
    assert not any(e.kind == "tool_use" and e.data["name"] == "Exit" for e in events)  # never went on
    assert bus.unanswered >= 2  # it was asked again through the grace before giving up


async def test_a_session_told_its_executor_is_lost_before_it_ran_ends_after_its_first_events(
        harness: tuple[WatchedBus, AsyncExitStack]) -> None:
    """The lease's executor instance was already gone once the session was claimed: the harness
    tells the runner at once, while the session's first events are still being written."""
    bus, _ = harness
    runner, events = session_on(bus, "s3")
    lost = asyncio.create_task(runner.executor_lost(f"executor {EXECUTOR} stopped as the session started; "
                                                    "the session cannot continue"))
    await asyncio.sleep(0)  # told first
    await asyncio.wait_for(runner.run("go"), 30)
    await asyncio.wait_for(lost, 10)
    assert [e.kind for e in events] == ["session_started", "access_report", "user_prompt", "error", "shutdown"]
    assert events[-1].data["exit_code"] == 1 and "stopped as the session started" in events[-2].data["message"]
    assert bus.unanswered == 0  # no turn ran: nothing was asked of the dead executor


async def test_an_executor_listening_again_within_the_grace_keeps_the_session(
        harness: tuple[WatchedBus, AsyncExitStack], state_dir: StateDir, nats_server: NatsServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """NATS or the executor reconnecting: calls find nobody for a moment, then the executor answers."""
    bus, stack = harness
    monkeypatch.setattr(_session, "NO_RESPONDERS_GRACE_S", 60.0)
    runner, events = session_on(bus, "s2")
    running = asyncio.create_task(runner.run("go"))
    await asyncio.wait_for(bus.nobody.wait(), 30)
    executor = await service_bus(state_dir, nats_server, "executor", stack)

    async def on_tool(env: Envelope, msg: Msg) -> Message:
        call = env.expect(ToolCall)
        return ToolResult(call_id=call.call_id, content="a.txt")

    await executor.subscribe(subjects.exec_tool(EXECUTOR, "s2"), on_tool)
    await asyncio.wait_for(running, 30)
    results = [e.data for e in events if e.kind == "tool_result"]
    assert results[0]["content"] == "a.txt" and not results[0]["is_error"]
    assert not any(e.kind == "error" for e in events)
    assert events[-1].kind == "shutdown" and events[-1].data == {"exit_code": 0, "reason": "all fine"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def announce(eid: str, instance: str | None = None) -> ExecutorAnnounce:
    return ExecutorAnnounce(executor_id=eid, instance=instance or "i-" + eid, host="h", backends=("bwrap",),
                            capacity=4, free=4)


async def test_the_harness_paused_for_seconds_blames_no_executor_but_still_notices_a_dead_one(
        harness: tuple[WatchedBus, AsyncExitStack]) -> None:
    bus, _ = harness
    clock = Clock()
    pool = PoolView(clock=clock)
    watch = SilenceWatch(bus, pool, clock=clock)
    pool.update(announce("alive"))
    pool.update(announce("dead"))
    for _ in range(4):  # checks on time, each executor heard every second
        clock.now += WATCH_EVERY_S
        assert watch.check() == []
        if clock.now % 1.0 == 0:
            pool.update(announce("alive"))
            pool.update(announce("dead"))
    # "dead" is killed now; then this process stops for 6 s (SIGSTOP, a long GC): the watcher
    # wakes 6 s late, before the announcements that queued up meanwhile have been read.
    clock.now += 6.0
    assert watch.check() == []  # our own deafness: nobody is blamed for it
    # The queued announcements of "alive" are read, and it goes on announcing every second.
    pool.update(announce("alive"))
    woke, gone = clock.now, []
    while clock.now < woke + 30 and not gone:
        clock.now += WATCH_EVERY_S
        gone = watch.check()
        if clock.now % 1.0 == 0:
            pool.update(announce("alive"))
    assert gone == ["dead"]  # after a fresh grace, the executor that stayed silent is gone
    assert clock.now - woke == RECONNECT_GRACE_S + SILENCE_S + WATCH_EVERY_S
    assert pool.alive("alive") and not pool.instance_gone("i-alive") and pool.instance_gone("i-dead")


async def test_a_watcher_a_little_late_is_no_pause_and_real_silence_still_counts(
        harness: tuple[WatchedBus, AsyncExitStack]) -> None:
    bus, _ = harness
    clock = Clock()
    pool = PoolView(clock=clock)
    watch = SilenceWatch(bus, pool, clock=clock)
    pool.update(announce("e1"))
    step = WATCH_EVERY_S + LATE_WAKE_S / 2  # a busy machine: every check late, but not paused
    checks = 0
    while not watch.check():
        clock.now += step
        checks += 1
    assert checks * step > SILENCE_S >= (checks - 1) * step  # gone at the first check past the silence


def test_a_lease_from_an_executor_instance_that_is_already_gone_is_known_lost() -> None:
    """The pool remembers instances that restarted, stopped or fell silent; one heard again is back."""
    clock = Clock()
    pool = PoolView(clock=clock)
    pool.update(announce("e1", "old"))
    assert not pool.instance_gone("old")
    assert pool.update(announce("e1", "new"))  # restarted: "old"'s sandboxes died with it
    assert pool.instance_gone("old") and not pool.instance_gone("new")
    clock.now += SILENCE_S + 0.1
    assert pool.expire() == ["e1"] and pool.instance_gone("new")
    pool.update(announce("e1", "new"))  # it was only silent (our pause): heard again, not gone
    assert not pool.instance_gone("new")
    assert pool.update(announce("e1", "new").model_copy(update={"stopping": True}))
    assert pool.instance_gone("new")
