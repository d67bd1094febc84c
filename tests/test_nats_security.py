"""NATS is locked down: TLS only, one nkey per service, subject permissions per role.

Every test runs against a real nats-server started from the rendered config.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import nats
import nats.errors
import nkeys  # type: ignore[import-untyped]
import pytest
import pytest_asyncio
from devsilo.protocol import ConfigError, Role, subjects
from devsilo.runtime._natsconn import NatsCredentials, connect_nats
from devsilo.runtime._natsserver import NatsServer, find_nats_server
from devsilo.runtime._state import StateDir, jetstream_permissions, render_nats_config
from devsilo.testing._nats import ErrorRecorder, init_state
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

EVENTS = subjects.EVENTS_STREAM
SUBJECT = subjects.session_events("s1")
QUIET = 0.3  # how long "nothing arrives" is watched for


class Service:
    """A connected service and the asynchronous errors the server sent it."""

    def __init__(self, nc: Client, errors: ErrorRecorder) -> None:
        self.nc = nc
        self.errors = errors
        self.js = nc.jetstream(timeout=0.5)  # denied requests simply time out


Connect = Callable[[str], Awaitable[Service]]


@pytest_asyncio.fixture
async def connect(state_dir: StateDir, nats_server: NatsServer) -> AsyncIterator[Connect]:
    """``await connect("harness")``: a Service; every connection is closed after the test."""
    opened: list[Client] = []

    async def open_service(service_id: str) -> Service:
        errors = ErrorRecorder()
        nc = await connect_nats(
            state_dir, service_id, nats_server.url, initial_timeout=5, on_error=errors
        )
        opened.append(nc)
        return Service(nc, errors)

    yield open_service
    for nc in opened:
        await nc.close()


async def received(sub: Subscription, wait: float = QUIET) -> list[Msg]:
    """Messages that reach ``sub`` within ``wait`` seconds."""
    got = []
    try:
        while True:
            got.append(await sub.next_msg(timeout=wait))
    except nats.errors.TimeoutError:
        return got


async def create_events_stream(harness: Service) -> None:
    await harness.js.add_stream(name=EVENTS, subjects=[subjects.EVENTS_SUBJECTS], allow_direct=True)


async def refusal(url: str, tls: ssl.SSLContext) -> str:
    """The error a raw nats-py TLS connection without credentials (no retries) gets."""
    try:
        nc = await nats.connect(
            url, allow_reconnect=False, connect_timeout=2, error_cb=_ignore, tls=tls
        )
    except (nats.errors.Error, OSError, TimeoutError) as exc:  # the refusal is what we assert on
        return f"{type(exc).__name__}: {exc}"
    await nc.close()
    return "connected"


async def _ignore(exc: Exception) -> None:
    """nats-py's default error callback logs a traceback; the test reads the exception instead."""


# ---------------------------------------------------------------- authentication and TLS


async def test_each_service_connects_with_its_own_nkey_over_tls(
    connect: Connect, nats_server: NatsServer
) -> None:
    for sid in ("gateway", "harness", "executor", "egress"):
        svc = await connect(sid)
        assert svc.nc.is_connected
        assert svc.nc.connected_url is not None and svc.nc.connected_url.scheme == "tls"
        assert svc.nc._server_info["tls_required"] is True
        await svc.nc.flush(timeout=1)


