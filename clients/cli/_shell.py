"""`silo shell`: the user's terminal, in a sandbox on a locked workspace, through the gateway.

Interactive when no command is given and stdin is a terminal: the local
terminal goes into raw mode (so Ctrl-C, Ctrl-Z, Ctrl-D travel as bytes to
the remote terminal), window size changes follow it, and the remote exit
code becomes ours. With a command (or without a terminal) the command runs
on pipes: our stdin is its stdin, its stdout and stderr are ours, and
SIGINT, SIGTERM and SIGHUP sent to us are passed on to it. An interactive
`silo shell` sent SIGTERM or SIGHUP hangs up instead: it leaves, and the
gateway ends the remote shell with the connection.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import select
import signal
import stat
import termios
import tty
from collections.abc import Iterator
from typing import Any, cast

from devsilo.protocol import SHELL_CHUNK
from devsilo.protocol.client import (
    ErrorFrame,
    ShellExitFrame,
    ShellInputFrame,
    ShellOpenedFrame,
    ShellOpenFrame,
    ShellOutputFrame,
    ShellResizeFrame,
    ShellSignalFrame,
)

from ._client import GatewayClient, GatewayError
from ._sessions import GatewayTarget

EXIT_RUNTIME = 1
_FORWARDED = {signal.SIGINT: "INT", signal.SIGTERM: "TERM", signal.SIGHUP: "HUP"}


def terminal_size(fd: int) -> tuple[int, int]:
    """``(rows, cols)`` of the terminal on ``fd`` (24 x 80 when it is none)."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 24, 80
    return max(1, min(size.lines, 1000)), max(1, min(size.columns, 1000))


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """The terminal on ``fd`` in raw mode for the duration, restored however we leave."""
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:  # a terminal shared with our non-blocking stdin
            select.select([], [fd], [])
            continue
        view = view[n:]


