"""The egress proxy: every sandbox connection, decided, intercepted, checked, recorded.

Each connection comes from an executor's relay (see
:mod:`devsilo.executor._relay` for the framing): a preamble naming the
session and the kind, then either one proxy client's bytes (``TCP``) or
length-prefixed DNS messages (``DNS``).

``TCP``, the HTTP(S) proxy, parsed with h11 on both sides:

* ``CONNECT host:port`` — the decision is taken on the tunnel's target: the
  name is normalised (:mod:`._names`) and must be on the session's
  allow-list. The proxy answers 200, then terminates TLS itself with a leaf
  for that host from the session's CA (:mod:`._ca`); a ClientHello whose
  SNI names another host fails the handshake. Inside, each request's
  ``Host`` must name the tunnel's host (and port, when it gives one),
  otherwise it is refused: the sandbox chooses the Host header, so it never
  decides anything.
* an absolute-form ``http://host[:port]/…`` request — plain HTTP forward
  proxying, decided on the URI's host, which ``Host`` must agree with; one
  host per client connection.

Allowed requests go upstream over a connection the proxy opens itself
(:mod:`._upstream`: resolved once, every answer checked by the address
guard, connected to a checked address, TLS verified for the host), with
the session's credentials for that exact host injected (:mod:`._secrets`,
failing closed) and hop-by-hop proxy headers removed. Responses stream back
as they arrive; a ``101 Switching Protocols`` (WebSocket) turns the rest of
the connection into a byte pipe. Every refusal is an HTTP response whose
``X-Devsilo-Blocked`` header and one-line body say why. Every request,
allowed or not, produces a :class:`TrafficRecord` — never bodies, never
header values.

``DNS`` — answered here, never forwarded for a name off the allow-list:
allowed names get their checked A/AAAA addresses, other names NXDOMAIN,
names whose addresses the guard refuses REFUSED.

HTTP/2: a sandbox client that offers ``h2`` gets it (:mod:`._h2`), with
every stream checked as above; upstream connections are HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import SplitResult, urlsplit

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import h11
from devsilo.executor._relay import RelayPreamble, read_preamble
from devsilo.executor.helper.helper import splice
from devsilo.protocol import ProtocolError, SiloError
from devsilo.protocol._names import AllowList, BadHost, normalise_host

from ._ca import SessionCA
from ._h2 import H2Tunnel
from ._policy import PolicyTable, SessionPolicy
from ._secrets import CredentialError, CredentialStore, inject
from ._upstream import Refused, Upstream

BLOCKED_HEADER = "X-Devsilo-Blocked"
HEAD_MAX = 64 * 1024
CHUNK = 256 * 1024
IDLE_TIMEOUT = 120.0
TLS_HANDSHAKE_TIMEOUT = 15.0
MAX_DNS_MESSAGE = 4096
DNS_TTL = 30
RECORD_PATH_MAX = 512
POOL_IDLE_S = 30.0
"""How long an idle upstream connection is kept for the same session and host."""
POOL_PER_HOST = 4

# Sent by the sandbox to its proxy, not for the upstream server.
_HOP_BY_HOP = {b"proxy-authorization", b"proxy-connection", b"proxy-authenticate", b"keep-alive", b"te"}


@dataclass
class TrafficRecord:
    """One request through the egress, for the session's journal (REQUIREMENTS §4)."""

    session_id: str
    host: str
    port: int
    method: str
    path: str
    status: int = 0
    bytes_in: int = 0
    """Body bytes from upstream to the sandbox."""
    bytes_out: int = 0
    """Body bytes from the sandbox to upstream."""
    duration_ms: float = 0.0
    allowed: bool = False
    reason: str = ""
    """Why it was refused (empty when allowed)."""
    label: str = ""
    """The reason's low-cardinality label, for metrics."""
    credential: bool = False
    started: float = field(default_factory=time.monotonic, repr=False)
    record_id: str = field(default_factory=lambda: uuid.uuid4().hex, repr=False)


class _StaleUpstream(Exception):
    """A pooled upstream connection turned out closed before it answered."""


class Blocked(Exception):
    """A refusal: ``reason`` for the client, ``label`` for metrics, the HTTP ``status``."""

    def __init__(self, reason: str, label: str, status: int = 403) -> None:
        super().__init__(reason)
        self.reason = reason
        self.label = label
        self.status = status


