"""The egress service: session policies from verified grants, and the proxy that applies them.

Every second it announces itself with an instance id that is new at each
start, so that executors re-open their sessions with a restarted egress (the
policies and session CAs die with the process). On ``EgressSessionOpen`` (from an executor) the egress re-verifies the
gateway's grant, installs the session's policy, creates the session's CA
(:mod:`._ca`, key in memory only) and answers with where its proxy listens
and the CA's certificate, which the executor hands to the sandbox. Relay
connections then arrive at the proxy (:mod:`._proxy`); each request's
:class:`~devsilo.protocol.NetworkRecord` goes to the session's journal.

Options (the service's ``options`` in ``config.json``, all optional):

``listen``            ``host:port`` of the proxy (default ``127.0.0.1:0``: a free port)
``advertise``         ``host:port`` executors should connect to (default: the bound address)
``nameservers``       DNS servers to resolve with (default: the host's ``/etc/resolv.conf``)
``dns_port``          their port (default 53)
``ca_bundles``        extra CA files trusted for upstream servers, beside the system store
``credentials``       the secret store's entries (see :mod:`._secrets`)
``guard_exceptions``  exact host names allowed to resolve to blocked addresses
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Mapping
from typing import Any

from devsilo.executor._relay import RelayPreamble
from devsilo.protocol import (
    EgressAnnounce,
    EgressSessionClose,
    EgressSessionOpen,
    EgressSessionReady,
    Envelope,
    GrantError,
    Message,
    NetworkRecord,
    RelayHello,
    open_grant,
    subjects,
)
from devsilo.protocol._names import BadHost
from devsilo.runtime import ServiceContext
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge, Histogram

from ._guard import GuardExceptions
from ._policy import PolicyTable
from ._proxy import EgressProxy, TrafficRecord
from ._secrets import CredentialStore
from ._upstream import Upstream, client_context

RECORD_QUEUE = 10_000
ANNOUNCE_EVERY_S = 1.0
RELAY_HELLO_TTL = 60.0
"""How long an executor's signed relay line is good for (and then never again: replay cache)."""


