"""Signed messaging over NATS: the one place that seals, verifies, logs and counts.

Every handler a service registers runs behind ``Bus.subscribe``'s middleware:
the envelope is verified (signature, roster, role, subject, freshness,
replay, schema) before the handler sees anything; a rejection is logged with
its reason, counted in ``silo_messages_rejected_total{reason}`` and, where the
sender waits for a reply, answered with a signed error. A handler's return
value is sealed and sent as the reply; a ``SiloError`` it raises becomes an
error reply; anything else is logged and answered as ``internal``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from devsilo.protocol import (
    Envelope,
    ErrorReply,
    Message,
    MessageRejected,
    RemoteError,
    Role,
    ServiceIdentity,
    Signer,
    SiloError,
    TrustRoster,
    Verifier,
    peek_header,
    subjects,
)
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import ConnectionClosedError, NoRespondersError, OutboundBufferLimitError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import PubAck

from ._jetstream import jetstream
from ._metrics import ServiceMetrics

INBOX_PREFIX = subjects.INBOX_PREFIX
JS_RETRY_S = 60.0
"""How long a JetStream publish is retried without an acknowledgement before it fails."""

M = TypeVar("M", bound=Message)
Handler = Callable[[Envelope, Msg], Awaitable[Message | None]]


class Bus:
    """A service's signed view of NATS."""

    def __init__(
        self,
        nc: NATS,
        identity: ServiceIdentity,
        roster: TrustRoster,
        metrics: ServiceMetrics,
        *,
        clock: Callable[[], float] = time.time,
        max_bytes: int | None = None,
        log: Any = None,
        replicas: int = 1,
    ) -> None:
        self.nc = nc
        self.identity = identity
        self.signer = Signer(identity, clock=clock)
        kwargs: dict[str, Any] = {"clock": clock}
        if max_bytes is not None:
            kwargs["max_bytes"] = max_bytes
        self.verifier = Verifier(roster, **kwargs)
        self.metrics = metrics
        self.log = log if log is not None else structlog.get_logger().bind(service=identity.service_id)
        self.js = jetstream(nc, replicas)  # streams it creates get config.json's nats.replicas
        self._tasks: set[asyncio.Task[None]] = set()
        self.reconnects = 0
        """How many times the connection to NATS was lost and made again (see ``reconnected``)."""
        self._reconnected: asyncio.Event = asyncio.Event()

    # -- the connection ------------------------------------------------------------------

    def reconnected(self) -> None:
        """The connection came back (``connect_nats``'s hook): replies sent meanwhile are lost."""
        self.reconnects += 1
        event, self._reconnected = self._reconnected, asyncio.Event()
        event.set()

    async def wait_reconnected(self, after: int) -> None:
        """Return once ``reconnects`` exceeds ``after`` (at once if it already does)."""
        while self.reconnects <= after:
            await self._reconnected.wait()

    # -- sending -----------------------------------------------------------------------

    async def publish(self, subject: str, body: Message, *, sid: str | None = None) -> str:
        """Seal and publish ``body``; return its message id."""
        wire, mid = self.signer.seal(body, subject, sid=sid)
        await self.nc.publish(subject, wire)
        self.metrics.messages_sent.labels(type=body.TYPE).inc()
        return mid

    async def js_publish(
        self, subject: str, body: Message, *, sid: str | None, dedupe_id: str, timeout: float = 10.0,
        retry_s: float = JS_RETRY_S,
    ) -> PubAck:
        """Seal and publish into a JetStream stream; ``dedupe_id`` makes retries idempotent.

        An attempt that gets no acknowledgement (NATS restarting, a lost connection, a stream
        leader moving) is repeated, same bytes and dedupe id, until ``retry_s`` has passed; the
        stream keeps one copy whichever attempts landed.
        """
        wire, _ = self.signer.seal(body, subject, sid=sid, ttl=3600.0)
        headers = {"Nats-Msg-Id": dedupe_id}
        deadline = time.monotonic() + retry_s
        attempt = 0
        while True:
            try:
                ack = await self.js.publish(subject, wire, timeout=timeout, headers=headers)
                break
            except (NatsTimeout, NoRespondersError, ConnectionClosedError, OutboundBufferLimitError) as exc:
                attempt += 1
                if time.monotonic() >= deadline:
                    raise
                self.metrics.js_retries.inc()
                self.log.info("js_publish_retry", subject=subject, attempt=attempt,
                              error=type(exc).__name__)
                await asyncio.sleep(min(0.1 * 2 ** min(attempt, 4), 1.0))
        self.metrics.messages_sent.labels(type=body.TYPE).inc()
        return ack

    async def request(
        self,
        subject: str,
        body: Message,
        expect: type[M],
        *,
        from_role: Role,
        sid: str | None = None,
        timeout: float = 10.0,
    ) -> M:
        """Send a request and return its verified reply as ``expect``.

        Raises RemoteError for an error reply or no answer, and MessageRejected
        for a reply that fails verification or answers another message.
        """
        wire, mid = self.signer.seal(body, subject, sid=sid)
        try:
            msg = await self.nc.request(subject, wire, timeout=timeout)
        except NoRespondersError:
            raise RemoteError("no_responders", f"no {from_role.value} is listening on {subject}") from None
        except NatsTimeout:
            raise RemoteError("timeout", f"no answer on {subject} within {timeout:.0f}s") from None
        self.metrics.messages_sent.labels(type=body.TYPE).inc()
        env = self.open(msg.data, msg.subject)
        if env.header.reply_to != mid:
            self.metrics.messages_rejected.labels(reason="wrong_subject").inc()
            raise MessageRejected(f"reply on {msg.subject} answers {env.header.reply_to}, not {mid}")
        if env.header.role is not from_role:
            self.metrics.messages_rejected.labels(reason="role_not_allowed").inc()
            raise MessageRejected(f"reply from {env.header.role.value}, expected {from_role.value}")
        if isinstance(env.body, ErrorReply):
            raise RemoteError(env.body.code, env.body.message)
        return env.expect(expect)

    # -- receiving ---------------------------------------------------------------------

    def open(self, data: bytes, subject: str, *, fresh: bool = True) -> Envelope:
        """Verify a message; count and log a rejection before re-raising it."""
        try:
            return self.verifier.open(data, subject, fresh=fresh)
        except MessageRejected as exc:
            self.metrics.messages_rejected.labels(reason=exc.reason).inc()
            self.log.warning(
                "message_rejected", subject=subject, reason=exc.reason, detail=exc.detail,
                claimed=peek_header(data), size=len(data),
            )
            raise

    async def subscribe(
        self,
        subject: str,
        handler: Handler,
        *,
        queue: str = "",
        concurrent: bool = False,
    ) -> Subscription:
        """Run ``handler`` for every verified message on ``subject``.

        ``concurrent`` runs each message in its own task (owned by the bus and
        cancelled by ``close``); otherwise messages are handled in order.
        """

        async def on_message(msg: Msg) -> None:
            if concurrent:
                task = asyncio.create_task(self._dispatch(msg, handler))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                await self._dispatch(msg, handler)

        return await self.nc.subscribe(subject, queue=queue, cb=on_message)

    async def _dispatch(self, msg: Msg, handler: Handler) -> None:
        try:
            env = self.open(msg.data, msg.subject)
        except MessageRejected as exc:
            await self._reply_error(msg, exc.reason, str(exc), None)
            return
        with structlog.contextvars.bound_contextvars(mid=env.header.mid, session=env.header.sid):
            await self._handle(msg, env, handler)

    async def _handle(self, msg: Msg, env: Envelope, handler: Handler) -> None:
        # Every line logged while handling (and by tasks started here) carries mid and session.
        kind = env.header.type
        log = self.log.bind(type=kind, sender=env.header.sender)
        self.metrics.messages_received.labels(type=kind).inc()
        started = time.perf_counter()
        try:
            reply = await handler(env, msg)
        except SiloError as exc:
            code = getattr(exc, "code", None) or getattr(exc, "reason", None) or type(exc).__name__
            self.metrics.handler_errors.labels(type=kind, code=str(code)).inc()
            log.info("handler_refused", code=code, error=str(exc))
            await self._reply_error(msg, str(code), str(exc), env)
            return
        except Exception:  # a handler bug must not take the service down
            self.metrics.handler_errors.labels(type=kind, code="internal").inc()
            log.exception("handler_failed")
            await self._reply_error(msg, "internal", f"{self.identity.service_id} failed handling {kind}", env)
            return
        finally:
            self.metrics.handler_seconds.labels(type=kind).observe(time.perf_counter() - started)
        if msg.reply and reply is not None:
            await self._reply(msg, reply, env)

    async def _reply(self, msg: Msg, body: Message, env: Envelope | None) -> None:
        if not msg.reply.startswith(INBOX_PREFIX):
            return  # a sender may not steer our signed replies onto a real subject
        wire, _ = self.signer.seal(
            body, msg.reply, sid=env.header.sid if env else None,
            reply_to=env.header.mid if env else None,
        )
        await self.nc.publish(msg.reply, wire)
        self.metrics.messages_sent.labels(type=body.TYPE).inc()

    async def _reply_error(self, msg: Msg, code: str, message: str, env: Envelope | None) -> None:
        if not msg.reply.startswith(INBOX_PREFIX):
            return
        if env is None:
            # The rejected request's id is unverified; echo it only so the sender can match.
            claimed = peek_header(msg.data) or {}
            mid = claimed.get("mid") if isinstance(claimed.get("mid"), str) else None
            wire, _ = self.signer.seal(ErrorReply(code=code, message=message[:1000]), msg.reply, reply_to=mid)
            await self.nc.publish(msg.reply, wire)
            return
        await self._reply(msg, ErrorReply(code=code, message=message[:1000]), env)

    async def close(self) -> None:
        """Cancel in-flight concurrent handlers."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
