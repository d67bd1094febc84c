"""Sessions whose events a test or benchmark writes itself, signed as the stack's harness.

``ScriptedSession`` registers a session record the way a gateway does (in
the sessions bucket, as the ``gateway`` service) and publishes its events
the way the harness does (``SessionEvents``, as the ``harness`` service),
so the gateway serves them exactly as a real session's: verified, from the
stream, to every client. Used where a test needs more events, faster, than
a model would produce.
"""

from __future__ import annotations

import secrets
import time
from types import TracebackType
from typing import Any, Self

import structlog
from devsilo.gateway._sessions import SessionDirectory, SessionRecord, open_sessions_bucket
from devsilo.harness._session import SessionEvents
from devsilo.protocol import Role
from devsilo.runtime import Bus
from devsilo.runtime._metrics import ServiceMetrics
from devsilo.runtime._natsconn import connect_nats
from devsilo.runtime._state import StateDir
from nats.aio.client import Client


async def service_bus(state: StateDir, service_id: str, nats_url: str) -> Bus:
    """A signed bus connected to the stack's NATS as ``service_id`` (its own key and permissions)."""
    nc = await connect_nats(state, service_id, nats_url, initial_timeout=10.0)
    identity = state.identity(service_id)
    log = structlog.get_logger().bind(service=f"{service_id}-test")
    return Bus(nc, identity, state.roster(), ServiceMetrics(f"{service_id}-test", identity.role.value), log=log)


class ScriptedSession:
    """A session record plus a harness-signed event writer for it (an async context manager)."""

    def __init__(self, state: StateDir, nats_url: str, *, user: str = "local", workspace: str = "/nowhere") -> None:
        self.state = state
        self.nats_url = nats_url
        self.user = user
        self.workspace = workspace
        self.sid = "scripted-" + secrets.token_hex(6)
        self._buses: list[Bus] = []
        self.events: SessionEvents | None = None
        self.next_seq = 0
        """The seq the next event gets."""

    async def __aenter__(self) -> Self:
        gateway = await service_bus(self.state, "gateway", self.nats_url)
        harness = await service_bus(self.state, "harness", self.nats_url)
        self._buses = [gateway, harness]
        assert harness.identity.role is Role.HARNESS and gateway.identity.role is Role.GATEWAY
        directory = SessionDirectory(gateway.js, await open_sessions_bucket(gateway.js), gateway.log)
        await directory.add(SessionRecord(session_id=self.sid, user=self.user, workspace=self.workspace,
                                          executor_id="none", created_at=time.time()))
        self.events = SessionEvents(harness, self.sid)
        return self

    async def emit(self, kind: Any, data: dict[str, Any] | None = None, agent: str = "main") -> int:
        """Publish the next event (acknowledged by JetStream); its seq."""
        assert self.events is not None
        seq = await self.events.emit(kind, data, agent)
        self.next_seq = seq + 1
        return seq

    @property
    def nc(self) -> Client:
        """The harness-side NATS connection (e.g. to publish something forged)."""
        return self._buses[1].nc

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        for bus in self._buses:
            await bus.nc.close()
