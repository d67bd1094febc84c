"""devsilo's in-sandbox helper: executes the executor's requests inside the sandbox.

Started by the sandbox backend as ``/usr/bin/python3 -I -S /.devsilo/helper.py
--fd N``; it serves one connection, the inherited unix socket ``N``, and exits
when the executor closes it or asks it to shut down. Standard library only,
and it must keep running on the oldest Python a sandbox image may carry
(3.9), so no newer syntax at run time.

Protocol: JSON lines, UTF-8. Each request is ``{"id": int, "op": str, ...}``;
requests are served concurrently and each gets exactly one final response
``{"id": int, "ok": true, ...}`` or ``{"id": int|null, "ok": false, "error":
{"code": str, "message": str}}``. An ``exec`` asked with ``"stream": true``
also sends ``{"id": int, "stream": "stdout"|"stderr", "data": str}`` lines
before its final response. Ops: ``hello``, ``exec``, ``cancel``, ``read``,
``write``, ``shutdown``.

The helper is not a security boundary: it runs with exactly the rights of
anything else in the sandbox, so it does not confine paths. It must only
never crash on bad input and never block its event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import codecs
import json
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

MAX_REQUEST_LINE = 8 * 1024 * 1024
"""Longest request line the helper accepts; longer ones get a ``too_large`` error."""

MAX_RESPONSE_LINE = 16 * 1024 * 1024
"""Longest response line the executor accepts (an exec result carries two 1 MiB
outputs, which JSON escaping can grow up to six times)."""

OUTPUT_CAP = 1024 * 1024
"""Bytes kept of each of stdout and stderr per exec."""

READ_MAX = 5 * 1024 * 1024
"""Largest ``limit`` a read may ask for."""

DEFAULT_TIMEOUT_MS = 120_000
MAX_TIMEOUT_MS = 600_000

DEFAULT_WORKSPACE = "/workspace"

# After the shell exits, background jobs it left may still hold the output
# pipes open; wait this long for end-of-file, then stop reading, so that
# `server &` cannot hold a command's result back until its timeout.
PIPE_LINGER_S = 0.5

_CHUNK = 64 * 1024


def truncation_mark(stream: str, dropped: int) -> str:
    """The text appended to a stream that went over ``OUTPUT_CAP``."""
    return f"\n[devsilo: {stream} truncated: {dropped} more bytes not shown]\n"


class RequestError(Exception):
    """A request the helper refuses; becomes an ``ok: false`` response."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class LineReader:
    """Splits a byte stream into lines, with a hard limit on line length.

    ``StreamReader.readline`` loses sync on an overlong line (it drops what it
    buffered and hands the rest of that line out as more lines), so both ends
    use this reader: an overlong line is skipped up to its newline and
    reported once as ``OVERSIZED``.
    """

    OVERSIZED = object()

    def __init__(self, reader: asyncio.StreamReader, limit: int) -> None:
        self._reader = reader
        self._limit = limit
        self._buf = bytearray()
        self._scan_from = 0
        self._discarding = False

    async def next_line(self) -> Any:
        """Return the next line (bytes, without newline), ``OVERSIZED``, or None at end."""
        while True:
            nl = self._buf.find(b"\n", self._scan_from)
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                self._scan_from = 0
                if self._discarding:
                    self._discarding = False
                    continue
                if len(line) > self._limit:
                    return LineReader.OVERSIZED
                return line
            if len(self._buf) > self._limit:
                # Drop what we have and everything up to the next newline.
                self._buf.clear()
                self._scan_from = 0
                if not self._discarding:
                    self._discarding = True
                    return LineReader.OVERSIZED
            self._scan_from = len(self._buf)
            data = await self._reader.read(_CHUNK * 4)
            if not data:
                return None
            self._buf += data


def _dumps(obj: dict[str, Any]) -> bytes:
    # ensure_ascii=False keeps non-ASCII output at its UTF-8 size instead of
    # six bytes per character; lone surrogates cannot occur (all text we send
    # was decoded with errors="replace").
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


