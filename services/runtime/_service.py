"""Running one service process: identity, NATS, bus, health endpoint, signals."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from devsilo.protocol import ConfigError, Role

from ._bus import Bus
from ._health import HealthServer
from ._logging import configure_logging
from ._memtrace import trace_memory, wanted
from ._metrics import ServiceMetrics
from ._natsconn import connect_nats
from ._state import StateDir


@dataclass
class ServiceContext:
    """What a running service body gets: its bus, state, logger, metrics and stop signal."""

    service_id: str
    role: Role
    state: StateDir
    bus: Bus
    log: Any
    metrics: ServiceMetrics
    stopping: asyncio.Event
    status: dict[str, object] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


ServiceBody = Callable[[ServiceContext], Awaitable[None]]


async def run_service(
    role: Role,
    service_id: str,
    state: StateDir,
    nats_url: str | list[str],
    body: ServiceBody,
    *,
    metrics_host: str = "127.0.0.1",
    metrics_port: int | None = None,
    log_level: str = "info",
    options: dict[str, Any] | None = None,
    max_message_bytes: int | None = None,
) -> None:
    """Run ``body`` as service ``service_id`` until SIGTERM/SIGINT or until it returns.

    The body sets up its subscriptions and waits on ``ctx.stopping``; everything
    it started must be torn down before it returns.
    """
    log = configure_logging(service_id, level=log_level)
    identity = state.identity(service_id)
    if identity.role is not role:
        raise ConfigError(f"service {service_id} holds role {identity.role.value}, not {role.value}")
    roster = state.roster()
    metrics = ServiceMetrics(service_id, role.value)
    buses: list[Bus] = []

    def reconnected() -> None:  # the bus is made after the connection it listens to
        for b in buses:
            b.reconnected()

    nc = await connect_nats(state, service_id, nats_url, on_reconnected=reconnected)
    metrics.watch_nats(nc)
    bus = Bus(nc, identity, roster, metrics, log=log, max_bytes=max_message_bytes,
              replicas=state.config().nats.replicas)
    buses.append(bus)
    stopping = asyncio.Event()
    ctx = ServiceContext(service_id, role, state, bus, log, metrics, stopping, options=dict(options or {}))
    started = time.time()

    def status() -> dict[str, object]:
        connected = nc.is_connected
        # A body that sets ``ctx.status["ready"] = False`` first is not healthy until it says it serves.
        ready = ctx.status.get("ready", True) is not False
        return {"ok": connected and ready and not stopping.is_set(), "service": service_id, "role": role.value,
                "pid": os.getpid(),
                "nats_connected": connected, "uptime_s": round(time.time() - started, 1), **ctx.status}

    port = metrics_port if metrics_port is not None else state.config().metrics_ports[service_id]
    health = HealthServer(metrics.registry, status, metrics_host, port)
    await health.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    log.info("service_started", role=role.value, nats=nats_url, metrics_port=port)
    trace_dir = wanted(service_id)
    tracer = asyncio.create_task(trace_memory(service_id, trace_dir, stopping)) if trace_dir else None
    try:
        await body(ctx)
    finally:
        stopping.set()
        if tracer is not None:
            await asyncio.gather(tracer, return_exceptions=True)
        await bus.close()
        await health.stop()
        try:
            await asyncio.wait_for(nc.drain(), timeout=5)
        except Exception:  # draining a broken connection: closing is all that is left
            await nc.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        log.info("service_stopped")
