"""Session ownership against a real NATS (exactly one replica takes a silent owner's session),
and the rebuild of a session from journal entries of every shape a crash can leave."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import pytest
import structlog
from devsilo.harness._failover import UNKNOWN_RESULT, SessionOwners, rebuild
from devsilo.harness._journal import JournalEntry
from devsilo.protocol import AccessReport, LLMChoice, SessionOwnership
from devsilo.runtime import Bus
from devsilo.runtime._metrics import ServiceMetrics
from devsilo.runtime._natsconn import connect_nats
from devsilo.runtime._natsserver import NatsServer
from devsilo.runtime._state import StateDir
from nats.errors import TimeoutError as NatsTimeoutError

ACCESS = AccessReport(backend="bwrap", workspace="/w")


async def harness_bus(state: StateDir, server: NatsServer, stack: AsyncExitStack) -> Bus:
    nc = await connect_nats(state, "harness", server.url)
    stack.push_async_callback(nc.close)
    return Bus(nc, state.identity("harness"), state.roster(), ServiceMetrics("harness", "harness"),
               log=structlog.get_logger())


@pytest.fixture
async def buses(state_dir: StateDir, nats_server: NatsServer) -> AsyncIterator[list[Bus]]:
    async with AsyncExitStack() as stack:
        yield [await harness_bus(state_dir, nats_server, stack) for _ in range(3)]


def entry(owner: str, sid: str = "s1") -> SessionOwnership:
    return SessionOwnership(session_id=sid, owner=owner, instance="i-" + owner, grant="g",
                            llm=LLMChoice(), executor_id="executor", access=ACCESS)


async def test_exactly_one_replica_takes_over_a_silent_owner_and_the_owner_learns_it_lost(
        buses: list[Bus]) -> None:
    log = structlog.get_logger()
    a, b, c = (SessionOwners(bus, name, "i-" + name, log, takeover_after_s=1.0)
               for bus, name in zip(buses, ("h1", "h2", "h3"), strict=True))
    for owners in (a, b, c):
        await owners.open()
    await a.claim(entry("h1"))
    with pytest.raises(Exception, match="wrong last sequence|key exists"):
        await b.claim(entry("h2"))  # a running session cannot be claimed twice
    # a value nobody signed sits in the bucket too: no replica ever acts on it
    await b.kv.put("forged", b"not a signed ownership")
    won: list[tuple[str, str]] = []

    def taker(name: str) -> Any:
        async def take(own: SessionOwnership, revision: int) -> None:
            won.append((name, own.session_id))
        return take

    watchers = [asyncio.create_task(o.watch(taker(n))) for o, n in ((b, "h2"), (c, "h3"))]

    async def beat(owners: SessionOwners) -> None:
        while True:
            await asyncio.sleep(0.3)
            await owners.renew(lambda sid: asyncio.sleep(0))

    try:
        for _ in range(4):  # the owner renews: nobody takes it
            await a.renew(lambda sid: asyncio.sleep(0))
            await asyncio.sleep(0.5)
        assert won == []
        async with asyncio.timeout(15):  # the owner goes silent
            while not won:
                await asyncio.sleep(0.1)
        winner = b if won[0][0] == "h2" else c
        beating = asyncio.create_task(beat(winner))
        await asyncio.sleep(2.5)  # longer than takeover_after_s: the winner's renewals keep it
        beating.cancel()
        assert won == [(won[0][0], "s1")]
        assert winner.owns("s1") and not (b if winner is c else c).owns("s1")
        lost: list[str] = []

        async def on_lost(sid: str) -> None:
            lost.append(sid)

        await a.renew(on_lost)  # the old owner wakes up: its compare-and-set fails
        assert lost == ["s1"] and not a.owns("s1")
        current = await b.kv.get("s1")
        assert current.value is not None and won[0][0].encode() in current.value
    finally:
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)


async def test_a_dead_harness_s_sessions_are_taken_over_side_by_side_and_a_nats_failure_is_retried(
        buses: list[Bus]) -> None:
    """One resume that hangs holds no other back; one that NATS fails is tried again, not dropped."""
    log = structlog.get_logger()
    dead = SessionOwners(buses[0], "h1", "i-h1", log)
    heir = SessionOwners(buses[1], "h2", "i-h2", log, takeover_after_s=0.5)
    for owners in (dead, heir):
        await owners.open()
    for sid in ("hangs", "fails-once", "plain"):
        await dead.claim(entry("h1", sid))
    calls: list[str] = []
    never = asyncio.Event()

    async def take(own: SessionOwnership, revision: int) -> None:
        calls.append(own.session_id)
        if own.session_id == "hangs":
            await never.wait()  # e.g. an executor that is gone too
        if own.session_id == "fails-once" and calls.count("fails-once") == 1:
            raise NatsTimeoutError  # NATS restarting under the journal read

    watcher = asyncio.create_task(heir.watch(take))
    try:
        async with asyncio.timeout(20):
            while "plain" not in calls or calls.count("fails-once") < 2:
                await asyncio.sleep(0.1)
        assert calls.count("hangs") == 1 and calls.count("fails-once") == 2
        assert heir.owns("plain") and heir.owns("fails-once") and heir.owns("hangs")
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


def e(n: int, kind: str, data: dict, agent: str | None = None) -> JournalEntry:  # type: ignore[type-arg]
    return JournalEntry(kind, data, n, float(n), agent)


def start() -> list[JournalEntry]:
    return [e(0, "meta", {}), e(1, "lifecycle", {"what": "started"}),
            e(2, "client_input", {"kind": "prompt", "text": "go"}), e(3, "lifecycle", {"what": "turn"}),
            e(4, "llm_request", {"from": 0, "messages": [{"role": "user", "content": "go"}]}, "main")]


def response(n: int, *calls: str) -> JournalEntry:
    return e(n, "llm_response", {"text": "t", "tool_calls": [
        {"id": c, "name": "Bash", "input": {"command": c}} for c in calls]}, "main")


def test_rebuild_a_session_that_died_while_a_tool_ran() -> None:
    entries = [*start(), response(5, "a", "b", "c"),
               e(6, "tool_exec", {"phase": "call", "id": "a"}, "main"),
               e(7, "tool_exec", {"phase": "result", "id": "a", "content": "A", "is_error": False}, "main"),
               e(8, "tool_exec", {"phase": "call", "id": "b"}, "main")]
    r = rebuild(entries)
    assert r.in_turn and not r.ended and r.next_n == 9 and r.responses == 1
    assert [m["role"] for m in r.messages] == ["user", "assistant", "tool", "tool"]
    assert r.messages[2]["content"] == "A" and r.messages[3]["content"] == UNKNOWN_RESULT
    assert [c.id for c in r.unknown] == ["b"] and [c.id for c in r.pending] == ["c"]
    assert r.queued == []


def test_rebuild_a_session_that_died_while_the_model_answered() -> None:
    entries = [*start(), response(5, "a"), e(6, "tool_exec", {"phase": "call", "id": "a"}, "main"),
               e(7, "tool_exec", {"phase": "result", "id": "a", "content": "A"}, "main"),
               e(8, "llm_request", {"from": 1, "messages": [
                   {"role": "assistant", "content": "t"}, {"role": "tool", "content": "A"}]}, "main")]
    r = rebuild(entries)
    assert r.in_turn and r.pending == [] and r.unknown == [] and r.responses == 1
    assert [m["role"] for m in r.messages] == ["user", "assistant", "tool"]


def test_rebuild_an_idle_session_keeps_the_prompts_not_yet_started() -> None:
    entries = [*start(), response(5), e(6, "event", {"kind": "turn_complete"}),
               e(7, "client_input", {"kind": "prompt", "text": "second"}),
               e(8, "client_input", {"kind": "prompt", "text": "third"})]
    r = rebuild(entries)
    assert not r.in_turn and r.queued == ["second", "third"] and r.pending == []


def test_rebuild_a_first_request_that_was_under_way_goes_on_from_the_turns_prompt() -> None:
    entries = [e(0, "meta", {}), e(1, "client_input", {"kind": "prompt", "text": "go"}),
               e(2, "lifecycle", {"what": "turn"}), e(3, "event", {"kind": "user_prompt"}),
               e(4, "client_input", {"kind": "prompt", "text": "later"})]
    r = rebuild(entries)
    assert r.in_turn and r.pending == [] and r.responses == 0
    assert r.messages == [{"role": "user", "content": "go"}] and r.queued == ["later"]


def test_rebuild_an_ended_session_says_so_and_skips_half_written_records() -> None:
    entries = [*start(), JournalEntry("llm_response", {"parts": 3, "parts_found": 1}, 5, 5.0, "main",
                                      incomplete=True), e(6, "lifecycle", {"what": "ended", "exit_code": 0})]
    r = rebuild(entries)
    assert r.ended and r.next_n == 7 and r.responses == 0