async def test_plaintext_client_is_refused_even_with_a_valid_nkey(
    state_dir: StateDir, nats_server: NatsServer
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", nats_server.port)
    try:
        info = json.loads((await reader.readline())[5:])
        assert info["tls_required"] is True
        kp = nkeys.from_seed(bytearray(state_dir.nats_seed("harness")))
        sig = kp.sign(info["nonce"].encode())
        connect = {
            "nkey": kp.public_key.decode(),
            "sig": base64.b64encode(sig).decode(),
            "verbose": False,
            "pedantic": False,
            "protocol": 1,
        }
        writer.write(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(4096), 3)
        assert b"PONG" not in answer
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass  # the server already dropped us


async def test_client_that_does_not_trust_the_internal_ca_is_refused(
    state_dir: StateDir, nats_server: NatsServer
) -> None:
    system_only = NatsCredentials(state_dir.nats_seed("harness"), ssl.create_default_context())
    with pytest.raises(ConfigError, match="CERTIFICATE_VERIFY_FAILED"):
        await connect_nats(system_only, "harness", nats_server.url, initial_timeout=5)


async def test_tls_client_without_credentials_is_refused(
    state_dir: StateDir, nats_server: NatsServer
) -> None:
    outcome = await refusal(nats_server.url, tls=state_dir.nats_client_tls())
    assert "Authorization Violation" in outcome


async def test_random_nkey_is_refused(state_dir: StateDir, nats_server: NatsServer) -> None:
    stranger = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    creds = NatsCredentials(stranger, state_dir.nats_client_tls())
    with pytest.raises(ConfigError, match="Authorization Violation"):
        await connect_nats(creds, "harness", nats_server.url, initial_timeout=5)


async def test_unreachable_server_is_a_config_error_after_the_initial_timeout(
    state_dir: StateDir, free_port: int
) -> None:
    with pytest.raises(ConfigError, match="not reachable within 0.5 s"):
        await connect_nats(
            state_dir, "harness", f"tls://127.0.0.1:{free_port}", initial_timeout=0.5
        )


# ---------------------------------------------------------------- core subject permissions


async def test_executor_cannot_publish_session_events(connect: Connect) -> None:
    gateway = await connect("gateway")
    executor = await connect("executor")
    harness = await connect("harness")
    sub = await gateway.nc.subscribe(subjects.EVENTS_SUBJECTS)
    await gateway.nc.flush()

    await executor.nc.publish(SUBJECT, b"forged")
    await executor.nc.flush()
    err = await executor.errors.wait_for("permissions violation")
    assert SUBJECT in str(err)
    assert await received(sub) == []

    await harness.nc.publish(SUBJECT, b"real")  # control: the subject itself works
    assert [m.data for m in await received(sub)] == [b"real"]


async def test_request_reply_uses_private_inboxes(connect: Connect) -> None:
    gateway = await connect("gateway")
    harness = await connect("harness")
    executor = await connect("executor")

    async def answer(msg: Msg) -> None:
        await msg.respond(b"started:" + msg.data)

    await harness.nc.subscribe(subjects.HARNESS_START, queue=subjects.HARNESS_QUEUE, cb=answer)
    await harness.nc.flush()
    snoop = await executor.nc.subscribe("_INBOX.>")
    await executor.nc.flush()
    await executor.errors.wait_for('subscription to "_INBOX.>"')

    reply = await gateway.nc.request(subjects.HARNESS_START, b"s1", timeout=2)
    assert reply.data == b"started:s1"
    assert reply.subject.startswith("_INBOX.gateway.")
    assert await received(snoop) == []


async def test_gateway_cannot_send_tool_calls(connect: Connect) -> None:
    gateway = await connect("gateway")
    executor = await connect("executor")
    sub = await executor.nc.subscribe(subjects.exec_listen("executor"))
    await executor.nc.flush()
    await gateway.nc.publish(subjects.exec_tool("executor", "s1"), b"rm -rf")
    await gateway.nc.flush()
    await gateway.errors.wait_for("permissions violation")
    assert await received(sub) == []


# ---------------------------------------------------------------- JetStream permissions


async def test_harness_creates_events_stream_and_publishes_with_ack(connect: Connect) -> None:
    harness = await connect("harness")
    await create_events_stream(harness)
    ack = await harness.js.publish(SUBJECT, b"e0", stream=EVENTS)
    assert (ack.stream, ack.seq) == (EVENTS, 1)
    info = await harness.js.stream_info(EVENTS)
    assert info.state.messages == 1


async def test_gateway_reads_events_with_consumers(connect: Connect) -> None:
    harness = await connect("harness")
    gateway = await connect("gateway")
    await create_events_stream(harness)
    for i in range(3):
        await harness.js.publish(SUBJECT, f"e{i}".encode(), stream=EVENTS)

    ordered = await gateway.js.subscribe(SUBJECT, ordered_consumer=True)
    assert [(await ordered.next_msg(timeout=2)).data for _ in range(3)] == [b"e0", b"e1", b"e2"]

    pull = await gateway.js.pull_subscribe(SUBJECT, durable="gw", stream=EVENTS)
    batch = await pull.fetch(3, timeout=2)
    assert [m.data for m in batch] == [b"e0", b"e1", b"e2"]
    for m in batch:
        await m.ack()

    assert (await gateway.js.get_msg(EVENTS, 2)).data == b"e1"
    last = await gateway.js.get_msg(EVENTS, subject=SUBJECT, direct=True)
    assert last.data == b"e2"
    await gateway.nc.flush()
    assert gateway.errors.errors == []


async def test_gateway_cannot_create_or_delete_the_stream(connect: Connect) -> None:
    harness = await connect("harness")
    gateway = await connect("gateway")
    await create_events_stream(harness)
    with pytest.raises(nats.errors.TimeoutError):
        await gateway.js.delete_stream(EVENTS)
    with pytest.raises(nats.errors.TimeoutError):
        await gateway.js.add_stream(name="SILO_OTHER", subjects=["silo.other.>"])
    await gateway.errors.wait_for("$JS.API.STREAM.DELETE.SILO_EVENTS")
    assert (await harness.js.stream_info(EVENTS)).config.name == EVENTS


async def test_executor_cannot_read_the_events_stream(connect: Connect) -> None:
    harness = await connect("harness")
    executor = await connect("executor")
    await create_events_stream(harness)
    await harness.js.publish(SUBJECT, b"secret", stream=EVENTS)

    with pytest.raises(nats.errors.TimeoutError):
        await executor.js.stream_info(EVENTS)
    with pytest.raises(nats.errors.TimeoutError):
        await executor.js.get_msg(EVENTS, 1)
    with pytest.raises(nats.errors.TimeoutError):
        await executor.js.pull_subscribe(SUBJECT, durable="x", stream=EVENTS)
    await executor.errors.wait_for("$JS.API.STREAM.INFO.SILO_EVENTS")

    live = await executor.nc.subscribe(subjects.EVENTS_SUBJECTS)
    await executor.nc.flush()
    await executor.errors.wait_for(f'subscription to "{subjects.EVENTS_SUBJECTS}"')
    await harness.js.publish(SUBJECT, b"secret2", stream=EVENTS)
    assert await received(live) == []


async def test_harness_cannot_touch_streams_outside_its_role(connect: Connect) -> None:
    harness = await connect("harness")
    with pytest.raises(nats.errors.TimeoutError):
        await harness.js.add_stream(name="STEAL", subjects=["silo.exec.>"])
    await harness.errors.wait_for("$JS.API.STREAM.CREATE.STEAL")


# ---------------------------------------------------------------- config and server process


def test_rendered_config_is_valid_and_limits_jetstream_by_role(
    state_dir: StateDir, tmp_path: Path
) -> None:
    text = render_nats_config(
        state_dir, host="127.0.0.1", port=4999, store_dir=tmp_path / "js", max_payload=2 << 20
    )
    conf_path = tmp_path / "server.conf"
    conf_path.write_text(text)
    check = subprocess.run(
        [find_nats_server(), "-t", "-c", str(conf_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert check.returncode == 0, check.stderr
    conf = json.loads(text.split("\n", 1)[1])
    assert conf["max_payload"] == 2 << 20
    assert "http" not in conf and "http_port" not in conf
    assert len(conf["authorization"]["users"]) == 4
    executor = jetstream_permissions(Role.EXECUTOR)
    assert executor and all(subjects.WORKSPACE_OBJECTS_STREAM in p or p.startswith("$O.silo_workspaces.")
                            or p in ("$JS.API.INFO", "$JS.API.STREAM.NAMES") for p in executor)
    assert jetstream_permissions(Role.EGRESS) == []
    gateway = jetstream_permissions(Role.GATEWAY)
    assert "$JS.API.CONSUMER.MSG.NEXT.SILO_EVENTS.*" in gateway
    assert not any(".CREATE.SILO_EVENTS" in p and "STREAM" in p for p in gateway)
    harness = jetstream_permissions(Role.HARNESS)
    assert {"$JS.API.STREAM.CREATE.SILO_EVENTS", "$JS.API.STREAM.CREATE.SILO_JOURNAL"} <= set(
        harness
    )
    assert not any(p.startswith("$JS.API.>") or p == ">" for p in gateway + harness)


async def test_max_payload_is_enforced(state_dir: StateDir, tmp_path: Path, free_port: int) -> None:
    server = NatsServer(state_dir, port=free_port, store_dir=tmp_path / "js", max_payload=64 * 1024)
    async with server:
        nc = await connect_nats(state_dir, "harness", server.url, initial_timeout=5)
        try:
            assert nc.max_payload == 64 * 1024
            with pytest.raises(nats.errors.MaxPayloadError):
                await nc.publish(SUBJECT, b"x" * (64 * 1024 + 1))
        finally:
            await nc.close()


async def test_start_failure_reports_the_servers_own_error(
    state_dir: StateDir, nats_server: NatsServer, tmp_path: Path
) -> None:
    clash = NatsServer(
        state_dir, port=nats_server.port, store_dir=tmp_path / "js2", start_timeout=5
    )
    with pytest.raises(ConfigError, match="(?i)address already in use"):
        await clash.start()
    assert clash.pid is None


async def test_start_failure_is_reported_when_a_foreign_server_holds_the_port(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    other = init_state(tmp_path / "other-state")  # its keys are unknown to the running server
    clash = NatsServer(other, port=nats_server.port, store_dir=tmp_path / "js2", start_timeout=5)
    with pytest.raises(ConfigError, match="(?i)address already in use"):
        await clash.start()


async def test_stop_ends_the_process(state_dir: StateDir, tmp_path: Path, free_port: int) -> None:
    server = NatsServer(state_dir, port=free_port, store_dir=tmp_path / "js")
    await server.start()
    pid = server.pid
    assert pid is not None and os.getpgid(pid) == pid  # its own process group
    conf = state_dir.nats_conf_path
    assert conf.stat().st_mode & 0o777 == 0o600
    await server.stop()
    assert server.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_connection_comes_back_after_a_server_restart(
    state_dir: StateDir, tmp_path: Path, free_port: int
) -> None:
    server = NatsServer(state_dir, port=free_port, store_dir=tmp_path / "js")
    await server.start()
    nc = await connect_nats(
        state_dir, "gateway", server.url, initial_timeout=5, reconnect_base=0.05, reconnect_cap=0.2
    )
    try:
        await server.stop()
        await server.start()
        async with asyncio.timeout(5):
            while not nc.is_connected:
                await asyncio.sleep(0.05)
        await nc.flush(timeout=1)
    finally:
        await nc.close()
        await server.stop()


async def test_only_gateway_and_executor_reach_the_workspace_object_store(connect: Connect) -> None:
    from devsilo.runtime._workspace_objects import open_bucket

    gateway = await connect("gateway")
    executor = await connect("executor")
    harness = await connect("harness")
    egress = await connect("egress")
    stored = await open_bucket(gateway.js)
    await stored.put("up-x.0", b"workspace bytes")
    got = await (await open_bucket(executor.js)).get("up-x.0")
    assert got.data == b"workspace bytes"
    for outsider in (harness, egress):
        with pytest.raises(nats.errors.TimeoutError):
            await outsider.js.object_store(subjects.WORKSPACE_OBJECTS)
        await outsider.errors.wait_for(f"$JS.API.STREAM.INFO.{subjects.WORKSPACE_OBJECTS_STREAM}")
        live = await outsider.nc.subscribe(f"$O.{subjects.WORKSPACE_OBJECTS}.>")
        await outsider.nc.flush()
        await outsider.errors.wait_for("subscription to")
        await stored.put("up-x.1", b"more bytes")
        assert await received(live) == []
