"""Another machine for tests: its own network, mount and UTS namespaces on this host.

:class:`ClientMachine` gives a process (run with :meth:`ClientMachine.run`)
a network namespace joined to this host only by a veth pair (it reaches
the host's side address and nothing else: not this host's loopback, so not
NATS), a mount namespace where ``home`` is a tmpfs that no process outside
can see (outside it stays an empty directory), and its own host name. The
namespaces are kept by files (``ip netns``, ``unshare --mount=FILE``), so
several commands run one after another on the same "machine". Needs root.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

CLONE_NEWNET = 0x40000000


def socket_in_netns(ns: str, address: str, port: int = 0, kind: int = socket.SOCK_STREAM,
                    backlog: int = 128) -> socket.socket:
    """A socket bound (and, for TCP, listening) inside network namespace ``ns`` (``ip netns``).

    A socket keeps the namespace it was made in, so a test's own event loop can
    serve from inside a namespace it never entered: the ``setns`` happens on a
    thread of its own, the only thread that changes namespace.
    """
    result: list[socket.socket | OSError] = []

    def make() -> None:
        try:
            with open(f"/run/netns/{ns}", "rb") as f:
                # Python 3.11 has no os.setns.
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            sock = socket.socket(socket.AF_INET, kind)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            if kind == socket.SOCK_STREAM:
                sock.listen(backlog)
            sock.setblocking(False)
            result.append(sock)
        except OSError as exc:
            result.append(exc)

    thread = threading.Thread(target=make, name=f"netns-{ns}")
    thread.start()
    thread.join(10)
    if not result:
        raise OSError(errno.ETIMEDOUT, f"could not make a socket in network namespace {ns}")
    if isinstance(result[0], OSError):
        raise result[0]
    return result[0]


def netns_available() -> str | None:
    """Why :class:`ClientMachine` cannot work here, or None when it can."""
    import os

    if os.geteuid() != 0:
        return "needs root (network and mount namespaces)"
    for tool in ("ip", "nsenter", "unshare", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30)


class ClientMachine:
    """A simulated other machine: ``start`` makes it, ``stop`` removes every trace."""

    def __init__(self, scratch: Path, home: Path, hostname: str = "client-machine") -> None:
        tag = secrets.token_hex(3)
        self.ns = f"dsx-{tag}"
        self.host_if, self.client_if = f"dsxh{tag}", f"dsxc{tag}"
        in_use = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=False).stdout
        octet = next(o for o in [int(tag[:2], 16) % 250 + 1, *range(1, 251)] if f"10.231.{o}." not in in_use)
        self.host_addr, self.client_addr = f"10.231.{octet}.1", f"10.231.{octet}.2"
        self.nsdir = scratch / f"ns-{tag}"
        self.home = home
        self.hostname = hostname
        self._made: list[str] = []

    @property
    def prefix(self) -> list[str]:
        """The command prefix that runs a program on this machine."""
        return ["nsenter", f"--net=/run/netns/{self.ns}", f"--mount={self.nsdir / 'mnt'}",
                f"--uts={self.nsdir / 'uts'}", "--"]

    def start(self) -> None:
        """Create the namespaces, the veth pair and the private tmpfs at ``home``."""
        try:
            _sh("ip", "netns", "add", self.ns)
            self._made.append("netns")
            _sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.client_if)
            self._made.append("veth")
            _sh("ip", "link", "set", self.client_if, "netns", self.ns)
            _sh("ip", "addr", "add", f"{self.host_addr}/30", "dev", self.host_if)
            _sh("ip", "link", "set", self.host_if, "up")
            _sh("ip", "-n", self.ns, "addr", "add", f"{self.client_addr}/30", "dev", self.client_if)
            _sh("ip", "-n", self.ns, "link", "set", self.client_if, "up")
            _sh("ip", "-n", self.ns, "link", "set", "lo", "up")
            # Namespace files must sit on a private mount, or binding them there fails.
            self.nsdir.mkdir(parents=True)
            _sh("mount", "--bind", str(self.nsdir), str(self.nsdir))
            self._made.append("nsdir")
            _sh("mount", "--make-private", str(self.nsdir))
            (self.nsdir / "mnt").touch()
            (self.nsdir / "uts").touch()
            _sh("unshare", f"--mount={self.nsdir / 'mnt'}", f"--uts={self.nsdir / 'uts'}",
                "--propagation", "private", "hostname", self.hostname)
            self._made.append("ns")
            self.home.mkdir(parents=True, exist_ok=True)
            _sh("nsenter", f"--mount={self.nsdir / 'mnt'}", "--", "mount", "-t", "tmpfs", "-o", "mode=0755",
                "devsilo-client", str(self.home))
        except BaseException:
            self.stop()
            raise

    def run(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on this machine (text mode, output captured unless told otherwise)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 300)
        kwargs.setdefault("check", False)
        return subprocess.run([*self.prefix, *argv], **kwargs)  # noqa: PLW1510 -- check is set above

    def stop(self) -> None:
        """Remove the namespaces (the tmpfs goes with its mount namespace) and the veth pair."""
        if "ns" in self._made:
            for name in ("mnt", "uts"):
                subprocess.run(["umount", str(self.nsdir / name)], capture_output=True, check=False)
        if "nsdir" in self._made:
            subprocess.run(["umount", str(self.nsdir)], capture_output=True, check=False)
        if "veth" in self._made:
            subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, check=False)
        if "netns" in self._made:
            subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, check=False)
        self._made.clear()
