"""Shared fixtures: a free port, an initialised state directory, a real NATS server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from devsilo.runtime._natsserver import NatsServer
from devsilo.runtime._state import StateDir
from devsilo.testing._nats import free_port as _free_port
from devsilo.testing._nats import init_state, running_nats
from devsilo.testing._stack import Stack


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on."""
    return _free_port()


@pytest.fixture
def state_dir(tmp_path: Path) -> StateDir:
    """A freshly initialised state directory (default services) under tmp_path."""
    return init_state(tmp_path / "state")


@pytest_asyncio.fixture
async def nats_server(state_dir: StateDir, tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A real nats-server with TLS, JetStream and per-service nkeys; stopped after the test."""
    async with running_nats(state_dir, store_dir=tmp_path / "jetstream") as server:
        yield server


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A whole devsilo (`silo up`) for the tests of one module; stopped even when tests fail."""
    s = Stack(tmp_path_factory.mktemp("stack") / "state")
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """An empty project directory to use as a session's workspace."""
    ws = tmp_path / "ws"
    ws.mkdir()
    return ws