class EgressMetrics:
    """The egress's metrics; labels stay low-cardinality (no hosts, no sessions)."""

    def __init__(self, registry: Any) -> None:
        self.sessions = Gauge("silo_egress_sessions", "Session policies in force.", registry=registry)
        self.requests = Counter("silo_egress_requests_total", "Requests through the egress by decision and reason.",
                                ["decision", "reason"], registry=registry)
        self.bytes = Counter("silo_egress_bytes_total", "Body bytes through the egress.", ["direction"],
                             registry=registry)
        self.latency = Histogram("silo_egress_request_seconds", "Time from a request to the end of its response.",
                                 ["decision"], registry=registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.dns = Counter("silo_egress_dns_queries_total", "Sandbox DNS queries by answer.", ["answer"],
                           registry=registry)
        for answer in ("answered", "not_allowed", "refused", "malformed", "other_type"):  # zeros, not gaps
            self.dns.labels(answer=answer)
        self.credentials = Counter("silo_egress_credentials_injected_total", "Requests a credential was injected into.",
                                   registry=registry)
        self.records_dropped = Counter("silo_egress_records_dropped_total",
                                       "Network records not journaled (queue full or NATS down).", registry=registry)

    def observe(self, record: TrafficRecord) -> None:
        decision = "allowed" if record.allowed else "blocked"
        self.requests.labels(decision=decision, reason=record.label or "ok").inc()
        self.bytes.labels(direction="in").inc(record.bytes_in)
        self.bytes.labels(direction="out").inc(record.bytes_out)
        self.latency.labels(decision=decision).observe(record.duration_ms / 1000)
        if record.credential:
            self.credentials.inc()


def make_proxy(options: Mapping[str, Any], policies: PolicyTable,
               on_record: Any = lambda record: None, on_dns: Any = lambda answer: None) -> EgressProxy:
    """The proxy as the options configure it (shared with tests and the benchmark)."""
    upstream = Upstream(
        nameservers=tuple(options.get("nameservers") or ()),
        dns_port=int(options.get("dns_port", 53)),
        exceptions=GuardExceptions.of(options.get("guard_exceptions") or ()),
        trust=client_context(tuple(options.get("ca_bundles") or ())),
    )
    return EgressProxy(policies=policies, upstream=upstream,
                       credentials=CredentialStore(options.get("credentials") or {}),
                       on_record=on_record, on_dns=on_dns)


def _split(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not host:port: {addr!r}")
    return host.strip("[]"), int(port)


async def serve(ctx: ServiceContext) -> None:
    """Run the egress until stopped."""
    bus = ctx.bus
    options = ctx.options
    metrics = EgressMetrics(ctx.metrics.registry)
    policies = PolicyTable()
    records: asyncio.Queue[TrafficRecord] = asyncio.Queue(RECORD_QUEUE)

    def on_record(record: TrafficRecord) -> None:
        metrics.observe(record)
        if not record.allowed:  # hosts go to the log (and Loki), never into a metric label
            ctx.log.info("egress_blocked", session=record.session_id, host=record.host[:255], port=record.port,
                         reason=record.label or "blocked", status=record.status)
        try:
            records.put_nowait(record)
        except asyncio.QueueFull:
            metrics.records_dropped.inc()

    openers: dict[str, str] = {}
    """session id -> the executor that opened it: the only one whose relay may speak for it."""
    relay_subject = subjects.egress_relay(ctx.service_id)

    def authenticate(preamble: RelayPreamble) -> str:
        assert preamble.signed is not None
        env = bus.verifier.open(preamble.signed, relay_subject, max_ttl=RELAY_HELLO_TTL + 5)
        hello = env.expect(RelayHello)
        if openers.get(hello.session_id) != env.header.sender:
            raise GrantError(f"{env.header.sender} did not open session {hello.session_id} here")
        return hello.session_id

    proxy = make_proxy(options, policies, on_record, lambda answer: metrics.dns.labels(answer=answer).inc())
    proxy.authenticate = authenticate
    host, port = _split(str(options.get("listen", "127.0.0.1:0")))
    server = await asyncio.start_server(proxy.handle, host, port, limit=1 << 20)
    bound = server.sockets[0].getsockname()
    advertise = str(options.get("advertise") or f"{bound[0]}:{bound[1]}")
    ctx.status["proxy"] = advertise
    ctx.log.info("egress_proxy_listening", listen=f"{bound[0]}:{bound[1]}", advertise=advertise)

    async def journal() -> None:
        while True:
            record = await records.get()
            body = NetworkRecord(
                session_id=record.session_id, host=record.host[:255], port=record.port,
                method=record.method[:32], path=record.path[:1024], status=record.status,
                bytes_in=record.bytes_in, bytes_out=record.bytes_out, duration_ms=record.duration_ms,
                allowed=record.allowed, reason=record.reason[:512], credential=record.credential)
            try:
                await bus.js_publish(subjects.journal_network(record.session_id), body,
                                     sid=record.session_id, dedupe_id=f"net-{record.record_id}")
            except Exception as exc:  # noqa: BLE001 — journaling must not stop the proxy
                metrics.records_dropped.inc()
                ctx.log.warning("network_record_not_journaled", session=record.session_id, error=str(exc))

    async def on_session(env: Envelope, msg: Msg) -> Message | None:
        if isinstance(env.body, EgressSessionClose):
            if env.header.sid != env.body.session_id:
                raise GrantError("close signed for another session")
            if openers.get(env.body.session_id) not in (None, env.header.sender):
                raise GrantError(f"{env.header.sender} did not open session {env.body.session_id}")
            policies.remove(env.body.session_id)
            proxy.close_session(env.body.session_id)
            openers.pop(env.body.session_id, None)
            metrics.sessions.set(len(policies))
            return None
        req = env.expect(EgressSessionOpen)
        grant = open_grant(bus.verifier, req.grant)
        if env.header.sid != grant.session_id:
            raise GrantError(f"open signed for {env.header.sid}, grant is for {grant.session_id}")
        policy = policies.install(grant)
        try:
            ca_pem = proxy.open_session(policy)
        except BadHost as exc:
            policies.remove(grant.session_id)
            raise GrantError(f"bad allow-list entry: {exc}") from None
        openers[grant.session_id] = env.header.sender
        metrics.sessions.set(len(policies))
        usable = proxy.credentials.usable(grant.user, grant.credentials)
        ctx.log.info("egress_session_open", session=grant.session_id, domains=len(policy.allowed_domains),
                     credentials=len(usable))
        return EgressSessionReady(session_id=grant.session_id, egress_id=ctx.service_id,
                                  allowed_domains=policy.allowed_domains, proxy_addr=advertise,
                                  ca_cert=ca_pem.decode("ascii"), credentials=usable,
                                  credential_hosts=proxy.credentials.hosts(usable))

    instance = secrets.token_hex(8)

    async def announce() -> None:
        """Tell executors which instance serves: a new one holds none of the earlier one's sessions."""
        body = EgressAnnounce(egress_id=ctx.service_id, instance=instance)
        while True:
            try:
                await bus.publish(subjects.egress_announce(ctx.service_id), body)
            except Exception as exc:  # noqa: BLE001 — NATS away: the next beat tries again
                ctx.log.warning("egress_announce_failed", error=str(exc))
            await asyncio.sleep(ANNOUNCE_EVERY_S)

    writer = asyncio.create_task(journal(), name="egress-journal")
    announcer = asyncio.create_task(announce(), name="egress-announce")
    try:
        await bus.subscribe(subjects.egress_session(ctx.service_id), on_session)
        await bus.subscribe(subjects.egress_session(subjects.EGRESS_ANY), on_session, queue=subjects.EGRESS_QUEUE)
        await ctx.stopping.wait()
    finally:
        server.close()
        proxy.close()
        writer.cancel()
        announcer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        with contextlib.suppress(asyncio.CancelledError):
            await announcer
        await server.wait_closed()
