"""A whole devsilo stack for tests: `silo up` as a real subprocess on free ports."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_run(n: int, tries: int = 200) -> int:
    """The first of ``n`` consecutive ports all free on 127.0.0.1 right now."""
    import random

    for _ in range(tries):
        base = random.randint(20000, 60000 - n)
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no run of {n} free ports found")


class Stack:
    """`silo up` started on free ports with its own state directory.

    ``stop`` sends SIGTERM and waits; it is safe to call twice and always runs
    from the fixtures' teardown, so a failing test leaves nothing behind.
    """

    def __init__(self, state_dir: Path, extra_args: list[str] | None = None,
                 services: dict[str, dict[str, Any]] | None = None) -> None:
        """``services`` adds or changes entries of config.json (id -> ServiceConfig fields)."""
        from devsilo.runtime._state import StackConfig, StateDir, write_private

        self.state_dir = state_dir
        self.extra_args = list(extra_args or [])
        state = StateDir(state_dir)
        state.initialize()
        data = json.loads(state.config_path.read_text())
        for sid, fields in (services or {}).items():
            data["services"].setdefault(sid, {}).update(fields)
        for sid, svc in data["services"].items():
            if svc.get("role") == "executor":  # locked workspaces stay with this stack
                svc.setdefault("options", {}).setdefault(
                    "workspace_store", str(state_dir.parent / f"workspaces-{sid}"))
        write_private(state.config_path, json.dumps(data, indent=2).encode())
        state.initialize()
        self._config = StackConfig.model_validate(json.loads(state.config_path.read_text()))
        self._pick_ports()

    def _pick_ports(self) -> None:
        from devsilo.cli.main import metrics_port_plan

        self.nats_port, self.gateway_port = free_ports(2)
        self.metrics_ports = metrics_port_plan(self._config, free_port_run(len(self._config.services)))
        self._lines: list[str] = []
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self.stack: dict[str, Any] = {}

    def start(self, timeout: float = 60.0, attempts: int = 3) -> None:
        """Start and wait until every service is healthy.

        Ports are picked free but can be taken by another process before the
        services bind them; then the stack is started again on new ports.
        """
        for attempt in range(attempts):
            try:
                self._start_once(timeout)
                return
            except RuntimeError as exc:
                if "address already in use" not in str(exc) or attempt == attempts - 1:
                    raise
                self._lines.clear()
                self._pick_ports()

    def _start_once(self, timeout: float) -> None:
        argv = [sys.executable, "-m", "devsilo.cli", "--state-dir", str(self.state_dir), "up",
                "--nats-port", str(self.nats_port), "--gateway-port", str(self.gateway_port),
                "--metrics-port-base", str(self.metrics_ports["gateway"]), *self.extra_args]
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "devsilo is up." in self.output():
                self.stack = json.loads((self.state_dir / "run" / "stack.json").read_text())
                return
            if self._proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("silo up did not come up:\n" + self.output())

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.append(line)

    def output(self) -> str:
        """Everything `silo up` printed so far."""
        return "".join(self._lines)

    def service_pid(self, service_id: str) -> int:
        """The pid the supervisor started first for ``service_id``."""
        return int(self.stack["services"][service_id]["pid"])

    def running(self) -> dict[str, Any]:
        """The stack file as the supervisor last wrote it (pids change as it restarts things)."""
        data: dict[str, Any] = json.loads((self.state_dir / "run" / "stack.json").read_text())
        return data

    def nats_pid(self) -> int:
        """The pid of the embedded nats-server running now."""
        return int(self.running()["nats_pid"])

    def health(self, service_id: str) -> dict[str, Any] | None:
        """The service's /healthz answer, or None when it does not answer 200."""
        try:
            url = f"http://127.0.0.1:{self.metrics_ports[service_id]}/healthz"
            with urllib.request.urlopen(url, timeout=2) as r:
                data: dict[str, Any] = json.loads(r.read())
                return data
        except OSError:
            return None

    def healthy(self, service_id: str) -> bool:
        """Whether the service answers /healthz with ok."""
        h = self.health(service_id)
        return bool(h and h.get("ok"))

    def live_pid(self, service_id: str) -> int | None:
        """The pid of the process answering /healthz now."""
        h = self.health(service_id)
        return int(h["pid"]) if h and "pid" in h else None

    def metrics(self, service_id: str) -> str:
        """The service's /metrics text."""
        url = f"http://127.0.0.1:{self.metrics_ports[service_id]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()

    def metric(self, service_id: str, name: str, labels: str = "") -> float:
        """One sample's value (0 when absent), e.g. metric('harness', 'x_total', 'reason="replayed"')."""
        key = f"{name}{{{labels}}}" if labels else name
        for line in self.metrics(service_id).splitlines():
            if line.startswith(key + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM `silo up` and wait for it; KILL the process group if it hangs."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        return self._proc.returncode


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists (and is not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


