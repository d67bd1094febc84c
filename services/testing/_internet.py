"""A small internet for tests: a network namespace with public-looking addresses.

No real internet is reachable here, and tests must never send traffic
anywhere but loopback and namespaces they made. :class:`TestInternet`
makes one namespace joined to the host by a veth pair, puts a few
public-looking addresses on its side (``45.N.M.0/24``: not in any range the
egress guard blocks), and serves, from sockets created *inside* the
namespace but driven by the test's own event loop:

* HTTPS (and plain HTTP on port 80) on each web address, with certificates
  from a test CA the egress is told to trust: ``/hello``, ``/headers``
  (request header names, and a SHA-256 of the Authorization value so a test
  can check an injected credential without the server echoing it),
  ``/bytes?n=N``, ``POST /echo``, ``/ws`` (a WebSocket echo), and static
  files from :attr:`TestInternet.static` (a dumb-HTTP git repository, a
  package index);
* DNS (UDP and TCP, dnslib) with the names in :data:`NAMES`, including the
  hostile ones: private, loopback and metadata addresses, IPv4-mapped and
  NAT64 IPv6 forms, a rebinding name that answers public once then private,
  and a name with both a public and a private answer. Every query it gets is
  recorded in :attr:`TestInternet.queries`, so a test can prove the egress
  never asked.

Each server also counts the requests it answered (:attr:`TestInternet.hits`),
so a test can tell "refused before connecting" from "refused after".
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import ipaddress
import os
import random
import socket
import ssl
import struct
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from aiohttp import WSMsgType, web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord

from ._netns import socket_in_netns

ZONE = "test-inet.example"
HOSTILE = "hostile.example"


@dataclass
class Site:
    """One web server in the test internet."""

    name: str
    address: str
    trusted: bool = True
    """Whether its certificate comes from the CA the egress trusts."""


@dataclass
class TestInternet:
    """Handles to a running test internet (see the module docs); use ``async with``."""

    __test__ = False  # not a pytest test class, whatever its name

    token: str = field(default_factory=lambda: f"{random.randrange(16**6):06x}")
    net: str = field(default_factory=lambda: f"45.{random.randrange(1, 250)}.{random.randrange(1, 250)}")
    static: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="silo-inet-static-")))
    queries: list[tuple[str, str]] = field(default_factory=list)
    hits: Counter[str] = field(default_factory=Counter)
    auth_seen: list[str] = field(default_factory=list)
    """SHA-256 of each Authorization header the servers received (never the value)."""

    def __post_init__(self) -> None:
        self.ns = f"dsinet-{self.token}"
        self.dns_addr = f"{self.net}.53"
        self.sites = {
            "www": Site(f"www.{ZONE}", f"{self.net}.10"),
            "api": Site(f"api.{ZONE}", f"{self.net}.11"),
            "other": Site(f"other.{ZONE}", f"{self.net}.12"),
            "untrusted": Site(f"untrusted.{ZONE}", f"{self.net}.13", trusted=False),
        }
        self._rebind_count = 0
        self._runners: list[web.AppRunner] = []
        self._transports: list[asyncio.BaseTransport] = []
        self._dns_servers: list[asyncio.AbstractServer] = []
        self._made = False
        self.ca_file = self.static.parent / f"silo-inet-ca-{self.token}.pem"

    # -- names --------------------------------------------------------------------------

    def answers(self, name: str, qtype: str) -> list[str] | None:
        """What the DNS server answers (None: NXDOMAIN)."""
        name = name.rstrip(".").lower()
        v4: dict[str, list[str]] = {site.name: [site.address] for site in self.sites.values()}
        v4.update({
            f"private.{HOSTILE}": ["10.0.0.5"],
            f"loopback.{HOSTILE}": ["127.0.0.1"],
            f"metadata.{HOSTILE}": ["169.254.169.254"],
            f"mixed.{HOSTILE}": [self.sites["www"].address, "10.0.0.5"],
        })
        v6: dict[str, list[str]] = {
            f"mapped.{HOSTILE}": ["::ffff:127.0.0.1"],
            f"nat64.{HOSTILE}": ["64:ff9b::a00:5"],
        }
        if name == f"rebind.{HOSTILE}":
            if qtype != "A":
                return []
            self._rebind_count += 1
            return [self.sites["www"].address] if self._rebind_count == 1 else ["10.0.0.5"]
        if name in v4 or name in v6:
            return v4.get(name, []) if qtype == "A" else v6.get(name, []) if qtype == "AAAA" else []
        return None

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        try:
            self._make_namespace()
            self._make_certs()
            for site in self.sites.values():
                await self._serve_site(site)
            await self._serve_dns()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        for transport in self._transports:
            transport.close()
        for server in self._dns_servers:
            server.close()
            with contextlib.suppress(Exception):
                await server.wait_closed()
        if self._made:
            await (await asyncio.create_subprocess_exec("ip", "netns", "del", self.ns)).wait()
            self._made = False
        with contextlib.suppress(OSError):
            self.ca_file.unlink()

    def add_git_repo(self, name: str, files: dict[str, str]) -> str:
        """A git repository served over dumb HTTP at ``/static/git/<name>.git``; returns its commit."""
        work = self.static / "git-work" / name
        bare = self.static / "git" / f"{name}.git"
        work.mkdir(parents=True)
        for path, text in files.items():
            (work / path).parent.mkdir(parents=True, exist_ok=True)
            (work / path).write_text(text)
        env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@example", "HOME": str(work), "PATH": os.environ.get("PATH", "")}

        def git(*args: str, cwd: Path = work) -> str:
            return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                                  text=True, timeout=30).stdout.strip()

        git("init", "-q", "-b", "main")
        git("add", "-A")
        git("commit", "-qm", "test repository")
        git("clone", "-q", "--bare", str(work), str(bare), cwd=self.static)
        git("update-server-info", cwd=bare)
        return git("rev-parse", "HEAD")

    def add_package(self, name: str, version: str, module_text: str) -> None:
        """A pure-Python wheel in a PEP 503 index at ``/simple/<name>/``."""
        import base64
        import zipfile

        dist = f"{name.replace('-', '_')}-{version}"
        wheel_name = f"{dist}-py3-none-any.whl"
        folder = self.static / "simple" / name
        folder.mkdir(parents=True)
        files = {
            f"{name.replace('-', '_')}.py": module_text.encode(),
            f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
            f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: silo-test\nRoot-Is-Purelib: true\n"
                                       b"Tag: py3-none-any\n",
        }
        record = []
        for path, data in files.items():
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{path},sha256={digest},{len(data)}")
        record.append(f"{dist}.dist-info/RECORD,,")
        files[f"{dist}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
        with zipfile.ZipFile(folder / wheel_name, "w") as whl:
            for path, data in files.items():
                whl.writestr(path, data)
        sha = hashlib.sha256((folder / wheel_name).read_bytes()).hexdigest()
        (folder / "index.html").write_text(
            f'<!DOCTYPE html><html><body><a href="/static/simple/{name}/{wheel_name}#sha256={sha}">'
            f"{wheel_name}</a></body></html>\n")

    def _make_namespace(self) -> None:
        host_if, ns_if = f"dih{self.token}", f"din{self.token}"

        def ip(*args: str) -> None:
            subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

        ip("netns", "add", self.ns)
        self._made = True
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", self.ns)
        ip("addr", "add", f"{self.net}.1/24", "dev", host_if)
        ip("link", "set", host_if, "up")
        for address in [s.address for s in self.sites.values()] + [self.dns_addr]:
            ip("-n", self.ns, "addr", "add", f"{address}/24", "dev", ns_if)
        ip("-n", self.ns, "link", "set", ns_if, "up")
        ip("-n", self.ns, "link", "set", "lo", "up")

    def _make_certs(self) -> None:
        now = dt.datetime.now(dt.UTC)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"silo test internet CA {self.token}")])
        self._ca = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
            .public_key(self._ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._ca_key, hashes.SHA256())
        )
        self.ca_pem = self._ca.public_bytes(serialization.Encoding.PEM)
        self.ca_file.write_bytes(self.ca_pem)

    def issue(self, site: Site) -> tuple[bytes, bytes]:
        """A certificate (PEM) for ``site`` from the test CA (or a stranger's, if untrusted) and its key."""
        now = dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        if site.trusted:
            issuer_key, issuer = self._ca_key, self._ca.subject
        else:
            issuer_key = ec.generate_private_key(ec.SECP256R1())
            issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone else's CA")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site.name)]))
            .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName(site.name), x509.IPAddress(ipaddress.ip_address(site.address))]), critical=False)
            .sign(issuer_key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    def hosts_file(self) -> str:
        """``/etc/hosts`` lines for the web sites, for programs that cannot be told a DNS server."""
        return "".join(f"{site.address} {site.name}\n" for site in self.sites.values())

    def _server_context(self, site: Site) -> ssl.SSLContext:
        cert, key = self.issue(site)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        fd = os.memfd_create("inet-cert", os.MFD_CLOEXEC)
        try:
            os.write(fd, cert + key)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    async def _serve_site(self, site: Site) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)

        async def hello(request: web.Request) -> web.Response:
            self.hits[site.name] += 1
            return web.Response(text=f"hello from {site.name}\n")

        async def headers(request: web.Request) -> web.Response:
            self.hits[site.name] += 1
            auth = request.headers.get("Authorization")
            digest = hashlib.sha256(auth.encode()).hexdigest() if auth is not None else None
            if digest is not None:
                self.auth_seen.append(digest)
            return web.json_response({
                "names": sorted({k.lower() for k in request.headers}),
                "host": request.headers.get("Host"),
                "authorization_sha256": digest,
                "x_token_sha256": hashlib.sha256(request.headers["X-Token"].encode()).hexdigest()
                if "X-Token" in request.headers else None,
            })

        async def some_bytes(request: web.Request) -> web.StreamResponse:
            self.hits[site.name] += 1
            n = int(request.query.get("n", "0"))
            resp = web.StreamResponse(headers={"Content-Length": str(n), "Content-Type": "application/octet-stream"})
            await resp.prepare(request)
            block = b"\0" * (256 * 1024)
            while n > 0:
                await resp.write(block[: min(n, len(block))])
                n -= min(n, len(block))
            await resp.write_eof()
            return resp

        async def echo(request: web.Request) -> web.Response:
            self.hits[site.name] += 1
            return web.Response(body=await request.read())

        async def search(request: web.Request) -> web.Response:
            # A search API's shape: the query back, and results that depend on it.
            self.hits[site.name] += 1
            query = request.query.get("q", "")
            return web.json_response({"query": query, "results": [
                {"title": f"{word} explained", "url": f"https://{site.name}/wiki/{word}"}
                for word in query.split()]})

        async def ws(request: web.Request) -> web.WebSocketResponse:
            self.hits[site.name] += 1
            sock = web.WebSocketResponse()
            await sock.prepare(request)
            async for msg in sock:
                if msg.type == WSMsgType.TEXT:
                    await sock.send_str(f"echo: {msg.data}")
            return sock

        app.router.add_get("/hello", hello)
        app.router.add_get("/search", search)
        app.router.add_get("/headers", headers)
        app.router.add_get("/bytes", some_bytes)
        app.router.add_post("/echo", echo)
        app.router.add_get("/ws", ws)
        async def simple(request: web.Request) -> web.StreamResponse:
            self.hits[site.name] += 1
            project = request.match_info["project"]
            page = self.static / "simple" / project / "index.html"
            if "/" in project or not page.is_file():
                raise web.HTTPNotFound()
            return web.FileResponse(page)

        app.router.add_get("/simple/{project}/", simple)
        app.router.add_static("/static/", self.static, show_index=False)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        tls_sock = self._socket(socket.SOCK_STREAM, site.address, 443)
        await web.SockSite(runner, tls_sock, ssl_context=self._server_context(site)).start()
        plain_sock = self._socket(socket.SOCK_STREAM, site.address, 80)
        await web.SockSite(runner, plain_sock).start()

    async def _serve_dns(self) -> None:
        loop = asyncio.get_running_loop()
        internet = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                answer = internet._dns_answer(data)
                if answer is not None:
                    self.transport.sendto(answer, addr)  # type: ignore[attr-defined]

        transport, _ = await loop.create_datagram_endpoint(Udp, sock=self._socket(socket.SOCK_DGRAM, self.dns_addr, 53))
        self._transports.append(transport)

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    size = struct.unpack(">H", await reader.readexactly(2))[0]
                    answer = self._dns_answer(await reader.readexactly(size))
                    if answer is not None:
                        writer.write(struct.pack(">H", len(answer)) + answer)
                        await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass  # the client closed its end
            finally:
                writer.close()

        self._dns_servers.append(await asyncio.start_server(tcp, sock=self._socket(socket.SOCK_STREAM, self.dns_addr, 53)))

    def _dns_answer(self, data: bytes) -> bytes | None:
        try:
            query = DNSRecord.parse(data)
        except Exception:  # noqa: BLE001 — dnslib raises assorted errors on garbage
            return None
        reply = query.reply()
        for question in query.questions:
            name, qtype = str(question.qname).rstrip("."), QTYPE[question.qtype]
            self.queries.append((name.lower(), qtype))
            answers = self.answers(name, qtype)
            if answers is None:
                reply.header.rcode = RCODE.NXDOMAIN
                continue
            for address in answers:
                rdata = A(address) if qtype == "A" else AAAA(list(ipaddress.IPv6Address(address).packed))
                reply.add_answer(RR(question.qname, question.qtype, rdata=rdata, ttl=1))
        return reply.pack()

    def _socket(self, kind: int, address: str, port: int) -> socket.socket:
        """A socket bound (and, for TCP, listening) inside the namespace."""
        return socket_in_netns(self.ns, address, port, kind)
