"""Chaos: kill -9 the gateway, the harness, an executor, the egress and NATS under load.

One `silo up` stack for the module (real NATS, TLS WebSocket, bwrap
sandboxes, mock models, a test internet for the egress). Each targeted test
kills one part with SIGKILL in the middle of a tool call while three
reconnecting clients follow the session, lets the supervisor restart it, and
checks what a user would see: every client's event list gapless and the
same; the session resumed or ended with a clear error, as the design says
for that part; workspaces intact against the journal's completed writes;
the network never reached without the egress's check.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from devsilo.cli._client import GatewayError
from devsilo.executor._workspace_lock import RemoteWorkspaces, WorkspaceStore
from devsilo.harness._failover import UNKNOWN_RESULT, shown_uses, unshown_results
from devsilo.harness._journal import JournalEntry
from devsilo.protocol import ExecutorAnnounce, SessionEvent, subjects
from devsilo.protocol.client import CreateSession, ErrorFrame, EventFrame, SessionCreated
from devsilo.runtime import Bus
from devsilo.runtime._kvwatch import follow_kv
from devsilo.runtime._metrics import ServiceMetrics
from devsilo.runtime._natsconn import connect_nats
from devsilo.runtime._natsserver import NatsServer
from devsilo.runtime._pool import PoolView
from devsilo.runtime._state import StateDir
from devsilo.testing import Stack
from devsilo.testing._chaos import (
    TARGETS,
    LoadChaos,
    digest_tree,
    expected_files,
    export_journal,
    kill,
    live_pid,
    read_as_executor,
    wait_back,
)
from devsilo.testing._clients import connect, follow
from devsilo.testing._internet import ZONE, TestInternet
from devsilo.testing._load import LoadRun
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import KeyValueConfig, StorageType, StreamConfig
from nats.js.kv import KeyValue

WWW = f"www.{ZONE}"
OTHER = f"other.{ZONE}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def internet() -> AsyncIterator[TestInternet]:
    async with TestInternet() as inet:
        yield inet


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, internet: TestInternet) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("chaos") / "state", services={
        "harness": {"options": {"takeover_after_s": 2.0}},
        "egress": {"options": {"nameservers": [internet.dns_addr], "ca_bundles": [str(internet.ca_file)]}}})
    s.start()
    try:
        yield s
    finally:
        s.stop()


async def create(stack: Stack, ws: Path, script: dict[str, Any], allow_domains: tuple[str, ...] = ()) -> str:
    """Start a headless session through the gateway; its id."""
    async with asyncio.timeout(30):  # the gateway may be (re)starting: its listener comes last
        while True:
            try:
                client = await connect(stack, "creator")
                break
            except GatewayError:
                await asyncio.sleep(0.2)
    try:
        await client.send(CreateSession(workspace=str(ws), script=json.dumps(script), headless=True,
                                        prompt="go", allow_domains=allow_domains))
        async with asyncio.timeout(90):
            while True:
                frame = await client.receive()
                if isinstance(frame, SessionCreated):
                    return frame.session_id
                if isinstance(frame, ErrorFrame):
                    raise AssertionError(  # noqa: TRY004 - a test failure, not a type check
f"gateway error: {frame.code}: {frame.message}")
    finally:
        await client.close()


class Followers:
    """Three clients following one session through whatever happens."""

    def __init__(self, stack: Stack, sid: str) -> None:
        self.sid = sid
        self.lists: dict[str, list[EventFrame]] = {f"c{i}": [] for i in range(3)}
        self.cuts: list[str] = []
        self.tasks = [asyncio.create_task(follow(stack, n, sid, got, self.cuts)) for n, got in self.lists.items()]

    async def until(self, seen: Any, timeout: float = 60.0) -> None:
        """Wait until every client has an event for which ``seen(event)`` holds."""
        async with asyncio.timeout(timeout):
            while not all(any(seen(e) for e in got) for got in self.lists.values()):
                await asyncio.sleep(0.02)

    async def finish(self, timeout: float = 150.0) -> list[EventFrame]:
        """Wait for every client to see the end; the one list they all hold."""
        await asyncio.wait_for(asyncio.gather(*self.tasks), timeout)
        lists = list(self.lists.values())
        for got in lists:
            assert [e.seq for e in got] == list(range(len(got))), [e.seq for e in got]
            assert [e.model_dump() for e in got] == [e.model_dump() for e in lists[0]]
        return lists[0]


def bash(command: str) -> dict[str, Any]:
    return {"name": "Bash", "input": {"command": command}}


def results(events: list[EventFrame]) -> list[dict[str, Any]]:
    return [e.data for e in events if e.kind == "tool_result"]


def running(command: str) -> Any:
    return lambda e: e.kind == "tool_use" and e.data.get("input", {}).get("command") == command


# -- NATS ---------------------------------------------------------------------------------------

NATS_SCRIPT = {"responses": [
    {"text": "one", "tool_calls": [{"name": "Write", "input": {"path": "a.txt", "content": "alpha\n"}}]},
    {"text": "two", "tool_calls": [bash("echo ran >> runs.txt; sleep 0.3; echo slept")]},
    {"text": "three", "tool_calls": [{"name": "Write", "input": {"path": "b.txt", "content": "beta\n"}}]},
    {"text": "four", "tool_calls": [bash("cat a.txt b.txt")]},
    {"text": "done", "tool_calls": [{"name": "Exit", "input": {"message": "carried on"}}]},
]}


@pytest.mark.asyncio(loop_scope="module")
async def test_nats_killed_mid_tool_call_is_restarted_and_the_session_carries_on(
        stack: Stack, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    sid = await create(stack, ws, NATS_SCRIPT)
    followers = Followers(stack, sid)
    await followers.until(running("echo ran >> runs.txt; sleep 0.3; echo slept"))
    k = await kill(stack, "nats")
    await wait_back(stack, k)
    events = await followers.finish()
    assert k.new_pid != k.pid and live_pid(stack, "nats") == k.new_pid
    assert events[-1].kind == "shutdown" and events[-1].data["exit_code"] == 0, events[-1].data
    assert events[-1].data["reason"] == "carried on"
    got = results(events)
    assert [r["is_error"] for r in got] == [False] * 5, got
    assert got[1]["content"].startswith("slept")  # the call NATS died under was answered
    assert got[3]["content"].startswith("alpha\nbeta\n")
    assert (ws / "a.txt").read_text() == "alpha\n"
    # The harness asked for the result again after reconnecting, and the command ran once.
    assert stack.metric("harness", "silo_tool_calls_asked_again_total") >= 1
    assert (ws / "runs.txt").read_text() == "ran\n"


# -- an executor --------------------------------------------------------------------------------

def silo(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "devsilo.cli", "--state-dir", str(stack.state_dir), *args],
                          check=False, capture_output=True, text=True, timeout=120)


STARTED = "echo started > started.txt && echo started; sleep 60"
EXECUTOR_SCRIPT = {"responses": [
    {"text": "one", "tool_calls": [{"name": "Write", "input": {"path": "notes/one.txt", "content": "first\n"}}]},
    {"text": "two", "tool_calls": [{"name": "Write", "input": {"path": "src/main.py", "content": "print(2)\n"}},
                                   {"name": "Write", "input": {"path": "keep.txt", "content": "changed\n"}}]},
    {"text": "three", "tool_calls": [bash(STARTED)]},
    {"text": "never", "tool_calls": [{"name": "Write", "input": {"path": "never.txt", "content": "no\n"}}]},
    {"text": "done", "tool_calls": [{"name": "Exit", "input": {"message": "should not get here"}}]},
]}


@pytest.mark.asyncio(loop_scope="module")
async def test_executor_killed_mid_call_ends_its_session_with_an_error_and_the_locked_workspace_is_intact(
        stack: Stack, tmp_path: Path) -> None:
    ws = tmp_path / "locked-ws"
    ws.mkdir()
    (ws / "keep.txt").write_text("original\n")
    (ws / "untouched.bin").write_bytes(bytes(range(256)) * 8)
    before = digest_tree(ws)
    r = await asyncio.to_thread(silo, stack, "workspace", "lock", str(ws))
    assert r.returncode == 0, r.stderr
    sid = await create(stack, ws, EXECUTOR_SCRIPT)
    followers = Followers(stack, sid)
    # The command has run its first part (its output arrived): then its executor dies.
    await followers.until(lambda e: e.kind == "tool_output" and "started" in e.data.get("data", ""))
    k = await kill(stack, "executor")
    events = await followers.finish()  # well before the call's own 660 s timeout
    errors = [e.data["message"] for e in events if e.kind == "error"]
    assert len(errors) == 1 and "executor executor" in errors[0] and "cannot continue" in errors[0], errors
    assert events[-1].kind == "shutdown" and events[-1].data["exit_code"] == 1
    assert not any(e.kind == "tool_use" and e.data["input"].get("path") == "never.txt" for e in events)
    await wait_back(stack, k)
    # Still locked after the executor came back: the directory holds only the marker.
    status = await asyncio.to_thread(silo, stack, "workspace", "status", str(ws))
    assert status.returncode == 0 and "locked" in status.stdout, status.stdout + status.stderr
    assert sorted(p.name for p in ws.iterdir()) == [".devsilo-locked"]
    # Every write the journal holds as done is in the workspace byte for byte, nothing else changed.
    writes = await asyncio.to_thread(expected_files, await asyncio.to_thread(
        export_journal, stack, sid, tmp_path / "journal.jsonl"))
    assert sorted(writes) == ["keep.txt", "notes/one.txt", "src/main.py"]
    unlock = await asyncio.to_thread(silo, stack, "workspace", "unlock", str(ws), "--accept")
    assert unlock.returncode == 0, unlock.stdout + unlock.stderr
    after = digest_tree(ws)
    expected = {**before, "started.txt": hashlib.sha256(b"started\n").hexdigest(),
                **{p: hashlib.sha256(c.encode()).hexdigest() for p, c in writes.items()}}
    assert after == expected


# -- all five in turn, under load ---------------------------------------------------------------

@pytest.mark.asyncio(loop_scope="module")
async def test_kill_9_each_part_in_turn_under_load_every_client_stays_gapless(
        stack: Stack, tmp_path: Path) -> None:
    """Gateway, harness, executor, egress, NATS: each killed while sessions run tool calls."""
    run = LoadRun(stack, workdir=tmp_path / "load", users=2, sessions=4, clients_per_session=3,
                  duration=5.0, rounds=40, allow_tool_errors=True)
    chaos = LoadChaos(stack)
    report = await run.run(during=chaos)
    print(chaos.summary())
    print(report.format())
    assert [k.target for k in chaos.kills] == list(TARGETS)
    assert report.ok, "\n".join(report.problems())
    # Sessions on the killed executor ended with an error; the others resumed through the rest.
    failed = [s for s in run.sessions if s.expect_error and s.track.errors]
    assert failed, "no session was running on the executor when it was killed"
    assert all(s.track.exit_code == 1 for s in failed)
    # The only tool errors allowed: a call the killed harness had in flight ("result is unknown").
    for s in run.sessions:
        if not s.expect_error:
            assert all(UNKNOWN_RESULT in e for e in s.track.tool_errors), s.track.tool_errors
            assert not s.track.tool_errors or s.session_id in chaos.live_at["harness"]
    assert stack.metric("harness", "silo_session_takeovers_total") >= 1
    # Their uploaded workspaces stay locked on the restarted executor, every file the journal
    # holds as written (Write, then Edit, completed) there byte for byte.
    remote = RemoteWorkspaces(WorkspaceStore(stack.state_dir.parent / "workspaces-executor"), max_bytes=1)
    pid = live_pid(stack, "executor")
    assert pid is not None
    for s in failed:
        host = f"{s.user}-host"
        assert (remote.state(host, str(s.workspace)) or {}).get("phase") == "locked", s.session_id
        files = remote.store_dir(host, str(s.workspace)) / "files"
        expected = await asyncio.to_thread(expected_files, await asyncio.to_thread(
            export_journal, stack, s.session_id, tmp_path / f"{s.session_id}.jsonl"))
        assert expected, f"no completed write in {s.session_id}'s journal"
        for rel, content in expected.items():
            assert await asyncio.to_thread(read_as_executor, pid, files / rel) == content.encode(), rel


# -- the egress ---------------------------------------------------------------------------------

def curl_codes(n: int) -> str:
    """``n`` requests to WWW a quarter second apart, printing each HTTP status (000: no answer)."""
    return (f"for i in $(seq {n}); do curl -s -o /dev/null -w '%{{http_code}} ' --max-time 3 https://{WWW}/hello;"
            " sleep 0.25; done; echo")


PLAIN_AGAIN = (f"for i in $(seq 60); do curl -sf --max-time 3 http://{WWW}/hello && break; sleep 0.5; done")
"""Plain HTTP to WWW, tried until it works (the egress may still be restarting)."""

TLS_AGAIN = (f"for i in $(seq 60); do curl -sSf --max-time 3 https://{WWW}/hello 2>&1 && break; sleep 0.5; done")
"""HTTPS to WWW, verified against the sandbox's trust file, tried until it works; failures are printed."""


