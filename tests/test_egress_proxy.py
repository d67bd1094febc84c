"""The egress proxy against a test internet: real curl, real TLS, real DNS, hostile answers.

The proxy runs in the test's process on loopback; a small relay in front of
it adds the executor's preamble, so ``curl -x`` and Python clients talk to
it exactly as a sandbox's helper would. Upstream servers and the DNS server
live in a network namespace on public-looking addresses
(:mod:`devsilo.testing._internet`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import ssl
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import dns.message
import dns.rcode
import pytest
from devsilo.egress._policy import PolicyTable
from devsilo.egress._proxy import BLOCKED_HEADER, EgressProxy, TrafficRecord
from devsilo.egress._secrets import CredentialStore
from devsilo.egress._upstream import Upstream, client_context
from devsilo.executor._relay import session_line
from devsilo.executor.helper.helper import splice
from devsilo.protocol import SessionGrant
from devsilo.testing._internet import HOSTILE, ZONE, TestInternet

SECRET = "sk-test-" + hashlib.sha256(os.urandom(16)).hexdigest()
PLACEHOLDER_SECRET = "ph-test-" + hashlib.sha256(os.urandom(16)).hexdigest()
WWW, API, OTHER = f"www.{ZONE}", f"api.{ZONE}", f"other.{ZONE}"


class Egress:
    """A proxy, its records, and a relay port in front of it for one session."""

    def __init__(self, internet: TestInternet, tmp: Path) -> None:
        self.internet = internet
        self.records: list[TrafficRecord] = []
        self.dns_answers: list[str] = []
        self.policies = PolicyTable()
        secret_file = tmp / "placeholder-secret"
        secret_file.write_text(PLACEHOLDER_SECRET + "\n")
        self.proxy = EgressProxy(
            policies=self.policies,
            upstream=Upstream(nameservers=[internet.dns_addr], trust=client_context([str(internet.ca_file)])),
            credentials=CredentialStore({
                "api": {"env": "SILO_TEST_API_TOKEN", "hosts": [API], "header": "Authorization: Bearer {secret}",
                        "users": ["alice"]},
                "token": {"file": str(secret_file), "hosts": [API], "placeholder": "DEVSILO_TOKEN_PLACEHOLDER",
                          "users": ["alice"]},
                "missing": {"env": "SILO_TEST_NOT_SET", "hosts": [OTHER], "header": "Authorization: {secret}",
                            "users": ["alice"]},
            }),
            on_record=self.records.append,
            on_dns=self.dns_answers.append,
        )
        self.ca_file = tmp / "session-ca.pem"

    def open(self, session_id: str, domains: list[str], credentials: tuple[str, ...] = ()) -> None:
        now = time.time()
        grant = SessionGrant(grant_id=session_id, session_id=session_id, user="alice", workspace="/w",
                             allow_domains=tuple(domains), credentials=credentials,
                             issued_at=now, expires_at=now + 600)
        policy = self.policies.install(grant)
        self.ca_file.write_bytes(self.proxy.open_session(policy))

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.proxy.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def relay(self, session_id: str, kind: bytes = b"TCP\n") -> tuple[asyncio.AbstractServer, int]:
        """A loopback port that forwards to the proxy as ``session_id``'s relay would."""

        async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
            up_writer.write(session_line(session_id) + kind)
            with contextlib.suppress(asyncio.CancelledError):  # the test ends while it still runs
                await splice(reader, writer, up_reader, up_writer)

        server = await asyncio.start_server(forward, "127.0.0.1", 0)
        return server, server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.server.close()
        self.proxy.close()
        await self.server.wait_closed()
        await asyncio.sleep(0)  # let the closed transports finish closing


@pytest.fixture
async def internet() -> AsyncIterator[TestInternet]:
    async with TestInternet() as inet:
        yield inet


@pytest.fixture
async def egress(internet: TestInternet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Egress]:
    monkeypatch.setenv("SILO_TEST_API_TOKEN", SECRET)
    eg = Egress(internet, tmp_path)
    await eg.start()
    try:
        yield eg
    finally:
        await eg.close()