class ShellSession:
    """One `silo shell` over one gateway connection."""

    def __init__(self, client: GatewayClient, *, stdin: int = 0, stdout: int = 1, stderr: int = 2) -> None:
        self.client = client
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.shell_id: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._hung_up: asyncio.Future[int] | None = None

    async def open(self, req: ShellOpenFrame) -> ShellOpenedFrame:
        """Ask for the shell; print the gateway's notes on its policy (and, for a terminal, the
        sandbox's warnings: a command's stderr stays its own); return its description."""
        await self.client.send(req)
        while True:
            frame = await self.client.receive()
            if isinstance(frame, ErrorFrame):
                raise GatewayError(frame.message)
            if isinstance(frame, ShellOpenedFrame):
                self.shell_id = frame.shell_id
                for note in frame.notes:
                    _write_all(self.stderr, f"note: {note}\n".encode())
                for warning in (frame.access.get("warnings") or ()) if req.tty else ():
                    _write_all(self.stderr, f"warning: {warning}\n".encode())
                return frame

    async def run(self, *, interactive: bool) -> int:
        """Relay until the shell exits; its exit code."""
        assert self.shell_id is not None
        loop = asyncio.get_running_loop()
        handled: list[signal.Signals] = []
        self._hung_up = loop.create_future()
        relay = asyncio.ensure_future(self._relay_output())
        try:
            if interactive:
                loop.add_signal_handler(signal.SIGWINCH, self._spawn_resize)
                handled.append(signal.SIGWINCH)
            for signum, name in _FORWARDED.items():
                if interactive and signum == signal.SIGINT:
                    continue  # raw mode: Ctrl-C is a byte, not a signal
                if interactive:
                    loop.add_signal_handler(signum, self._hang_up, signum)
                else:
                    loop.add_signal_handler(signum, self._spawn_signal, name)
                handled.append(signum)
            self._own(self._pump_stdin())
            await asyncio.wait({relay, self._hung_up}, return_when=asyncio.FIRST_COMPLETED)
            if relay.done():
                return relay.result()
            return self._hung_up.result()
        finally:
            relay.cancel()
            await asyncio.gather(relay, return_exceptions=True)
            for sig in handled:
                loop.remove_signal_handler(sig)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _relay_output(self) -> int:
        while True:
            frame = await self.client.receive()
            if isinstance(frame, ShellOutputFrame) and frame.shell_id == self.shell_id:
                data = base64.b64decode(frame.data)
                _write_all(self.stderr if frame.stream == "stderr" else self.stdout, data)
            elif isinstance(frame, ShellExitFrame) and frame.shell_id == self.shell_id:
                if frame.exit_code is None or frame.message:
                    _write_all(self.stderr, f"\r\nsilo shell: {frame.message or 'the shell ended'}\r\n".encode())
                return EXIT_RUNTIME if frame.exit_code is None else int(frame.exit_code)
            elif isinstance(frame, ErrorFrame):
                _write_all(self.stderr, f"\r\nsilo shell: {frame.code}: {frame.message}\r\n".encode())

    def _own(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn_resize(self) -> None:
        rows, cols = terminal_size(self.stdout if os.isatty(self.stdout) else self.stdin)
        assert self.shell_id is not None
        self._own(self.client.send(ShellResizeFrame(shell_id=self.shell_id, rows=rows, cols=cols)))

    def _hang_up(self, signum: int) -> None:
        if self._hung_up is not None and not self._hung_up.done():
            self._hung_up.set_result(128 + signum)

    def _spawn_signal(self, name: str) -> None:
        assert self.shell_id is not None
        self._own(self.client.send(ShellSignalFrame(shell_id=self.shell_id, signal=cast(Any, name))))

    async def _pump_stdin(self) -> None:
        """Our stdin to the shell, in chunks, then end-of-input."""
        assert self.shell_id is not None
        reader = _StdinReader(self.stdin)
        try:
            while data := await reader.read(SHELL_CHUNK):
                await self.client.send(ShellInputFrame(shell_id=self.shell_id,
                                                       data=base64.b64encode(data).decode("ascii")))
            await self.client.send(ShellInputFrame(shell_id=self.shell_id, eof=True))
        finally:
            reader.close()


class _StdinReader:
    """Reads a descriptor without blocking the event loop (regular files need no waiting)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        mode = os.fstat(fd).st_mode
        self._pollable = not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)
        self._was_blocking = os.get_blocking(fd)
        if self._pollable:
            os.set_blocking(fd, False)

    async def read(self, most: int) -> bytes:
        loop = asyncio.get_running_loop()
        while True:
            try:
                return os.read(self.fd, most)
            except BlockingIOError:
                ready: asyncio.Future[None] = loop.create_future()
                loop.add_reader(self.fd, _wake, ready)
                try:
                    await ready
                finally:
                    loop.remove_reader(self.fd)
            except OSError:
                return b""  # e.g. EIO: the terminal went away

    def close(self) -> None:
        if self._pollable:
            with contextlib.suppress(OSError):
                os.set_blocking(self.fd, self._was_blocking)


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


async def run_shell(target: GatewayTarget, req: ShellOpenFrame, *, stdin: int = 0, stdout: int = 1,
                    stderr: int = 2) -> int:
    """Open a shell as ``req`` asks and relay it until it exits; return its exit code."""
    interactive = req.tty
    if interactive:
        rows, cols = terminal_size(stdout if os.isatty(stdout) else stdin)
        req = req.model_copy(update={"rows": rows, "cols": cols,
                                     "term": _term(os.environ.get("TERM"))})
    async with GatewayClient(target.url, target.fingerprint, client_name="silo-shell") as client:
        await client.connect(target.token)
        shell = ShellSession(client, stdin=stdin, stdout=stdout, stderr=stderr)
        await shell.open(req)
        if not interactive:
            return await shell.run(interactive=False)
        with raw_terminal(stdin):
            return await shell.run(interactive=True)


def _term(value: str | None) -> str:
    """$TERM when it is a plausible terminal name, else a common default."""
    if value and re.fullmatch(r"[A-Za-z0-9._+-]{1,64}", value):
        return value
    return "xterm-256color"


def wants_tty(command: list[str], stdin: int = 0) -> bool:
    """A terminal for an interactive shell whose stdin is one; pipes for a command."""
    return not command and os.isatty(stdin)

