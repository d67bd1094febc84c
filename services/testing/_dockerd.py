"""A private Docker daemon for tests: its own data root, exec root, socket, pid file.

No daemon runs on a test machine by default, and the host's own must never be
touched, so tests start :class:`Dockerd`: Debian's ``dockerd`` with
``--iptables=false --ip6tables=false --bridge=none`` (so it changes no
firewall rule and makes no bridge), a ``daemon.json`` of its own (the
``runsc`` runtime when gVisor is installed), and the host's forwarding
sysctls put back the moment it is up (dockerd turns ``ip_forward`` on).
:meth:`Dockerd.stop` removes every container, stops the daemon and its
containerd, unmounts what they left and restores the sysctls again.

Needs root (dockerd does). Use as a context manager or call ``start`` and,
in a ``finally``, ``stop``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import docker
import docker.errors
from devsilo.executor._docker import ensure_base_image

__all__ = ["Dockerd", "build_base_image", "runsc_path"]

RUNSC_RUNTIME_ARGS = ("--network=none", "--host-uds=open", "--oci-seccomp")
"""How the daemon runs runsc: without --network=none gVisor cannot start here;
--host-uds=open lets the sandbox connect to the unix sockets bound into it
(the helper's and the egress relay's); --oci-seccomp applies the container's
seccomp profile inside gVisor too."""

# Forwarding switches dockerd may flip on at start; restored to what they were.
_SYSCTLS = (
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/ipv6/conf/all/forwarding",
    "/proc/sys/net/ipv6/conf/default/forwarding",
)
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_OCTAL = re.compile(r"\\([0-7]{3})")


def runsc_path() -> str | None:
    """Where gVisor's ``runsc`` is installed, or None."""
    return shutil.which("runsc", path=_PATH)


def build_base_image(docker_url: str) -> str:
    """Import the sandbox base image into the daemon at ``docker_url`` (if missing); its ref."""
    client = docker.DockerClient(base_url=docker_url)
    try:
        return ensure_base_image(client)
    finally:
        client.close()