class _Exec:
    """One running exec: its process, and whether it was cancelled."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.cancelled = False
        self.cancel_event = asyncio.Event()

    def kill_group(self) -> None:
        """SIGKILL the command's whole process group (its pgid is its pid)."""
        if self.proc is None or self.proc.pid is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # the group is already gone


class _Capture:
    """Reads one output pipe to its end, keeps the first OUTPUT_CAP bytes."""

    def __init__(
        self,
        name: str,
        stream: asyncio.StreamReader,
        on_chunk: Callable[[str, str], Awaitable[None]] | None,
    ) -> None:
        self.name = name
        self.kept = bytearray()
        self.dropped = 0
        self._stream = stream
        self._on_chunk = on_chunk
        # An incremental decoder so a streamed chunk never splits a character.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    async def run(self) -> None:
        while True:
            data = await self._stream.read(_CHUNK)
            if not data:
                break
            room = OUTPUT_CAP - len(self.kept)
            if room > 0:
                part = data[:room]
                self.kept += part
                if self._on_chunk is not None:
                    text = self._decoder.decode(part)
                    if text:
                        await self._on_chunk(self.name, text)
            # Past the cap we keep reading, only to count: a child blocked on a
            # full pipe would otherwise never finish.
            self.dropped += max(0, len(data) - max(room, 0))
        if self._on_chunk is not None:
            tail = self._decoder.decode(b"", final=True)
            if tail:
                await self._on_chunk(self.name, tail)

    def text(self) -> str:
        out = self.kept.decode("utf-8", errors="replace")
        if self.dropped:
            out += truncation_mark(self.name, self.dropped)
        return out