async def curl(port: int, url: str, ca: Path, *extra: str) -> tuple[int, str, str]:
    """``curl`` through the relay port: (exit code, stdout, stderr); -i so headers come too."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-i", "--max-time", "20", "--noproxy", "", "-x", f"http://127.0.0.1:{port}",
        "--cacert", str(ca), *extra, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={"PATH": os.environ["PATH"]})
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def blocked_reason(output: str) -> str | None:
    for line in output.splitlines():
        if line.lower().startswith(BLOCKED_HEADER.lower() + ":"):
            return line.split(":", 1)[1].strip()
    return None


async def test_curl_reaches_an_allowed_host_over_intercepted_https(egress: Egress, internet: TestInternet) -> None:
    egress.open("s1", [f"*.{ZONE}"])
    relay, port = await egress.relay("s1")
    async with relay:
        code, out, err = await curl(port, f"https://{WWW}/hello", egress.ca_file)
        assert code == 0, err
        assert out.rstrip().endswith(f"hello from {WWW}")
        # keep-alive: two requests in one tunnel, one upstream connection
        code, out, err = await curl(port, f"https://{WWW}/hello", egress.ca_file, "-o", "/dev/null",
                                    "--next", "-x", f"http://127.0.0.1:{port}", "--cacert", str(egress.ca_file),
                                    f"https://{WWW}/hello?secret=q")
        assert code == 0, err
    assert internet.hits[WWW] == 3
    requests = [r for r in egress.records if r.method == "GET"]
    assert [(r.host, r.port, r.path, r.status, r.allowed) for r in requests] == [(WWW, 443, "/hello", 200, True)] * 3
    assert all("secret" not in r.path for r in egress.records)


async def test_the_sandbox_sees_the_session_ca_not_the_upstream_certificate(egress: Egress) -> None:
    egress.open("s1", [WWW])
    relay, port = await egress.relay("s1")
    async with relay:
        code, _, err = await curl(port, f"https://{WWW}/hello", egress.internet.ca_file)
        assert code == 60, (code, err)  # the upstream's CA does not vouch for the interception leaf
        code, _out, err = await curl(port, f"https://{WWW}/hello", egress.ca_file, "-v")
        assert code == 0
        assert "devsilo session s1" in err


async def test_python_urllib_and_plain_http_go_through(egress: Egress) -> None:
    egress.open("s1", [WWW])
    relay, port = await egress.relay("s1")
    async with relay:
        code, out, err = await curl(port, f"http://{WWW}/hello", egress.ca_file)
        assert code == 0 and f"hello from {WWW}" in out, err
        script = (
            "import ssl, urllib.request, sys\n"
            f"ctx = ssl.create_default_context(cafile={str(egress.ca_file)!r})\n"
            f"h = urllib.request.ProxyHandler({{'https': 'http://127.0.0.1:{port}'}})\n"
            "o = urllib.request.build_opener(h, urllib.request.HTTPSHandler(context=ctx))\n"
            f"sys.stdout.write(o.open('https://{WWW}/hello', timeout=20).read().decode())\n"
        )
        proc = await asyncio.create_subprocess_exec("python3", "-c", script, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        out_b, err_b = await proc.communicate()
        assert proc.returncode == 0, err_b.decode()
        assert out_b.decode() == f"hello from {WWW}\n"


@pytest.mark.parametrize(("url", "reason"), [
    (f"https://{OTHER}/hello", f"domain not allowed: {OTHER}"),
    (f"http://{OTHER}/hello", f"domain not allowed: {OTHER}"),
    (f"https://private.{HOSTILE}/", f"private.{HOSTILE} resolves to 10.0.0.5 is private"),
    (f"https://loopback.{HOSTILE}/", f"loopback.{HOSTILE} resolves to 127.0.0.1 is loopback"),
    (f"https://metadata.{HOSTILE}/", f"metadata.{HOSTILE} resolves to 169.254.169.254 is link-local"),
    (f"https://mapped.{HOSTILE}/", "is loopback (IPv4-mapped 127.0.0.1)"),
    (f"https://nat64.{HOSTILE}/", "is private (NAT64 10.0.0.5)"),
    (f"https://mixed.{HOSTILE}/", f"mixed.{HOSTILE} resolves to 10.0.0.5 is private"),
    (f"https://nxdomain.{HOSTILE}/", f"nxdomain.{HOSTILE} does not resolve"),
    ("https://10.0.0.5/", "address 10.0.0.5 is private"),
    ("https://[::1]/", "domain not allowed: ::1"),
    (f"https://untrusted.{ZONE}/hello", f"upstream certificate for untrusted.{ZONE} not trusted"),
])
async def test_each_refusal_says_why(egress: Egress, internet: TestInternet, url: str, reason: str) -> None:
    egress.open("s1", [WWW, API, f"*.{HOSTILE}", "10.0.0.5", f"untrusted.{ZONE}"])
    relay, port = await egress.relay("s1")
    async with relay:
        code, out, err = await curl(port, url, egress.ca_file)
        # curl shows a refused CONNECT's headers, not its body: read the body first-hand
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        authority = urlsplit(url).netloc
        if url.startswith("https:"):
            writer.write(f"CONNECT {authority}:443 HTTP/1.1\r\nHost: {authority}:443\r\n\r\n".encode())
        else:
            writer.write(f"GET {url} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), 20)
        writer.close()
    assert " 403 " in out or " 502 " in out, (code, out, err)
    got = blocked_reason(out)
    assert got is not None, (out, err)
    assert reason in got
    assert raw.split(b"\r\n\r\n", 1)[1] == f"blocked: {got}\n".encode()
    assert sum(internet.hits.values()) == 0
    record = egress.records[-1]
    assert not record.allowed and reason in record.reason and record.label


async def test_a_rebinding_name_is_only_ever_connected_at_the_address_that_was_checked(
        egress: Egress, internet: TestInternet) -> None:
    egress.open("s1", [f"*.{HOSTILE}"])
    relay, port = await egress.relay("s1")
    async with relay:
        # first lookup: public (www's address), checked, connected to that address; the
        # server's certificate does not name rebind.*, so TLS verification then refuses it
        _code, out, _ = await curl(port, f"https://rebind.{HOSTILE}/hello", egress.ca_file)
        assert "not trusted" in (blocked_reason(out) or "")
        _code, out, _ = await curl(port, f"https://rebind.{HOSTILE}/hello", egress.ca_file)
        assert blocked_reason(out) == f"rebind.{HOSTILE} resolves to 10.0.0.5 is private"
    assert [q for q in internet.queries if q == (f"rebind.{HOSTILE}", "A")] == [(f"rebind.{HOSTILE}", "A")] * 2


async def test_host_header_and_sni_must_agree_with_the_tunnel(egress: Egress) -> None:
    egress.open("s1", [WWW, OTHER])
    relay, port = await egress.relay("s1")
    async with relay:
        _code, out, _ = await curl(port, f"https://{WWW}/hello", egress.ca_file, "-H", f"Host: {OTHER}")
        assert blocked_reason(out) == f"Host header disagrees with the tunnel to {WWW}:443"
        # SNI for another (even allowed) host than the CONNECT target: the handshake fails
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"CONNECT {WWW}:443 HTTP/1.1\r\nHost: {WWW}:443\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        ctx = ssl.create_default_context(cafile=str(egress.ca_file))
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await writer.start_tls(ctx, server_hostname=OTHER)
        writer.close()
    assert egress.internet.hits[OTHER] == 0 and egress.internet.hits[WWW] == 0


async def test_credentials_are_injected_for_their_exact_host_only_and_never_seen(egress: Egress) -> None:
    egress.open("s1", [WWW, API, OTHER], credentials=("api", "token", "missing"))
    relay, port = await egress.relay("s1")
    async with relay:
        code, out, err = await curl(port, f"https://{API}/headers", egress.ca_file,
                                    "-H", "X-Token: DEVSILO_TOKEN_PLACEHOLDER")
        assert code == 0, err
        seen = json.loads(out.rsplit("\r\n\r\n", 1)[1])
        assert seen["authorization_sha256"] == hashlib.sha256(f"Bearer {SECRET}".encode()).hexdigest()
        assert seen["x_token_sha256"] == hashlib.sha256(PLACEHOLDER_SECRET.encode()).hexdigest()
        code, out, err = await curl(port, f"https://{WWW}/headers", egress.ca_file,
                                    "-H", "X-Token: DEVSILO_TOKEN_PLACEHOLDER")
        seen = json.loads(out.rsplit("\r\n\r\n", 1)[1])
        assert seen["authorization_sha256"] is None
        assert seen["x_token_sha256"] == hashlib.sha256(b"DEVSILO_TOKEN_PLACEHOLDER").hexdigest()
        # a credential that cannot be read: no request at all (fail closed)
        code, out, err = await curl(port, f"https://{OTHER}/hello", egress.ca_file)
        assert blocked_reason(out) == "credential missing is unavailable (environment variable not set)"
    assert egress.internet.hits[OTHER] == 0
    assert [r.credential for r in egress.records if r.method == "GET"] == [True, False, False]
    everything = repr(egress.records) + repr(egress.dns_answers)
    assert SECRET not in everything and PLACEHOLDER_SECRET not in everything


async def test_a_session_without_the_grant_or_user_gets_no_credential(egress: Egress) -> None:
    egress.open("s1", [API])  # the grant names no credentials
    relay, port = await egress.relay("s1")
    async with relay:
        _code, out, _err = await curl(port, f"https://{API}/headers", egress.ca_file)
    assert json.loads(out.rsplit("\r\n\r\n", 1)[1])["authorization_sha256"] is None


async def test_unknown_session_malformed_and_non_http_streams_are_refused(egress: Egress) -> None:
    relay, port = await egress.relay("nosuch")
    async with relay:
        _code, out, _ = await curl(port, f"https://{WWW}/hello", egress.ca_file)
        assert blocked_reason(out) == "no policy for this session (it ended or was never opened)"
    egress.open("s1", [WWW])
    relay, port = await egress.relay("s1")
    async with relay:
        for garbage in (b"GET\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64,
                        b"SSH-2.0-OpenSSH_9.2\r\n\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(garbage)
            data = await asyncio.wait_for(reader.read(), 10)
            assert data == b"" or data.startswith(b"HTTP/1.1 400"), data[:200]
            writer.close()
        _code, out, _ = await curl(port, f"http://{WWW}/hello", egress.ca_file, "--request-target", "ftp://x/")
        assert out.startswith("HTTP/1.1 400")
        assert blocked_reason(out) == "only CONNECT and absolute http:// URLs can go through this proxy"
    # a connection that never sends its preamble is closed, not served
    reader, writer = await asyncio.open_connection("127.0.0.1", egress.port)
    writer.write(b"CONNECT www:443 HTTP/1.1\r\n\r\n")
    assert await asyncio.wait_for(reader.read(), 15) == b""
    writer.close()


async def test_websocket_upgrade_to_an_allowed_host(egress: Egress) -> None:
    import aiohttp

    egress.open("s1", [WWW])
    relay, port = await egress.relay("s1")
    ctx = ssl.create_default_context(cafile=str(egress.ca_file))
    async with relay, aiohttp.ClientSession() as session, session.ws_connect(
            f"https://{WWW}/ws", proxy=f"http://127.0.0.1:{port}", ssl=ctx) as ws:
        await ws.send_str("ping")
        msg = await ws.receive(timeout=10)
        assert msg.data == "echo: ping"
    # the upgrade's record is written when the pipe ends, with its bytes
    for _ in range(100):
        if any(r.status == 101 for r in egress.records):
            break
        await asyncio.sleep(0.1)
    ws_record = next(r for r in egress.records if r.status == 101)
    assert ws_record.path == "/ws" and ws_record.allowed and ws_record.bytes_out > 0 and ws_record.bytes_in > 0


async def test_large_bodies_stream_both_ways(egress: Egress) -> None:
    egress.open("s1", [WWW])
    relay, port = await egress.relay("s1")
    size = 32 * 1024 * 1024
    async with relay:
        code, out, err = await curl(port, f"https://{WWW}/bytes?n={size}", egress.ca_file,
                                    "-o", "/dev/null", "-w", "%{size_download}")
        assert code == 0, err
        assert out.endswith(str(size))
    assert egress.records[-1].bytes_in == size


def dns_query(name: str, rdtype: str = "A") -> bytes:
    wire = dns.message.make_query(name, rdtype).to_wire()
    return struct.pack(">H", len(wire)) + wire


async def dns_ask(egress: Egress, session_id: str, name: str, rdtype: str = "A") -> dns.message.Message:
    reader, writer = await asyncio.open_connection("127.0.0.1", egress.port)
    try:
        writer.write(session_line(session_id) + b"DNS\n" + dns_query(name, rdtype))
        size = struct.unpack(">H", await asyncio.wait_for(reader.readexactly(2), 10))[0]
        return dns.message.from_wire(await reader.readexactly(size))
    finally:
        writer.close()


async def test_dns_answers_allowed_names_and_never_asks_for_others(egress: Egress, internet: TestInternet) -> None:
    egress.open("s1", [WWW, f"*.{HOSTILE}"])
    answer = await dns_ask(egress, "s1", WWW)
    assert answer.rcode() == dns.rcode.NOERROR
    assert [str(r) for rrset in answer.answer for r in rrset] == [internet.sites["www"].address]
    answer = await dns_ask(egress, "s1", OTHER)
    assert answer.rcode() == dns.rcode.NXDOMAIN
    answer = await dns_ask(egress, "s1", f"private.{HOSTILE}")
    assert answer.rcode() == dns.rcode.REFUSED and not answer.answer
    answer = await dns_ask(egress, "s1", WWW, "TXT")
    assert answer.rcode() == dns.rcode.NOERROR and not answer.answer
    answer = await dns_ask(egress, "nosuch", WWW)
    assert answer.rcode() == dns.rcode.REFUSED
    asked = {name for name, _ in internet.queries}
    assert OTHER not in asked
    assert WWW in asked and f"private.{HOSTILE}" in asked


async def test_garbage_dns_gets_no_answer_and_does_not_stop_the_stream(egress: Egress) -> None:
    egress.open("s1", [WWW])
    reader, writer = await asyncio.open_connection("127.0.0.1", egress.port)
    try:
        writer.write(session_line("s1") + b"DNS\n" + struct.pack(">H", 5) + b"\xff" * 5 + dns_query(WWW))
        size = struct.unpack(">H", await asyncio.wait_for(reader.readexactly(2), 10))[0]
        answer = dns.message.from_wire(await reader.readexactly(size))
        assert answer.rcode() == dns.rcode.NOERROR and answer.answer
    finally:
        writer.close()
    assert "malformed" in egress.dns_answers


async def test_closing_a_session_drops_its_ca_and_policy(egress: Egress) -> None:
    egress.open("s1", [WWW])
    egress.proxy.close_session("s1")
    egress.policies.remove("s1")
    relay, port = await egress.relay("s1")
    async with relay:
        _code, out, _ = await curl(port, f"https://{WWW}/hello", egress.ca_file)
    assert blocked_reason(out) == "no policy for this session (it ended or was never opened)"


async def test_http2_from_the_sandbox_is_checked_per_stream(egress: Egress, internet: TestInternet,
                                                            tmp_path: Path) -> None:
    egress.open("s1", [WWW, API], credentials=("api",))
    relay, port = await egress.relay("s1")
    upload = tmp_path / "upload"
    upload.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    async with relay:
        code, out, err = await curl(port, f"https://{WWW}/hello", egress.ca_file, "--http2", "-v")
        assert code == 0, err
        assert "ALPN: server accepted h2" in err and out.rstrip().endswith(f"hello from {WWW}")
        assert "HTTP/2 200" in out
        # a body up and a larger one down, through HTTP/2 flow control
        code, out, err = await curl(port, f"https://{WWW}/echo", egress.ca_file, "--http2",
                                    "--data-binary", f"@{upload}", "-o", str(tmp_path / "echoed"))
        assert code == 0, err
        echoed = (tmp_path / "echoed").read_bytes()  # -i: the response head comes first
        assert echoed.endswith(upload.read_bytes()) and len(echoed) - upload.stat().st_size < 1024
        code, out, err = await curl(port, f"https://{WWW}/bytes?n={8 << 20}", egress.ca_file, "--http2",
                                    "-o", "/dev/null", "-w", "%{size_download}")
        assert code == 0 and out.endswith(str(8 << 20)), err
        # two streams on one connection, each its own request
        code, out, err = await curl(port, f"https://{WWW}/hello", egress.ca_file, "--http2", "--parallel",
                                    "--parallel-immediate", "-o", "/dev/null", "-o", "/dev/null",
                                    f"https://{WWW}/hello?x=2")
        assert code == 0, err
        # the authority must name the tunnel's host, per stream
        code, out, err = await curl(port, f"https://{WWW}/hello", egress.ca_file, "--http2", "-H", f"Host: {API}")
        assert "HTTP/2 403" in out and blocked_reason(out) == f"Host header disagrees with the tunnel to {WWW}:443"
        # credentials for the exact host, over HTTP/2 too
        code, out, err = await curl(port, f"https://{API}/headers", egress.ca_file, "--http2")
        seen = json.loads(out.rsplit("\r\n\r\n", 1)[1])
        assert seen["authorization_sha256"] == hashlib.sha256(f"Bearer {SECRET}".encode()).hexdigest()
    assert internet.hits[API] == 1
    got = [(r.path, r.status, r.allowed) for r in egress.records if r.method in ("GET", "POST")]
    assert ("/echo", 200, True) in got and ("/hello", 403, False) in got
    assert next(r for r in egress.records if r.path == "/echo").bytes_out == upload.stat().st_size


async def test_git_clone_and_pip_install_through_the_egress(egress: Egress, internet: TestInternet,
                                                            tmp_path: Path) -> None:
    commit = internet.add_git_repo("tool", {"README": "a repository in the test internet\n"})
    internet.add_package("silo-test-pkg", "1.0", "ANSWER = 42\n")
    egress.open("s1", [WWW])
    relay, port = await egress.relay("s1")
    proxy = f"http://127.0.0.1:{port}"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    async with relay:
        git = await asyncio.create_subprocess_exec(
            "git", "-c", f"http.proxy={proxy}", "-c", f"http.sslCAInfo={egress.ca_file}", "clone", "-q",
            f"https://{WWW}/static/git/tool.git", str(tmp_path / "tool"),
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await git.communicate()
        assert git.returncode == 0, err.decode()
        pip = await asyncio.create_subprocess_exec(
            "/usr/bin/python3", "-m", "pip", "install", "-q", "--no-cache-dir", "--disable-pip-version-check",
            "--target", str(tmp_path / "site"), "--index-url", f"https://{WWW}/simple/",
            "--cert", str(egress.ca_file), "--proxy", proxy, "silo-test-pkg",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await pip.communicate()
        assert pip.returncode == 0, err.decode()
    assert (tmp_path / "tool" / "README").read_text() == "a repository in the test internet\n"
    head = await asyncio.create_subprocess_exec("git", "-C", str(tmp_path / "tool"), "rev-parse", "HEAD",
                                                stdout=asyncio.subprocess.PIPE)
    assert (await head.communicate())[0].decode().strip() == commit
    assert (tmp_path / "site" / "silo_test_pkg.py").read_text() == "ANSWER = 42\n"


async def test_a_request_head_that_never_ends_gets_a_clear_answer(egress: Egress) -> None:
    egress.open("s1", [WWW])
    relay, port = await egress.relay("s1")
    async with relay:
        # more head than the proxy buffers (64 KiB) and no end to it: 431, not a hang or a reset
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET http://" + WWW.encode() + b"/ HTTP/1.1\r\nX: " + b"b" * 70_000)
        answer = await asyncio.wait_for(reader.read(), 15)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert blocked_reason(answer.decode()) is not None
    assert egress.internet.hits[WWW] == 0


async def test_idle_upstream_connections_serve_the_same_session_only(egress: Egress, internet: TestInternet) -> None:
    egress.open("s2", [WWW])
    ca2 = egress.ca_file.with_name("s2-ca.pem")
    ca2.write_bytes(egress.ca_file.read_bytes())
    egress.open("s1", [WWW])
    relay1, port1 = await egress.relay("s1")
    relay2, port2 = await egress.relay("s2")
    lookups = lambda: sum(1 for name, kind in internet.queries if name == WWW and kind == "A")
    async with relay1, relay2:
        code, _, err = await curl(port1, f"https://{WWW}/hello", egress.ca_file)
        assert code == 0, err
        assert lookups() == 1
        # a new client connection of the same session: the idle upstream one, no new lookup
        code, _, err = await curl(port1, f"https://{WWW}/hello", egress.ca_file)
        assert code == 0, err
        assert lookups() == 1
        # another session never gets it: its own lookup, its own connection
        code, _out, err = await curl(port2, f"https://{WWW}/hello", ca2)
        assert code == 0, err
        assert lookups() == 2
    assert internet.hits[WWW] == 3
    # a session's end closes its idle connections
    assert any(k[0] == "s1" for k in egress.proxy._idle)
    egress.proxy.close_session("s1")
    assert not any(k[0] == "s1" for k in egress.proxy._idle)
