"""The executor's side of the helper protocol (see ``devsilo.executor.helper.helper``).

The helper runs inside the sandbox, so everything it sends is hostile until
checked: lines are length-limited, every response is type-checked, and any
protocol violation (bad JSON, an unknown id, a malformed field, an overlong
line) or the connection closing fails every pending request with
:class:`~devsilo.protocol.SandboxError` and closes the client for good.
A well-formed error reply from the helper (``ok: false``) fails only its own
request, with :class:`HelperRequestError`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from devsilo.protocol import SandboxError, ToolError

from .helper.helper import (
    BLOCKED_HEADER,
    DEFAULT_TIMEOUT_MS,
    FETCH_DEFAULT_TIMEOUT_MS,
    FETCH_HEADERS_MAX,
    FETCH_MAX,
    FETCH_MAX_TIMEOUT_MS,
    GLOB_DEFAULT,
    GLOB_MAX,
    GREP_DEFAULT,
    GREP_DEFAULT_TIMEOUT_MS,
    GREP_LINE_MAX,
    GREP_MAX,
    GREP_MAX_TIMEOUT_MS,
    LIST_DEFAULT,
    LIST_MAX,
    MAX_REDIRECTS,
    MAX_REQUEST_LINE,
    MAX_RESPONSE_LINE,
    MAX_TIMEOUT_MS,
    OUTPUT_CAP,
    READ_MAX,
    SHELL_CHUNK,
    SHELL_SIGNALS,
    LineReader,
)

__all__ = [
    "DirEntry",
    "DirListing",
    "EditResult",
    "ExecHandle",
    "ExecResult",
    "FetchResult",
    "GlobResult",
    "GrepMatch",
    "GrepResult",
    "HelloInfo",
    "HelperClient",
    "HelperRequestError",
    "OutputCallback",
    "ReadResult",
    "ShellHandle",
    "ShellOutputCallback",
    "ShellResult",
]

OutputCallback = Callable[[str, str], None]
"""Called as ``callback(stream, text)`` with ``stream`` "stdout" or "stderr"."""
ShellOutputCallback = Callable[[str, bytes], Awaitable[None] | None]
"""Called as ``callback(stream, data)`` with ``stream`` "pty", "stdout" or "stderr". When it
returns an awaitable, nothing more is read from the helper until it is done: output then
waits in the sandbox (the helper stops reading the terminal) instead of piling up here."""

# How long past its own timeout an exec may take before the executor stops
# waiting: the helper kills the command at its timeout, so silence beyond
# this margin means the helper is stuck or lying.
_EXEC_GRACE_S = 30.0
_MAX_ERROR_TEXT = 4096
# The cap plus room for the truncation mark.
_MAX_OUTPUT_TEXT = OUTPUT_CAP + 256
# Past a grep's or fetch's own time limit (which the helper enforces), how
# long the executor still waits for the answer.
_WORK_GRACE_S = 10.0
_ENTRY_TYPES = frozenset(("file", "dir", "symlink", "fifo", "socket", "char", "block", "other"))


class HelperRequestError(ToolError):
    """The helper refused or failed one request (``ok: false``).

    ``code`` is the helper's short error code (``not_found``, ``bad_request``,
    ``io_error``…); the text comes from inside the sandbox and is only shown,
    never interpreted.
    """

    def __init__(self, op: str, code: str, message: str) -> None:
        super().__init__(f"{op} failed in the sandbox ({code}): {message}")
        self.op = op
        self.code = code
        self.message = message


@dataclass(frozen=True)
class HelloInfo:
    """What the helper says about itself."""

    pid: int
    uid: int
    gid: int
    cwd: str
    workspace: str
    python: str
    proxy_port: int | None = None
    """The helper's HTTP(S) proxy port inside, None when it runs none."""
    dns_ports: tuple[int, ...] = ()
    """The ports its DNS resolver answers on inside (53 only where the sandbox allows)."""
    egress_relay: bool = False
    """Whether the session's relay socket is there (else all traffic is refused)."""