def blocked_probe(host: str) -> str:
    return f"curl -sS -v --max-time 10 https://{host}/hello 2>&1 | grep -i '^< x-devsilo-blocked'"


def direct_probe(internet: TestInternet) -> str:
    addr = internet.sites["www"].address
    return (f"python3 -c \"import socket; socket.create_connection(('{addr}', 443), timeout=3)\" 2>&1 "
            "| tail -1")


@pytest.mark.asyncio(loop_scope="module")
async def test_egress_killed_nothing_gets_out_unchecked_and_after_restart_old_and_new_sessions_go_through_it(
        stack: Stack, internet: TestInternet, tmp_path: Path) -> None:
    ws = tmp_path / "net-ws"
    ws.mkdir()
    loop_cmd = curl_codes(24)
    sid = await create(stack, ws, {"responses": [
        {"text": "ok?", "tool_calls": [bash(f"curl -sS --max-time 10 https://{WWW}/hello")]},
        {"text": "loop", "tool_calls": [bash(loop_cmd)]},
        {"text": "direct", "tool_calls": [bash(direct_probe(internet))]},
        {"text": "plain", "tool_calls": [bash(PLAIN_AGAIN)]},
        {"text": "tls", "tool_calls": [bash(TLS_AGAIN)]},
        {"text": "denied", "tool_calls": [bash(blocked_probe(OTHER))]},
        {"text": "done", "tool_calls": [{"name": "Exit", "input": {"message": "probed"}}]},
    ]}, allow_domains=(WWW,))
    followers = Followers(stack, sid)
    await followers.until(running(loop_cmd))
    hits_before = internet.hits[WWW]
    k = await kill(stack, "egress")
    await wait_back(stack, k)
    events = await followers.finish()
    out = [r["content"] for r in results(events)]
    assert out[0].startswith(f"hello from {WWW}")
    codes = out[1].split("[exit code")[0].split()
    assert len(codes) == 24 and set(codes) <= {"200", "502", "000"}, codes
    # While the session's egress was gone its requests failed, closed (after the restart the
    # loop's last ones may go through the new egress again)
    assert set(codes) - {"200"}, codes
    assert "Network is unreachable" in out[2]  # and the sandbox has no other way out
    # The session itself was opened again with the restarted egress: plain HTTP goes through
    # it, and so does HTTPS — the executor put the new egress's session CA in the running
    # sandbox's trust directory (the old CA's key died with the old egress) — and the policy
    # still holds.
    assert out[3].count(f"hello from {WWW}") == 1, out[3]
    assert out[4].count(f"hello from {WWW}") == 1, out[4]
    assert f"domain not allowed: {OTHER}" in out[5], out[5]
    # Every request that reached the host went through the egress: each 200 the loop saw, the
    # plain and the HTTPS request, and at most one more — the loop's request in flight through
    # the old egress when it was killed, which reached the host but whose answer died with the
    # egress (CI saw it).
    extra = internet.hits[WWW] - hits_before - (codes.count("200") + 2)
    assert extra in (0, 1), (extra, codes)
    # A session started after the restart goes through the new egress, under its policy.
    ws2 = tmp_path / "net-ws2"
    ws2.mkdir()
    sid2 = await create(stack, ws2, {"responses": [
        {"text": "ok?", "tool_calls": [bash(f"curl -sS --max-time 10 https://{WWW}/hello")]},
        {"text": "denied?", "tool_calls": [bash(blocked_probe(OTHER))]},
        {"text": "done", "tool_calls": [{"name": "Exit", "input": {"message": "probed"}}]},
    ]}, allow_domains=(WWW,))
    after = await Followers(stack, sid2).finish()
    out2 = [r["content"] for r in results(after)]
    assert out2[0].startswith(f"hello from {WWW}"), out2[0]
    assert f"domain not allowed: {OTHER}" in out2[1], out2[1]
    assert OTHER not in {name for name, _ in internet.queries}