class Dockerd:
    """One private ``dockerd`` under ``root`` (see the module docstring).

    ``url`` is its API socket (``unix://…``) for ``DockerSandbox(docker_url=…)``;
    ``runtimes`` the runtimes it has (``runc``, plus ``runsc`` when installed
    and not disabled with ``runsc=None``). The exec root and the socket live in
    a short directory under ``/tmp`` (unix socket paths are limited to 107
    bytes); the data root is ``root/data`` and is removed by :meth:`stop`
    unless ``keep_data``.
    """

    def __init__(
        self,
        root: Path,
        *,
        dockerd: str = "/usr/sbin/dockerd",
        runsc: str | None | bool = True,
        start_timeout: float = 30.0,
        stop_timeout: float = 20.0,
        keep_data: bool = False,
    ) -> None:
        """``runsc``: True finds it on PATH, a path uses that one, None/False leaves it out."""
        self.root = Path(root)
        self.dockerd = dockerd
        self.runsc: str | None = runsc_path() if runsc is True else (runsc or None)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.keep_data = keep_data
        self.data_root = self.root / "data"
        self.config_file = self.root / "daemon.json"
        self.pidfile = self.root / "dockerd.pid"
        self.log_path = self.root / "dockerd.log"
        self.exec_root: Path | None = None
        self.socket_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._containerd_pid: int | None = None
        self._sysctls: dict[str, str] = {}

    # -- properties ----------------------------------------------------------

    @property
    def url(self) -> str:
        """The daemon's API address, ``unix:///…/docker.sock``."""
        if self.socket_path is None:
            raise RuntimeError("dockerd is not started")
        return f"unix://{self.socket_path}"

    @property
    def runtimes(self) -> tuple[str, ...]:
        """Runtime names this daemon offers to ``DockerSandbox(runtime=…)``."""
        return ("runc", "runsc") if self.runsc else ("runc",)

    @property
    def pid(self) -> int | None:
        """dockerd's pid while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Start the daemon and wait until its API answers; RuntimeError with its log if not."""
        if self._proc is not None:
            raise RuntimeError("dockerd already started")
        if os.geteuid() != 0:
            raise RuntimeError("a private dockerd needs root")
        if not os.access(self.dockerd, os.X_OK):
            raise RuntimeError(f"{self.dockerd} is missing: apt-get install docker.io")
        self.root.mkdir(parents=True, exist_ok=True)
        self.exec_root = Path(tempfile.mkdtemp(prefix="devsilo-dockerd-", dir="/tmp"))
        self.socket_path = self.exec_root / "docker.sock"
        config: dict[str, object] = {}
        if self.runsc:
            config["runtimes"] = {
                "runsc": {"path": self.runsc, "runtimeArgs": list(RUNSC_RUNTIME_ARGS)}
            }
        self.config_file.write_text(json.dumps(config, indent=2))
        self._sysctls = _read_sysctls()
        # fmt: off
        argv = [
            self.dockerd,
            "--config-file", str(self.config_file),
            "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root / "exec"),
            "--pidfile", str(self.pidfile),
            "-H", self.url,
            "--iptables=false", "--ip6tables=false", "--bridge=none",
            "--log-level", "warn",
        ]
        # fmt: on
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={"PATH": _PATH, "LC_ALL": "C"},
                # Its own session: a Ctrl-C for the tests must not kill it
                # behind stop()'s back, leaving containers and mounts.
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        finally:
            _restore_sysctls(self._sysctls)
        self._containerd_pid = self._read_containerd_pid()

    def stop(self) -> None:
        """Remove every container, stop dockerd (TERM, then KILL) and its containerd; clean up.

        Safe to call twice and after a failed start.
        """
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                self._remove_all_containers()
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            self._stop_leftovers()
        if self.exec_root is not None:
            _unmount_below(self.exec_root)
        _unmount_below(self.data_root)
        if self._sysctls:
            _restore_sysctls(self._sysctls)
        if self.exec_root is not None:
            shutil.rmtree(self.exec_root, ignore_errors=True)
            self.exec_root = None
        if not self.keep_data:
            shutil.rmtree(self.data_root, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- use -----------------------------------------------------------------

    def client(self) -> docker.DockerClient:
        """A new SDK client of this daemon; the caller closes it."""
        return docker.DockerClient(base_url=self.url)

    def build_base_image(self) -> str:
        """Import the sandbox base image (``docker import``, no registry); its ref."""
        return build_base_image(self.url)

    def containers(self) -> list[str]:
        """Names of every container the daemon has, running or not."""
        client = self.client()
        try:
            return [c.name or c.id or "" for c in client.containers.list(all=True)]
        finally:
            client.close()

    def log_tail(self, limit: int = 4000) -> str:
        """The end of dockerd's own log."""
        try:
            return self.log_path.read_bytes()[-limit:].decode("utf-8", errors="replace")
        except OSError:
            return ""

    # -- internals -----------------------------------------------------------

    def _wait_ready(self) -> None:
        assert self._proc is not None and self.socket_path is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"dockerd exited with status {self._proc.returncode}:\n{self.log_tail()}"
                )
            if _ping(self.socket_path):
                return
            time.sleep(0.05)
        raise RuntimeError(
            f"dockerd did not answer within {self.start_timeout:g} s:\n{self.log_tail()}"
        )

    def _read_containerd_pid(self) -> int | None:
        assert self.exec_root is not None
        with contextlib.suppress(OSError, ValueError):
            return int((self.exec_root / "exec" / "containerd" / "containerd.pid").read_text())
        return None

    def _remove_all_containers(self) -> None:
        with contextlib.suppress(docker.errors.DockerException, OSError):
            client = docker.DockerClient(base_url=self.url, timeout=30)
            try:
                for container in client.containers.list(all=True):
                    with contextlib.suppress(docker.errors.DockerException):
                        container.remove(force=True, v=True)
            finally:
                client.close()

    def _stop_leftovers(self) -> None:
        """containerd and shims of *this* daemon that outlived it (after a KILL)."""
        assert self.exec_root is not None
        marker = str(self.exec_root).encode()
        pids = set(_pids_mentioning(marker))
        if self._containerd_pid is not None and _mentions(self._containerd_pid, marker):
            pids.add(self._containerd_pid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = {p for p in pids if _mentions(p, marker)}
            if not alive:
                return
            for p in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, sig)
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and any(_mentions(p, marker) for p in alive):
                time.sleep(0.05)


def _ping(path: Path) -> bool:
    """Whether the daemon's API answers ``/_ping`` with OK."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.connect(str(path))
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
    except OSError:
        return False
    return reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n", 1)[0]


def _read_sysctls() -> dict[str, str]:
    values = {}
    for path in _SYSCTLS:
        with contextlib.suppress(OSError):
            values[path] = Path(path).read_text().strip()
    return values


def _restore_sysctls(values: dict[str, str]) -> None:
    for path, value in values.items():
        with contextlib.suppress(OSError):
            if Path(path).read_text().strip() != value:
                Path(path).write_text(value + "\n")


def _mentions(pid: int, marker: bytes) -> bool:
    """Whether process ``pid`` runs with ``marker`` (our exec root) in its command line."""
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _pids_mentioning(marker: bytes) -> list[int]:
    me = os.getpid()
    return [
        int(name)
        for name in os.listdir("/proc")
        if name.isdigit() and int(name) != me and _mentions(int(name), marker)
    ]


def _unmount_below(path: Path) -> None:
    """Lazily unmount everything mounted at or below ``path`` (deepest first)."""
    prefix = os.path.realpath(path)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    targets = []
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 4:
            target = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
            if target == prefix or target.startswith(prefix + "/"):
                targets.append(target)
    for target in sorted(set(targets), key=len, reverse=True):
        subprocess.run(
            ["umount", "-l", target],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={"PATH": _PATH},
            check=False,
        )