@dataclass(frozen=True)
class ExecResult:
    """The outcome of one command.

    ``exit_code`` follows the shell: 128 + N when signal N ended the command
    (``signal`` is then N). ``stdout``/``stderr`` hold at most 1 MiB each,
    followed by a truncation mark when more was written.
    """

    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool
    cancelled: bool
    stdout_truncated: bool
    stderr_truncated: bool
    duration_ms: int
    signal: int | None = None

    @property
    def truncated(self) -> bool:
        """True when either stream went over its cap."""
        return self.stdout_truncated or self.stderr_truncated


@dataclass(frozen=True)
class ShellResult:
    """How a shell ended: ``exit_code`` as the shell reports it (128 + N after signal N)."""

    exit_code: int
    signal: int | None = None


@dataclass(frozen=True)
class ReadResult:
    """A slice of a file: ``content`` from ``offset``; ``size`` is the whole file's."""

    content: bytes
    offset: int
    size: int
    eof: bool


@dataclass(frozen=True)
class EditResult:
    """A done edit: how many places changed, the file's new size, the first changed line."""

    path: str
    replacements: int
    size: int
    first_line: int


@dataclass(frozen=True)
class DirEntry:
    """One directory entry, described without following symlinks.

    ``type`` is file, dir, symlink, fifo, socket, char, block or other;
    ``mode`` the permission bits; ``target`` a symlink's target text.
    """

    name: str
    type: str
    size: int
    mode: int
    mtime: float
    target: str | None = None


@dataclass(frozen=True)
class DirListing:
    """A directory's entries by name; ``total`` counts all, ``truncated`` if more than given."""

    path: str
    entries: tuple[DirEntry, ...]
    total: int
    truncated: bool


@dataclass(frozen=True)
class GlobResult:
    """Absolute paths matching a pattern below ``base``, sorted."""

    base: str
    matches: tuple[str, ...]
    truncated: bool


@dataclass(frozen=True)
class GrepMatch:
    """One matching line (1-based ``line``; ``text`` cut at 1000 characters)."""

    path: str
    line: int
    text: str


@dataclass(frozen=True)
class GrepResult:
    """Matching lines, and what the search skipped."""

    matches: tuple[GrepMatch, ...]
    truncated: bool
    files_searched: int
    binary_skipped: int
    large_skipped: int
    unreadable: int


@dataclass(frozen=True)
class FetchResult:
    """The final response of a GET through the sandbox's proxy (after redirects).

    A refusal by the helper or the egress is a result too: ``blocked`` then
    says why (from its header), and ``content`` holds its one-line body.
    """

    url: str
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    content: bytes
    truncated: bool
    redirects: tuple[str, ...]

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        return next((v for k, v in self.headers if k.lower() == wanted), None)

    @property
    def blocked(self) -> str | None:
        """Why the proxy refused the request, when it did."""
        return self.header(BLOCKED_HEADER)

    @property
    def text(self) -> str:
        """The body as text (UTF-8, undecodable bytes replaced)."""
        return self.content.decode("utf-8", errors="replace")


class _Garbage(Exception):
    """The helper broke the protocol."""


@dataclass
class _Pending:
    op: str
    future: asyncio.Future[dict[str, Any]]
    on_output: OutputCallback | None = None
    on_shell_output: ShellOutputCallback | None = None
    # Set when the caller stopped waiting; the late answer is then dropped.
    abandoned: bool = False
    # Characters streamed so far per stream: an honest helper sends at most
    # OUTPUT_CAP each (one character per byte at worst).
    streamed: dict[str, int] = field(default_factory=dict)


class ExecHandle:
    """A running ``exec``: its request ``id``, its result, and a way to cancel it."""

    def __init__(self, client: HelperClient, request_id: int, waiter: asyncio.Task[ExecResult]):
        self._client = client
        self.id = request_id
        self._waiter = waiter

    async def result(self) -> ExecResult:
        """Wait for the command to finish (timed out and cancelled ones finish too)."""
        return await asyncio.shield(self._waiter)

    async def cancel(self) -> bool:
        """Kill the command's process group; its result then says ``cancelled``."""
        return await self._client.cancel(self.id)