def test_executors_are_not_counted_dead_for_the_silence_of_our_own_nats_outage() -> None:
    now = [100.0]
    pool = PoolView(clock=lambda: now[0])
    pool.update(ExecutorAnnounce(executor_id="e1", instance="i1", host="h", backends=("bwrap",), capacity=4,
                                 free=4))
    now[0] += 2.5  # our connection was away: no announcement reached us
    pool.grace(3.0)  # back: every executor gets time to be heard again
    now[0] += 3.0
    assert pool.expire() == [] and pool.alive("e1")
    now[0] += 3.5  # still silent well after we came back: gone
    assert pool.expire() == ["e1"]


async def test_a_jetstream_publish_across_a_nats_kill_and_restart_lands_exactly_once(
        state_dir: StateDir, nats_server: NatsServer) -> None:
    buses: list[Bus] = []

    def reconnected() -> None:
        for b in buses:
            b.reconnected()

    nc = await connect_nats(state_dir, "harness", nats_server.url, on_reconnected=reconnected)
    try:
        bus = Bus(nc, state_dir.identity("harness"), state_dir.roster(), ServiceMetrics("harness", "harness"))
        buses.append(bus)
        await bus.js.add_stream(StreamConfig(name=subjects.EVENTS_STREAM, subjects=[subjects.EVENTS_SUBJECTS],
                                             storage=StorageType.FILE, duplicate_window=120.0))
        event = SessionEvent(session_id="s1", seq=0, kind="busy", ts=1.0, data={"busy": True})
        os.killpg(nats_server.pid or 0, signal.SIGKILL)
        await nats_server.wait()
        # Each attempt's acknowledgement waits 1 s; the server is away for longer than that.
        publish = asyncio.create_task(bus.js_publish(subjects.session_events("s1"), event, sid="s1",
                                                     dedupe_id="s1:0", timeout=1.0))
        await asyncio.sleep(2.5)
        assert not publish.done()
        await nats_server.restart()  # same port, same JetStream store
        await asyncio.wait_for(publish, 30)
        await bus.wait_reconnected(0)
        assert bus.reconnects == 1
        assert bus.metrics.js_retries._value.get() >= 1
        info = await bus.js.stream_info(subjects.EVENTS_STREAM)
        assert info.state.messages == 1  # every attempt that landed was the same, kept once
    finally:
        await nc.close()


