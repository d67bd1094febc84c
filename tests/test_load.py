"""Load: 5 users, 20 concurrent sessions doing real work in bwrap sandboxes, 3 clients each.

The CI run of the driver `bench/load.py` runs for 10 minutes (devsilo.testing._load): one
`silo up`, ~35 s of load, then every client's record is checked. The checker itself is tested
first, on records with a gap, a duplicate, a divergence, an unanswered call and a stall, so
the load test cannot pass by checking nothing.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from devsilo.cli._client import ClientKeyPair, GatewayClient, GatewayError
from devsilo.cli._workspace_transfer import RemoteWorkspace
from devsilo.protocol.client import (
    CreateSession,
    PairingCode,
    PairingCodeRequest,
    SessionCreated,
    Shutdown,
)
from devsilo.runtime._state import StateDir
from devsilo.testing import Stack
from devsilo.testing._load import (
    ClientLog,
    LoadReport,
    LoadRun,
    SessionTrack,
    event_digest,
    percentile,
    round_script,
    stack_services,
    verify_session,
    verify_workspace,
)

USERS, SESSIONS, CLIENTS = 5, 20, 3
LOAD_S = 20.0
ROUNDS = 5
"""Turns per session: short, so sessions also end and start again under load."""
STALL_S = 30.0


# -- the checker, on records made by hand ----------------------------------------------------------------


def event(seq: int, kind: str, ts: float, **data: object) -> dict[str, object]:
    return {"type": "event", "session_id": "s1", "seq": seq, "kind": kind, "agent": "main", "ts": ts,
            "data": data}


def good_session() -> list[dict[str, object]]:
    return [event(0, "session_started", 0.0), event(1, "user_prompt", 1.0, text="round 0"),
            event(2, "busy", 1.1, busy=True), event(3, "tool_use", 1.2, id="c1", name="Bash"),
            event(4, "tool_result", 1.5, id="c1", name="Bash", content="ok", is_error=False),
            event(5, "busy", 1.6, busy=False), event(6, "turn_complete", 1.6),
            event(7, "shutdown", 2.0, exit_code=0)]


def recorded(events: list[dict[str, object]], clients: int = 3) -> tuple[list[ClientLog], SessionTrack]:
    """What ``clients`` clients that each received ``events`` would hold."""
    logs, track = [], SessionTrack()
    for c in range(clients):
        log = ClientLog(f"client{c}")
        for ev in events:
            log.add(int(ev["seq"]), event_digest(ev))  # type: ignore[call-overload]
            track.offer(ev)
            log.ended = log.ended or ev["kind"] == "shutdown"
        logs.append(log)
    return logs, track


def check(logs: list[ClientLog], track: SessionTrack, **kw: bool) -> list[str]:
    return verify_session(logs, track, stall_s=STALL_S, **kw)


def test_the_checker_passes_complete_identical_streams_and_measures_tool_latency() -> None:
    logs, track = recorded(good_session())
    assert check(logs, track) == []
    assert track.latencies == [pytest.approx(0.3)] and track.turns == 1 and track.next_seq == 8


def test_the_checker_finds_an_event_one_client_missed() -> None:
    logs, track = recorded(good_session())
    gapped = ClientLog("client1")
    for ev in good_session():
        if ev["seq"] != 4:
            gapped.add(int(ev["seq"]), event_digest(ev))  # type: ignore[call-overload]
    gapped.ended = True
    logs[1] = gapped
    problems = check(logs, track)
    assert "client1: 1 event(s) missing, first seq 4" in problems
    assert any("client1: event list differs from client0's from position 4" in p for p in problems)


def test_the_checker_finds_a_duplicated_event() -> None:
    events = good_session()
    logs, track = recorded(events)
    logs[2].add(3, event_digest(events[3]))
    assert "client2: 1 duplicate event(s)" in check(logs, track)


def test_the_checker_finds_events_out_of_order() -> None:
    events = good_session()
    events[3], events[4] = events[4], events[3]
    logs, _ = recorded(events)
    _, track = recorded(good_session())
    assert "client0: events out of order" in check(logs, track)


def test_the_checker_finds_clients_that_saw_different_events() -> None:
    logs, track = recorded(good_session())
    other = good_session()
    other[4] = event(4, "tool_result", 1.5, id="c1", name="Bash", content="not ok", is_error=False)
    logs[2] = recorded(other, clients=1)[0][0]
    logs[2].name = "client2"
    assert check(logs, track) == ["client2: event list differs from client0's from position 4"]


def test_the_checker_finds_a_stream_that_ends_before_shutdown() -> None:
    logs, track = recorded(good_session()[:-1])
    problems = check(logs, track)
    assert "client0: never received the session's shutdown event" in problems


def test_the_checker_finds_an_unanswered_tool_call_and_a_result_without_a_call() -> None:
    events = [e for e in good_session() if e["kind"] != "tool_result"]
    events.insert(3, event(3, "tool_result", 1.1, id="c0", name="Bash", content="", is_error=False))
    for seq, ev in enumerate(events):
        ev["seq"] = seq
    logs, track = recorded(events)
    problems = check(logs, track)
    assert "1 tool call(s) never answered: ['c1']" in problems
    assert "1 tool_result(s) without a tool_use" in problems


def test_the_checker_finds_a_stall_while_busy_but_not_while_idle() -> None:
    events = good_session()
    for ev in events[4:]:
        ev["ts"] = float(ev["ts"]) + STALL_S + 5  # type: ignore[arg-type]
    logs, track = recorded(events)
    assert check(logs, track) == [f"stalled: {STALL_S + 5 + 0.3:.1f} s without an event while busy"]
    idle = good_session()
    idle[-1]["ts"] = 1000.0  # a long wait for the next prompt is not a stall
    logs, track = recorded(idle)
    assert check(logs, track) == []


def test_the_checker_finds_a_session_still_busy_at_the_end() -> None:
    logs, track = recorded(good_session()[:4])
    assert "stalled: still busy when the run ended" in check(logs, track)


def test_an_error_counts_unless_the_session_was_expected_to_fail() -> None:
    events = good_session()[:-1] + [event(7, "error", 1.9, message="executor e1 stopped responding"),
                                    event(8, "shutdown", 2.0, exit_code=1)]
    logs, track = recorded(events)
    assert check(logs, track) == ["error event: executor e1 stopped responding", "ended with exit code 1"]
    assert check(logs, track, expect_error=True) == []


def test_a_failed_tool_call_counts_unless_allowed() -> None:
    events = good_session()
    events[4]["data"] = {"id": "c1", "name": "Bash", "content": "tool failed: no sandbox", "is_error": True}
    logs, track = recorded(events)
    assert check(logs, track) == ["1 tool call(s) failed, first: Bash: tool failed: no sandbox"]
    assert check(logs, track, allow_tool_errors=True) == []


def test_the_session_track_takes_each_seq_once_in_order() -> None:
    track = SessionTrack()
    events = good_session()
    for ev in [events[0], events[2], events[1], events[1], events[2]]:
        track.offer(ev)
    assert track.next_seq == 3 and track.prompts == ["round 0"] and track.busy


def test_the_workspace_check_follows_the_log_across_sessions() -> None:
    assert verify_workspace([[1, 2, 3], [4, 5], [], [6]]) == [None, None, None, None]
    assert verify_workspace([[1, 2, 3], [3, 4]]) == [None, "workspace log had [3, 4] lines where [4, 5] were expected"]
    assert verify_workspace([[1, 3]])[0] is not None  # a turn's line was lost
    assert verify_workspace([[2]])[0] is not None  # the workspace did not start empty


def test_bash_results_report_the_workspace_log_length() -> None:
    track = SessionTrack()
    track.offer(event(0, "tool_use", 0.0, id="c1", name="Bash"))
    track.offer(event(1, "tool_result", 0.1, id="c1", name="Bash", content="abc  log.txt\nlines=7\n2\n",
                      is_error=False))
    assert track.log_lines == [7]


def test_percentile_is_nearest_rank() -> None:
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 0.5) == 3.0
    assert percentile([float(x) for x in range(1, 101)], 0.99) == 99.0
    assert percentile([], 0.5) != percentile([], 0.5)  # NaN


def test_the_script_makes_every_turn_run_bash_write_and_edit() -> None:
    script = round_script(3)
    assert len(script["responses"]) == 6 and len(json.dumps(script)) < 512 * 1024
    calls = [[c["name"] for c in r.get("tool_calls", [])] for r in script["responses"]]
    assert calls == [["Bash", "Write", "Edit"], [], ["Bash", "Write", "Edit"], [], ["Bash", "Write", "Edit"], []]


# -- the load run ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One stack with executor room for the load's sessions."""
    s = Stack(tmp_path_factory.mktemp("load") / "state", services=stack_services(SESSIONS, USERS))
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def report(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> LoadReport:
    run = LoadRun(stack, workdir=tmp_path_factory.mktemp("load-work"), users=USERS, sessions=SESSIONS,
                  clients_per_session=CLIENTS, duration=LOAD_S, rounds=ROUNDS, stall_s=STALL_S)
    return asyncio.run(run.run())


def test_every_client_of_every_session_got_every_event_once_and_the_same_as_the_others(
        report: LoadReport) -> None:
    assert report.ok, "\n".join(report.problems()[:40])
    assert report.retries == [], report.retries[:5]
    for s in report.sessions:
        assert s.events > 0 and s.exit_code == 0, s


def test_the_load_ran_every_session_with_its_users_clients_and_tool_calls(report: LoadReport) -> None:
    assert len({s.slot for s in report.sessions}) == SESSIONS
    assert len({s.user for s in report.sessions}) == USERS
    # sessions ended and new ones started on their slots' workspaces during the load
    assert len(report.sessions) > SESSIONS
    for s in report.sessions:
        assert s.tool_calls == 3 * s.turns, s  # Bash, Write and Edit each turn, each answered
    assert report.tool_calls == sum(s.tool_calls for s in report.sessions) > 0
    assert report.latency_p50 <= report.latency_p99


def test_memory_stays_within_a_generous_bound_after_warm_up(report: LoadReport) -> None:
    for name in ("gateway", "harness", "executor", "egress", "nats"):
        use = report.services[name]
        assert use.rss_warm > 0 and use.restarts == 0, use.name
        assert use.rss_end < use.rss_warm + 256 * 2**20, report.format()


def test_the_report_names_every_figure(report: LoadReport) -> None:
    text = report.format()
    for needle in ("concurrent sessions 20", "attach batch 1, 100, 100", "tool calls", "/s)", "p50", "p99", "gateway", "harness",
                   "executor", "egress", "nats", "sandboxes", "checks:", "OK"):
        assert needle in text, text


# -- found under load with faults --------------------------------------------------------------------------


async def create_on_a_restarted_gateway(stack: Stack, tmp_path: Path) -> object:
    """A user's session on an uploaded workspace, asked of a gateway that has heard no executor yet."""
    state = StateDir(stack.state_dir)
    url, fp = f"wss://127.0.0.1:{stack.gateway_port}/ws", state.gateway_fingerprint()
    async with GatewayClient(url, fp, client_name="op") as op:
        await op.connect(state.client_token())
        await op.send(PairingCodeRequest(user="late", client_name="late-laptop"))
        code = await asyncio.wait_for(op.receive(), 30)
    assert isinstance(code, PairingCode), code
    key = ClientKeyPair.generate()
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "a.txt").write_text("a\n")
    async with GatewayClient(url, fp, client_name="late-laptop") as c:
        paired = await c.pair(code.code, key)
        assert await RemoteWorkspace(c, tmp_path / "transfers", ws, "late-host", io.StringIO()).lock(None) == 0
    executor, gateway = stack.live_pid("executor"), stack.live_pid("gateway")
    assert executor is not None and gateway is not None
    os.kill(executor, signal.SIGSTOP)  # no announcement reaches the new gateway until SIGCONT
    try:
        os.kill(gateway, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            client = GatewayClient(url, fp, client_name="late-laptop")
            try:
                await client.connect_key(paired.key_id, key)
                break
            except (GatewayError, OSError):
                await client.close()
                assert time.monotonic() < deadline, "the gateway did not come back"
                await asyncio.sleep(0.1)
        await client.send(CreateSession(workspace=str(ws), workspace_host="late-host",
                                        script=json.dumps({"responses": [{"text": "hi"}]})))
        await asyncio.sleep(0.5)  # the request is in while the gateway knows no executor
    finally:
        os.kill(executor, signal.SIGCONT)
    try:
        reply = await asyncio.wait_for(client.receive(), 90)
        if isinstance(reply, SessionCreated):
            await client.send(Shutdown(session_id=reply.session_id))
        return reply
    finally:
        await client.close()


def test_a_restarted_gateway_waits_for_the_executors_before_refusing_an_uploaded_workspace(
        stack: Stack, tmp_path: Path) -> None:
    reply = asyncio.run(create_on_a_restarted_gateway(stack, tmp_path))
    assert isinstance(reply, SessionCreated), reply  # not "only an operator works on the executors' own files"