class Helper:
    """Serves the protocol on one connection."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        workspace: str = DEFAULT_WORKSPACE,
    ) -> None:
        self._lines = LineReader(reader, MAX_REQUEST_LINE)
        self._writer = writer
        self._write_lock = asyncio.Lock()
        self._workspace = workspace
        self._execs: dict[int, _Exec] = {}
        self._inflight: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()

    # -- plumbing -----------------------------------------------------------

    async def _send(self, obj: dict[str, Any]) -> None:
        async with self._write_lock:
            if self._writer.is_closing():
                return
            self._writer.write(_dumps(obj))
            try:
                await self._writer.drain()
            except (ConnectionError, OSError):
                self._stopping.set()

    async def _error(self, req_id: int | None, code: str, message: str) -> None:
        await self._send({"id": req_id, "ok": False, "error": {"code": code, "message": message}})

    async def serve(self) -> None:
        """Read requests until the executor goes away or asks for shutdown."""
        reading = asyncio.ensure_future(self._read_loop())
        stopping = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for fut in (reading, stopping):
            fut.cancel()
        self.kill_all()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass  # the executor is gone already; nothing left to flush to

    def kill_all(self) -> None:
        """Kill every running command's process group."""
        for ex in self._execs.values():
            ex.cancelled = True
            ex.kill_group()
            ex.cancel_event.set()

    async def _read_loop(self) -> None:
        while True:
            line = await self._lines.next_line()
            if line is None:
                return
            if line is LineReader.OVERSIZED:
                await self._error(
                    None, "too_large", f"request line longer than {MAX_REQUEST_LINE} bytes"
                )
                continue
            if not line.strip():
                continue
            self._dispatch(line)

    def _dispatch(self, line: bytes) -> None:
        try:
            req = json.loads(line)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            self._spawn(self._error(None, "bad_request", f"not a JSON line: {exc}"))
            return
        if not isinstance(req, dict):
            self._spawn(self._error(None, "bad_request", "a request must be a JSON object"))
            return
        req_id = req.get("id")
        if type(req_id) is not int or not -(2**53) < req_id < 2**53:
            self._spawn(self._error(None, "bad_request", "request id must be an integer"))
            return
        if req_id in self._inflight:
            self._spawn(self._error(req_id, "bad_request", f"id {req_id} is already in flight"))
            return
        self._inflight.add(req_id)
        self._spawn(self._handle(req_id, req))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, req_id: int, req: dict[str, Any]) -> None:
        op = req.get("op")
        handler = {
            "hello": self._op_hello,
            "exec": self._op_exec,
            "cancel": self._op_cancel,
            "read": self._op_read,
            "write": self._op_write,
            "shutdown": self._op_shutdown,
        }.get(op if isinstance(op, str) else "")
        try:
            if handler is None:
                raise RequestError("unknown_op", f"unknown op {op!r}")
            result = await handler(req_id, req)
            response = {"id": req_id, "ok": True}
            response.update(result)
            # Free the id before answering: the executor may reuse it at once.
            self._inflight.discard(req_id)
            await self._send(response)
            if op == "shutdown":
                self._stopping.set()
        except RequestError as exc:
            self._inflight.discard(req_id)
            await self._error(req_id, exc.code, exc.message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 -- one request must never take the helper down
            self._inflight.discard(req_id)
            await self._error(req_id, "internal", f"{type(exc).__name__}: {exc}")
        finally:
            self._inflight.discard(req_id)

    def _path(self, req: dict[str, Any]) -> str:
        path = req.get("path")
        if not isinstance(path, str) or not path or "\0" in path:
            raise RequestError("bad_request", "path must be a non-empty string")
        return os.path.join(self._workspace, path)  # absolute paths stay as they are

    # -- ops ----------------------------------------------------------------

    async def _op_hello(self, req_id: int, req: dict[str, Any]) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "uid": os.getuid(),
            "gid": os.getgid(),
            "cwd": os.getcwd(),
            "workspace": self._workspace,
            "python": ".".join(str(n) for n in sys.version_info[:3]),
        }

    async def _op_exec(self, req_id: int, req: dict[str, Any]) -> dict[str, Any]:
        command = req.get("command")
        if not isinstance(command, str) or "\0" in command:
            raise RequestError("bad_request", "command must be a string without NUL")
        timeout_ms = req.get("timeout_ms", DEFAULT_TIMEOUT_MS)
        if type(timeout_ms) is not int or not 0 < timeout_ms <= MAX_TIMEOUT_MS:
            raise RequestError(
                "bad_request", f"timeout_ms must be an integer from 1 to {MAX_TIMEOUT_MS}"
            )
        cwd = req.get("cwd")
        if cwd is None:
            cwd = self._workspace
        elif not isinstance(cwd, str) or "\0" in cwd:
            raise RequestError("bad_request", "cwd must be a string")
        else:
            cwd = os.path.join(self._workspace, cwd)
        extra = req.get("env") or {}
        if not isinstance(extra, dict) or not all(
            isinstance(k, str)
            and k
            and "=" not in k
            and "\0" not in k
            and isinstance(v, str)
            and "\0" not in v
            for k, v in extra.items()
        ):
            raise RequestError("bad_request", "env must map variable names to strings")
        env = dict(os.environ)
        env.update(extra)
        streaming = req.get("stream") is True

        async def on_chunk(name: str, text: str) -> None:
            await self._send({"id": req_id, "stream": name, "data": text})

        ex = _Exec()
        self._execs[req_id] = ex
        started = time.monotonic()
        # Plain pipes, read by us, rather than asyncio's PIPE: before 3.12
        # Process.wait() waits for asyncio's pipes to close too, and a job that
        # escaped the process group can hold them open for ever.
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        transports: list[asyncio.BaseTransport] = []
        try:
            try:
                ex.proc = await asyncio.create_subprocess_exec(
                    "/bin/sh",
                    "-c",
                    command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out_w,
                    stderr=err_w,
                    cwd=cwd,
                    env=env,
                    # Own session, hence own process group: timeout and cancel
                    # kill everything the command started that stayed in it.
                    start_new_session=True,
                )
            except OSError as exc:
                raise RequestError("spawn_failed", f"cannot run command in {cwd}: {exc}")
            finally:
                os.close(out_w)
                os.close(err_w)
            proc = ex.proc
            fd, out_r = out_r, -1  # _read_pipe owns it from here on
            out_stream = await _read_pipe(fd, transports)
            fd, err_r = err_r, -1
            err_stream = await _read_pipe(fd, transports)
            captures = [
                _Capture("stdout", out_stream, on_chunk if streaming else None),
                _Capture("stderr", err_stream, on_chunk if streaming else None),
            ]
            pumps = [asyncio.ensure_future(c.run()) for c in captures]
            waiter = asyncio.ensure_future(proc.wait())
            cancelled = asyncio.ensure_future(ex.cancel_event.wait())
            done, _ = await asyncio.wait(
                {waiter, cancelled},
                timeout=timeout_ms / 1000,
                return_when=asyncio.FIRST_COMPLETED,
            )
            timed_out = not done
            # A command that finished as the cancel came in was not cancelled.
            was_cancelled = cancelled in done and waiter not in done
            if waiter not in done:
                ex.kill_group()
            cancelled.cancel()
            await waiter
            # Output the command already wrote is still worth returning; pipes
            # held open by jobs that escaped the group are abandoned.
            _, lingering = await asyncio.wait(pumps, timeout=PIPE_LINGER_S)
            for pump in lingering:
                pump.cancel()
            await asyncio.gather(*lingering, return_exceptions=True)
            for pump in pumps:
                if pump not in lingering:
                    pump.result()  # re-raises a failed read
            code = proc.returncode
            assert code is not None
            return {
                # The shell's convention for a signal death, e.g. 137 for SIGKILL.
                "exit_code": code if code >= 0 else 128 - code,
                "signal": -code if code < 0 else None,
                "stdout": captures[0].text(),
                "stderr": captures[1].text(),
                "stdout_truncated": captures[0].dropped > 0,
                "stderr_truncated": captures[1].dropped > 0,
                "timed_out": timed_out,
                "cancelled": was_cancelled,
                "duration_ms": int((time.monotonic() - started) * 1000),
            }
        finally:
            if ex.proc is not None and ex.proc.returncode is None:
                ex.kill_group()  # the request task itself was cancelled
            self._execs.pop(req_id, None)
            for transport in transports:
                transport.close()
            for fd in (out_r, err_r):
                if fd >= 0:
                    os.close(fd)

    async def _op_cancel(self, req_id: int, req: dict[str, Any]) -> dict[str, Any]:
        target = req.get("target")
        if type(target) is not int:
            raise RequestError("bad_request", "target must be the id of an exec request")
        ex = self._execs.get(target)
        if ex is None:
            return {"found": False}
        ex.cancelled = True
        ex.kill_group()
        ex.cancel_event.set()
        return {"found": True}

    async def _op_read(self, req_id: int, req: dict[str, Any]) -> dict[str, Any]:
        path = self._path(req)
        offset = req.get("offset", 0)
        limit = req.get("limit", READ_MAX)
        if type(offset) is not int or offset < 0:
            raise RequestError("bad_request", "offset must be a non-negative integer")
        if type(limit) is not int or not 0 <= limit <= READ_MAX:
            raise RequestError("bad_request", f"limit must be an integer from 0 to {READ_MAX}")
        # Disk (or FUSE) reads may block; keep the event loop free.
        data, size = await asyncio.get_running_loop().run_in_executor(
            None, _read_file, path, offset, limit
        )
        return {
            "path": path,
            "offset": offset,
            "size": size,
            "content": base64.b64encode(data).decode("ascii"),
            "eof": offset + len(data) >= size,
        }

    async def _op_write(self, req_id: int, req: dict[str, Any]) -> dict[str, Any]:
        path = self._path(req)
        content = req.get("content")
        encoding = req.get("encoding", "utf-8")
        if not isinstance(content, str):
            raise RequestError("bad_request", "content must be a string")
        if encoding == "base64":
            try:
                data = base64.b64decode(content, validate=True)
            except ValueError as exc:
                raise RequestError("bad_request", f"content is not valid base64: {exc}")
        elif encoding == "utf-8":
            try:
                data = content.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError("bad_request", "content is not valid Unicode text")
        else:
            raise RequestError("bad_request", "encoding must be 'utf-8' or 'base64'")
        append = req.get("append", False)
        if not isinstance(append, bool):
            raise RequestError("bad_request", "append must be a boolean")
        size = await asyncio.get_running_loop().run_in_executor(
            None, _write_file, path, data, append
        )
        return {"path": path, "written": len(data), "size": size}

    async def _op_shutdown(self, req_id: int, req: dict[str, Any]) -> dict[str, Any]:
        # Stopping happens in _handle once the answer is on its way.
        self.kill_all()
        return {}


