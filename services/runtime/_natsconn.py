"""Connecting a service to NATS: TLS with the internal CA, its own nkey, its own inbox."""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import structlog
from devsilo.protocol import ConfigError, subjects
from nats.aio.client import Client, Server

from ._state import StateDir, inbox_prefix

log = structlog.get_logger("devsilo.nats")

ErrorHook = Callable[[Exception], Awaitable[None]]


@dataclass(frozen=True)
class NatsCredentials:
    """What a service needs to reach NATS when its key material is not in a StateDir."""

    nkey_seed: bytes
    tls: ssl.SSLContext


def credentials(source: StateDir | NatsCredentials, service_id: str) -> NatsCredentials:
    """The credentials of ``service_id``, read from a state directory or passed through."""
    if isinstance(source, NatsCredentials):
        return source
    return NatsCredentials(source.nats_seed(service_id), source.nats_client_tls())


def connect_options(
    source: StateDir | NatsCredentials, service_id: str, *, name: str | None = None
) -> dict[str, Any]:
    """The nats-py ``connect`` keyword arguments that authenticate ``service_id``.

    ``inbox_prefix`` matters: the server lets a service subscribe only to
    ``_INBOX.<service_id>.>``, so a client with the default prefix could not
    receive replies.
    """
    creds = credentials(source, service_id)
    return {
        "tls": creds.tls,
        "nkeys_seed_str": creds.nkey_seed.decode("ascii"),
        "inbox_prefix": inbox_prefix(service_id),
        "name": name or f"devsilo-{service_id}",
    }


def _backoff(
    base: float, cap: float
) -> Callable[[list[Server], dict[str, Any]], tuple[Server | None, float]]:
    """A reconnect policy: the least-failed server, after an exponential, jittered delay."""

    def choose(servers: list[Server], _info: dict[str, Any]) -> tuple[Server | None, float]:
        server = min(servers, key=lambda s: s.reconnects)
        delay = min(cap, base * 2 ** min(server.reconnects, 16))
        # full jitter between half and all of it, so a fleet does not reconnect in lockstep
        return server, delay * random.uniform(0.5, 1.0)

    return choose


def _fatal(exc: BaseException) -> bool:
    """Errors that retrying cannot fix: wrong credentials, a certificate we do not trust."""
    if isinstance(exc, (nats.errors.AuthorizationError, ssl.SSLCertVerificationError)):
        return True
    text = str(exc).lower()
    return "authorization violation" in text or "authentication" in text


async def connect_nats(
    source: StateDir | NatsCredentials,
    service_id: str,
    url: str | list[str],
    *,
    name: str | None = None,
    initial_timeout: float | None = 30.0,
    connect_timeout: float = 2.0,
    reconnect_base: float = 0.25,
    reconnect_cap: float = 10.0,
    on_error: ErrorHook | None = None,
    on_reconnected: Callable[[], None] | None = None,
) -> Client:
    """Connect as ``service_id`` over TLS with its nkey; once connected, reconnect forever.

    The first connection is retried (with backoff) for ``initial_timeout``
    seconds (None: forever) so that a service may start before NATS does;
    a cluster's URLs are tried in the order given (list the node on the
    service's own machine first), and after a lost connection the next ones;
    wrong credentials or an untrusted certificate fail at once with a
    ConfigError. Every connection event is logged; ``on_error`` additionally
    sees every asynchronous error, e.g. a server-side permission violation;
    ``on_reconnected`` is called each time the connection is made again
    (subscriptions are back; replies sent to us meanwhile are lost).
    """
    subjects.check_id(service_id, "service id")
    options = connect_options(source, service_id, name=name)
    where = url if isinstance(url, str) else ", ".join(url)
    bound = log.bind(service=service_id, nats=where)
    fatal: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
    connected = False

    async def error_cb(exc: Exception) -> None:
        if not connected and _fatal(exc):
            if not fatal.done():
                fatal.set_result(exc)
        else:
            bound.warning(
                "nats_error", error=str(exc) or type(exc).__name__, error_type=type(exc).__name__
            )
        if on_error is not None:
            await on_error(exc)

    async def disconnected_cb() -> None:
        if nc.is_closed:  # our own close(); nothing went wrong
            bound.info("nats_disconnected")
        else:
            bound.warning("nats_disconnected")

    async def reconnected_cb() -> None:
        bound.info(
            "nats_reconnected", server=str(nc.connected_url.netloc if nc.connected_url else "")
        )
        if on_reconnected is not None:
            on_reconnected()

    async def closed_cb() -> None:
        bound.info("nats_closed")

    nc = Client()
    attempt = asyncio.ensure_future(
        nc.connect(
            url,
            error_cb=error_cb,
            disconnected_cb=disconnected_cb,
            reconnected_cb=reconnected_cb,
            closed_cb=closed_cb,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            # nats-py annotates these as int but takes seconds as float
            connect_timeout=connect_timeout,  # type: ignore[arg-type]
            reconnect_time_wait=reconnect_base,  # type: ignore[arg-type]
            reconnect_to_server_handler=_backoff(reconnect_base, reconnect_cap),
            dont_randomize=True,
            **options,
        )
    )
    try:
        waiting: set[asyncio.Future[Any]] = {attempt, fatal}
        done, _ = await asyncio.wait(
            waiting, timeout=initial_timeout, return_when=asyncio.FIRST_COMPLETED
        )
    except BaseException:
        await _abandon(nc, attempt)
        raise
    if attempt in done:
        attempt.result()
        connected = True
        bound.info("nats_connected", server=str(nc.connected_url.netloc if nc.connected_url else ""))
        return nc
    await _abandon(nc, attempt)
    if fatal.done():
        exc = fatal.result()
        raise ConfigError(
            f"NATS at {where} refused service {service_id}: {exc or type(exc).__name__}; "
            f"check its nkey and CA in the state directory (`silo init`)"
        )
    raise ConfigError(
        f"NATS at {where} not reachable within {initial_timeout:g} s; is it running (`silo up`)?"
    )


async def _abandon(nc: Client, attempt: asyncio.Future[None]) -> None:
    """Stop a connection attempt that is still retrying and release its socket."""
    attempt.cancel()
    await asyncio.wait({attempt})  # unlike awaiting it, lets our own cancellation through
    if not attempt.cancelled():
        attempt.exception()  # its outcome no longer matters; mark it retrieved
    await nc.close()
