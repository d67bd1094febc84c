"""The executor's relay for one session: the sandbox's only way out, on to the egress.

Each session's sandbox gets one unix socket, bound inside at
:data:`~devsilo.executor._spec.RELAY_SOCKET`. The helper inside (the
sandbox's HTTP(S) proxy and DNS resolver) opens a new connection to it for
every proxied connection and for its DNS traffic; :class:`SessionRelay`
accepts them and, for each, opens a TCP connection to the session's egress
proxy and copies bytes both ways. The relay decides nothing about traffic:
the egress applies the session's policy, and it knows which session's
policy because the relay says so. The sandbox cannot claim another session:
the socket it reaches is this session's alone, and only the executor opens
connections to the egress, each with a fresh signed first line.

Framing — defined here and nowhere else (the helper's ``STREAM_TCP`` and
``STREAM_DNS`` are these first lines)::

    sandbox → relay, on the unix socket:
        "TCP\\n"  then one proxy client's bytes verbatim, both ways (an HTTP
                 forward-proxy request with an absolute URI, or a CONNECT
                 and whatever the tunnel carries);
     or "DNS\\n"  then DNS messages, each preceded by its length as 2 bytes,
                 big-endian (exactly DNS over TCP, RFC 1035 §4.2.2); the
                 answers come back the same way, matched by DNS id.

    relay → egress, on a new TCP connection per sandbox connection:
        "SILO-RELAY <base64url of a signed RelayHello envelope>\\n"
     (or, where nothing checks signatures, e.g. a bare proxy in a test,
        "SILO-SESSION <session id>\\n")
        then the sandbox's first line ("TCP\\n" or "DNS\\n") and its bytes,
        verbatim, both ways.

The egress reads the two lines with :func:`read_preamble`. The signed line
is made afresh for every connection by the executor that opened the session
(a ``RelayHello`` naming the session, signed for ``silo.egress.<gid>.relay``,
valid for a minute, its message id never accepted twice), so nothing else
on the network between executor and egress can speak for a session. When the relay
has no egress (``egress_addr`` None) or cannot reach it, it answers itself:
a ``TCP`` stream gets an HTTP 502 with a one-line ``blocked: …`` body, and
DNS queries get REFUSED (no egress) or SERVFAIL (unreachable).

DNS inside the sandbox: the helper resolves on ``127.0.0.1:DNS_PORT``
(:data:`PROXY_PORT` + 1, UDP and TCP) always, and on port 53 where the
sandbox lets an unprivileged user bind it. bubblewrap gives the sandbox user
no capability that counts in the sandbox's network namespace (that
namespace belongs to bubblewrap's outer user namespace, the user sits in a
nested one), and ``/proc/sys`` is read-only inside, so port 53 is refused
by default; ``/etc/resolv.conf`` cannot name another port. A backend makes
53 work by setting ``net.ipv4.ip_unprivileged_port_start=53`` in the
sandbox's network namespace before the helper starts (as root, e.g. with
bubblewrap's ``--block-fd`` and ``nsenter --net=/proc/<child-pid>/ns/net``;
Docker already sets it to 0 in containers). Either way ``/etc/resolv.conf``
should say ``nameserver 127.0.0.1`` (glibc and musl also default to it when
the file is missing), so that resolution goes to the helper or fails at
once: there is no other server to reach.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import socket
import stat
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from devsilo.protocol import ProtocolError, SandboxError
from devsilo.protocol._messages import SESSION_ID_PATTERN

from .helper.helper import (
    DNS_PORT,
    DNS_RCODE_REFUSED,
    DNS_RCODE_SERVFAIL,
    NO_EGRESS,
    PROXY_PORT,
    STREAM_DNS,
    STREAM_TCP,
    answer_blocked,
    answer_dns_frames,
    splice,
)

__all__ = [
    "DNS_PORT",
    "PROXY_PORT",
    "RELAY_PREFIX",
    "SESSION_PREFIX",
    "STREAM_DNS",
    "STREAM_TCP",
    "RelayPreamble",
    "RelayStats",
    "SessionRelay",
    "read_preamble",
    "relay_line",
    "session_line",
]

SESSION_PREFIX = b"SILO-SESSION "
"""How the relay's first line to the egress starts; the session id follows."""

MAX_CONNECTIONS = 256
"""Sandbox connections one relay serves at once; more are closed at once."""

EGRESS_UNREACHABLE = "egress proxy unreachable"

_SESSION_ID = re.compile(SESSION_ID_PATTERN)
_SESSION_LINE = re.compile(rb"SILO-SESSION ([A-Za-z0-9_-]{1,64})\n\Z")
_SESSION_LINE_MAX = len(SESSION_PREFIX) + 64 + 1


def session_line(session_id: str) -> bytes:
    """The relay's first line to the egress for ``session_id``."""
    if not _SESSION_ID.match(session_id):
        raise ValueError(f"not a session id: {session_id[:80]!r}")
    return SESSION_PREFIX + session_id.encode("ascii") + b"\n"


