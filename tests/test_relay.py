"""The route out of a sandbox: helper proxy and resolver → session relay → egress.

A small asyncio server on 127.0.0.1 stands in for the egress proxy (the real
one is a later issue): it reads the relay's preamble, then acts as a tiny
forward proxy (CONNECT included, TLS with a test CA) or DNS server, and
records what it saw. Only loopback addresses are used.
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import os
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from devsilo.executor import _spec
from devsilo.executor._helper_client import HelperClient, HelperRequestError
from devsilo.executor._relay import (
    STREAM_DNS,
    STREAM_TCP,
    RelayPreamble,
    SessionRelay,
    read_preamble,
    session_line,
)
from devsilo.executor._sandbox import BwrapSandbox, prepare_workspace_ownership
from devsilo.executor._spec import SandboxSpec, sandbox_env
from devsilo.executor._trust import SessionTrust
from devsilo.executor.helper import helper as helper_module
from devsilo.protocol import ProtocolError, SandboxError

AS_ROOT = os.geteuid() == 0
SANDBOX_UID = 64123 if AS_ROOT else os.getuid()
SANDBOX_GID = 64123 if AS_ROOT else os.getgid()
root_only = pytest.mark.skipif(not AS_ROOT, reason="only root can act as another uid")
SESSION = "sess-relay-1"
ANSWER_IP = bytes([192, 0, 2, 7])  # TEST-NET-1: an answer that leads nowhere


# -- the stand-in egress ----------------------------------------------------


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 65536:
        chunk = await reader.read(4096)
        if not chunk:
            break
        head += chunk
    return head


def _http(status: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    ).encode() + body


class StandInEgress:
    """Where the relay connects: records preambles and requests, answers like a tiny proxy.

    Paths: ``/redirect/N`` answers 302 to ``/redirect/N-1`` (``/redirect/0``
    answers 200), ``/big`` 100 000 bytes; anything else echoes its request
    line. DNS: an A record for ``example.test``, NXDOMAIN for other names.
    """

    def __init__(self, tls: TestCA | None = None) -> None:
        self.tls = tls
        self.preambles: list[RelayPreamble] = []
        self.requests: list[str] = []
        self.dns_names: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.silent = False
        """Accept connections but never read them (for backpressure)."""
        self.held: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self.held:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self.silent:
                self.held.append(writer)
                await asyncio.sleep(3600)
            preamble = await read_preamble(reader)
            self.preambles.append(preamble)
            if preamble.kind == "dns":
                await self._dns(reader, writer)
            else:
                await self._proxy(reader, writer)
        except (OSError, asyncio.IncompleteReadError, ProtocolError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _proxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await _read_head(reader)
        line = head.split(b"\r\n", 1)[0].decode()
        self.requests.append(line)
        if line.startswith("CONNECT "):
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            if line.split()[1].endswith(":443"):
                assert self.tls is not None
                await writer.start_tls(self.tls.server_context())
            head = await _read_head(reader)
            line = head.split(b"\r\n", 1)[0].decode()
            self.requests.append(line)
        target = line.split()[1] if len(line.split()) > 1 else "/"
        path = "/" + target.split("://", 1)[-1].split("/", 1)[-1] if "://" in target else target
        if path.startswith("/redirect/"):
            left = int(path.rsplit("/", 1)[1])
            if left > 0:
                writer.write(_http("302 Found", b"", f"Location: /redirect/{left - 1}\r\n"))
            else:
                writer.write(_http("200 OK", b"landed\n"))
        elif path == "/big":
            writer.write(_http("200 OK", b"b" * 100_000))
        else:
            writer.write(_http("200 OK", f"egress saw {line} for {SESSION}\n".encode()))
        await writer.drain()

    async def _dns(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            size = struct.unpack(">H", await reader.readexactly(2))[0]
            query = await reader.readexactly(size)
            end = query.index(b"\0", 12) + 5
            labels, pos = [], 12
            while query[pos]:
                labels.append(query[pos + 1 : pos + 1 + query[pos]].decode())
                pos += 1 + query[pos]
            name = ".".join(labels)
            self.dns_names.append(name)
            if name == "example.test":
                header = struct.pack(">HHHHH", 0x8180, 1, 1, 0, 0)
                record = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + ANSWER_IP
            else:
                header = struct.pack(">HHHHH", 0x8183, 1, 0, 0, 0)  # NXDOMAIN
                record = b""
            answer = query[:2] + header + query[12:end] + record
            writer.write(struct.pack(">H", len(answer)) + answer)
            await writer.drain()


class TestCA:
    """A throwaway CA and a certificate for example.test that it signed."""

    __test__ = False  # not a test class, despite its name

    def __init__(self, tmp: Path) -> None:
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "devsilo test CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "example.test")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName("example.test")]), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        self.ca_pem = ca.public_bytes(serialization.Encoding.PEM)
        self.cert_file = tmp / "leaf.pem"
        self.key_file = tmp / "leaf.key"
        self.cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        self.key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


# -- fixtures ---------------------------------------------------------------


def make_bwrap(
    workspace: Path,
    scratch_root: Path,
    *,
    relay_socket: Path | None = None,
    ca_cert_pem: bytes | None = None,
) -> BwrapSandbox:
    """A bwrap sandbox from a SandboxSpec (the keyword constructor where that is all there is)."""
    spec = SandboxSpec(
        session_id=SESSION,
        workspace=workspace,
        sandbox_uid=SANDBOX_UID,
        sandbox_gid=SANDBOX_GID,
        scratch_root=scratch_root,
        relay_socket=relay_socket,
        trust_dir=(SessionTrust.create(scratch_root.parent / "trust", ca_cert_pem).path
                   if ca_cert_pem is not None else None),
    )
    # Any: the keyword constructor below is the backend's older signature.
    factory: Any = BwrapSandbox
    if "spec" in inspect.signature(BwrapSandbox).parameters:
        return factory(spec)  # type: ignore[no-any-return]
    if relay_socket is not None or ca_cert_pem is not None:
        pytest.skip("this bwrap backend does not bind spec.relay_socket yet")
    return factory(  # type: ignore[no-any-return]
        workspace,
        sandbox_uid=SANDBOX_UID,
        sandbox_gid=SANDBOX_GID,
        scratch_root=scratch_root,
        env=sandbox_env(spec),
    )


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A directory for relay sockets that every uid may traverse (not list)."""
    path = Path(tempfile.mkdtemp(prefix="devsilo-relay-test-", dir="/tmp"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    if AS_ROOT:
        prepare_workspace_ownership(ws, SANDBOX_UID, SANDBOX_GID)
    return ws


@pytest.fixture
def test_ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path)


@pytest_asyncio.fixture
async def egress(test_ca: TestCA) -> AsyncIterator[StandInEgress]:
    server = StandInEgress(test_ca)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest_asyncio.fixture
async def relay(egress: StandInEgress, socket_dir: Path) -> AsyncIterator[SessionRelay]:
    async with SessionRelay(
        SESSION, socket_dir / "egress.sock", ("127.0.0.1", egress.port), uid=SANDBOX_UID
    ) as r:
        yield r


@pytest_asyncio.fixture
async def connected(
    relay: SessionRelay, workspace: Path, tmp_path: Path, test_ca: TestCA
) -> AsyncIterator[HelperClient]:
    """The helper of a sandbox whose relay socket leads to the stand-in egress."""
    sb = make_bwrap(
        workspace, tmp_path / "scratch", relay_socket=relay.socket_path, ca_cert_pem=test_ca.ca_pem
    )
    await sb.start()
    try:
        yield sb.helper
    finally:
        await sb.close()


@pytest_asyncio.fixture
async def unconnected(workspace: Path, tmp_path: Path) -> AsyncIterator[HelperClient]:
    """The helper of a sandbox with no relay socket at all."""
    sb = make_bwrap(workspace, tmp_path / "scratch")
    await sb.start()
    try:
        yield sb.helper
    finally:
        await sb.close()


async def _sh(helper: HelperClient, command: str) -> tuple[int, str, str]:
    result = await helper.exec(command, timeout_ms=30_000)
    return result.exit_code, result.stdout, result.stderr


# A DNS client for inside the sandbox: two sockets query at once with the same
# id for different names; each must get its own answer back.
_DNS_CLIENT = r"""
import socket, struct, sys
def query(name, qid=0x1234):
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0" + struct.pack(">HH", 1, 1)
port = int(sys.argv[1])
a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); a.settimeout(5)
b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); b.settimeout(5)
a.sendto(query("example.test"), ("127.0.0.1", port))
b.sendto(query("other.test"), ("127.0.0.1", port))
for s in (a, b):
    r = s.recv(4096)
    print(r[:2].hex(), r[3] & 15, struct.unpack(">H", r[6:8])[0], r[-4:].hex())
t = socket.create_connection(("127.0.0.1", port), timeout=5)
q = query("example.test", 0x4242)
t.sendall(struct.pack(">H", len(q)) + q)
n = struct.unpack(">H", t.recv(2))[0]
r = t.recv(n)
print(r[:2].hex(), r[3] & 15, struct.unpack(">H", r[6:8])[0], r[-4:].hex())
"""


# -- through a real sandbox -------------------------------------------------


async def test_curl_reaches_the_egress_with_the_session_line(
    connected: HelperClient, egress: StandInEgress, relay: SessionRelay
) -> None:
    code, out, err = await _sh(connected, "curl -sS http://example.test/x")
    assert code == 0, err
    assert out == f"egress saw GET http://example.test/x HTTP/1.1 for {SESSION}\n"
    assert egress.preambles == [RelayPreamble(SESSION, "tcp")]
    assert egress.requests == ["GET http://example.test/x HTTP/1.1"]
    stats = relay.stats
    assert stats.connections == 1 and stats.bytes_up > 0 and stats.bytes_down > len(out)


async def test_connect_tunnels_go_through_too(
    connected: HelperClient, egress: StandInEgress
) -> None:
    code, out, err = await _sh(connected, "curl -sS --proxytunnel http://example.test/y")
    assert code == 0, err
    assert egress.requests == ["CONNECT example.test:80 HTTP/1.1", "GET /y HTTP/1.1"]
    code, out, err = await _sh(connected, "curl -sS https://example.test/z")
    assert code == 0, err
    assert out == f"egress saw GET /z HTTP/1.1 for {SESSION}\n"
    assert egress.requests[2:] == ["CONNECT example.test:443 HTTP/1.1", "GET /z HTTP/1.1"]


async def test_dns_is_answered_by_the_egress(
    connected: HelperClient, egress: StandInEgress
) -> None:
    await connected.write("dns.py", _DNS_CLIENT)
    code, out, err = await _sh(connected, f"python3 dns.py {helper_module.DNS_PORT}")
    assert code == 0, err
    # id kept, rcode, answer count, last four bytes (the address when there is one)
    first, second, over_tcp = out.splitlines()
    assert first == f"1234 0 1 {ANSWER_IP.hex()}"
    assert second.startswith("1234 3 0 ")  # NXDOMAIN
    assert over_tcp == f"4242 0 1 {ANSWER_IP.hex()}"
    assert sorted(egress.dns_names) == ["example.test", "example.test", "other.test"]
    assert {p.kind for p in egress.preambles} == {"dns"}
    assert {p.session_id for p in egress.preambles} == {SESSION}


async def test_fetch_goes_through_the_proxy_and_follows_redirects(
    connected: HelperClient, egress: StandInEgress
) -> None:
    result = await connected.fetch("http://example.test/redirect/3")
    assert (result.status, result.text) == (200, "landed\n")
    assert result.redirects == tuple(f"http://example.test/redirect/{n}" for n in (2, 1, 0))
    # Every hop went through the proxy, hence the egress.
    assert egress.requests == [
        f"GET http://example.test/redirect/{n} HTTP/1.1" for n in (3, 2, 1, 0)
    ]
    with pytest.raises(HelperRequestError) as info:
        await connected.fetch("http://example.test/redirect/11")
    assert info.value.code == "too_many_redirects"
    assert len(egress.requests) == 4 + 11


async def test_fetch_over_https_trusts_the_session_ca(
    connected: HelperClient, egress: StandInEgress
) -> None:
    result = await connected.fetch("https://example.test/secure?q=1")
    assert result.status == 200 and result.blocked is None
    assert result.text == f"egress saw GET /secure?q=1 HTTP/1.1 for {SESSION}\n"
    assert egress.requests == ["CONNECT example.test:443 HTTP/1.1", "GET /secure?q=1 HTTP/1.1"]


async def test_fetch_keeps_at_most_max_bytes(connected: HelperClient) -> None:
    result = await connected.fetch("http://example.test/big", max_bytes=1000)
    assert result.truncated and result.content == b"b" * 1000
    whole = await connected.fetch("http://example.test/big")
    assert not whole.truncated and len(whole.content) == 100_000


async def test_direct_connections_bypassing_the_proxy_fail(
    connected: HelperClient, egress: StandInEgress
) -> None:
    code, _, err = await _sh(
        connected, f"curl -sS --max-time 5 --noproxy '*' http://127.0.0.1:{egress.port}/"
    )
    assert code != 0 and "Couldn't connect" in err
    code, _, _ = await _sh(connected, "curl -sS --max-time 5 --noproxy '*' http://example.test/")
    assert code != 0
    assert egress.requests == []
    # Name lookups by the system resolver do not reach anything either.
    code, out, _ = await _sh(connected, "getent hosts example.test")
    assert code != 0 and out == ""


async def test_without_a_relay_socket_the_proxy_answers_blocked(
    unconnected: HelperClient,
) -> None:
    blocked = f"blocked: {helper_module.NO_EGRESS}"
    code, out, err = await _sh(unconnected, "curl -sS -i http://example.test/x")
    assert code == 0, err
    assert out.startswith("HTTP/1.1 502 ")
    assert out.endswith(f"\r\n\r\n{blocked}\n")
    assert f"{helper_module.BLOCKED_HEADER}: {helper_module.NO_EGRESS}\r\n" in out
    code, out, err = await _sh(unconnected, "curl -sS https://example.test/x")
    assert code != 0 and "CONNECT tunnel failed, response 502" in err
    await unconnected.write("dns.py", _DNS_CLIENT)
    code, out, err = await _sh(unconnected, f"python3 dns.py {helper_module.DNS_PORT}")
    assert code == 0, err
    assert [line.split()[:3] for line in out.splitlines()] == [
        ["1234", "5", "0"],  # REFUSED, no answer
        ["1234", "5", "0"],
        ["4242", "5", "0"],
    ]


# -- the relay on its own ---------------------------------------------------


async def _unix(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(str(path))


async def test_the_relay_prefixes_the_session_and_counts_bytes(
    relay: SessionRelay, egress: StandInEgress
) -> None:
    reader, writer = await _unix(relay.socket_path)
    request = b"GET http://example.test/count HTTP/1.1\r\nHost: example.test\r\n\r\n"
    writer.write(STREAM_TCP + request)
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.endswith(
        b"egress saw GET http://example.test/count HTTP/1.1 for " + SESSION.encode() + b"\n"
    )
    assert egress.preambles == [RelayPreamble(SESSION, "tcp")]
    for _ in range(50):
        if relay.stats.open == 0:
            break
        await asyncio.sleep(0.02)
    stats = relay.stats
    assert (stats.connections, stats.open, stats.refused) == (1, 0, 0)
    assert (stats.bytes_up, stats.bytes_down) == (len(request), len(answer))


async def test_the_relay_passes_dns_frames(relay: SessionRelay, egress: StandInEgress) -> None:
    reader, writer = await _unix(relay.socket_path)
    query = (
        struct.pack(">HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"\x07example\x04test\x00\x00\x01\x00\x01"
    )
    writer.write(STREAM_DNS + struct.pack(">H", len(query)) + query)
    size = struct.unpack(">H", await asyncio.wait_for(reader.readexactly(2), 5))[0]
    answer = await reader.readexactly(size)
    writer.close()
    assert answer[:2] == b"\x00\x07" and answer.endswith(ANSWER_IP)
    assert egress.preambles == [RelayPreamble(SESSION, "dns")]


async def test_a_bad_first_line_is_dropped(relay: SessionRelay, egress: StandInEgress) -> None:
    reader, writer = await _unix(relay.socket_path)
    writer.write(b"UDP\nwhatever")
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert relay.stats.refused == 1 and egress.preambles == []


async def test_without_egress_the_relay_answers_blocked_itself(socket_dir: Path) -> None:
    async with SessionRelay(SESSION, socket_dir / "none.sock", None, uid=SANDBOX_UID) as r:
        reader, writer = await _unix(r.socket_path)
        writer.write(STREAM_TCP + b"GET http://x.test/ HTTP/1.1\r\nHost: x.test\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 502 ")
        assert answer.endswith(f"blocked: {helper_module.NO_EGRESS}\n".encode())
        reader, writer = await _unix(r.socket_path)
        query = struct.pack(">HHHHHH", 9, 0x0100, 1, 0, 0, 0) + b"\x01a\x00\x00\x01\x00\x01"
        writer.write(STREAM_DNS + struct.pack(">H", len(query)) + query)
        size = struct.unpack(">H", await asyncio.wait_for(reader.readexactly(2), 5))[0]
        answer = await reader.readexactly(size)
        writer.close()
        assert answer[:2] == b"\x00\x09" and answer[3] & 0xF == helper_module.DNS_RCODE_REFUSED


async def test_an_unreachable_egress_is_a_clear_502(socket_dir: Path, free_port: int) -> None:
    async with SessionRelay(
        SESSION, socket_dir / "down.sock", ("127.0.0.1", free_port), uid=SANDBOX_UID
    ) as r:
        reader, writer = await _unix(r.socket_path)
        writer.write(STREAM_TCP + b"GET http://x.test/ HTTP/1.1\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.endswith(b"blocked: egress proxy unreachable\n")
        assert r.stats.egress_failures == 1


async def test_close_ends_every_connection_and_removes_the_socket(
    relay: SessionRelay, egress: StandInEgress
) -> None:
    egress.silent = True
    reader, writer = await _unix(relay.socket_path)
    writer.write(STREAM_TCP + b"CONNECT example.test:443 HTTP/1.1\r\n\r\n")
    for _ in range(100):
        if egress.held:
            break
        await asyncio.sleep(0.02)
    assert relay.stats.open == 1
    await asyncio.wait_for(relay.close(), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert not relay.socket_path.exists()
    assert relay.stats.open == 0
    with pytest.raises(OSError):
        await _unix(relay.socket_path)
    await relay.close()  # idempotent


async def test_streams_are_copied_with_backpressure(
    relay: SessionRelay, egress: StandInEgress
) -> None:
    # The egress never reads: what the sandbox may push is bounded by socket
    # buffers and the relay's one chunk in flight, not by memory.
    egress.silent = True
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(relay.socket_path))
    sock.setblocking(False)
    sock.send(STREAM_TCP)
    sent = 0
    stalls = 0
    chunk = b"x" * 65536
    while stalls < 5 and sent < 256 * 1024 * 1024:
        try:
            sent += sock.send(chunk)
            stalls = 0
        except BlockingIOError:
            stalls += 1
            await asyncio.sleep(0.1)
    sock.close()
    assert sent < 32 * 1024 * 1024, f"{sent} bytes went in without anyone reading"
    assert relay.stats.bytes_up <= sent


def test_the_preamble_is_parsed_strictly() -> None:
    async def parse(data: bytes) -> RelayPreamble:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await read_preamble(reader, timeout=1)

    async def main() -> None:
        assert await parse(session_line("abc") + STREAM_DNS) == RelayPreamble("abc", "dns")
        for bad in (
            b"SILO-SESSION abc\nUDP\n",
            b"SILO-SESSION a b\nTCP\n",
            b"SILO-SESSION \nTCP\n",
            b"SILO-SESSION " + b"a" * 65 + b"\nTCP\n",
            b"HELLO abc\nTCP\n",
            b"SILO-SESSION abc",
            b"x" * 100_000 + b"\n",
        ):
            with pytest.raises(ProtocolError):
                await parse(bad)

    asyncio.run(main())
    with pytest.raises(ValueError):
        session_line("bad id\nTCP")


async def test_an_existing_path_is_never_replaced(socket_dir: Path) -> None:
    taken = socket_dir / "taken.sock"
    taken.write_text("not ours")
    with pytest.raises(SandboxError, match="already exists"):
        await SessionRelay(SESSION, taken, None, uid=SANDBOX_UID).start()
    assert taken.read_text() == "not ours"


def _connect_as(uid: int, path: Path) -> str:
    """Try to connect to ``path`` as ``uid``: "ok", "closed" or the error's name."""
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        "    s.connect(sys.argv[1])\n"
        "except OSError as e:\n"
        "    print(type(e).__name__); sys.exit()\n"
        "s.settimeout(5)\n"
        "try:\n"
        "    s.sendall(b'TCP\\nGET http://a.test/ HTTP/1.1\\r\\n\\r\\n')\n"
        "    print('ok' if s.recv(100) else 'closed')\n"
        "except ConnectionError:\n"
        "    print('closed')\n"
    )
    out = subprocess.run(
        [
            "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            "/usr/bin/python3", "-I", "-c", probe, str(path),
        ],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return out.stdout.strip()


@root_only
async def test_only_the_sandbox_uid_can_connect(relay: SessionRelay) -> None:
    st = relay.socket_path.stat()
    assert (oct(st.st_mode & 0o777), st.st_uid) == ("0o600", SANDBOX_UID)
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, _connect_as, SANDBOX_UID, relay.socket_path) == "ok"
    other = SANDBOX_UID + 1
    assert await loop.run_in_executor(None, _connect_as, other, relay.socket_path) == (
        "PermissionError"
    )
    # Even if the mode were loosened, the peer check turns other uids away.
    relay.socket_path.chmod(0o666)
    assert await loop.run_in_executor(None, _connect_as, other, relay.socket_path) == "closed"
    assert relay.stats.refused == 1


def test_the_egress_framing_constants_are_the_helpers() -> None:
    assert (STREAM_TCP, STREAM_DNS) == (helper_module.STREAM_TCP, helper_module.STREAM_DNS)
    assert _spec.RELAY_SOCKET == helper_module.RELAY_SOCKET
