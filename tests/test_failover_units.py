"""Session ownership against a real NATS (exactly one replica takes a silent owner's session),
and the rebuild of a session from journal entries of every shape a crash can leave."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import pytest
import structlog
from devsilo.harness._failover import UNKNOWN_RESULT, SessionOwners, rebuild
from devsilo.harness._journal import JournalEntry
from devsilo.harness._model import ScriptedModel
from devsilo.harness._session import SessionRunner
from devsilo.protocol import (
    AccessReport,
    LLMChoice,
    SessionEvent,
    SessionGrant,
    SessionOwnership,
    SiloError,
)
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


def spawned(n: int, child: str, parent: str = "main", prompt: object = "p", sender: str | None = None,
            name: str = "n") -> JournalEntry:
    return e(n, "event", {"kind": "agent_spawned", "data": {"id": child, "name": name, "parent": parent,
                                                            "prompt": prompt}}, sender or parent)


def called(n: int, call_id: str, name: str, agent: str = "main") -> JournalEntry:
    return e(n, "tool_exec", {"phase": "call", "id": call_id, "name": name}, agent)


def result(n: int, call_id: str, name: str, child: str, agent: str = "main") -> JournalEntry:
    """The result of an ``Agent`` call that started ``child``."""
    meta = {"agent": child}
    content = f"started subagent {child}"
    return e(n, "tool_exec", {"phase": "result", "id": call_id, "name": name, "content": content,
                              "is_error": False, "meta": meta}, agent)


def responded(n: int, agent: str, *calls: tuple[str, str, dict[str, Any]], text: str = "t") -> JournalEntry:
    return e(n, "llm_response", {"text": text, "tool_calls": [
        {"id": c, "name": name, "input": args} for c, name, args in calls]}, agent)


def broken_journal() -> list[JournalEntry]:
    """Main started a1 (first model request under way), a2 (answered, not yet collected), a5 (its
    start missing) and a6 (a malformed request), and waits for a5; records forged or malformed
    for a7, a8 and ``zz`` sit in between."""
    return [
        *start(),
        responded(5, "main", ("c1", "Agent", {"name": "one", "prompt": "p1"}),
                  ("c2", "Agent", {"name": "two", "prompt": "p2"}), ("c5", "Agent", {"name": "five", "prompt": "p5"}),
                  ("c6", "Agent", {"name": "six", "prompt": "p6"}), ("c3", "AwaitAgent", {"agent": "a5"})),
        called(6, "c1", "Agent"), spawned(7, "a1", prompt="p1", name="one"), result(8, "c1", "Agent", "a1"),
        called(9, "c2", "Agent"), spawned(10, "a2", prompt="p2", name="two"), result(11, "c2", "Agent", "a2"),
        responded(12, "a2", text="two's answer"),
        e(13, "event", {"kind": "agent_completed", "data": {"id": "a2", "status": "done", "text": "two's answer"}},
          "a2"),
        called(14, "c5", "Agent"), result(15, "c5", "Agent", "a5"),  # a5's start never journaled
        called(16, "c6", "Agent"), spawned(17, "a6", name="six"), result(18, "c6", "Agent", "a6"),
        e(19, "llm_request", {"from": 99, "messages": "not a list"}, "a6"),
        spawned(20, "a7", parent="a9"),  # a parent that is no agent of this session
        spawned(21, "a8", prompt=5),  # malformed content
        spawned(22, "zz"),  # not an id the harness makes
        spawned(23, "a1"),  # a second start for a1
        e(24, "event", {"kind": "agent_completed", "data": {"id": "a4", "status": "done", "text": "?"}}, "a4"),
        called(25, "c3", "AwaitAgent"),
    ]


def test_rebuild_resumes_a_running_subagent_keeps_an_ended_one_and_fails_forged_ones_with_a_reason() -> None:
    r = rebuild(broken_journal())
    assert r.in_turn and r.pending == [] and r.unknown == []
    assert r.main.again is not None and r.main.again.id == "c3"  # AwaitAgent cut short: asked again
    assert list(r.agents) == ["a1", "a2", "a5", "a6", "a7", "a8"]
    a1, a2, a5, a6, a7, a8 = r.agents.values()
    assert a1.status is None and a1.parent == "main" and a1.error is None
    assert [m["role"] for m in a1.messages] == ["system", "user"] and a1.messages[1]["content"] == "p1"
    assert "subagent a1 (one), started by agent main" in a1.messages[0]["content"]
    assert (a2.status, a2.text, a2.reported, a2.collected, a2.finished) == ("done", "two's answer", True, False, 1)
    assert a5.status == "failed" and "agent_spawned) is not in the journal" in a5.text
    assert a6.status == "failed" and "model request (journal record 19) is malformed" in a6.text
    assert a7.status == "failed" and "parent 'a9' is not an agent of this session" in a7.text and a7.parent is None
    assert a8.status == "failed" and "agent_spawned event is malformed" in a8.text
    assert all(a.text.startswith("it could not be resumed after its harness restarted: ")
               for a in (a5, a6, a7, a8))
    assert r.last_agent == 9 and r.finished_count == 5  # a9 signed a record: no new agent gets its id
    assert len(r.problems) == 3 and "malformed id 'zz'" in r.problems[0]
    assert "second agent_spawned event for a1" in r.problems[1] and "unknown or ended" in r.problems[2]


def test_rebuild_of_subagents_cut_short_between_their_records() -> None:
    """An ``Agent`` call killed after its subagent was spawned gets its real result; a subagent that
    answered just before the crash ends ``done``; one mid-call gets an unknown result; one whose
    parent had ended is cancelled; an AwaitAgent of a subagent that is not resumed is unknown."""
    entries = [
        *start(), responded(5, "main", ("c1", "Agent", {"name": "one", "prompt": "p"}),
                            ("c2", "Agent", {"name": "two", "prompt": "p"})),
        called(6, "c1", "Agent"), spawned(7, "a1", name="one"),  # killed before c1's result
        e(8, "llm_request", {"from": 0, "messages": [{"role": "user", "content": "p"}]}, "a1"),
        responded(9, "a1", ("b1", "Bash", {"command": "sleep 9"}), ("b2", "Bash", {"command": "ls"})),
        called(10, "b1", "Bash", "a1"),
        responded(11, "a1", ("g1", "Agent", {"name": "g", "prompt": "p"})),
    ]
    r = rebuild(entries)
    a1 = r.agents["a1"]
    assert [c.id for c, _, _ in r.main.recovered] == ["c1"] and r.main.recovered[0][2] == {"agent": "a1"}
    assert r.main.recovered[0][1].startswith("started subagent a1 (one)") and [c.id for c in r.pending] == ["c2"]
    # a1's last response (n=11) came after its request; the earlier Bash is of an older response
    assert a1.status is None and [c.id for c in a1.pending] == ["g1"]
    r = rebuild([*entries[:-1], e(11, "tool_exec", {"phase": "call", "id": "b2", "name": "Bash"}, "a1")])
    assert [c.id for c in r.agents["a1"].unknown] == ["b1", "b2"]  # b1 never got a result either
    answered = rebuild([*entries[:-2], responded(10, "a1", text="my answer")])
    assert (answered.agents["a1"].status, answered.agents["a1"].text) == ("done", "my answer")
    ended = rebuild([*entries, called(12, "g1", "Agent", "a1"), spawned(13, "a2", parent="a1"),
                     e(14, "event", {"kind": "agent_completed", "data": {"id": "a1", "status": "failed",
                                                                          "text": "boom"}}, "a1"),
                     called(15, "c9", "AwaitAgent")])
    assert ended.agents["a2"].status == "cancelled" and ended.agents["a2"].finished == 2
    assert ended.agents["a1"].recovered == [] and ended.agents["a1"].text == "boom"  # ended: only held
    idle = rebuild([*entries, e(12, "event", {"kind": "turn_complete"})])
    assert idle.agents["a1"].status == "cancelled" and not idle.in_turn


class Sink:
    """What a SessionRunner uses of a bus without a sandbox: event publishes (kept) and requests
    (refused, as with no executor)."""

    def __init__(self) -> None:
        self.events: list[SessionEvent] = []

    async def js_publish(self, subject: str, body: SessionEvent, *, sid: str | None, dedupe_id: str) -> None:
        assert dedupe_id == f"{sid}:{body.seq}"
        self.events.append(body)

    async def request(self, subject: str, body: object, reply: type, **_: object) -> object:
        raise SiloError(f"no_responders: nobody listens on {subject}")


async def test_a_resumed_session_collects_resumed_and_ended_subagents_and_gets_errors_for_broken_ones() -> None:
    state = rebuild(broken_journal())
    sink = Sink()
    grant = SessionGrant(grant_id="g1", session_id="s1", user="u", workspace="/w", issued_at=0.0, expires_at=1.0)
    model = ScriptedModel(json.dumps({"responses": [
        {"agent": "main", "text": "before"}, {"agent": "a2", "text": "two's answer"},  # used before the crash
        {"agent": "a1", "text": "one's answer"},
        {"agent": "main", "tool_calls": [{"name": "AwaitAgent", "input": {"agent": "a1"}},
                                         {"name": "AwaitAgent", "input": {"agent": "a2"}},
                                         {"name": "AwaitAgent", "input": {"agent": "a8"}},
                                         {"name": "Agent", "input": {"name": "new", "prompt": "q"}},
                                         {"name": "AwaitAgent", "input": {"agent": "a10"}},
                                         {"name": "AwaitAgent", "input": {}}]},
        {"agent": "a10", "text": "ten"},
        {"agent": "main", "text": "finished"}]}))
    model.resume_after(state.response_agents)
    runner = SessionRunner(sink, grant, "e1", AccessReport(backend="mock", workspace="/w"), model,  # type: ignore[arg-type]
                           headless=False, log=structlog.get_logger(), next_seq=40)
    await runner.restore(state, shown={"c1", "c2", "c5", "c6", "c3"})
    run = asyncio.create_task(runner.resume(state))
    try:
        async with asyncio.timeout(20):
            while not any(ev.kind == "turn_complete" for ev in sink.events):
                await asyncio.sleep(0.01)
    finally:
        await runner.stop("test over")
        await asyncio.wait_for(run, 10)
    assert [ev.seq for ev in sink.events] == list(range(40, 40 + len(sink.events)))
    ended = {ev.data["id"]: ev.data for ev in sink.events if ev.kind == "agent_completed"}
    assert {k: v["status"] for k, v in ended.items()} == {
        "a5": "failed", "a6": "failed", "a7": "failed", "a8": "failed", "a1": "done", "a10": "done"}
    # the AwaitAgent cut short is asked again (no second tool_use) and gets a clear error, no hang
    assert not any(ev.kind == "tool_use" and ev.data["id"] == "c3" for ev in sink.events)
    results = [ev.data for ev in sink.events if ev.kind == "tool_result" and ev.agent == "main"]
    assert results[0]["id"] == "c3" and results[0]["is_error"]
    assert results[0]["content"] == ("subagent a5 (?) failed: it could not be resumed after its harness restarted: "
                                     "its start (agent_spawned) is not in the journal")
    assert [x["content"] for x in results[1:3]] == ["one's answer", "two's answer"]
    assert results[3]["is_error"] and "a8 (n) failed: it could not be resumed" in results[3]["content"]
    counted = {o: runner.metrics.resumed.labels(outcome=o)._value.get() for o in ("resumed", "held", "not_resumable")}
    assert counted == {"resumed": 1, "held": 1, "not_resumable": 4}
    assert results[4]["meta"] == {"agent": "a10"}  # ids count on: none is used again
    assert results[5]["content"] == "ten"
    # without an id: the one left uncollected that ended first (a7 has no parent here to collect it)
    assert results[6]["meta"] == {"agent": "a6", "status": "failed"} and len(results) == 7


def test_rebuild_keeps_the_depth_cap_for_subagents_the_journal_names() -> None:
    chain = [spawned(5, "a1"), spawned(6, "a2", parent="a1"), spawned(7, "a3", parent="a2"),
             spawned(8, "a4", parent="a3"), spawned(9, "a5", parent="a1", sender="main")]
    r = rebuild([*start(), *chain])
    assert [a.error for a in r.agents.values()][:3] == [None, None, None]
    assert r.agents["a4"].status == "failed" and "nest 4 deep (at most 3)" in r.agents["a4"].text
    assert "names parent 'a1' but came from 'main'" in r.agents["a5"].text and r.agents["a5"].parent is None