async def test_a_kv_bucket_is_followed_across_a_nats_kill_and_restart(
        state_dir: StateDir, nats_server: NatsServer) -> None:
    """A bare nats-py watch hears nothing after a server restart; follow_kv watches again."""
    buses: list[Bus] = []

    def reconnected() -> None:
        for b in buses:
            b.reconnected()

    nc = await connect_nats(state_dir, "harness", nats_server.url, on_reconnected=reconnected)
    try:
        bus = Bus(nc, state_dir.identity("harness"), state_dir.roster(), ServiceMetrics("harness", "harness"))
        buses.append(bus)
        kv = await bus.js.create_key_value(KeyValueConfig(bucket=subjects.SESSION_OWNERS, history=1,
                                                          storage=StorageType.FILE))
        seen: list[tuple[str, str]] = []
        current: list[set[str]] = []

        async def on_entry(entry: Any) -> None:
            seen.append((entry.key, entry.operation or "PUT"))

        bare = await kv.watchall()
        following = asyncio.create_task(follow_kv(kv, bus, on_entry, on_current=current.append, poll_s=0.2))
        await kv.put("a", b"1")
        await kv.put("gone", b"1")
        async with asyncio.timeout(10):
            while ("gone", "PUT") not in seen:
                await asyncio.sleep(0.05)
        os.killpg(nats_server.pid or 0, signal.SIGKILL)
        await nats_server.wait()
        await nats_server.restart()
        await bus.wait_reconnected(0)
        await kv.delete("gone")
        await kv.put("b", b"2")
        async with asyncio.timeout(20):
            while ("b", "PUT") not in seen:
                await asyncio.sleep(0.05)
        assert ("gone", "DEL") in seen
        assert len(current) >= 2 and "a" in current[1]  # watched again: the current values again
        bare_keys = []
        with contextlib.suppress(NatsTimeoutError):
            while True:
                entry = await bare.updates(timeout=1.0)
                if entry is not None:
                    bare_keys.append(entry.key)
        assert "b" not in bare_keys  # what follow_kv is for: the bare watch went deaf
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
    finally:
        await nc.close()