class ShellHandle:
    """A running ``shell``: its input, window size and signals, and how it ended."""

    def __init__(self, client: HelperClient, request_id: int, pending: _Pending) -> None:
        self._client = client
        self.id = request_id
        self._pending = pending

    async def result(self) -> ShellResult:
        """Wait for the shell to exit (no timeout: SandboxError when the sandbox goes)."""
        r = await asyncio.shield(self._pending.future)
        code = self._client._field(r, "exit_code", int)
        sig = None if r.get("signal") is None else self._client._field(r, "signal", int)
        return ShellResult(exit_code=code, signal=sig)

    async def send_input(self, data: bytes, *, eof: bool = False) -> None:
        """Queue ``data`` for the shell's input (the helper writes inputs in the order sent)."""
        params = {"target": self.id, "data": base64.b64encode(data).decode("ascii"), "eof": eof}
        await self._client._send_unawaited("shell_input", params)

    async def resize(self, rows: int, cols: int) -> None:
        """Set the shell's terminal size."""
        await self._client._send_unawaited("shell_resize", {"target": self.id, "rows": rows, "cols": cols})

    async def signal(self, name: str) -> None:
        """Send signal ``name`` (INT, TERM, HUP, …) to the shell's foreground process group."""
        if name not in SHELL_SIGNALS:
            raise ValueError(f"signal must be one of {', '.join(SHELL_SIGNALS)}, not {name!r}")
        await self._client._send_unawaited("shell_signal", {"target": self.id, "signal": name})