class _Half:
    """One side of an HTTP/1.1 conversation: an h11 connection over asyncio streams."""

    def __init__(self, role: type[h11.CLIENT | h11.SERVER],
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conn = h11.Connection(role, max_incomplete_event_size=HEAD_MAX)
        self.reader = reader
        self.writer = writer
        self.reused = False
        """Taken from the pool: it may have been closed by the server meanwhile."""

    async def next_event(self) -> h11.Event:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                if isinstance(event, (h11.Request, h11.InformationalResponse, h11.Response)) and \
                        _head_size(event) > HEAD_MAX:
                    # h11 limits only a head still incomplete; one that arrived whole in a read is as big.
                    raise h11.RemoteProtocolError(f"message head larger than {HEAD_MAX} bytes",
                                                  error_status_hint=431)
                return event  # type: ignore[return-value]
            data = await asyncio.wait_for(self.reader.read(CHUNK), IDLE_TIMEOUT)
            self.conn.receive_data(data)

    async def send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            self.writer.write(data)
            await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


def _head_size(event: h11.Request | h11.InformationalResponse | h11.Response) -> int:
    """About the size of an HTTP/1.1 message head: its start line and headers as sent."""
    start = len(event.method) + len(event.target) if isinstance(event, h11.Request) else len(event.reason) + 4
    return start + 12 + sum(len(name) + len(value) + 4 for name, value in event.headers) + 2


@dataclass
class _Route:
    """Where one client connection's requests go: decided once, for all of them."""

    session: SessionPolicy
    host: str
    port: int
    tls: bool


class EgressProxy:
    """Serves relay connections for every session whose policy is installed."""

    def __init__(
        self,
        *,
        policies: PolicyTable,
        upstream: Upstream,
        credentials: CredentialStore | None = None,
        on_record: Callable[[TrafficRecord], None] = lambda record: None,
        on_dns: Callable[[str], None] = lambda answer: None,
        authenticate: Callable[[RelayPreamble], str] | None = None,
    ) -> None:
        """``authenticate`` checks a relay's signed first line and returns its session id
        (raising a :class:`~devsilo.protocol.SiloError` otherwise); when it is given,
        bare ``SILO-SESSION`` lines are refused. Without it (a proxy on its own, in tests
        and the benchmark) only bare lines are understood."""
        self.authenticate = authenticate
        self.policies = policies
        self.upstream = upstream
        self.credentials = credentials or CredentialStore()
        self._on_record = on_record
        self._on_dns = on_dns
        self._cas: dict[str, SessionCA] = {}
        self._allow: dict[str, AllowList] = {}
        self._idle: dict[tuple[str, str, int, bool], list[tuple[_Half, float]]] = {}
        """Idle upstream connections by (session, host, port, tls): never shared across sessions."""
        self._tasks: set[asyncio.Task[None]] = set()
        self.open_connections = 0
        self.refused_preambles = 0
        """Relay connections closed unanswered: a first line unsigned, forged, stale or replayed."""

    # -- sessions -----------------------------------------------------------------------

    def open_session(self, policy: SessionPolicy) -> bytes:
        """Create the session's allow-list and CA; returns the CA certificate (PEM) for the sandbox."""
        allow = AllowList(policy.allowed_domains)
        self._allow[policy.session_id] = allow
        ca = SessionCA(policy.session_id, allow.entries(), alpn=("h2", "http/1.1"))
        self._cas[policy.session_id] = ca
        return ca.cert_pem

    def close(self) -> None:
        """Close every idle upstream connection (when the proxy stops)."""
        for idle in self._idle.values():
            for up, _ in idle:
                up.close()
        self._idle.clear()

    def close_session(self, session_id: str) -> None:
        """Forget the session's CA (its key goes with it) and allow-list."""
        self._cas.pop(session_id, None)
        self._allow.pop(session_id, None)
        for key in [k for k in self._idle if k[0] == session_id]:
            for up, _ in self._idle.pop(key):
                up.close()

    # -- connections --------------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One relay connection, start to end (the ``asyncio.start_server`` callback)."""
        self.open_connections += 1
        try:
            try:
                preamble = await read_preamble(reader)
            except ProtocolError:
                return
            if (preamble.signed is None) != (self.authenticate is None):
                self.refused_preambles += 1
                return  # unsigned where signatures are required, or signed where nothing checks them
            if self.authenticate is not None:
                try:
                    session_id = self.authenticate(preamble)
                except SiloError:
                    self.refused_preambles += 1
                    return
                preamble = RelayPreamble(session_id, preamble.kind)
            policy = self.policies.get(preamble.session_id)
            if policy is None:
                self.close_session(preamble.session_id)  # expired: its CA goes too
            elif preamble.session_id not in self._cas:
                policy = None
            if preamble.kind == "dns":
                await self._serve_dns(preamble.session_id, policy, reader, writer)
            else:
                await self._serve_proxy_client(preamble.session_id, policy, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError, h11.ProtocolError):
            pass  # the client or upstream went away, or broke the protocol: nothing left to answer
        finally:
            self.open_connections -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve_proxy_client(
        self, session_id: str, policy: SessionPolicy | None,
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    ) -> None:
        down = _Half(h11.SERVER, reader, writer)
        try:
            first = await down.next_event()
        except h11.RemoteProtocolError as exc:
            await self._refuse(down, Blocked(f"bad request: {exc}", "bad_request", exc.error_status_hint), None)
            return
        if not isinstance(first, h11.Request):
            return
        method = first.method.decode("ascii", "replace")
        record = TrafficRecord(session_id, "", 0, method, _path(first.target))
        up: _Half | None = None
        try:
            if policy is None:
                raise Blocked("no policy for this session (it ended or was never opened)", "no_session")
            record.host, record.port = _target_of(first)  # for the record, even when refused
            route = self._route(policy, first)
            record.host, record.port = route.host, route.port
            if route.tls:
                # Connect (resolve, check, TLS-verify) before answering the CONNECT, so that a
                # refusal is the CONNECT's own answer, which every client shows.
                up = await self._open_upstream(route)
        except Blocked as blocked:
            await self._refuse(down, blocked, record)
            return
        if up is not None:
            await self._tunnel(session_id, route, down, up, record)
        else:
            await self._requests(route, down, first, None)

    async def _tunnel(self, session_id: str, route: _Route, down: _Half, up: _Half, record: TrafficRecord) -> None:
        """After an allowed CONNECT: answer 200, terminate the sandbox's TLS, serve its requests."""
        reader, writer = down.reader, down.writer
        record.path = ""
        handed = False
        try:
            await down.send(h11.Response(status_code=200, headers=[], reason=b"Connection established"))
            if down.conn.trailing_data[0]:
                return  # the client did not wait for the 200: not a proxy client we speak to
            ca = self._cas.get(session_id)
            if ca is None:
                return
            try:
                await asyncio.wait_for(writer.start_tls(ca.server_context(route.host)), TLS_HANDSHAKE_TIMEOUT)
            except (ssl.SSLError, OSError, TimeoutError):
                record.reason, record.label = "TLS handshake with the sandbox failed (wrong SNI?)", "tls_client"
                self._finish(record)
                return
            self._finish_tunnel(record)
            ssl_object = writer.get_extra_info("ssl_object")
            handed = True  # from here the request loop owns ``up``: it releases or closes it
            if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
                await H2Tunnel(self, route, reader, writer, up).run()
            else:
                await self._requests(route, _Half(h11.SERVER, reader, writer), None, up)
        finally:
            if not handed:
                self._release(route, up)

    def _route(self, policy: SessionPolicy, request: h11.Request) -> _Route:
        """The decision on a client connection's first request (CONNECT target or absolute URI)."""
        if request.method == b"CONNECT":
            host_raw, port = _split_authority(request.target.decode("ascii", "replace"), None)
            tls = True
        else:
            url = _urlsplit(request.target.decode("ascii", "replace"))
            if url.scheme != "http" or not url.hostname:
                raise Blocked("only CONNECT and absolute http:// URLs can go through this proxy",
                              "bad_request", 400)
            host_raw, port = _split_authority(url.netloc, 80)
            tls = False
        host = _normalise(host_raw)
        allow = self._allow.get(policy.session_id)
        if allow is None or not allow.allows(host):
            raise Blocked(f"domain not allowed: {host}", "domain_not_allowed")
        return _Route(policy, host, port, tls)

    async def _requests(self, route: _Route, down: _Half, first: h11.Request | None, up: _Half | None) -> None:
        """Serve one client connection's requests in turn, over one upstream connection."""
        try:
            while True:
                try:
                    request = first if first is not None else await down.next_event()
                except h11.RemoteProtocolError as exc:
                    await self._refuse(down, Blocked(f"bad request: {exc}", "bad_request",
                                                     exc.error_status_hint), None)
                    return
                first = None
                if not isinstance(request, h11.Request):
                    return
                record = TrafficRecord(route.session.session_id, route.host, route.port,
                                       request.method.decode("ascii", "replace"), _path(request.target))
                try:
                    target, headers, record.credential = self._prepare(route, request)
                    if up is None:
                        up = await self._open_upstream(route)
                except Blocked as blocked:
                    await self._refuse(down, blocked, record)
                    return
                try:
                    upgraded = await self._exchange(down, up, request.method, target, headers, record)
                except _StaleUpstream:
                    # A pooled connection the server had closed: nothing of this request was
                    # read from the client beyond its head, so it goes again on a fresh one.
                    up.close()
                    try:
                        up = await self._open_upstream(route, fresh=True)
                    except Blocked as blocked:
                        up = None
                        await self._refuse(down, blocked, record)
                        return
                    upgraded = await self._exchange(down, up, request.method, target, headers, record)
                record.allowed = True
                self._finish(record)
                if upgraded:
                    return
                if down.conn.our_state is h11.MUST_CLOSE or down.conn.their_state is h11.MUST_CLOSE:
                    return
                if up.conn.our_state is not h11.DONE or up.conn.their_state is not h11.DONE:
                    up.close()
                    up = None
                else:
                    up.conn.start_next_cycle()
                down.conn.start_next_cycle()
        finally:
            if up is not None:
                self._release(route, up)

    def _prepare(self, route: _Route, request: h11.Request) -> tuple[bytes, list[tuple[bytes, bytes]], bool]:
        """Check one request against its route; the target and headers to send upstream."""
        target = request.target
        if not target.startswith(b"/"):
            url = _urlsplit(target.decode("ascii", "replace"))
            if url.scheme not in ("http", "https") or not url.netloc:
                raise Blocked("request target must be a path or an absolute URL", "bad_request", 400)
            if _normalise(_split_authority(url.netloc, route.port)[0]) != route.host:
                raise Blocked(f"request URL names another host than this connection's {route.host}",
                              "host_mismatch")
            target = (url.path or "/").encode("ascii") + (b"?" + url.query.encode("ascii") if url.query else b"")
        hosts = [v for k, v in request.headers if k == b"host"]
        if len(hosts) != 1:
            raise Blocked("request must carry exactly one Host header", "host_mismatch", 400)
        host_raw, port = _split_authority(hosts[0].decode("ascii", "replace"), route.port)
        if _normalise(host_raw) != route.host or port != route.port:
            raise Blocked(f"Host header disagrees with the tunnel to {route.host}:{route.port}", "host_mismatch")
        headers = [(k, v) for k, v in request.headers if k not in _HOP_BY_HOP]
        creds = self.credentials.for_host(route.host, route.session.user, route.session.credentials)
        if not creds:
            return target, headers, False
        try:
            headers, injected = inject(headers, creds)
        except CredentialError as exc:
            raise Blocked(str(exc), "credential_unavailable", 502) from None
        return target, headers, injected

    async def _open_upstream(self, route: _Route, *, fresh: bool = False) -> _Half:
        """A connection to the route's host: an idle one of this session's, or a new one
        (resolved, every address checked, TLS verified: :meth:`Upstream.connect`)."""
        key = (route.session.session_id, route.host, route.port, route.tls)
        idle = self._idle.get(key, [])
        now = time.monotonic()
        while idle and not fresh:
            up, since = idle.pop()
            if now - since < POOL_IDLE_S and not up.reader.at_eof() and not up.writer.is_closing():
                up.reused = True
                return up
            up.close()
        try:
            reader, writer, _addr = await self.upstream.connect(route.host, route.port, tls=route.tls)
        except Refused as exc:
            status = 403 if exc.label == "address_blocked" else 502
            raise Blocked(exc.reason, exc.label, status) from None
        return _Half(h11.CLIENT, reader, writer)

    def _release(self, route: _Route, up: _Half) -> None:
        """Keep ``up`` for the session's next connection to the same host, if it can serve one."""
        key = (route.session.session_id, route.host, route.port, route.tls)
        states = (up.conn.our_state, up.conn.their_state)
        if states == (h11.DONE, h11.DONE):
            up.conn.start_next_cycle()
            states = (up.conn.our_state, up.conn.their_state)
        idle = self._idle.setdefault(key, [])
        if (states != (h11.IDLE, h11.IDLE) or up.reader.at_eof() or up.writer.is_closing()
                or len(idle) >= POOL_PER_HOST or route.session.session_id not in self._cas):
            up.close()
            return
        idle.append((up, time.monotonic()))

    async def _exchange(
        self, down: _Half, up: _Half, method: bytes, target: bytes,
        headers: list[tuple[bytes, bytes]], record: TrafficRecord,
    ) -> bool:
        """Send one request upstream and its response back; True when the connection was upgraded."""
        await up.send(h11.Request(method=method, target=target, headers=headers))
        while True:
            event = await down.next_event()
            if isinstance(event, h11.Data):
                record.bytes_out += len(event.data)
                await up.send(event)
            elif isinstance(event, h11.EndOfMessage):
                await up.send(event)
                break
            else:
                raise ConnectionError("client went away mid-request")
        while True:
            try:
                response = await up.next_event()
            except (ConnectionError, h11.RemoteProtocolError):
                response = h11.ConnectionClosed()
            if isinstance(response, h11.ConnectionClosed) and up.reused and record.bytes_out == 0:
                raise _StaleUpstream
            if isinstance(response, h11.InformationalResponse):
                await down.send(response)
                if response.status_code == 101:
                    record.status = 101
                    await self._pipe(down, up, record)
                    return True
                continue
            if not isinstance(response, h11.Response):
                raise ConnectionError("upstream closed before answering")
            break
        record.status = response.status_code
        headers = [(k, v) for k, v in response.headers if k not in _HOP_BY_HOP]
        await down.send(h11.Response(status_code=response.status_code, headers=headers, reason=response.reason))
        while True:
            event = await up.next_event()
            if isinstance(event, h11.Data):
                record.bytes_in += len(event.data)
                await down.send(event)
            elif isinstance(event, h11.EndOfMessage):
                await down.send(event)
                return False
            else:
                raise ConnectionError("upstream closed mid-response")

    async def _pipe(self, down: _Half, up: _Half, record: TrafficRecord) -> None:
        """After a 101: bytes both ways until either side ends (WebSocket)."""
        rest_down, _ = down.conn.trailing_data
        rest_up, _ = up.conn.trailing_data
        if rest_down:
            up.writer.write(rest_down)
        if rest_up:
            down.writer.write(rest_up)
        counts = [len(rest_down), len(rest_up)]
        await splice(down.reader, down.writer, up.reader, up.writer, counts)
        record.bytes_out += counts[0]
        record.bytes_in += counts[1]

    async def _refuse(self, down: _Half, blocked: Blocked, record: TrafficRecord | None) -> None:
        reason = " ".join(blocked.reason.split())[:300]
        body = f"blocked: {reason}\n".encode()
        if record is not None:
            record.status, record.reason, record.label = blocked.status, reason, blocked.label
            self._finish(record)
        # Written as bytes, not through h11: a refusal may answer a request h11 could not
        # parse (its state then allows no response), and the connection closes after it.
        head = (f"HTTP/1.1 {blocked.status} {HTTPStatus(blocked.status).phrase}\r\n"
                "Content-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\n"
                f"{BLOCKED_HEADER}: {reason.encode('ascii', 'replace').decode('ascii')}\r\n"
                "Connection: close\r\n\r\n").encode("ascii")
        with contextlib.suppress(ConnectionError):
            down.writer.write(head + body)
            await down.writer.drain()
            if down.writer.can_write_eof():
                down.writer.write_eof()
            # Read (and drop) what the client still sends, briefly, so that closing does not
            # reset the connection before it has read the answer.
            with contextlib.suppress(TimeoutError, ConnectionError):
                async with asyncio.timeout(2):
                    while await down.reader.read(CHUNK):
                        continue

    def _finish(self, record: TrafficRecord) -> None:
        record.duration_ms = round((time.monotonic() - record.started) * 1000, 3)
        self._on_record(record)

    def _finish_tunnel(self, record: TrafficRecord) -> None:
        """A CONNECT that was allowed: the tunnel's own record (its requests get theirs)."""
        record.allowed, record.status = True, 200
        self._finish(record)

    # -- DNS ----------------------------------------------------------------------------

    async def _serve_dns(
        self, session_id: str, policy: SessionPolicy | None,
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    ) -> None:
        while True:
            try:
                size = struct.unpack(">H", await asyncio.wait_for(reader.readexactly(2), IDLE_TIMEOUT))[0]
                wire = await asyncio.wait_for(reader.readexactly(size), IDLE_TIMEOUT)
            except (asyncio.IncompleteReadError, TimeoutError):
                return
            if size > MAX_DNS_MESSAGE:
                return
            answer = await self._answer_dns(session_id, policy, wire)
            if answer is None:
                continue
            writer.write(struct.pack(">H", len(answer)) + answer)
            await writer.drain()

    async def _answer_dns(self, session_id: str, policy: SessionPolicy | None, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
            response = dns.message.make_response(query)  # FormError for a message that is not a query
        except dns.exception.DNSException:
            self._on_dns("malformed")
            return None
        response.flags |= dns.flags.RA
        if policy is None or len(query.question) != 1 or query.opcode() != 0:
            response.set_rcode(dns.rcode.REFUSED)
            self._on_dns("refused")
            return response.to_wire()
        question = query.question[0]
        allow = self._allow.get(session_id)
        try:
            host = normalise_host(question.name.to_text(omit_final_dot=True))
        except BadHost:
            host = ""
        if not host or allow is None or not allow.allows(host) or question.rdclass != dns.rdataclass.IN:
            response.set_rcode(dns.rcode.NXDOMAIN)
            self._on_dns("not_allowed")
            return response.to_wire()
        if question.rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA):
            self._on_dns("other_type")
            return response.to_wire()  # NOERROR, no records: nothing but addresses is looked up
        try:
            checked = await self.upstream.resolve(host)
        except Refused as exc:
            response.set_rcode(dns.rcode.NXDOMAIN if exc.label == "dns_nxdomain"
                               else dns.rcode.REFUSED if exc.label == "address_blocked" else dns.rcode.SERVFAIL)
            self._on_dns(exc.label)
            return response.to_wire()
        version = 4 if question.rdtype == dns.rdatatype.A else 6
        addresses = [str(a) for a in checked.addresses if a.version == version]
        if addresses:
            response.answer.append(dns.rrset.from_text_list(
                question.name, DNS_TTL, dns.rdataclass.IN, question.rdtype, addresses))
        self._on_dns("answered")
        return response.to_wire()


def _normalise(raw: str) -> str:
    try:
        return normalise_host(raw)
    except BadHost as exc:
        raise Blocked(str(exc), "bad_host", 400) from None


def _target_of(request: h11.Request) -> tuple[str, int]:
    """Best effort: the host and port a first request names (normalised when possible)."""
    text = request.target.decode("ascii", "replace")
    try:
        if request.method == b"CONNECT":
            host, port = _split_authority(text, None)
        else:
            url = _urlsplit(text)
            host, port = _split_authority(url.netloc, 80)
        return _normalise(host), port
    except Blocked:
        return text[:255], 0


def _urlsplit(text: str) -> SplitResult:
    """``urlsplit``, refusing what it cannot split (an unbalanced ``[`` or ``]``) as a bad request."""
    try:
        return urlsplit(text)
    except ValueError as exc:
        raise Blocked(f"bad request target {text[:80]!r}: {exc}", "bad_request", 400) from None


def _split_authority(text: str, default_port: int | None) -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets) → (host, port); the port is required without a default."""
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end == -1:
            raise Blocked(f"bad authority: {text[:80]!r}", "bad_request", 400)
        host, rest = text[: end + 1], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise Blocked(f"bad authority: {text[:80]!r}", "bad_request", 400)
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not port_text:
        if default_port is None:
            raise Blocked(f"CONNECT needs host:port, got {text[:80]!r}", "bad_request", 400)
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise Blocked(f"bad port in {text[:80]!r}", "bad_request", 400)
    return host, int(port_text)


def _path(target: bytes) -> str:
    """A request target for the record: the path only, never the query."""
    text = target.decode("ascii", "replace")
    if not text.startswith("/"):
        try:
            text = urlsplit(text).path or "/"
        except ValueError:
            return ""  # not a URL; refused as such (and its parts never recorded)
    return text.split("?", 1)[0][:RECORD_PATH_MAX]