async def _read_pipe(fd: int, transports: list[asyncio.BaseTransport]) -> asyncio.StreamReader:
    """A StreamReader on the read end of a pipe (which it owns from the call on).

    Its transport goes into ``transports``, for the caller to close.
    """
    pipe = os.fdopen(fd, "rb", buffering=0)
    reader = asyncio.StreamReader(limit=_CHUNK)
    try:
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
    except BaseException:
        pipe.close()
        raise
    transports.append(transport)
    return reader


def _read_file(path: str, offset: int, limit: int) -> tuple[bytes, int]:
    try:
        # O_NONBLOCK: opening a FIFO must not hang the request.
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise RequestError("not_found", f"no such file: {path}")
    except OSError as exc:
        raise RequestError("io_error", f"cannot open {path}: {exc.strerror}")
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise RequestError("is_directory", f"{path} is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise RequestError("not_regular", f"{path} is not a regular file")
        chunks = []
        want = limit
        pos = offset
        while want > 0:
            piece = os.pread(fd, min(want, 1024 * 1024), pos)
            if not piece:
                break
            chunks.append(piece)
            want -= len(piece)
            pos += len(piece)
        return b"".join(chunks), max(st.st_size, pos)
    except OSError as exc:
        raise RequestError("io_error", f"cannot read {path}: {exc.strerror}")
    finally:
        os.close(fd)


def _write_file(path: str, data: bytes, append: bool) -> int:
    try:
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
        flags |= os.O_APPEND if append else os.O_TRUNC
        fd = os.open(path, flags, 0o644)
    except IsADirectoryError:
        raise RequestError("is_directory", f"{path} is a directory")
    except OSError as exc:
        raise RequestError("io_error", f"cannot open {path} for writing: {exc.strerror}")
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RequestError("not_regular", f"{path} is not a regular file")
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        return os.fstat(fd).st_size
    except OSError as exc:
        raise RequestError("io_error", f"cannot write {path}: {exc.strerror}")
    finally:
        os.close(fd)


def _close_other_fds(keep: int) -> None:
    # Only stdio and the connection may survive: a stray descriptor to a host
    # directory would be a way out of the sandbox for anything we start.
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd > 2 and fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the listing's own descriptor, already closed


async def _main_async(fd: int, workspace: str) -> None:
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM:
        raise SystemExit(f"helper: fd {fd} is not a stream socket")
    reader, writer = await asyncio.open_connection(sock=sock, limit=MAX_REQUEST_LINE)
    await Helper(reader, writer, workspace).serve()


def main(argv: list[str] | None = None) -> int:
    """Entry point inside the sandbox: ``helper.py --fd N [--workspace DIR]``."""
    parser = argparse.ArgumentParser(prog="helper.py", description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="inherited unix socket")
    parser.add_argument("--workspace", default=DEFAULT_WORKSPACE)
    args = parser.parse_args(argv)
    _close_other_fds(args.fd)
    os.set_inheritable(args.fd, False)  # commands we run must not get the connection
    try:
        asyncio.run(_main_async(args.fd, args.workspace))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