class HelperClient:
    """Talks to one helper over the executor's end of the socket pair.

    Requests may run concurrently; responses are matched by id. Call
    :meth:`start` once before any request, and :meth:`close` at the end.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        request_timeout: float = 60.0,
        describe_exit: Callable[[], str] | None = None,
    ) -> None:
        """``describe_exit`` adds context (e.g. how the sandbox ended) to connection errors."""
        self._sock = sock
        self._request_timeout = request_timeout
        self._describe_exit = describe_exit
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self._failure: SandboxError | None = None
        self._backpressure: Awaitable[None] | None = None

    async def start(self) -> None:
        """Open the connection and start reading responses."""
        if self._writer is not None:
            raise SandboxError("helper client already started")
        reader, writer = await asyncio.open_connection(sock=self._sock, limit=MAX_RESPONSE_LINE)
        self._writer = writer
        self._reader_task = asyncio.create_task(self._read_loop(reader), name="helper-reader")

    @property
    def closed(self) -> bool:
        """True once the connection failed or was closed; every request then fails."""
        return self._failure is not None

    # -- requests -----------------------------------------------------------

    async def hello(self) -> HelloInfo:
        """Ask the helper who and where it is."""
        r = await self._call("hello", {})
        return HelloInfo(
            pid=self._field(r, "pid", int),
            uid=self._field(r, "uid", int),
            gid=self._field(r, "gid", int),
            cwd=self._field(r, "cwd", str),
            workspace=self._field(r, "workspace", str),
            python=self._field(r, "python", str),
            proxy_port=None if r.get("proxy_port") is None else self._field(r, "proxy_port", int),
            dns_ports=tuple(self._items(r, "dns_ports", int, 4)),
            egress_relay=self._field(r, "egress_relay", bool),
        )

    async def start_exec(
        self,
        command: str,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
        on_output: OutputCallback | None = None,
    ) -> ExecHandle:
        """Start ``sh -c command`` and return at once with a handle to it.

        ``cwd`` is relative to the workspace (default: the workspace);
        ``env`` adds to the sandbox's environment; ``on_output`` receives
        output chunks as they come, before the result.
        """
        if not 0 < timeout_ms <= MAX_TIMEOUT_MS:
            raise ValueError(f"timeout_ms must be from 1 to {MAX_TIMEOUT_MS}, not {timeout_ms}")
        params: dict[str, Any] = {"command": command, "timeout_ms": timeout_ms}
        if cwd is not None:
            params["cwd"] = cwd
        if env:
            params["env"] = dict(env)
        if on_output is not None:
            params["stream"] = True
        request_id, pending = await self._send("exec", params, on_output)
        waiter = asyncio.create_task(
            self._exec_result(request_id, pending, timeout_ms / 1000 + _EXEC_GRACE_S)
        )
        # A handle whose result nobody awaits must not log "never retrieved".
        waiter.add_done_callback(_ignore_result)
        return ExecHandle(self, request_id, waiter)

    async def exec(
        self,
        command: str,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
        on_output: OutputCallback | None = None,
    ) -> ExecResult:
        """Run ``sh -c command`` and wait for it; see :meth:`start_exec`.

        Cancelling the awaiting task also kills the command in the sandbox.
        """
        handle = await self.start_exec(
            command, cwd=cwd, env=env, timeout_ms=timeout_ms, on_output=on_output
        )
        try:
            return await handle.result()
        except asyncio.CancelledError:
            # Nobody will read the result; stop the command in the background.
            with contextlib.suppress(SandboxError):
                self._abandon(handle.id)
                await asyncio.shield(self._fire_and_forget_cancel(handle.id))
            raise

    async def start_shell(
        self,
        command: str | None,
        *,
        tty: bool,
        rows: int = 24,
        cols: int = 80,
        env: Mapping[str, str] | None = None,
        on_output: ShellOutputCallback,
    ) -> ShellHandle:
        """Start a user's shell (``command`` None) or ``sh -c command`` in the workspace.

        ``tty``: on a pseudo-terminal of ``rows`` x ``cols``, output as
        ``pty``; else on pipes, output as ``stdout`` and ``stderr``.
        ``on_output`` gets every chunk in order, before the result.
        """
        params: dict[str, Any] = {"command": command, "tty": tty, "rows": rows, "cols": cols}
        if env:
            params["env"] = dict(env)
        request_id, pending = await self._send("shell", params, None)
        pending.on_shell_output = on_output
        return ShellHandle(self, request_id, pending)

    async def _send_unawaited(self, op: str, params: dict[str, Any]) -> None:
        """Send a request in order without waiting for its answer: input to a shell that just
        ended has nowhere to go, and waiting would hold up the input behind it."""
        request_id, pending = await self._send(op, params, None)
        pending.future.add_done_callback(_ignore_result)
        self._abandon(request_id)

    async def cancel(self, request_id: int) -> bool:
        """Cancel a running exec by id; False when the helper no longer runs it."""
        r = await self._call("cancel", {"target": request_id})
        return bool(self._field(r, "found", bool))

    async def read(self, path: str, *, offset: int = 0, limit: int = READ_MAX) -> ReadResult:
        """Read up to ``limit`` bytes (at most 5 MiB) of a file from ``offset``.

        ``path`` is relative to the workspace, or absolute inside the sandbox.
        """
        if offset < 0 or not 0 <= limit <= READ_MAX:
            raise ValueError(f"offset must be >= 0 and limit from 0 to {READ_MAX}")
        r = await self._call("read", {"path": path, "offset": offset, "limit": limit})
        try:
            content = base64.b64decode(self._field(r, "content", str), validate=True)
        except ValueError as exc:
            raise self._fatal(f"read answer is not valid base64: {exc}") from None
        size = self._field(r, "size", int)
        if len(content) > limit or self._field(r, "offset", int) != offset or size < 0:
            raise self._fatal("read answer does not match the request")
        eof = self._field(r, "eof", bool)
        return ReadResult(content=content, offset=offset, size=size, eof=eof)

    async def write(self, path: str, content: bytes | str, *, append: bool = False) -> int:
        """Write (or append) ``content`` to a file, creating parent directories.

        Returns the number of bytes written. ``path`` as for :meth:`read`.
        """
        if isinstance(content, str):
            params = {"path": path, "content": content, "encoding": "utf-8", "append": append}
        else:
            params = {
                "path": path,
                "content": base64.b64encode(content).decode("ascii"),
                "encoding": "base64",
                "append": append,
            }
        r = await self._call("write", params)
        return int(self._field(r, "written", int))

    async def edit(self, path: str, old: str, new: str, *, replace_all: bool = False) -> EditResult:
        """Replace ``old`` by ``new`` in a file; ``old`` must occur exactly once unless ``replace_all``.

        Fails with :class:`HelperRequestError` code ``no_match`` or
        ``multiple_matches`` (whose message says where). ``path`` as for :meth:`read`.
        """
        params = {"path": path, "old": old, "new": new, "replace_all": replace_all}
        r = await self._call("edit", params)
        result = EditResult(
            path=self._field(r, "path", str),
            replacements=self._field(r, "replacements", int),
            size=self._field(r, "size", int),
            first_line=self._field(r, "first_line", int),
        )
        if result.replacements < 1 or (result.replacements > 1 and not replace_all):
            raise self._fatal("edit answer does not match the request")
        return result

    async def list_dir(self, path: str = ".", *, limit: int = LIST_DEFAULT) -> DirListing:
        """The entries of a directory (default: the workspace), at most ``limit``."""
        if not 0 < limit <= LIST_MAX:
            raise ValueError(f"limit must be from 1 to {LIST_MAX}")
        r = await self._call("list", {"path": path, "limit": limit})
        entries = []
        for item in self._items(r, "entries", dict, limit):
            try:
                mtime = float(self._field(item, "mtime", (int, float)))
            except OverflowError:  # an integer past any float: no file was changed then
                raise self._fatal("list answer has an entry with an mtime out of range") from None
            entry = DirEntry(
                name=self._field(item, "name", str),
                type=self._field(item, "type", str),
                size=self._field(item, "size", int),
                mode=self._field(item, "mode", int),
                mtime=mtime,
                target=None if item.get("target") is None else self._field(item, "target", str),
            )
            if entry.type not in _ENTRY_TYPES:
                raise self._fatal(f"list answer has an entry of unknown type {entry.type[:20]!r}")
            entries.append(entry)
        return DirListing(
            path=self._field(r, "path", str),
            entries=tuple(entries),
            total=self._field(r, "total", int),
            truncated=self._field(r, "truncated", bool),
        )

    async def glob(
        self, pattern: str, *, path: str | None = None, limit: int = GLOB_DEFAULT
    ) -> GlobResult:
        """Paths matching ``pattern`` (``*``, ``?``, ``[..]``, ``**``, ``{a,b}``) below ``path``.

        ``path`` defaults to the workspace; answers absolute paths, at most ``limit``.
        """
        if not 0 < limit <= GLOB_MAX:
            raise ValueError(f"limit must be from 1 to {GLOB_MAX}")
        params: dict[str, Any] = {"pattern": pattern, "limit": limit}
        if path is not None:
            params["path"] = path
        r = await self._call("glob", params)
        return GlobResult(
            base=self._field(r, "base", str),
            matches=tuple(self._items(r, "matches", str, limit)),
            truncated=self._field(r, "truncated", bool),
        )

    async def grep(
        self,
        pattern: str,
        *,
        path: str | None = None,
        glob: str | None = None,
        case_insensitive: bool = False,
        max_results: int = GREP_DEFAULT,
        timeout_ms: int = GREP_DEFAULT_TIMEOUT_MS,
    ) -> GrepResult:
        """Lines matching the regular expression ``pattern`` below ``path`` (default: workspace).

        ``glob`` filters file names; binary and huge files are skipped and
        counted. A bad expression fails with code ``bad_pattern``; a search
        over ``timeout_ms`` with code ``timeout``.
        """
        if not 0 < max_results <= GREP_MAX:
            raise ValueError(f"max_results must be from 1 to {GREP_MAX}")
        if not 0 < timeout_ms <= GREP_MAX_TIMEOUT_MS:
            raise ValueError(f"timeout_ms must be from 1 to {GREP_MAX_TIMEOUT_MS}")
        params: dict[str, Any] = {
            "pattern": pattern,
            "case_insensitive": case_insensitive,
            "max_results": max_results,
            "timeout_ms": timeout_ms,
        }
        if path is not None:
            params["path"] = path
        if glob is not None:
            params["glob"] = glob
        r = await self._call("grep", params, timeout=timeout_ms / 1000 + _WORK_GRACE_S)
        matches = []
        for item in self._items(r, "matches", dict, max_results):
            match = GrepMatch(
                path=self._field(item, "path", str),
                line=self._field(item, "line", int),
                text=self._field(item, "text", str),
            )
            if match.line < 1 or len(match.text) > GREP_LINE_MAX:
                raise self._fatal("grep answer has a malformed match")
            matches.append(match)
        return GrepResult(
            matches=tuple(matches),
            truncated=self._field(r, "truncated", bool),
            files_searched=self._field(r, "files_searched", int),
            binary_skipped=self._field(r, "binary_skipped", int),
            large_skipped=self._field(r, "large_skipped", int),
            unreadable=self._field(r, "unreadable", int),
        )

    async def fetch(
        self,
        url: str,
        *,
        max_bytes: int = FETCH_MAX,
        timeout_ms: int = FETCH_DEFAULT_TIMEOUT_MS,
        headers: Mapping[str, str] | None = None,
    ) -> FetchResult:
        """HTTP(S) GET ``url`` from inside the sandbox, through its proxy and the egress.

        Follows up to 10 redirects (each through the proxy); keeps at most
        ``max_bytes`` of the body (``truncated`` says when there was more).
        Network failures fail with codes ``fetch_failed``, ``timeout``,
        ``tls_error``, ``too_many_redirects``; a refusal is a result (see
        :attr:`FetchResult.blocked`).
        """
        if not 0 <= max_bytes <= FETCH_MAX:
            raise ValueError(f"max_bytes must be from 0 to {FETCH_MAX}")
        if not 0 < timeout_ms <= FETCH_MAX_TIMEOUT_MS:
            raise ValueError(f"timeout_ms must be from 1 to {FETCH_MAX_TIMEOUT_MS}")
        params: dict[str, Any] = {"url": url, "max_bytes": max_bytes, "timeout_ms": timeout_ms}
        if headers:
            params["headers"] = dict(headers)
        r = await self._call("fetch", params, timeout=timeout_ms / 1000 + _WORK_GRACE_S)
        try:
            content = base64.b64decode(self._field(r, "content", str), validate=True)
        except ValueError as exc:
            raise self._fatal(f"fetch answer is not valid base64: {exc}") from None
        pairs = []
        for pair in self._items(r, "headers", list, FETCH_HEADERS_MAX):
            if len(pair) != 2 or not all(isinstance(x, str) for x in pair):
                raise self._fatal("fetch answer has a malformed header")
            pairs.append((pair[0], pair[1]))
        status = self._field(r, "status", int)
        if len(content) > max_bytes or not 100 <= status <= 999:
            raise self._fatal("fetch answer does not match the request")
        return FetchResult(
            url=self._field(r, "url", str),
            status=status,
            reason=self._field(r, "reason", str),
            headers=tuple(pairs),
            content=content,
            truncated=self._field(r, "truncated", bool),
            redirects=tuple(self._items(r, "redirects", str, MAX_REDIRECTS)),
        )

    async def shutdown(self) -> None:
        """Ask the helper to kill every command and exit (the sandbox then ends)."""
        await self._call("shutdown", {})

    async def close(self) -> None:
        """Close the connection; pending requests fail with SandboxError."""
        self._fail(SandboxError("helper connection closed by the executor"))
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()
        else:
            self._sock.close()

    # -- plumbing -----------------------------------------------------------

    async def _call(
        self, op: str, params: dict[str, Any], *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Send one request and wait for its answer (``timeout`` overrides the default)."""
        wait_s = self._request_timeout if timeout is None else timeout
        request_id, pending = await self._send(op, params, None)
        try:
            return await asyncio.wait_for(asyncio.shield(pending.future), timeout=wait_s)
        except TimeoutError:
            self._abandon(request_id)
            raise SandboxError(f"sandbox helper did not answer {op} within {wait_s:g} s") from None
        except asyncio.CancelledError:
            self._abandon(request_id)
            raise

    async def _exec_result(self, request_id: int, pending: _Pending, wait_s: float) -> ExecResult:
        try:
            r = await asyncio.wait_for(asyncio.shield(pending.future), timeout=wait_s)
        except TimeoutError:
            self._abandon(request_id)
            raise SandboxError(
                f"sandbox helper did not finish exec {request_id} within {wait_s:g} s"
            ) from None
        stdout, stderr = self._field(r, "stdout", str), self._field(r, "stderr", str)
        if max(len(stdout), len(stderr)) > _MAX_OUTPUT_TEXT:
            raise self._fatal(f"exec {request_id} returned more output than the cap allows")
        return ExecResult(
            exit_code=self._field(r, "exit_code", int),
            stdout=stdout,
            stderr=stderr,
            timed_out=self._field(r, "timed_out", bool),
            cancelled=self._field(r, "cancelled", bool),
            stdout_truncated=self._field(r, "stdout_truncated", bool),
            stderr_truncated=self._field(r, "stderr_truncated", bool),
            duration_ms=self._field(r, "duration_ms", int),
            signal=None if r.get("signal") is None else self._field(r, "signal", int),
        )

    async def _fire_and_forget_cancel(self, request_id: int) -> None:
        request_id_c, _ = await self._send("cancel", {"target": request_id}, None)
        self._abandon(request_id_c)

    async def _send(
        self, op: str, params: dict[str, Any], on_output: OutputCallback | None
    ) -> tuple[int, _Pending]:
        if self._failure is not None:
            raise SandboxError(str(self._failure))
        if self._writer is None:
            raise SandboxError("helper client not started")
        request_id = next(self._ids)
        line = json.dumps({"id": request_id, "op": op, **params}, separators=(",", ":"))
        data = line.encode("utf-8") + b"\n"
        if len(data) > MAX_REQUEST_LINE:
            raise ValueError(
                f"{op} request is {len(data)} bytes; the helper accepts at most {MAX_REQUEST_LINE}"
            )
        pending = _Pending(op, asyncio.get_running_loop().create_future(), on_output)
        self._pending[request_id] = pending
        try:
            async with self._write_lock:
                self._writer.write(data)
                await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            raise self._fatal(f"cannot send to the helper: {exc}") from None
        return request_id, pending

    def _abandon(self, request_id: int) -> None:
        pending = self._pending.get(request_id)
        if pending is not None:
            pending.abandoned = True
            pending.on_output = None
            if not pending.future.done():
                pending.future.cancel()

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        lines = LineReader(reader, MAX_RESPONSE_LINE)
        try:
            while True:
                line = await lines.next_line()
                if line is None:
                    why = "the helper closed the connection (it died, or the sandbox ended)"
                    self._fail(self._lost(why))
                    return
                if line is LineReader.OVERSIZED:
                    raise _Garbage(f"a line longer than {MAX_RESPONSE_LINE} bytes")
                self._dispatch(line)
                if self._backpressure is not None:
                    waiting, self._backpressure = self._backpressure, None
                    try:
                        await waiting
                    except Exception as exc:  # noqa: BLE001 -- reported as the connection's end
                        self._fail(self._lost(f"the shell output consumer failed: {exc!r}"))
                        return
        except _Garbage as exc:
            self._fail(self._lost(f"the helper broke the protocol: {exc}"))
        except (ConnectionError, OSError) as exc:
            self._fail(self._lost(f"connection error: {exc}"))
        finally:
            if self._writer is not None:
                self._writer.close()

    def _dispatch(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            raise _Garbage("a line that is not JSON") from None
        if not isinstance(msg, dict):
            raise _Garbage("a JSON line that is not an object")
        request_id = msg.get("id")
        if request_id is None and msg.get("ok") is False:
            # The helper could not tell which request this was about; ours are
            # always well-formed, so it is confused or hostile.
            raise _Garbage(f"an error without request id: {self._error_text(msg)}")
        if type(request_id) is not int or request_id not in self._pending:
            raise _Garbage(f"a message for unknown request id {str(request_id)[:40]!r}")
        pending = self._pending[request_id]
        if "stream" in msg:
            self._on_chunk(request_id, pending, msg)
            return
        ok = msg.get("ok")
        if ok is True:
            outcome: dict[str, Any] | HelperRequestError = msg
        elif ok is False:
            outcome = HelperRequestError(pending.op, *self._error_text(msg))
        else:
            raise _Garbage("a response without a boolean 'ok'")
        del self._pending[request_id]
        if pending.abandoned or pending.future.done():
            return
        if isinstance(outcome, HelperRequestError):
            pending.future.set_exception(outcome)
        else:
            pending.future.set_result(outcome)

    def _on_chunk(self, request_id: int, pending: _Pending, msg: dict[str, Any]) -> None:
        if pending.op == "shell":
            self._on_shell_chunk(request_id, pending, msg)
            return
        stream, data = msg.get("stream"), msg.get("data")
        if pending.op != "exec" or stream not in ("stdout", "stderr") or not isinstance(data, str):
            raise _Garbage(f"a malformed output chunk for request {request_id}")
        total = pending.streamed.get(stream, 0) + len(data)
        if total > OUTPUT_CAP:
            raise _Garbage(
                f"more than {OUTPUT_CAP} characters of {stream} for request {request_id}"
            )
        pending.streamed[stream] = total
        callback = pending.on_output
        if callback is None:
            if pending.abandoned:
                return
            raise _Garbage(f"output chunks for request {request_id}, which did not ask for them")
        try:
            callback(stream, data)
        except Exception as exc:  # noqa: BLE001 -- a caller's bug must not kill the connection
            # Fail that exec with the callback's error and stop its command.
            pending.on_output = None
            if not pending.future.done():
                pending.future.set_exception(exc)
            pending.abandoned = True
            task = asyncio.get_running_loop().create_task(self._fire_and_forget_cancel(request_id))
            task.add_done_callback(_ignore_result)

    def _on_shell_chunk(self, request_id: int, pending: _Pending, msg: dict[str, Any]) -> None:
        stream, data = msg.get("stream"), msg.get("data")
        if stream not in ("pty", "stdout", "stderr") or not isinstance(data, str):
            raise _Garbage(f"a malformed shell output chunk for request {request_id}")
        try:
            raw = base64.b64decode(data, validate=True)
        except ValueError:
            raise _Garbage(f"shell output for request {request_id} is not base64") from None
        if len(raw) > SHELL_CHUNK:
            raise _Garbage(f"a shell output chunk of {len(raw)} bytes, over {SHELL_CHUNK}")
        callback = pending.on_shell_output
        if callback is None:
            return  # the caller is gone
        try:
            waiting = callback(str(stream), raw)
        except Exception as exc:  # noqa: BLE001 -- a caller's bug must not kill the connection
            pending.on_shell_output = None
            if not pending.future.done():
                pending.future.set_exception(exc)
            return
        if waiting is not None:
            self._backpressure = waiting

    def _field(self, obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
        """``obj[key]`` if it has type ``kind``; otherwise the helper is broken."""
        value = obj.get(key)
        # bool is an int in Python; the protocol keeps them apart.
        if isinstance(value, bool) and kind is not bool:
            ok = False
        else:
            ok = isinstance(value, kind)
        if not ok:
            name = kind.__name__ if isinstance(kind, type) else "number"
            raise self._fatal(f"{obj.get('id')!r}: field {key!r} is not a {name}")
        return value

    def _items(self, obj: Mapping[str, Any], key: str, kind: type, most: int) -> list[Any]:
        """``obj[key]``, a list of at most ``most`` items of type ``kind``; else the helper is broken."""
        value = self._field(obj, key, list)
        if len(value) > most:
            raise self._fatal(f"field {key!r} has {len(value)} items, more than the {most} asked")
        for item in value:
            if not isinstance(item, kind) or (isinstance(item, bool) and kind is not bool):
                raise self._fatal(f"field {key!r} holds an item that is not a {kind.__name__}")
        return list(value)

    @staticmethod
    def _error_text(msg: dict[str, Any]) -> tuple[str, str]:
        err = msg.get("error")
        if not isinstance(err, dict):
            raise _Garbage("an error response without an error object")
        code, text = err.get("code"), err.get("message")
        if not isinstance(code, str) or not isinstance(text, str):
            raise _Garbage("an error response without code and message")
        return code[:64], text[:_MAX_ERROR_TEXT]

    def _lost(self, why: str) -> SandboxError:
        extra = ""
        if self._describe_exit is not None:
            with contextlib.suppress(Exception):
                extra = self._describe_exit()
        message = f"sandbox helper lost: {why}"
        if extra:
            message += f" ({extra})"
        return SandboxError(message)

    def _fatal(self, why: str) -> SandboxError:
        """Fail everything over a protocol violation seen outside the reader."""
        err = self._lost(f"the helper broke the protocol: {why}")
        self._fail(err)
        if self._writer is not None:
            self._writer.close()
        return err

    def _fail(self, err: SandboxError) -> None:
        if self._failure is None:
            self._failure = err
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(SandboxError(str(self._failure)))
                # Mark retrieved: an abandoned future's error is nobody's to see.
                p.future.exception()


def _ignore_result(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()
