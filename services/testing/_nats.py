"""Test helpers: a private state directory and a real, locked-down NATS server per test."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from devsilo.runtime._natsserver import NatsServer
from devsilo.runtime._state import StateDir


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it; tiny reuse race accepted)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def init_state(root: Path) -> StateDir:
    """An initialised state directory at ``root`` (created 0700 if missing)."""
    state = StateDir(root)
    state.initialize()
    return state


@asynccontextmanager
async def running_nats(
    state: StateDir, *, port: int | None = None, store_dir: Path | None = None
) -> AsyncIterator[NatsServer]:
    """A NatsServer for ``state`` on a free loopback port, stopped on exit even after a failure."""
    server = NatsServer(
        state,
        host="127.0.0.1",
        port=port if port is not None else free_port(),
        store_dir=store_dir,
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class ErrorRecorder:
    """An ``on_error`` hook for ``connect_nats`` that remembers errors and lets a test await one."""

    def __init__(self) -> None:
        self.errors: list[Exception] = []
        self._changed = asyncio.Event()

    async def __call__(self, exc: Exception) -> None:
        """Record one asynchronous error of a connection."""
        self.errors.append(exc)
        self._changed.set()

    def matching(self, text: str) -> list[Exception]:
        """Recorded errors whose message contains ``text`` (case-insensitive)."""
        return [e for e in self.errors if text.lower() in str(e).lower()]

    async def wait_for(self, text: str, timeout: float = 2.0) -> Exception:
        """The first recorded error containing ``text``; TimeoutError if none comes in time."""
        async with asyncio.timeout(timeout):
            while True:
                found = self.matching(text)
                if found:
                    return found[0]
                self._changed.clear()
                await self._changed.wait()
