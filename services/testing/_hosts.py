"""Several "hosts" on one machine for tests: network namespaces on one bridge.

:class:`HostNetwork` makes a Linux bridge in the root namespace and, per
host, a network namespace joined to it by a veth pair, each with its own
address in one private /24 (``10.99.X.0/24``; the root namespace gets
``.254`` so a test, or a Prometheus it runs, reaches every host). A host
reaches the others and the root namespace over the bridge, and nothing
else. Programs run in a host with ``ip netns exec`` (:meth:`HostNetwork.popen`),
and every process started that way is stopped, and every namespace, link and
the bridge removed, by :meth:`HostNetwork.stop` (safe to call twice, also
after a half-finished :meth:`HostNetwork.start`). Needs root.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30)


@dataclass
class Host:
    """One simulated machine: its namespace, address and veth pair."""

    name: str
    ns: str
    address: str
    outer_if: str
    inner_if: str


@dataclass
class HostNetwork:
    """A bridge and one network namespace per host name; see the module docstring."""

    names: tuple[str, ...]
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    hosts: dict[str, Host] = field(default_factory=dict)
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list)
    _made: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bridge = f"dsb{self.tag}"
        in_use = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=False).stdout
        start = int(self.tag[:2], 16)
        octet = next(o for o in [*range(start, 250), *range(start)] if f"10.99.{o}." not in in_use)
        self.prefix = f"10.99.{octet}"
        self.root_address = f"{self.prefix}.254"
        for i, name in enumerate(self.names, start=1):
            self.hosts[name] = Host(name, f"ds3-{self.tag}-{name}", f"{self.prefix}.{i}",
                                    f"ds3o{self.tag}{i}", f"ds3i{self.tag}{i}")

    def address(self, name: str) -> str:
        """The address of host ``name`` on the bridge."""
        return self.hosts[name].address

    def start(self) -> None:
        """Make the bridge, the namespaces and the veth pairs, all up."""
        try:
            _sh("ip", "link", "add", self.bridge, "type", "bridge")
            self._made.append(("link", self.bridge))
            _sh("ip", "addr", "add", f"{self.root_address}/24", "dev", self.bridge)
            _sh("ip", "link", "set", self.bridge, "up")
            for host in self.hosts.values():
                _sh("ip", "netns", "add", host.ns)
                self._made.append(("netns", host.ns))
                _sh("ip", "link", "add", host.outer_if, "type", "veth", "peer", "name", host.inner_if)
                self._made.append(("link", host.outer_if))
                _sh("ip", "link", "set", host.inner_if, "netns", host.ns)
                _sh("ip", "link", "set", host.outer_if, "master", self.bridge)
                _sh("ip", "link", "set", host.outer_if, "up")
                _sh("ip", "-n", host.ns, "addr", "add", f"{host.address}/24", "dev", host.inner_if)
                _sh("ip", "-n", host.ns, "link", "set", host.inner_if, "up")
                _sh("ip", "-n", host.ns, "link", "set", "lo", "up")
        except BaseException:
            self.stop()
            raise

    def popen(self, name: str, argv: list[str], *, log: Path | None = None,
              env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` on host ``name`` (its own process group); output to ``log`` when given.

        The process is stopped by :meth:`stop` unless the caller stopped it first.
        """
        out: IO[bytes] | int = subprocess.DEVNULL
        if log is not None:
            out = log.open("ab")
            kwargs.setdefault("stdout", out)
            kwargs.setdefault("stderr", subprocess.STDOUT)
        try:
            proc = subprocess.Popen(["ip", "netns", "exec", self.hosts[name].ns, *argv],
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True, **kwargs)
        finally:
            if log is not None and not isinstance(out, int):
                out.close()
        self._procs.append(proc)
        return proc

    def run(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on host ``name`` to its end (text, output captured, not checked)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 120)
        kwargs.setdefault("check", False)
        return subprocess.run(["ip", "netns", "exec", self.hosts[name].ns, *argv], **kwargs)  # noqa: PLW1510

    @staticmethod
    def terminate(proc: subprocess.Popen[Any], timeout: float = 20.0) -> int:
        """SIGTERM ``proc``'s process group, SIGKILL it if still there after ``timeout``; its exit code."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # already gone
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        return proc.returncode

    def stop(self) -> None:
        """Stop every process started here, then remove the namespaces, veth pairs and bridge."""
        for proc in reversed(self._procs):
            with contextlib.suppress(subprocess.TimeoutExpired, ProcessLookupError):  # the sweep below kills it
                self.terminate(proc)
        for proc in self._procs:  # a session's sandboxes die with their executor; catch stragglers
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        self._procs.clear()
        for kind, name in reversed(self._made):
            if kind == "netns":
                # processes of other groups still inside (none expected) would keep it alive
                pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                                      check=False).stdout.split()
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
                subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
            else:
                subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)
        self._made.clear()
