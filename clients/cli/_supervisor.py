"""`silo up`: an embedded NATS server and every service as its own OS process.

Services start together and the stack is up when every one answers
``/healthz``. A service that dies is
restarted with exponential backoff (1 s doubling to 30 s, reset after a
minute of good health); so is the embedded NATS server (0.5 s doubling), on
its port with its JetStream store, while the services reconnect to it. On SIGINT or SIGTERM everything stops in the reverse
order and nothing is left behind: children also get SIGTERM from the kernel if
the supervisor itself dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from devsilo.protocol import ConfigError, Role
from devsilo.runtime._natsserver import NatsServer
from devsilo.runtime._state import StateDir

START_ORDER = (Role.EGRESS, Role.EXECUTOR, Role.HARNESS, Role.GATEWAY)
STOP_GRACE_S = 10.0
HEALTH_TIMEOUT_S = 30.0
PR_SET_PDEATHSIG = 1
NATS_FIRST_BACKOFF_S = 0.5
"""The embedded NATS server is restarted sooner than a service: every service waits for it."""


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the supervisor goes away."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class ServiceProcess:
    """One supervised service process and its restart bookkeeping."""

    role: Role
    service_id: str
    argv: list[str]
    metrics_port: int
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def health_url(self) -> str:
        """Where this service answers /healthz."""
        return f"http://127.0.0.1:{self.metrics_port}/healthz"


@dataclass(frozen=True)
class StackPorts:
    """The ports a stack listens on."""

    nats: int
    gateway: int
    metrics: dict[str, int]
    gateway_host: str = "127.0.0.1"


class Supervisor:
    """Starts, watches, restarts and stops the whole stack on one machine."""

    def __init__(
        self,
        state: StateDir,
        ports: StackPorts,
        *,
        nats_url: str | None = None,
        say: Callable[[str], None] = print,
        max_message_bytes: int | None = None,
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self.state = state
        self.ports = ports
        self.external_nats = nats_url
        self.say = say
        self.nats: NatsServer | None = None
        self.services: list[ServiceProcess] = []
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.stack_file = state.root / "run" / "stack.json"
        self.nats_started_at = 0.0
        self.nats_backoff = NATS_FIRST_BACKOFF_S
        self.nats_restarts = 0

    @property
    def nats_url(self) -> str:
        """The NATS server the services use."""
        if self.external_nats:
            return self.external_nats
        assert self.nats is not None
        return self.nats.url

    @property
    def gateway_url(self) -> str:
        """Where clients connect."""
        return f"wss://{self.ports.gateway_host}:{self.ports.gateway}/ws"

    async def run(self) -> None:
        """Run until SIGINT/SIGTERM (or ``stopping`` is set), then stop everything."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        try:
            await self._start_all()
            self._write_stack_file()
            self.ready.set()
            fp = self.state.gateway_fingerprint()
            self.say(f"devsilo is up.\n  gateway:     {self.gateway_url}\n  fingerprint: SHA256 {fp}\n"
                     f"  NATS:        {self.nats_url}\n  state:       {self.state.root}\n"
                     f"  logs:        {self.state.root / 'logs'}\n"
                     f"Try: silo demo   (Ctrl-C stops everything)")
            await self._watch()
        finally:
            await self._stop_all()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    async def _start_all(self) -> None:
        if self.external_nats is None:
            self.nats = NatsServer(self.state, host="127.0.0.1", port=self.ports.nats)
            await self.nats.start()
            self.nats_started_at = time.monotonic()
            self.say(f"nats-server started on {self.nats.url}")
        cfg = self.state.config()
        (self.state.root / "logs").mkdir(mode=0o700, exist_ok=True)
        for role in START_ORDER:
            for service_id in cfg.service_ids(role):
                port = self.ports.metrics[service_id]
                argv = [sys.executable, "-m", "devsilo.cli", "service", role.value, "--id", service_id,
                        "--state-dir", str(self.state.root), "--nats", self.nats_url,
                        "--metrics-port", str(port)]
                if self.max_message_bytes:
                    argv += ["--max-message-bytes", str(self.max_message_bytes)]
                if role is Role.GATEWAY and "port" not in cfg.services[service_id].options:
                    # A further gateway replica names its own port in its options.
                    argv += ["--listen", f"{self.ports.gateway_host}:{self.ports.gateway}"]
                sp = ServiceProcess(role, service_id, argv, port, self.state.root / "logs" / f"{service_id}.log")
                self.services.append(sp)
                await self._spawn(sp)

        async def ready(sp: ServiceProcess) -> None:
            await self._wait_healthy(sp)
            self.say(f"{sp.service_id} ready (pid {sp.proc.pid if sp.proc else '?'}, metrics :{sp.metrics_port})")

        # Together: no service needs another to start (each waits for what it uses, as it must
        # when another restarts), and one after another cost the sum of their start times.
        await asyncio.gather(*(ready(sp) for sp in self.services))

    async def _spawn(self, sp: ServiceProcess) -> None:
        log = open(sp.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        os.chmod(sp.log_path, 0o600)
        try:
            sp.proc = await asyncio.create_subprocess_exec(
                *sp.argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                preexec_fn=_die_with_parent, start_new_session=True,
            )
        finally:
            log.close()
        sp.started_at = time.monotonic()

    async def _wait_healthy(self, sp: ServiceProcess) -> None:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if sp.proc is None or sp.proc.returncode is not None:
                    raise ConfigError(f"{sp.service_id} exited during start; see {sp.log_path}:\n"
                                      + _tail(sp.log_path))
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):  # not listening yet
                    async with http.get(sp.health_url, timeout=aiohttp.ClientTimeout(total=1)) as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.05)
        raise ConfigError(f"{sp.service_id} did not become healthy in {HEALTH_TIMEOUT_S:.0f}s; see {sp.log_path}")

    async def _watch(self) -> None:
        """Restart services (and the embedded NATS server) that die, until asked to stop."""
        while not self.stopping.is_set():
            waits = {asyncio.ensure_future(sp.proc.wait()): sp for sp in self.services if sp.proc}
            nats_wait = asyncio.ensure_future(self.nats.wait()) if self.nats is not None else None
            stop = asyncio.ensure_future(self.stopping.wait())
            watched = [stop, *waits] + ([nats_wait] if nats_wait is not None else [])
            done, pending = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            for f in pending:
                f.cancel()
            if self.stopping.is_set():
                return
            if nats_wait is not None and nats_wait in done and not await self._restart_nats(nats_wait.result()):
                return
            for f in done:
                sp = waits.get(f)
                if sp is None:
                    continue
                code = sp.proc.returncode if sp.proc else None
                if time.monotonic() - sp.started_at > 60:
                    sp.backoff = 1.0
                self.say(f"{sp.service_id} exited with {code}; restarting in {sp.backoff:.0f}s "
                         f"(restart {sp.restarts + 1}; log {sp.log_path})")
                with contextlib.suppress(TimeoutError):  # the backoff passed: restart
                    await asyncio.wait_for(self.stopping.wait(), timeout=sp.backoff)
                    return
                sp.backoff = min(sp.backoff * 2, 30.0)
                sp.restarts += 1
                await self._spawn(sp)
            self._write_stack_file()

    async def _restart_nats(self, code: int) -> bool:
        """Start the embedded NATS server again on its port with its JetStream store; False when stopping.

        The services keep running and reconnect by themselves (``connect_nats`` retries forever);
        what they had in flight fails or is retried as each of them arranges.
        """
        assert self.nats is not None
        nats = self.nats
        if time.monotonic() - self.nats_started_at > 60:
            self.nats_backoff = NATS_FIRST_BACKOFF_S
        while True:
            self.say(f"nats-server exited with {code}; restarting in {self.nats_backoff:.1f}s "
                     f"(restart {self.nats_restarts + 1})")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=self.nats_backoff)
                return False
            self.nats_backoff = min(self.nats_backoff * 2, 30.0)
            self.nats_restarts += 1
            try:
                await nats.restart()
            except ConfigError as exc:  # e.g. its port taken meanwhile: try again after the backoff
                self.say(f"nats-server did not start again: {exc}")
                continue
            self.nats_started_at = time.monotonic()
            self.say(f"nats-server restarted on {nats.url} (pid {nats.pid})")
            return True

    async def _stop_all(self) -> None:
        for sp in reversed(self.services):
            started = time.monotonic()
            code = await _terminate(sp.proc)
            if code is not None:
                self.say(f"{sp.service_id} stopped ({code}) in {time.monotonic() - started:.1f}s")
        if self.nats is not None:
            await self.nats.stop()
        self.stack_file.unlink(missing_ok=True)
        self.say("devsilo stopped.")

    def _write_stack_file(self) -> None:
        self.stack_file.parent.mkdir(mode=0o700, exist_ok=True)
        data = {
            "pid": os.getpid(), "gateway_url": self.gateway_url, "nats_url": self.nats_url,
            "fingerprint": self.state.gateway_fingerprint(),
            "nats_pid": self.nats.pid if self.nats is not None else None,
            "services": {sp.service_id: {"pid": sp.proc.pid if sp.proc else None,
                                         "metrics": f"http://127.0.0.1:{sp.metrics_port}/metrics"}
                         for sp in self.services},
        }
        tmp = self.stack_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.chmod(tmp, 0o600)
        tmp.replace(self.stack_file)


async def _terminate(proc: asyncio.subprocess.Process | None) -> int | None:
    """TERM, then KILL after the grace period; the exit status, or None if it was not running."""
    if proc is None or proc.returncode is not None:
        return None
    try:
        proc.terminate()
        return await asyncio.wait_for(proc.wait(), timeout=STOP_GRACE_S)
    except TimeoutError:
        proc.kill()
        return await proc.wait()
    except ProcessLookupError:
        return None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def read_stack_file(state: StateDir) -> dict[str, Any] | None:
    """The running stack's addresses, or None when no live `silo up` wrote one."""
    path = state.root / "run" / "stack.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        os.kill(int(data["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return data
