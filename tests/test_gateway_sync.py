"""Clients in sync through the gateway: restart, catch-up, slow clients, limits, uploads, cost.

One `silo up` stack for the module (real NATS, TLS WebSocket, bwrap
sandboxes, mock model). Clients are real WebSocket clients pinned to the
gateway's certificate.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from devsilo.cli._client import GatewayClient, GatewayError
from devsilo.protocol.client import (
    AccessReportFrame,
    AccessReportRequest,
    Attach,
    CostFrame,
    CostRequest,
    CreateSession,
    ErrorFrame,
    EventFrame,
    EventsFrame,
    ListSessions,
    Overloaded,
    Ping,
    Pong,
    Prompt,
    RequestEvents,
    SessionCreated,
    Sessions,
    Shutdown,
    UploadChunk,
    UploadDone,
    UploadFile,
    UploadProgress,
    UploadReady,
)
from devsilo.runtime._state import StateDir
from devsilo.testing import Stack
from devsilo.testing._clients import connect, follow, gateway_url
from devsilo.testing._events import ScriptedSession

UPLOAD_MAX = 1024 * 1024
MAX_PER_USER = 8
MAX_CLIENTS = MAX_PER_USER + 2
CLIENT_RATE = 40
KEEP_SESSIONS = 2
RING_CHARS = 8192


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One stack with small gateway limits, so the tests reach them quickly."""
    s = Stack(tmp_path_factory.mktemp("gwsync") / "state", services={"gateway": {"options": {
        "upload_max_bytes": UPLOAD_MAX, "max_clients_per_user": MAX_PER_USER, "client_rate": CLIENT_RATE,
        "max_clients": MAX_CLIENTS,
        "client_queue": 64, "event_ring": 128, "event_ring_bytes": RING_CHARS,
        "keep_sessions": KEEP_SESSIONS}}})
    s.start()
    try:
        yield s
    finally:
        s.stop()


async def next_frame(client: GatewayClient, kind: type[Any], timeout: float = 30.0) -> Any:
    """The next frame of type ``kind``; other frames (events of attached sessions) are skipped."""
    async def wait() -> Any:
        while True:
            frame = await client.receive()
            if isinstance(frame, kind):
                return frame
            if isinstance(frame, ErrorFrame) and kind is not ErrorFrame:
                raise AssertionError(f"gateway error: {frame.code}: {frame.message}")
    return await asyncio.wait_for(wait(), timeout)


async def events_until(client: GatewayClient, sid: str, stop: Any, out: list[EventFrame],
                       timeout: float = 60.0) -> list[EventFrame]:
    """Collect ``sid``'s events into ``out`` until ``stop(event)``."""
    async def wait() -> list[EventFrame]:
        while True:
            frame = await client.receive()
            if isinstance(frame, EventFrame) and frame.session_id == sid:
                out.append(frame)
                if stop(frame):
                    return out
    return await asyncio.wait_for(wait(), timeout)


def assert_gapless(events: list[EventFrame]) -> None:
    assert [e.seq for e in events] == list(range(len(events)))


def write_script(tmp_path: Path, script: dict[str, Any]) -> str:
    return json.dumps(script)


# -- a gateway restart in the middle of a streamed turn -------------------------------------