RELAY_PREFIX = b"SILO-RELAY "
"""How a signed first line starts; base64url of a signed ``RelayHello`` envelope follows."""
_RELAY_LINE = re.compile(rb"SILO-RELAY ([A-Za-z0-9_=-]{16,4096})\n\Z")
_RELAY_LINE_MAX = len(RELAY_PREFIX) + 4096 + 1


def relay_line(sealed: bytes) -> bytes:
    """The signed first line carrying ``sealed`` (a signed ``RelayHello`` envelope)."""
    return RELAY_PREFIX + base64.urlsafe_b64encode(sealed) + b"\n"


@dataclass(frozen=True)
class RelayPreamble:
    """What a relay connection says before its payload: whose, and which kind."""

    session_id: str
    kind: str
    """``"tcp"`` (a proxy client's stream) or ``"dns"`` (length-prefixed DNS messages)."""
    signed: bytes | None = None
    """The signed ``RelayHello`` envelope of a ``SILO-RELAY`` line (the egress verifies it);
    None for a bare ``SILO-SESSION`` line, whose ``session_id`` nobody vouches for."""


async def read_preamble(reader: asyncio.StreamReader, timeout: float = 10.0) -> RelayPreamble:
    """Read the two framing lines at the start of a relay → egress connection (for the egress).

    Raises :class:`~devsilo.protocol.ProtocolError` when they are missing,
    malformed or slow; the connection should then be closed unanswered.
    """
    try:
        async with asyncio.timeout(timeout):
            line = await reader.readuntil(b"\n")
            kind = await reader.readexactly(len(STREAM_TCP))
    except TimeoutError:
        raise ProtocolError(f"relay preamble not received within {timeout:g} s") from None
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        raise ProtocolError("relay connection closed or overlong before its preamble") from None
    if kind not in (STREAM_TCP, STREAM_DNS):
        raise ProtocolError(f"bad relay stream kind: {kind!r}")
    stream = "tcp" if kind == STREAM_TCP else "dns"
    signed = _RELAY_LINE.match(line) if len(line) <= _RELAY_LINE_MAX else None
    if signed is not None:
        try:
            sealed = base64.urlsafe_b64decode(signed.group(1))
        except ValueError:
            raise ProtocolError("bad relay line: not base64") from None
        return RelayPreamble("", stream, sealed)
    match = _SESSION_LINE.match(line) if len(line) <= _SESSION_LINE_MAX else None
    if match is None:
        raise ProtocolError(f"bad relay session line: {line[:80]!r}")
    return RelayPreamble(match.group(1).decode("ascii"), stream)


@dataclass
class RelayStats:
    """Counters of one relay since it started."""

    connections: int = 0
    """Connections accepted from the sandbox (refused ones included)."""
    open: int = 0
    """Connections being relayed now."""
    refused: int = 0
    """Dropped unanswered: a wrong peer, over the limit, or no valid first line."""
    egress_failures: int = 0
    """Connections the egress could not be reached for."""
    bytes_up: int = 0
    """Payload bytes from the sandbox to the egress."""
    bytes_down: int = 0
    """Payload bytes from the egress to the sandbox."""