def test_a_result_journaled_as_its_harness_died_is_shown_by_the_harness_that_resumes() -> None:
    def result(call_id: str) -> JournalEntry:
        return JournalEntry("tool_exec", {"phase": "result", "id": call_id, "name": "Bash", "content": "ok",
                                          "is_error": False, "meta": {}}, agent="main")

    def shown(call_id: str, seq: int) -> JournalEntry:
        return JournalEntry("event", {"seq": seq, "kind": "tool_result", "ts": 1.0, "data": {"id": call_id}})

    entries = [result("c1"), shown("c1", 5), result("c2"),  # killed between journaling c2 and its event
               JournalEntry("tool_exec", {"phase": "result", "id": "c3"}, incomplete=True)]
    assert [e.data["id"] for e in unshown_results(entries)] == ["c2"]
    uses = [JournalEntry("event", {"seq": 4, "kind": "tool_use", "ts": 1.0, "data": {"id": "c1"}})]
    assert shown_uses(uses + entries) == {"c1"}  # c2's use would be emitted before its unknown result


async def test_a_kv_follower_stops_when_cancelled_as_an_update_arrives() -> None:
    """Cancelled in the same tick as an update lands, the follower must end: nats-py's
    ``updates(timeout)`` (``asyncio.wait_for`` in Python 3.11) returned the update instead and the
    loop went on, which once hung a harness's stop until it was killed."""

    class Watcher(KeyValue.KeyWatcher):  # nats-py's own watcher, without a subscription
        async def stop(self) -> None:
            self._updates.put_nowait(KeyValue.KeyWatcher.STOP_ITER)

    class Kv:
        def __init__(self) -> None:
            self.watcher = Watcher(None)

        async def watchall(self) -> Watcher:
            return self.watcher

    class Quiet:  # a bus that never reconnects
        reconnects = 0

    seen: list[str] = []

    async def on_entry(entry: Any) -> None:
        seen.append(entry.key)

    kv = Kv()
    following = asyncio.create_task(follow_kv(kv, Quiet(), on_entry, poll_s=30.0))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)  # waiting for an update
    kv.watcher._updates.put_nowait(KeyValue.Entry(bucket="b", key="k", value=b"1", revision=1, delta=0,
                                                 created=None, operation=None))
    following.cancel()
    done, _ = await asyncio.wait({following}, timeout=2.0)
    assert done == {following} and following.cancelled(), "the follower went on after its cancellation"
    assert seen == []
