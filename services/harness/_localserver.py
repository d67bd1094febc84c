"""The local model server process a harness may start, watch and stop (see ``_local.py``).

Kept apart from the Chat Completions backend so that a harness that never
uses a real model does not import the OpenAI SDK (seconds of start time).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import time
from collections import deque
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx2
import structlog

from ._model import ModelFailure

log = structlog.get_logger("devsilo.harness.local")


def _open_log(path: str) -> Any:
    """The server's output file (appended to; the child keeps its own descriptor)."""
    return open(path, "ab", buffering=0)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the harness dies, even by SIGKILL."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


class LocalServer:
    """A model server process the harness starts from a configured command and health-checks.

    Shared by every session that uses it; ``aclose`` stops it (the harness
    does so when it stops). Its output goes to ``log_path`` when given.
    """

    def __init__(self, command: list[str], base_url: str, *, health_path: str | None = None,
                 start_timeout_s: float = 120.0, log_path: str | None = None) -> None:
        self.command = command
        self.base_url = base_url
        self.health_path = health_path
        self.start_timeout_s = start_timeout_s
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0
        self._lock = asyncio.Lock()
        self._stderr_tail: deque[str] = deque(maxlen=20)
        self._reader: asyncio.Task[None] | None = None

    def _root(self) -> str:
        parts = urlsplit(self.base_url)
        return urlunsplit((parts.scheme, parts.netloc, "", "", ""))

    async def healthy(self, client: httpx2.AsyncClient) -> bool:
        """Whether the server answers its health check with 200 now."""
        paths = [self.health_path] if self.health_path else ["/health", "/v1/models"]
        for path in paths:
            try:
                r = await client.get(self._root() + path, timeout=2.0)
            except httpx2.HTTPError:
                return False
            if r.status_code == 200:
                return True
        return False

    async def ensure_running(self) -> None:
        """Start the server unless it runs, and wait until it is healthy; ModelFailure saying why not."""
        async with self._lock:
            alive = self.process is not None and self.process.returncode is None
            async with httpx2.AsyncClient() as client:
                if alive and await self.healthy(client):
                    return
                if not alive:
                    await self._spawn()
                await self._wait_healthy(client)

    async def _spawn(self) -> None:
        out: Any = _open_log(self.log_path) if self.log_path else asyncio.subprocess.DEVNULL
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.command, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=asyncio.subprocess.PIPE, start_new_session=True,
                preexec_fn=_die_with_parent)  # async-signal-safe: one prctl call
        except OSError as exc:
            raise ModelFailure(f"cannot start the local model server {self.command[0]!r}: "
                               f"{exc.strerror or exc}") from None
        finally:
            if out is not asyncio.subprocess.DEVNULL:
                out.close()
        self.starts += 1
        self._stderr_tail.clear()
        self._reader = asyncio.ensure_future(self._read_stderr(self.process))
        log.info("local_server_started", pid=self.process.pid, command=self.command[0])

    async def _read_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            self._stderr_tail.append(line.decode("utf-8", "replace").rstrip()[:500])

    async def _wait_healthy(self, client: httpx2.AsyncClient) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                tail = " | ".join(list(self._stderr_tail)[-3:]) or "no output"
                raise ModelFailure(f"the local model server {self.command[0]!r} exited with code "
                                   f"{self.process.returncode} before it was healthy: {tail}")
            if await self.healthy(client):
                return
            await asyncio.sleep(0.1)
        raise ModelFailure(f"the local model server {self.command[0]!r} was not healthy at "
                           f"{self._root()}{self.health_path or '/health or /v1/models'} within "
                           f"{self.start_timeout_s:.0f}s")

    async def aclose(self) -> None:
        """Stop the server (SIGTERM to its process group, SIGKILL after 10 s)."""
        proc, self.process = self.process, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
            log.info("local_server_stopped", pid=proc.pid, code=proc.returncode)
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None


class LocalServers:
    """The local model servers of one harness, by command; the harness closes them when it stops."""

    def __init__(self) -> None:
        self._servers: dict[tuple[str, ...], LocalServer] = {}

    def get(self, command: list[str], base_url: str, **kwargs: Any) -> LocalServer:
        """The server for ``command`` (one process however many sessions use it)."""
        key = (base_url, *command)
        if key not in self._servers:
            self._servers[key] = LocalServer(command, base_url, **kwargs)
        return self._servers[key]

    async def aclose(self) -> None:
        """Stop every server started."""
        await asyncio.gather(*(s.aclose() for s in self._servers.values()), return_exceptions=True)