class SessionRelay:
    """Listens on one session's unix socket and relays each connection to the egress.

    The socket is created mode 0600 and owned by the sandbox's host ``uid``,
    so only the sandbox (and root) can connect; a connecting peer of any
    other uid is refused as well (SO_PEERCRED). Use as ``async with`` or
    call :meth:`start` and :meth:`close`.
    """

    def __init__(
        self,
        session_id: str,
        socket_path: Path,
        egress_addr: tuple[str, int] | None,
        *,
        uid: int,
        max_connections: int = MAX_CONNECTIONS,
        connect_timeout: float = 10.0,
        first_line_timeout: float = 10.0,
        hello: Callable[[], bytes] | None = None,
    ) -> None:
        """``egress_addr`` is where the session's egress proxy listens (None: refuse all).

        ``hello``, when given, makes each connection's first line to the egress: a
        fresh signed ``SILO-RELAY`` line (:func:`relay_line`), which the egress
        service requires; without it the line is the bare ``SILO-SESSION``.
        """
        self._line = session_line(session_id)
        self.hello = hello
        self.session_id = session_id
        self.socket_path = Path(socket_path)
        self.egress_addr = egress_addr
        """Where new connections go; may be changed while running (None refuses them)."""
        self.uid = uid
        self._max = max_connections
        self._connect_timeout = connect_timeout
        self._first_line_timeout = first_line_timeout
        self._stats = RelayStats()
        self._bytes = [0, 0]  # up, down: splice adds to these as it copies
        self._server: asyncio.AbstractServer | None = None
        self._adopted: list[asyncio.AbstractServer] = []
        self._inode: tuple[int, int] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def stats(self) -> RelayStats:
        """A snapshot of the counters."""
        s = self._stats
        return RelayStats(
            connections=s.connections,
            open=s.open,
            refused=s.refused,
            egress_failures=s.egress_failures,
            bytes_up=self._bytes[0],
            bytes_down=self._bytes[1],
        )

    async def start(self) -> None:
        """Create the socket (failing if anything is at its path) and start accepting."""
        if self._server is not None or self._closed:
            raise SandboxError("a relay starts once; make a new one")
        euid = os.geteuid()
        if euid != 0 and self.uid != euid:
            raise SandboxError(
                f"the relay for uid {self.uid} needs root (the executor runs as uid {euid})"
            )
        if self.uid <= 0:
            raise SandboxError("the sandbox uid must not be 0")
        if os.path.lexists(self.socket_path):
            raise SandboxError(f"relay socket {self.socket_path} already exists")
        sock = await asyncio.get_running_loop().run_in_executor(None, self._make_socket)
        try:
            self._server = await asyncio.start_unix_server(self._accept, sock=sock)
        except BaseException:
            sock.close()
            self._unlink()
            raise

    async def adopt(self, listener: socket.socket) -> None:
        """Also accept this session's connections on ``listener``, a socket bound ahead of time.

        For a warm sandbox that was started before its session existed: the
        executor bound a socket for it then (owned by the sandbox uid, mode
        0600, not listening, so connecting was refused) and the sandbox has
        it at :data:`~devsilo.executor._spec.RELAY_SOCKET`. From here on its
        connections are this session's, checked and relayed like those on
        :attr:`socket_path`. The relay owns ``listener`` now and closes it
        with the rest; its file stays the binder's to remove.
        """
        if self._server is None or self._closed:
            listener.close()
            raise SandboxError("a relay adopts a socket only while it runs (start() it first)")
        try:
            listener.listen(128)
            listener.setblocking(False)
            self._adopted.append(await asyncio.start_unix_server(self._accept, sock=listener))
        except BaseException:
            listener.close()
            raise

    def _make_socket(self) -> socket.socket:
        # Bound in a private directory, given its owner and mode, and only
        # then renamed into place: at no moment can another uid connect.
        parent = self.socket_path.parent
        try:
            private = tempfile.mkdtemp(prefix=".relay-", dir=parent)
        except OSError as exc:
            raise SandboxError(f"cannot create the relay socket in {parent}: {exc}") from None
        staged = os.path.join(private, "s")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(staged)
            os.chmod(staged, 0o600)
            if os.geteuid() == 0:
                os.chown(staged, self.uid, -1)
            sock.listen(128)
            sock.setblocking(False)
            os.rename(staged, self.socket_path)
            st = os.lstat(self.socket_path)
            self._inode = (st.st_dev, st.st_ino)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(staged)
            raise SandboxError(f"cannot create relay socket {self.socket_path}: {exc}") from None
        finally:
            with contextlib.suppress(OSError):
                os.rmdir(private)
        return sock

    async def close(self) -> None:
        """Stop accepting, end every relayed connection, remove the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        servers = [s for s in (self._server, *self._adopted) if s is not None]
        for server in servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in servers:
            await server.wait_closed()
        self._unlink()

    def _unlink(self) -> None:
        # Only our own socket: something else at that path is not ours to remove.
        try:
            st = os.lstat(self.socket_path)
        except OSError:
            return
        if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self._inode:
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- one connection -----------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._stats.connections += 1
        if self._closed or self._stats.open >= self._max or not self._peer_allowed(writer):
            self._stats.refused += 1
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._stats.open += 1
        try:
            await self._relay(reader, writer)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass  # either end went away
        finally:
            self._stats.open -= 1
            self._tasks.discard(task)
            writer.close()

    def _peer_allowed(self, writer: asyncio.StreamWriter) -> bool:
        sock = writer.get_extra_info("socket")
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except (OSError, AttributeError):
            return False
        _pid, peer_uid, _gid = struct.unpack("3i", creds)
        return peer_uid in (self.uid, os.geteuid())

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            kind = await asyncio.wait_for(
                reader.readexactly(len(STREAM_TCP)), self._first_line_timeout
            )
        except (asyncio.IncompleteReadError, TimeoutError):
            self._stats.refused += 1
            return
        if kind not in (STREAM_TCP, STREAM_DNS):
            self._stats.refused += 1
            return
        egress = self.egress_addr
        if egress is None:
            await self._refuse(kind, reader, writer, NO_EGRESS, DNS_RCODE_REFUSED)
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*egress), self._connect_timeout
            )
        except (OSError, TimeoutError):
            self._stats.egress_failures += 1
            await self._refuse(kind, reader, writer, EGRESS_UNREACHABLE, DNS_RCODE_SERVFAIL)
            return
        with contextlib.suppress(OSError):
            up_writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up_writer.write((self.hello() if self.hello is not None else self._line) + kind)
        await splice(reader, writer, up_reader, up_writer, self._bytes)

    @staticmethod
    async def _refuse(
        kind: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        reason: str,
        rcode: int,
    ) -> None:
        if kind == STREAM_TCP:
            await answer_blocked(reader, writer, reason)
        else:
            await answer_dns_frames(reader, writer, rcode)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._server else "new"
        return f"<SessionRelay {self.session_id} {self.socket_path} → {self.egress_addr} {state}>"