RESTART_SCRIPT = {"responses": [
    {"text": "first step", "tool_calls": [{"name": "Bash", "input": {"command": "sleep 3; echo one"}}]},
    {"text": "second step", "tool_calls": [{"name": "Bash", "input": {"command": "sleep 1; echo two"}}]},
    {"text": "done", "tool_calls": [{"name": "Exit", "input": {"message": "finished"}}]},
]}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def restarted(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A session three clients follow while the gateway is killed mid-turn and comes back."""
    ws = tmp_path_factory.mktemp("restart-ws")
    creator = await connect(stack, "creator")
    try:
        # One waits for a prompt through the restart (to be stopped afterwards); one runs a turn.
        await creator.send(CreateSession(workspace=str(ws), script=json.dumps(IDLE_SCRIPT)))
        waiting = (await next_frame(creator, SessionCreated, timeout=90)).session_id
        await creator.send(CreateSession(workspace=str(ws), script=json.dumps(RESTART_SCRIPT), headless=True,
                                         prompt="go"))
        sid = (await next_frame(creator, SessionCreated, timeout=90)).session_id
    finally:
        await creator.close()
    lists: dict[str, list[EventFrame]] = {f"c{i}": [] for i in range(3)}
    reconnects: list[str] = []
    followers = [asyncio.create_task(follow(stack, n, sid, lists[n], reconnects, timeout=90)) for n in lists]
    # Kill the gateway while the first Bash (sleep 3) runs: every client has seen its tool_use.
    deadline = time.monotonic() + 60
    while not all(any(e.kind == "tool_use" for e in got) for got in lists.values()):
        assert time.monotonic() < deadline, "clients never saw the first tool call"
        await asyncio.sleep(0.05)
    old_pid = stack.live_pid("gateway")
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)
    killed_at = time.time()
    await asyncio.wait_for(asyncio.gather(*followers), 120)
    return {"sid": sid, "lists": lists, "reconnects": reconnects, "killed_at": killed_at, "old_pid": old_pid,
            "waiting": waiting}


@pytest.mark.asyncio(loop_scope="module")
async def test_gateway_restart_mid_turn_every_client_ends_with_identical_gapless_events(
        stack: Stack, restarted: dict[str, Any]) -> None:
    lists = list(restarted["lists"].values())
    assert sorted(restarted["reconnects"]) == ["c0", "c1", "c2"]  # each was cut off once
    assert stack.live_pid("gateway") not in (None, restarted["old_pid"])
    for got in lists:
        assert_gapless(got)
        assert [e.model_dump() for e in got] == [e.model_dump() for e in lists[0]]
    kinds = [e.kind for e in lists[0]]
    assert kinds[0] == "session_started" and kinds[-1] == "shutdown"
    assert lists[0][-1].data["exit_code"] == 0
    # The restart fell inside the turn: events were written both before and after it.
    assert lists[0][0].ts < restarted["killed_at"] < lists[0][-1].ts


@pytest.mark.asyncio(loop_scope="module")
async def test_sessions_are_listed_and_served_by_the_restarted_gateway(
        stack: Stack, restarted: dict[str, Any]) -> None:
    sid = restarted["sid"]
    events = restarted["lists"]["c0"]
    client = await connect(stack, "after-restart")
    try:
        await client.send(ListSessions())
        listed = {s.session_id: s for s in (await next_frame(client, Sessions)).sessions}
        assert listed[sid].state == "ended" and listed[sid].next_seq == len(events)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "devsilo.cli", "--state-dir", str(stack.state_dir), "sessions", "list",
            stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert any(line.startswith(sid) and line.endswith("  ended") for line in out.decode().splitlines()), out
        # request_events: bounded batches, in order, the same events as the live clients saw.
        got: list[EventFrame] = []
        complete = False
        while not complete:
            await client.send(RequestEvents(session_id=sid, from_seq=len(got), limit=4))
            batch = await next_frame(client, EventsFrame)
            assert len(batch.events) <= 4 and batch.next_seq == len(got) + len(batch.events)
            got.extend(batch.events)
            complete = batch.complete
        assert [e.model_dump() for e in got] == [e.model_dump() for e in events]
        await client.send(RequestEvents(session_id=sid, from_seq=len(events) + 10))
        past = await next_frame(client, EventsFrame)
        assert past.events == () and past.complete
        await client.send(RequestEvents(session_id="no-such-session", from_seq=0))
        err = await next_frame(client, ErrorFrame)
        assert "no session no-such-session" in err.message
        # A session created before the restart is stopped through the new gateway.
        waiting = restarted["waiting"]
        assert listed[waiting].state == "idle"
        await client.send(Attach(session_id=waiting))
        await client.send(Shutdown(session_id=waiting))
        end = await events_until(client, waiting, lambda e: e.kind == "shutdown", [])
        assert "stopped by after-restart" in end[-1].data["reason"]
    finally:
        await client.close()


# -- slow clients -----------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="module")
async def test_stalled_client_slows_nobody_then_catches_up_exactly_once(stack: Stack) -> None:
    state = StateDir(stack.state_dir)
    drops_before = stack.metric("gateway", "silo_delivery_queue_drops_total")
    total = 1500
    pad = "x" * 8000  # ~12 MB in all: more than the stalled client's and the gateway's socket buffers hold
    async with ScriptedSession(state, f"tls://127.0.0.1:{stack.nats_port}") as session:
        sid = session.sid
        slow = await connect(stack, "slow")
        fast = await connect(stack, "fast")
        # A client on a thin line: a small receive buffer that the kernel does not grow.
        sock = slow._ws._conn.transport.get_extra_info("socket")  # type: ignore[union-attr]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        try:
            await session.emit("session_started", {"note": "scripted"})
            for c in (slow, fast):
                await c.send(Attach(session_id=sid, from_seq=0))
                await next_frame(c, EventFrame)
            # The slow client stops reading (aiohttp then stops reading its socket, whose window fills up).
            fast_got: list[EventFrame] = []
            fast_task = asyncio.create_task(events_until(fast, sid, lambda e: e.seq == total, fast_got))
            for i in range(total):
                await session.emit("tool_output", {"i": i, "text": pad})
            await asyncio.wait_for(fast_task, 60)
            assert [e.seq for e in fast_got] == list(range(1, total + 1))
            # Reading again, the slow client gets everything it missed, once each, in order.
            slow_got: list[EventFrame] = []
            await events_until(slow, sid, lambda e: e.seq == total, slow_got)
            assert [e.seq for e in slow_got] == list(range(1, total + 1))
            assert [e.data["i"] for e in slow_got] == list(range(total))
            # It had fallen behind the live ring: its feed was dropped and it caught up from the stream.
            assert stack.metric("gateway", "silo_delivery_queue_drops_total") > drops_before
            assert stack.metric("gateway", "silo_events_caught_up_total") > 0
        finally:
            await slow.close()
            await fast.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_forged_event_in_the_stream_is_not_delivered(stack: Stack) -> None:
    state = StateDir(stack.state_dir)
    async with ScriptedSession(state, f"tls://127.0.0.1:{stack.nats_port}") as session:
        await session.emit("session_started")
        # Raw bytes on the session's subject (the harness may publish there) that no key signed.
        await session.nc.jetstream().publish(f"silo.session.{session.sid}.events", b"x" * 80 + b'{"seq": 1}')
        await session.emit("turn_complete")
        client = await connect(stack, "reader")
        try:
            await client.send(RequestEvents(session_id=session.sid, from_seq=0))
            batch = await next_frame(client, EventsFrame)
            assert [(e.seq, e.kind) for e in batch.events] == [(0, "session_started"), (1, "turn_complete")]
        finally:
            await client.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_client_attaching_after_the_last_follower_left_gets_live_events(stack: Stack) -> None:
    state = StateDir(stack.state_dir)
    async with ScriptedSession(state, f"tls://127.0.0.1:{stack.nats_port}") as session:
        await session.emit("session_started")
        connections = stack.metric("gateway", "silo_client_connections")
        for round_ in range(2):  # the second client comes after the first (the feed's only follower) left
            deadline = time.monotonic() + 10
            while stack.metric("gateway", "silo_client_connections") != connections:
                assert time.monotonic() < deadline, "the gateway never noticed the first client leave"
                await asyncio.sleep(0.05)
            client = await connect(stack, f"round-{round_}")
            try:
                first = session.next_seq
                await client.send(Attach(session_id=session.sid, from_seq=first))
                await client.send(Ping())
                await next_frame(client, Pong)  # the attach was handled
                await asyncio.sleep(0.5)  # ...and its follower is waiting for the next live event
                for _ in range(4):
                    await session.emit("tool_output", {"round": round_})
                got = await events_until(client, session.sid, lambda e, f=first: e.seq == f + 3, [], timeout=20)
                assert [e.seq for e in got] == [first, first + 1, first + 2, first + 3]
            finally:
                await client.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_batching_client_gets_its_backlog_in_events_frames_then_live(stack: Stack) -> None:
    state = StateDir(stack.state_dir)
    async with ScriptedSession(state, f"tls://127.0.0.1:{stack.nats_port}") as session:
        for i in range(300):
            await session.emit("tool_output", {"i": i})
        client = await connect(stack, "batcher")
        try:
            await client.send(Attach(session_id=session.sid, from_seq=0, batch=100))
            got: list[EventFrame] = []
            frames = []
            while len(got) < 300:
                frame = await asyncio.wait_for(client.receive(), 20)
                frames.append(frame)
                got.extend(frame.events if isinstance(frame, EventsFrame) else [frame])
            await session.emit("turn_complete")
            live = await asyncio.wait_for(client.receive(), 20)
            assert isinstance(live, EventFrame) and live.seq == 300
            assert [e.data["i"] for e in got] == list(range(300))
            assert [e.seq for e in got] == list(range(300))
            assert max(len(f.events) for f in frames if isinstance(f, EventsFrame)) > 1
            assert all(len(f.events) <= 100 for f in frames if isinstance(f, EventsFrame))
        finally:
            await client.close()


# -- limits -------------------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="module")
async def test_too_many_frames_get_overloaded_with_a_retry_hint(stack: Stack) -> None:
    client = await connect(stack, "chatty")
    try:
        for _ in range(CLIENT_RATE * 3):
            await client.send(Ping())
        frames = [await client.receive() for _ in range(CLIENT_RATE * 3)]
        over = [f for f in frames if isinstance(f, Overloaded)]
        assert over and all(f.reason == "rate" and f.retry_after_ms > 0 and f.request == "ping" for f in over)
        assert sum(isinstance(f, Pong) for f in frames) >= CLIENT_RATE
        await asyncio.sleep(over[0].retry_after_ms / 1000)
        await client.send(Ping())
        assert isinstance(await client.receive(), Pong)
    finally:
        await client.close()
    assert stack.metric("gateway", "silo_overloaded_total", 'reason="rate"') > 0


@pytest.mark.asyncio(loop_scope="module")
async def test_too_many_clients_of_one_user_get_overloaded(stack: Stack) -> None:
    clients = [await connect(stack, f"c{i}") for i in range(MAX_PER_USER)]
    try:
        # Authenticated, but one too many: told so with a retry hint, then disconnected.
        extra = await connect(stack, "one-too-many")
        try:
            over = await next_frame(extra, Overloaded)
            assert over.reason == "user_clients" and over.retry_after_ms > 0
            assert "clients connected already" in over.message
            with pytest.raises(GatewayError):
                await extra.receive()
        finally:
            await extra.close()
        # One leaves: there is room again.
        await clients.pop().close()
        await wait_connections(stack, MAX_PER_USER - 1)
        clients.append(await connect(stack, "room-again"))
        # Connections not authenticated (yet) count against the gateway's total.
        state = StateDir(stack.state_dir)
        fingerprint = aiohttp.Fingerprint(bytes.fromhex(state.gateway_fingerprint().replace(":", "").lower()))
        async with aiohttp.ClientSession() as http:
            waiting = [await http.ws_connect(gateway_url(stack), ssl=fingerprint) for _ in range(MAX_CLIENTS - MAX_PER_USER)]
            refused = await http.ws_connect(gateway_url(stack), ssl=fingerprint)
            first = json.loads((await refused.receive(timeout=10)).data)
            assert first["type"] == "overloaded" and first["reason"] == "clients" and first["retry_after_ms"] > 0
            for ws in [*waiting, refused]:
                await ws.close()
    finally:
        for c in clients:
            await c.close()
    assert stack.metric("gateway", "silo_overloaded_total", 'reason="user_clients"') == 1
    assert stack.metric("gateway", "silo_overloaded_total", 'reason="clients"') == 1


async def wait_connections(stack: Stack, n: int) -> None:
    """Wait until the gateway counts ``n`` open client connections."""
    deadline = time.monotonic() + 10
    while stack.metric("gateway", "silo_client_connections") != n:
        assert time.monotonic() < deadline, "the gateway never noticed the clients leave"
        await asyncio.sleep(0.05)


# -- uploads, access report, cost, busy state ------------------------------------------------------

IDLE_SCRIPT = {"responses": [{"text": "I see the file."}]}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def idle_session(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, Any]]:
    ws = tmp_path_factory.mktemp("upload-ws")
    (ws / "sub").mkdir()
    outside = tmp_path_factory.mktemp("outside")
    (ws / "link").symlink_to(outside)
    client = await connect(stack, "owner")
    await client.send(CreateSession(workspace=str(ws), script=json.dumps(IDLE_SCRIPT)))
    sid = (await next_frame(client, SessionCreated, timeout=90)).session_id
    await client.send(Attach(session_id=sid))
    events = await events_until(client, sid, lambda e: e.kind == "awaiting_input", [])
    yield {"sid": sid, "ws": ws, "outside": outside, "client": client, "events": events}
    await client.send(Shutdown(session_id=sid))
    await events_until(client, sid, lambda e: e.kind == "shutdown", [])
    await client.close()


async def upload(client: GatewayClient, sid: str, path: str, data: bytes, *, sha256: str | None = None,
                 size: int | None = None, chunk: int = 100_000) -> Any:
    """Upload ``data``; the final frame (upload_done) or the first error."""
    upload_id = hashlib.sha256(path.encode() + data[:64]).hexdigest()[:16]
    await client.send(UploadFile(session_id=sid, upload_id=upload_id, path=path, size=len(data) if size is None else size,
                                 sha256=sha256 or hashlib.sha256(data).hexdigest()))
    first = await next_frame(client, (UploadReady, ErrorFrame))  # type: ignore[arg-type]
    if isinstance(first, ErrorFrame):
        return first
    offset = 0
    while True:
        piece = data[offset:offset + chunk]
        await client.send(UploadChunk(upload_id=upload_id, offset=offset, data=base64.b64encode(piece).decode()))
        offset += len(piece)
        reply = await next_frame(client, (UploadProgress, UploadDone, ErrorFrame), timeout=60)  # type: ignore[arg-type]
        if not isinstance(reply, UploadProgress):
            return reply


@pytest.mark.asyncio(loop_scope="module")
async def test_binary_upload_lands_in_the_workspace_and_shows_for_every_client(
        stack: Stack, idle_session: dict[str, Any]) -> None:
    sid, ws = idle_session["sid"], idle_session["ws"]
    watcher = await connect(stack, "watcher")
    uploader = await connect(stack, "uploader")
    try:
        await watcher.send(Attach(session_id=sid, from_seq=len(idle_session["events"])))
        data = bytes(range(256)) * 1200  # every byte value, 300 KiB, four chunks
        done = await upload(uploader, sid, "sub/data.bin", data)
        assert isinstance(done, UploadDone), done
        assert (done.path, done.size, done.sha256) == ("sub/data.bin", len(data), hashlib.sha256(data).hexdigest())
        assert (ws / "sub" / "data.bin").read_bytes() == data
        shared = await next_frame(watcher, EventFrame)
        assert shared.kind == "file_shared"
        assert shared.data == {"path": "sub/data.bin", "size": len(data), "sha256": done.sha256,
                               "client": "uploader", "direction": "upload"}
        # An empty file is a file too.
        empty = await upload(uploader, sid, "empty.txt", b"")
        assert isinstance(empty, UploadDone) and (ws / "empty.txt").read_bytes() == b""
    finally:
        await watcher.close()
        await uploader.close()


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(("path", "size", "good_hash", "code"), [
    ("wrong-hash.bin", None, False, "upload_hash_mismatch"),
    ("big.bin", UPLOAD_MAX + 1, True, "upload_too_large"),
    ("../escape.bin", None, True, "upload_bad_path"),
    ("/tmp/absolute.bin", None, True, "upload_bad_path"),
    ("sub/../../escape.bin", None, True, "upload_bad_path"),
    ("link/through-symlink.bin", None, True, "upload_bad_path"),
    ("link", None, True, "upload_bad_path"),
])
async def test_bad_uploads_are_refused_and_write_nothing(stack: Stack, idle_session: dict[str, Any], path: str,
                                                         size: int | None, good_hash: bool, code: str) -> None:
    client = await connect(stack, "bad-uploader")
    try:
        data = b"\x00secret\xff" * 10
        reply = await upload(client, idle_session["sid"], path, data, size=size,
                             sha256=None if good_hash else "0" * 64)
        assert isinstance(reply, ErrorFrame) and reply.code == code, reply
        assert list(idle_session["outside"].iterdir()) == []
        assert not (idle_session["ws"].parent / "escape.bin").exists()
        assert not (idle_session["ws"] / "wrong-hash.bin").exists()
        await client.send(Ping())  # the connection goes on
        assert isinstance(await next_frame(client, Pong), Pong)
    finally:
        await client.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_access_report_cost_and_busy_state_on_request(stack: Stack, idle_session: dict[str, Any]) -> None:
    sid = idle_session["sid"]
    client = await connect(stack, "asker")
    try:
        await client.send(ListSessions())
        line = {s.session_id: s for s in (await next_frame(client, Sessions)).sessions}[sid]
        assert line.state == "idle"
        await client.send(Attach(session_id=sid, from_seq=0))
        await client.send(Prompt(session_id=sid, text="look at the file"))
        events = await events_until(client, sid, lambda e: e.kind == "turn_complete", [])
        # The model was told, with this prompt, about the file uploaded before it (from the session's journal).
        journal = idle_session["ws"].parent / "journal.jsonl"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "devsilo.cli", "--state-dir", str(stack.state_dir), "journal", "export", sid,
            "-o", str(journal))
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        requests = [json.loads(x)["data"] for x in journal.read_text().splitlines()
                    if json.loads(x)["kind"] == "llm_request"]
        told = requests[-1]["messages"][-1]["content"]
        assert told.endswith("look at the file") and "uploader uploaded sub/data.bin" in told
        assert f"{len(bytes(range(256)) * 1200)} bytes" in told
        await client.send(AccessReportRequest(session_id=sid))
        report = await next_frame(client, AccessReportFrame)
        published = [e for e in events if e.kind == "access_report"]
        assert report.seq == published[-1].seq and report.report == published[-1].data
        assert report.report["backend"] == "bwrap"
        await client.send(CostRequest(session_id=sid))
        cost = await next_frame(client, CostFrame)
        costs = [e for e in events if e.kind == "cost"]
        assert cost.cost_events == len(costs) >= 1
        for key in ("input_tokens", "output_tokens"):
            want = sum(e.data[key] for e in costs)
            assert cost.totals[key] == want and cost.by_agent["main"][key] == want
            assert cost.by_model[costs[0].data["model"]][key] == want
        assert cost.through_seq >= costs[-1].seq
    finally:
        await client.close()


# -- the gateway's tables: pruned when sessions end and clients go, bounded otherwise ------------------------

TABLES = ("connections", "followers", "feeds", "feeds_followed", "ring_events", "ring_chars", "tallies",
          "session_records")


def tables(stack: Stack) -> dict[str, float]:
    """The sizes of the gateway's in-memory tables, from its metrics."""
    text = stack.metrics("gateway")
    return {t: float(next((line.rsplit(" ", 1)[1] for line in text.splitlines()
                           if line.startswith(f'silo_gateway_table_entries{{table="{t}"}} ')), "nan"))
            for t in TABLES}


async def tables_settle(stack: Stack, want: Any) -> dict[str, float]:
    """The tables once ``want(tables)`` holds (the gateway tears a connection down after it closed)."""
    deadline = time.monotonic() + 20
    while not want(now := tables(stack)):
        assert time.monotonic() < deadline, f"the gateway's tables never settled: {now}"
        await asyncio.sleep(0.05)
    return now


async def tables_steady(stack: Stack) -> dict[str, float]:
    """The tables once two reads a moment apart agree (earlier tests' clients have gone)."""
    deadline = time.monotonic() + 20
    last = tables(stack)
    while True:
        await asyncio.sleep(0.2)
        if (now := tables(stack)) == last:
            return now
        assert time.monotonic() < deadline, f"the gateway's tables never settled: {now}"
        last = now


async def seqs_to_end(client: GatewayClient, sid: str, last: int | None = None) -> list[int]:
    """The seqs of ``sid``'s events (``event`` or ``events`` frames) up to its ``shutdown`` (or seq ``last``)."""
    async def wait() -> list[int]:
        seqs: list[int] = []
        while True:
            frame = await client.receive()
            if isinstance(frame, (EventFrame, EventsFrame)) and frame.session_id == sid:
                got = [frame] if isinstance(frame, EventFrame) else frame.events
                seqs += [e.seq for e in got]
                if any(e.kind == "shutdown" or e.seq == last for e in got):
                    return seqs
    return await asyncio.wait_for(wait(), 30)


@pytest.mark.asyncio(loop_scope="module")
async def test_ended_sessions_and_gone_clients_leave_nothing_behind_in_the_gateway(stack: Stack) -> None:
    """Other fixtures' clients may be connected and attached: everything is counted from where it stood."""
    state = StateDir(stack.state_dir)
    nats_url = f"tls://127.0.0.1:{stack.nats_port}"
    base = await tables_steady(stack)

    def back_to_base(t: dict[str, float], connections: int = 0) -> bool:
        return (t["connections"] == base["connections"] + connections and t["followers"] == base["followers"]
                and t["feeds_followed"] == base["feeds_followed"] and t["ring_events"] == base["ring_events"]
                and t["ring_chars"] == base["ring_chars"])

    watcher = await connect(stack, "watcher")  # stays connected, attached to every session in turn
    try:
        sids = []
        for n in range(KEEP_SESSIONS + 2):
            async with ScriptedSession(state, nats_url) as session:
                sids.append(session.sid)
                await session.emit("session_started")
                others = [await connect(stack, f"s{n}-c{i}") for i in range(2)]
                try:
                    for i, client in enumerate([watcher, *others]):
                        await client.send(Attach(session_id=session.sid, batch=1 + 99 * (i % 2)))
                        await client.send(Ping())
                        await next_frame(client, Pong)
                    during = tables(stack)
                    assert during["followers"] == base["followers"] + 3
                    assert during["feeds_followed"] == base["feeds_followed"] + 1
                    for i in range(5):  # 15 KB of output: more than a ring holds
                        await session.emit("tool_output", {"i": i, "text": "x" * 3000})
                    # Every event went through the ring, which holds the newest up to its size in characters.
                    assert await seqs_to_end(watcher, session.sid, last=5) == list(range(6))
                    held = tables(stack)
                    assert 1 <= held["ring_events"] - base["ring_events"] < 6
                    assert held["ring_chars"] - base["ring_chars"] <= RING_CHARS
                    await session.emit("shutdown", {"exit_code": 0, "reason": "done"})
                    assert await seqs_to_end(watcher, session.sid) == [6]
                    for client in others:
                        assert await seqs_to_end(client, session.sid) == list(range(7))
                finally:
                    for client in others:
                        await client.close()
            # The session ended: the client still connected follows nothing, and its feed let go of the events.
            await tables_settle(stack, lambda t: back_to_base(t, connections=1))
        # Attaching to an ended session: its events through the end, then nothing is left following it.
        await watcher.send(Attach(session_id=sids[0], from_seq=3, batch=100))
        assert await seqs_to_end(watcher, sids[0]) == [3, 4, 5, 6]
        await watcher.send(Attach(session_id=sids[1], from_seq=7))  # after its end: nothing to follow
        await watcher.send(Ping())
        await next_frame(watcher, Pong)
        await tables_settle(stack, lambda t: back_to_base(t, connections=1))
        # What the gateway keeps of sessions nobody follows is bounded; asking for an older one still works.
        for sid in sids:
            await watcher.send(CostRequest(session_id=sid))
            assert (await next_frame(watcher, CostFrame)).through_seq == 6
        kept = tables(stack)
        assert kept["session_records"] <= KEEP_SESSIONS and kept["tallies"] <= KEEP_SESSIONS
        assert kept["feeds"] <= KEEP_SESSIONS + base["feeds_followed"]
    finally:
        await watcher.close()
    await tables_settle(stack, back_to_base)
