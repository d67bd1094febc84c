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
``write``, ``edit``, ``list``, ``glob``, ``grep``, ``fetch``, ``shell``,
``shell_input``, ``shell_resize``, ``shell_signal``, ``shutdown`` (their
fields are documented on the ``_op_*`` methods). Paths are relative to the
workspace or absolute inside the sandbox. A ``shell`` streams
``{"id": int, "stream": "pty"|"stdout"|"stderr", "data": base64}`` lines
until its final response, which comes when the process exits.

Network: when it runs in a sandbox whose only interface is loopback, the
helper also listens on ``127.0.0.1:PROXY_PORT`` as an HTTP forward and
CONNECT proxy, and on ``127.0.0.1:DNS_PORT`` (and port 53 where the sandbox
allows it) as a DNS resolver, UDP and TCP. It decides nothing: each proxy
connection is a new connection to the unix socket at ``RELAY_SOCKET`` (the
executor's relay for this one session) carrying the client's bytes
verbatim, and each DNS query goes out the same way; the egress proxy behind
the relay applies all policy. The framing on that socket is documented in
``devsilo.executor._relay`` (``STREAM_TCP`` / ``STREAM_DNS`` below are its
first lines). Without the socket, proxy clients get a 502 saying ``blocked:
no egress configured for this session`` and DNS queries are REFUSED.

The helper is not a security boundary: it runs with exactly the rights of
anything else in the sandbox, so it does not confine paths. It must only
never crash on bad input and never block its event loop.
"""

from __future__ import annotations

# Start-up cost matters here: every sandbox starts this file, and its first
# answer is the sandbox's "ready". So the module imports at start only what
# the core needs (built-in and C modules, no enum, re, typing or asyncio);
# the rest, asyncio first, is imported by ``_load_rest`` on a background
# thread after the first request (see ``_Core``), or right away when this
# file is imported as a module (by the executor, and by tests).
import _signal  # type: ignore[import-not-found]  # signal without its enum
import _socket
import _thread
import codecs
import errno
import os
import select
import stat
import struct
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING or __name__ != "__main__":
    import asyncio
    import base64
    import fcntl
    import fnmatch
    import json
    import re
    import socket
    import termios
    import threading
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

SHELL_CHUNK = 16 * 1024
"""Most bytes of shell output one stream line carries (must match the protocol's SHELL_CHUNK)."""
SHELL_INPUT_MAX = 1024 * 1024
"""Most bytes one ``shell_input`` writes."""
SHELL_SIGNALS = {
    "INT": _signal.SIGINT, "TERM": _signal.SIGTERM, "HUP": _signal.SIGHUP,
    "QUIT": _signal.SIGQUIT, "KILL": _signal.SIGKILL, "TSTP": _signal.SIGTSTP,
    "CONT": _signal.SIGCONT, "USR1": _signal.SIGUSR1, "USR2": _signal.SIGUSR2,
    "WINCH": _signal.SIGWINCH,
}
"""Signals a ``shell_signal`` may send, by name."""

# Before Python 3.11 neither is the builtin TimeoutError (and before 3.10
# socket.timeout is only an OSError); the helper must run on 3.9, so it
# names them (_load_rest sets _ASYNC_TIMEOUT to asyncio's).
_ASYNC_TIMEOUT: type[BaseException] = TimeoutError
_SOCKET_TIMEOUT = _socket.timeout

EDIT_MAX = 10 * 1024 * 1024
"""Largest file an ``edit`` rewrites (it holds the file in memory twice)."""

LIST_DEFAULT = 1000
LIST_MAX = 10_000
"""Most entries one ``list`` returns (``limit``); more are reported as truncated."""

GLOB_DEFAULT = 1000
GLOB_MAX = 10_000
"""Most paths one ``glob`` returns (``limit``)."""
GLOB_VISIT_MAX = 200_000
"""Most directory entries one ``glob`` looks at before it stops, truncated."""
PATTERN_MAX = 4096
"""Longest glob pattern (``glob`` op, ``grep``'s file filter), in characters."""
BRACE_EXPANSIONS_MAX = 64
"""Most patterns one ``{a,b}`` pattern may expand to."""

REGEX_MAX = 16 * 1024
"""Longest ``grep`` regular expression, in characters."""
GREP_DEFAULT = 500
GREP_MAX = 10_000
"""Most matching lines one ``grep`` returns (``max_results``)."""
GREP_FILE_MAX = 32 * 1024 * 1024
"""Files larger than this are skipped by ``grep`` (and counted)."""
GREP_VISIT_MAX = 200_000
"""Most files one ``grep`` opens before it stops, truncated."""
GREP_LINE_MAX = 1000
"""Characters of a matching line that ``grep`` returns."""
GREP_OUTPUT_MAX = 4 * 1024 * 1024
"""Characters of paths and lines one ``grep`` answer may carry."""
GREP_DEFAULT_TIMEOUT_MS = 30_000
GREP_MAX_TIMEOUT_MS = 120_000
BINARY_SNIFF = 8192
"""A NUL byte in a file's first this many bytes makes it binary for ``grep``."""
_VCS_DIRS = frozenset((".git", ".hg", ".svn"))

FETCH_MAX = 5 * 1024 * 1024
"""Most body bytes one ``fetch`` returns (``max_bytes``)."""
FETCH_DEFAULT_TIMEOUT_MS = 30_000
FETCH_MAX_TIMEOUT_MS = 120_000
MAX_REDIRECTS = 10
"""Redirects a ``fetch`` follows, each through the proxy again."""
FETCH_HEADERS_MAX = 64
"""Most request headers a ``fetch`` may add, and response headers it returns."""
_FETCH_CONCURRENCY = 8
_REDIRECT_STATUSES = frozenset((301, 302, 303, 307, 308))
_HEADER_NAME_PATTERN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}\Z"
_HEADER_NAME: re.Pattern[str] | None = None
"""``_HEADER_NAME_PATTERN`` compiled (by _load_rest: re is not imported at start)."""

# -- the sandbox's network: these must match devsilo.executor._spec ----------

PROXY_PORT = 3128
"""The proxy listener on the sandbox's loopback (``HTTP_PROXY`` points here)."""
DNS_PORT = PROXY_PORT + 1
"""The resolver's port that always works. Port 53 needs privilege that an
unprivileged sandbox user lacks (see ``devsilo.executor._relay``), so the
helper serves 53 only where the sandbox allows it, and always this one."""
DNS_STANDARD_PORT = 53
RELAY_SOCKET = "/.devsilo/egress.sock"
"""The unix socket to the executor's relay for this session, if bound."""
CA_CERT = "/.devsilo/trust/ca.pem"
"""The session CA certificate, if any; ``fetch`` trusts it."""

STREAM_TCP = b"TCP\n"
"""First line on a relay connection that carries one proxy client's bytes verbatim."""
STREAM_DNS = b"DNS\n"
"""First line on a relay connection that carries DNS messages, each preceded
by its length as 2 bytes, big-endian (as DNS over TCP), answers likewise."""

BLOCKED_HEADER = "X-Devsilo-Blocked"
"""Header that carries the reason on every refusal the helper (or relay) answers."""
NO_EGRESS = "no egress configured for this session"

MAX_PROXY_CONNECTIONS = 256
"""Proxy and DNS-over-TCP connections served at once; more are closed at once."""
DNS_MAX_PENDING = 256
"""UDP DNS queries waiting for an answer at once; more are answered SERVFAIL."""
DNS_TIMEOUT_S = 5.0
RELAY_CONNECT_TIMEOUT_S = 10.0
HEAD_MAX = 64 * 1024
"""Bytes of a request head read before answering a refusal."""
DNS_RCODE_SERVFAIL = 2
DNS_RCODE_REFUSED = 5
_DNS_UDP_PLAIN = 512
_DNS_UDP_EDNS = 1232


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


# -- JSON without importing the json package (it costs a start-up its re) -----

_fast_encode: Any = None
_fast_scan: Any = None


def _json_default(obj: Any) -> Any:
    raise TypeError(f"Object of type {obj.__class__.__name__} is not JSON serializable")


class _ScanContext:
    """What ``_json.make_scanner`` reads off a decoder: ``json.loads``'s defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> float:
        return {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}[name]


def _init_json() -> None:
    """Use the json package's C encoder and scanner directly, if they behave as it does."""
    global _fast_encode, _fast_scan
    try:
        import _json

        # As json.dumps(ensure_ascii=False, separators=(",", ":")) builds it.
        encode = _json.make_encoder(
            None, _json_default, _json.encode_basestring, None, ":", ",", False, False, True
        )
        scan = _json.make_scanner(_ScanContext())  # type: ignore[arg-type]
        if "".join(encode({"a": [1, "é\n", None, True, 1.5]}, 0)) != (
            '{"a":[1,"é\\n",null,true,1.5]}'
        ):
            return
        probe = '{"a": [1, "\\u00e9", -2.5e3]}'
        if scan(probe, 0) != ({"a": [1, "é", -2500.0]}, len(probe)):
            return
    except Exception:  # noqa: BLE001 -- another Python's _json: use the json package
        return
    _fast_encode, _fast_scan = encode, scan


def _dumps(obj: dict[str, Any]) -> bytes:
    # ensure_ascii=False keeps non-ASCII output at its UTF-8 size instead of
    # six bytes per character; lone surrogates cannot occur (all text we send
    # was decoded with errors="replace").
    if _fast_encode is not None:
        return "".join(_fast_encode(obj, 0)).encode("utf-8") + b"\n"
    import json

    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def _loads(line: bytes) -> Any:
    """``json.loads(line)``: the C scanner for a plain object, else (and for every error) json."""
    # json.loads decodes bytes that start with "{" and a non-NUL as UTF-8
    # with surrogatepass; anything else, and every error, goes to json itself.
    if _fast_scan is not None and len(line) > 1 and line[0] == 0x7B and line[1] != 0:
        try:
            text = line.decode("utf-8", "surrogatepass")
            obj, end = _fast_scan(text, 0)
            if not text[end:].strip(" \t\n\r"):
                return obj
        except Exception:  # noqa: BLE001,S110 -- json.loads below says what is wrong
            pass
    import json

    return json.loads(line)


# -- the core: the connection, hello, exec, cancel, shutdown --------------------


class _Out:
    """The connection's sending side, shared by every thread: whole lines, one at a time.

    A writer blocks while the executor does not read (as ``drain`` did), so
    output backs up into the sandbox, not into memory here.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = _thread.allocate_lock()
        self.closed = False

    def send(self, data: bytes) -> bool:
        with self._lock:
            if self.closed:
                return False
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError:
                self.closed = True  # the executor is gone; reading sees it too
                return False
        return True


class _Capture:
    """One output pipe of an exec: keeps the first OUTPUT_CAP bytes, streams them if asked."""

    def __init__(self, name: str, on_chunk: Callable[[str, str], None] | None) -> None:
        self.name = name
        self.kept = bytearray()
        self.dropped = 0
        self._on_chunk = on_chunk
        # An incremental decoder so a streamed chunk never splits a character.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> None:
        room = OUTPUT_CAP - len(self.kept)
        if room > 0:
            part = data[:room]
            self.kept += part
            if self._on_chunk is not None:
                text = self._decoder.decode(part)
                if text:
                    self._on_chunk(self.name, text)
        # Past the cap we keep reading, only to count: a child blocked on a
        # full pipe would otherwise never finish.
        self.dropped += max(0, len(data) - max(room, 0))

    def finish(self) -> None:
        """The pipe ended: stream what the decoder still holds."""
        if self._on_chunk is not None:
            tail = self._decoder.decode(b"", final=True)
            if tail:
                self._on_chunk(self.name, tail)

    def text(self) -> str:
        out = self.kept.decode("utf-8", errors="replace")
        if self.dropped:
            out += truncation_mark(self.name, self.dropped)
        return out


class _Exec:
    """One running exec: its process, whether it exited or was cancelled, and a wake-up pipe."""

    def __init__(self) -> None:
        self.proc: Any = None
        self.cancelled = False
        self.exited = False
        self.wake_r, self._wake_w = os.pipe()
        self._lock = _thread.allocate_lock()

    def kill_group(self) -> None:
        """SIGKILL the command's whole process group (its pgid is its pid)."""
        if self.proc is None or self.proc.pid is None:
            return
        try:
            os.killpg(self.proc.pid, _signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # the group is already gone

    def wake(self) -> None:
        """Wake the exec's thread from its poll."""
        with self._lock:
            if self._wake_w >= 0:
                try:
                    os.write(self._wake_w, b"!")
                except OSError:
                    pass  # the pipe is full: it is awake anyway

    def cancel(self) -> None:
        # A command that finished as the cancel came in was not cancelled.
        if not self.exited:
            self.cancelled = True
        self.kill_group()
        self.wake()

    def close(self) -> None:
        with self._lock:
            for fd in (self.wake_r, self._wake_w):
                os.close(fd)
            self.wake_r = self._wake_w = -1


_REST_OPS = frozenset(
    (
        "read", "write", "edit", "list", "glob", "grep", "fetch",
        "shell", "shell_input", "shell_resize", "shell_signal",
    )
)
"""The ops that the rest (``Helper``, on asyncio) serves; the core serves the others."""


class _Listeners:
    """The proxy's and resolver's sockets, bound (and listening) by the core before hello."""

    def __init__(self) -> None:
        self.proxy: Any = None
        self.proxy_port: int | None = None
        self.dns: list[tuple[int, Any, Any]] = []
        """(port, UDP socket, TCP socket) for each resolver port."""
        self.dns_ports: list[int] = []
        self.errors: list[str] = []


def _bind_listeners(
    proxy_port: int = PROXY_PORT,
    dns_ports: tuple[int, ...] = (DNS_PORT, DNS_STANDARD_PORT),
) -> _Listeners:
    """Bind what can be bound, as ``Network.start`` would; failures land in ``errors``."""
    bound = _Listeners()
    host = "127.0.0.1"

    def tcp(port: int) -> Any:
        sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        try:
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            # Clients that connect before the event loop serves them wait here.
            sock.listen(100)
        except OSError:
            sock.close()
            raise
        return sock

    try:
        bound.proxy = tcp(proxy_port)
        bound.proxy_port = proxy_port
    except OSError as exc:
        bound.errors.append(f"proxy on port {proxy_port}: {exc.strerror}")
    for port in dns_ports:
        udp = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
        try:
            udp.bind((host, port))
        except OSError as exc:
            udp.close()
            bound.errors.append(f"dns on port {port}: {exc.strerror}")
            continue
        try:
            stream = tcp(port)
        except OSError as exc:
            udp.close()
            bound.errors.append(f"dns over tcp on port {port}: {exc.strerror}")
            continue
        bound.dns.append((port, udp, stream))
        bound.dns_ports.append(port)
    return bound


class _Core:
    """Serves the protocol on one connection, starting in a few milliseconds.

    The main thread reads requests and answers ``hello``, ``cancel`` and
    ``shutdown`` itself; each ``exec`` runs on a thread of its own (fork,
    poll on its pipes, wait), none of which needs asyncio. Every other op is
    handed, in order, to ``Helper`` on an asyncio event loop that a
    background thread starts after the first request (``_load_rest``
    imports asyncio and the rest there); requests for it that come earlier
    wait in a queue and are served, in order, as soon as it runs. The proxy
    and resolver sockets are bound before the first answer, so ``hello``
    tells the truth about them; connections wait in their backlog until the
    event loop serves them.
    """

    def __init__(self, fd: int, workspace: str, listeners: _Listeners | None) -> None:
        self._fd = fd
        self._workspace = workspace
        self._listeners = listeners
        self._out = _Out(fd)
        self._inflight: set[int] = set()
        self._execs: dict[int, _Exec] = {}
        self._stopping = False
        self._lock = _thread.allocate_lock()
        # The rest: requests waiting for it (None once it runs), its loop and Helper.
        self._queue: list[tuple[int, dict[str, Any]]] | None = []
        self._loop: Any = None
        self._helper: Helper | None = None
        self._stop_event: Any = None
        self._rest_failed = ""
        self._rest_stopped = _thread.allocate_lock()
        self._rest_stopped.acquire()

    # -- reading --------------------------------------------------------------

    def run(self) -> int:
        buf = bytearray()
        scan_from = 0
        discarding = False
        started_rest = False
        try:
            while not self._stopping:
                # The same splitting as LineReader (which needs asyncio).
                nl = buf.find(b"\n", scan_from)
                if nl < 0:
                    if len(buf) > MAX_REQUEST_LINE:
                        # Drop what we have and everything up to the next newline.
                        buf.clear()
                        scan_from = 0
                        if not discarding:
                            discarding = True
                            self._oversized()
                    scan_from = len(buf)
                    try:
                        data = os.read(self._fd, _CHUNK * 4)
                    except OSError:
                        data = b""  # reset by the executor: as good as closed
                    if not data:
                        return 0
                    buf += data
                    continue
                line = bytes(buf[:nl])
                del buf[: nl + 1]
                scan_from = 0
                if discarding:
                    discarding = False
                    continue
                if len(line) > MAX_REQUEST_LINE:
                    self._oversized()
                    continue
                if not line.strip():
                    continue
                self._dispatch(line)
                if not started_rest:
                    started_rest = True
                    _thread.start_new_thread(self._rest_thread, ())
            return 0
        finally:
            self._stop()

    def _oversized(self) -> None:
        self._error(None, "too_large", f"request line longer than {MAX_REQUEST_LINE} bytes")

    def _error(self, req_id: int | None, code: str, message: str) -> None:
        self._out.send(
            _dumps({"id": req_id, "ok": False, "error": {"code": code, "message": message}})
        )

    def _dispatch(self, line: bytes) -> None:
        try:
            req = _loads(line)
        except Exception as exc:  # noqa: BLE001 -- JSONDecodeError, UnicodeDecodeError, too deep
            self._error(None, "bad_request", f"not a JSON line: {exc}")
            return
        if not isinstance(req, dict):
            self._error(None, "bad_request", "a request must be a JSON object")
            return
        req_id = req.get("id")
        if type(req_id) is not int or not -(2**53) < req_id < 2**53:
            self._error(None, "bad_request", "request id must be an integer")
            return
        if req_id in self._inflight:
            self._error(req_id, "bad_request", f"id {req_id} is already in flight")
            return
        self._inflight.add(req_id)
        op = req.get("op")
        if op == "exec":
            # Known before its thread runs, so that a cancel right after it finds it.
            ex = self._execs[req_id] = _Exec()
            try:
                _thread.start_new_thread(self._answer, (req_id, self._op_exec, req))
            except RuntimeError as exc:  # no thread: the sandbox's pids limit, say
                self._execs.pop(req_id, None)
                ex.close()
                self._inflight.discard(req_id)
                self._error(req_id, "spawn_failed", f"cannot run command: {exc}")
        elif op == "hello":
            self._answer(req_id, self._op_hello, req)
        elif op == "cancel":
            self._answer(req_id, self._op_cancel, req)
        elif op == "shutdown":
            self._kill_all()
            self._answer(req_id, self._op_shutdown, req)
            self._out.closed = True  # nothing more after the shutdown's answer
            self._stopping = True
        elif isinstance(op, str) and op in _REST_OPS:
            self._to_rest(req_id, req)
        else:
            self._answer(req_id, self._op_unknown, req)

    def _answer(
        self, req_id: int, handler: Callable[[int, dict[str, Any]], dict[str, Any]], req: dict[str, Any]
    ) -> None:
        try:
            response = {"id": req_id, "ok": True}
            response.update(handler(req_id, req))
            # Free the id before answering: the executor may reuse it at once.
            self._inflight.discard(req_id)
            self._out.send(_dumps(response))
        except RequestError as exc:
            self._inflight.discard(req_id)
            self._error(req_id, exc.code, exc.message)
        except Exception as exc:  # noqa: BLE001 -- one request must never take the helper down
            self._inflight.discard(req_id)
            self._error(req_id, "internal", f"{type(exc).__name__}: {exc}")
        finally:
            self._inflight.discard(req_id)

    # -- the rest, on asyncio -----------------------------------------------------

    def _to_rest(self, req_id: int, req: dict[str, Any]) -> None:
        with self._lock:
            if self._queue is not None:
                self._queue.append((req_id, req))
                return
            loop, helper, failed = self._loop, self._helper, self._rest_failed
        if helper is not None and not failed:
            try:
                loop.call_soon_threadsafe(helper.submit, req_id, req)
                return
            except RuntimeError:
                failed = "its event loop has stopped"
        self._inflight.discard(req_id)
        self._error(req_id, "internal", f"the helper cannot serve {req.get('op')}: {failed}")

    def _rest_thread(self) -> None:
        """Import the rest and run its event loop (the background thread's body)."""
        # Let the main and exec threads take the GIL back quickly while this
        # thread imports (CPU-bound), instead of after the default 5 ms.
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, 0.0005))
        try:
            _load_rest()
            _watch_children_without_threads()  # the shell op's children: no thread per child either
            asyncio.run(self._rest_main(interval))
        except BaseException as exc:  # noqa: BLE001 -- reported to every request that needs it
            with self._lock:
                self._rest_failed = f"{type(exc).__name__}: {exc}"
                queued, self._queue = self._queue or [], None
            for req_id, req in queued:
                self._inflight.discard(req_id)
                self._error(
                    req_id, "internal", f"the helper cannot serve {req.get('op')}: {self._rest_failed}"
                )
        finally:
            sys.setswitchinterval(interval)
            if self._rest_stopped.locked():
                self._rest_stopped.release()

    async def _rest_main(self, interval: float) -> None:
        loop = asyncio.get_running_loop()
        network = None
        if self._listeners is not None:
            network = Network()
            await network.adopt(self._listeners)
        sender = _LineSender(self._out, loop)
        helper = Helper(sender.send, self._workspace, network, self._inflight)
        stop = asyncio.Event()
        sys.setswitchinterval(interval)
        try:
            with self._lock:
                self._loop, self._helper, self._stop_event = loop, helper, stop
                queued, self._queue = self._queue or [], None
            for req_id, req in queued:
                helper.submit(req_id, req)
            if not self._stopping:
                await stop.wait()
        finally:
            await helper.stop()
            if network is not None:
                network.close()
            sender.close()
            if self._rest_stopped.locked():
                self._rest_stopped.release()

    def _in_rest(self, fn: Callable[[], Any], timeout: float) -> None:
        """Run ``fn`` on the rest's loop, if it runs, and wait (bounded) until it did."""
        with self._lock:
            loop = self._loop
        if loop is None:
            return
        done = _thread.allocate_lock()
        done.acquire()

        def call() -> None:
            try:
                fn()
            finally:
                done.release()

        try:
            loop.call_soon_threadsafe(call)
        except RuntimeError:
            return  # its loop has stopped
        done.acquire(True, timeout)

    # -- stopping ---------------------------------------------------------------

    def _kill_all(self) -> None:
        """Kill every running command's process group (execs here, shells and workers there)."""
        for ex in list(self._execs.values()):
            ex.cancel()
        helper = self._helper
        if helper is not None:
            self._in_rest(helper.kill_all, 2.0)

    def _stop(self) -> None:
        """The executor went away or asked for shutdown: kill everything, stop the rest."""
        self._stopping = True
        self._kill_all()
        with self._lock:
            stop, loop = self._stop_event, self._loop
        if stop is not None:
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass  # its loop has stopped already
            else:
                # Helper.stop waits up to 2 s for its requests to end.
                self._rest_stopped.acquire(True, 3.0)
        self._out.closed = True

    # -- ops ------------------------------------------------------------------------

    def _op_unknown(self, req_id: int, req: dict[str, Any]) -> dict[str, Any]:
        raise RequestError("unknown_op", f"unknown op {req.get('op')!r}")

    def _op_hello(self, req_id: int, req: dict[str, Any]) -> dict[str, Any]:
        lis = self._listeners
        return {
            "pid": os.getpid(),
            "uid": os.getuid(),
            "gid": os.getgid(),
            "cwd": os.getcwd(),
            "workspace": self._workspace,
            "python": ".".join(str(n) for n in sys.version_info[:3]),
            "proxy_port": lis.proxy_port if lis else None,
            "dns_ports": list(lis.dns_ports) if lis else [],
            "egress_relay": os.path.exists(RELAY_SOCKET),
        }

    def _op_shutdown(self, req_id: int, req: dict[str, Any]) -> dict[str, Any]:
        return {}  # _dispatch killed everything; stopping follows the answer

    def _op_cancel(self, req_id: int, req: dict[str, Any]) -> dict[str, Any]:
        target = req.get("target")
        if type(target) is not int:
            raise RequestError("bad_request", "target must be the id of an exec request")
        ex = self._execs.get(target)
        if ex is None:
            return {"found": False}
        ex.cancel()
        return {"found": True}

    def _op_exec(self, req_id: int, req: dict[str, Any]) -> dict[str, Any]:
        ex = self._execs[req_id]
        try:
            return self._exec(ex, req_id, req)
        finally:
            if ex.proc is not None and not ex.exited:
                ex.kill_group()  # something failed
            self._execs.pop(req_id, None)
            ex.close()

    def _exec(self, ex: _Exec, req_id: int, req: dict[str, Any]) -> dict[str, Any]:
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
        send = self._out.send

        def on_chunk(name: str, text: str) -> None:
            send(_dumps({"id": req_id, "stream": name, "data": text}))

        started = time.monotonic()
        # Plain pipes, read here; a job that escaped the process group may
        # hold them open for ever, so they are read only while worth it.
        # The reaper's thread starts first: once the command runs, it may use
        # up the sandbox's pids limit (a fork bomb), and threads count there.
        spawned = _thread.allocate_lock()
        spawned.acquire()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            _thread.start_new_thread(_reap, (ex, spawned))
        except RuntimeError as exc:
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
            raise RequestError("spawn_failed", f"cannot run command in {cwd}: {exc}")
        try:
            try:
                # Own session, hence own process group: timeout and cancel
                # kill everything the command started that stayed in it.
                ex.proc = _spawn(["/bin/sh", "-c", command], cwd, env, out_w, err_w)
            except OSError as exc:
                raise RequestError("spawn_failed", f"cannot run command in {cwd}: {exc}")
            finally:
                spawned.release()
                os.close(out_w)
                os.close(err_w)
            open_pipes = {
                out_r: _Capture("stdout", on_chunk if streaming else None),
                err_r: _Capture("stderr", on_chunk if streaming else None),
            }
            captures = list(open_pipes.values())
            poller = select.poll()
            for fd in (out_r, err_r, ex.wake_r):
                poller.register(fd, select.POLLIN)

            def pump(timeout_s: float | None) -> None:
                """Wait up to ``timeout_s`` (None: no limit) for output or a wake-up; take it."""
                ms = -1 if timeout_s is None else max(0, int(timeout_s * 1000 + 0.999))
                for fd, _ in poller.poll(ms):
                    if fd == ex.wake_r:
                        os.read(fd, 512)
                        continue
                    capture = open_pipes.get(fd)
                    if capture is None:
                        continue
                    data = os.read(fd, _CHUNK)
                    if data:
                        capture.feed(data)
                    else:
                        capture.finish()
                        del open_pipes[fd]
                        poller.unregister(fd)

            deadline = started + timeout_ms / 1000
            timed_out = was_cancelled = False
            while True:
                if ex.cancelled:  # (set only while it had not exited)
                    was_cancelled = True
                    break
                if ex.exited:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                pump(left)
            if not ex.exited:
                ex.kill_group()
                while not ex.exited:
                    pump(None)
            # Output the command already wrote is still worth returning; pipes
            # held open by jobs that escaped the group are abandoned.
            linger_end = time.monotonic() + PIPE_LINGER_S
            while open_pipes:
                left = linger_end - time.monotonic()
                if left <= 0:
                    break
                pump(left)
            code = ex.proc.returncode
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
            os.close(out_r)
            os.close(err_r)


class _Child:
    """A command started by ``_spawn``: its pid, and its return code once reaped."""

    def __init__(self, pid: int, popen: Any = None) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._popen = popen

    def wait(self) -> None:
        """Block until it exits (a negative return code: killed by that signal)."""
        if self._popen is not None:
            self.returncode = self._popen.wait()
            return
        try:
            _, status = os.waitpid(self.pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = 0  # reaped elsewhere, as subprocess assumes too
        self.returncode = code


_fork_exec_ok = sys.version_info[:2] == (3, 11)
"""Whether ``_spawn`` calls _posixsubprocess directly (its signature is this Python's)."""


def _spawn(argv: list[str], cwd: str, env: dict[str, str], stdout: int, stderr: int) -> _Child:
    """``subprocess.Popen(argv, stdin=DEVNULL, stdout=, stderr=, cwd=, env=,
    start_new_session=True)``, without importing subprocess (milliseconds of a
    cold start, and more while the rest's thread imports) where this Python's
    ``_posixsubprocess.fork_exec`` is known. Raises OSError as Popen does."""
    global _fork_exec_ok
    if _fork_exec_ok:
        try:
            return _fork_exec(argv, cwd, env, stdout, stderr)
        except TypeError:
            _fork_exec_ok = False  # not the signature we know: use subprocess
    import subprocess

    popen = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        cwd=cwd,
        env=env,
        start_new_session=True,
    )
    return _Child(popen.pid, popen)


def _fork_exec(argv: list[str], cwd: str, env: dict[str, str], stdout: int, stderr: int) -> _Child:
    """What Popen._execute_child does on Python 3.11, for this one case."""
    import _posixsubprocess

    env_list = []
    for key, value in env.items():
        name = os.fsencode(key)
        if b"=" in name:
            raise ValueError("illegal environment variable name")
        env_list.append(name + b"=" + os.fsencode(value))
    executable = os.fsencode(argv[0])
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    errpipe_r, errpipe_w = os.pipe()
    try:
        try:
            pid = _posixsubprocess.fork_exec(
                argv, (executable,), True, (errpipe_w,), cwd, env_list,
                devnull, -1, -1, stdout, -1, stderr,
                errpipe_r, errpipe_w,
                True, True,  # restore_signals, start_new_session
                -1, None, None, None, -1,  # process_group, gid, gids, uid, umask
                None,  # type: ignore[arg-type]  # preexec_fn
                True,  # allow_vfork
            )
        finally:
            os.close(errpipe_w)
        # The child closes its end on exec; before that it reports a failure here.
        report = bytearray()
        while len(report) <= 50000:
            part = os.read(errpipe_r, 50000)
            if not part:
                break
            report += part
    finally:
        os.close(errpipe_r)
        os.close(devnull)
    if not report:
        return _Child(pid)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass  # reaped already
    name, _, rest = bytes(report).partition(b":")
    hex_errno, _, message = rest.partition(b":")
    try:
        errno_num = int(hex_errno, 16)
    except ValueError:
        errno_num = 0
    if name == b"OSError" and errno_num:
        text = message.decode(errors="replace")
        filename = cwd if text == "noexec:chdir" else "" if text.startswith("noexec") else argv[0]
        raise OSError(errno_num, os.strerror(errno_num), filename)
    raise OSError(f"cannot start {argv[0]}: {bytes(report).decode(errors='replace')}")


def _reap(ex: _Exec, spawned: Any) -> None:
    """Wait for an exec's process (a thread's body), then wake the exec's thread.

    ``spawned`` is released once the process was started (or failed to start).
    """
    spawned.acquire()
    if ex.proc is None:
        return  # it never started
    try:
        ex.proc.wait()
    finally:
        ex.exited = True
        ex.wake()


class _LineSender:
    """Sends lines for the rest's coroutines on a thread of its own.

    ``send`` returns once its line is written, so a coroutine that streams
    waits while the executor does not read, as it did on ``drain``; the
    event loop itself never blocks on the connection.
    """

    def __init__(self, out: _Out, loop: Any) -> None:
        import _queue

        self._out = out
        self._loop = loop
        self._queue: Any = _queue.SimpleQueue()
        _thread.start_new_thread(self._run, ())

    async def send(self, data: bytes) -> None:
        done = self._loop.create_future()
        self._queue.put((data, done))
        await done

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            data, done = item
            self._out.send(data)
            try:
                self._loop.call_soon_threadsafe(_resolve, done)
            except RuntimeError:
                return  # the loop is closed: the helper is exiting

    def close(self) -> None:
        self._queue.put(None)


def _resolve(future: Any) -> None:
    if not future.done():
        future.set_result(None)


class Helper:
    """Serves the ops that need asyncio (see ``_Core``) on the rest's event loop."""

    def __init__(
        self,
        send: Callable[[bytes], Awaitable[None]],
        workspace: str = DEFAULT_WORKSPACE,
        network: Network | None = None,
        inflight: set[int] | None = None,
    ) -> None:
        """``send`` writes one line; ``network`` is the helper's proxy and resolver, if any;
        ``inflight`` is the core's set of request ids being served."""
        self._send_line = send
        self._workspace = workspace
        self._network = network
        self._shells: dict[int, _Shell] = {}
        # grep workers, killed with everything else on shutdown.
        self._workers: set[asyncio.subprocess.Process] = set()
        self._fetch_slots = asyncio.Semaphore(_FETCH_CONCURRENCY)
        self._inflight: set[int] = inflight if inflight is not None else set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- plumbing -----------------------------------------------------------

    async def _send(self, obj: dict[str, Any]) -> None:
        await self._send_line(_dumps(obj))

    async def _error(self, req_id: int | None, code: str, message: str) -> None:
        await self._send({"id": req_id, "ok": False, "error": {"code": code, "message": message}})

    def submit(self, req_id: int, req: dict[str, Any]) -> None:
        """Serve one request (its id is in flight already)."""
        self._spawn(self._handle(req_id, req))

    async def stop(self) -> None:
        """Kill everything and end every request (waits up to 2 s for them)."""
        self.kill_all()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)

    def kill_all(self) -> None:
        """Kill every grep worker and every shell's process group."""
        for proc in self._workers:
            _kill(proc)
        for sh in self._shells.values():
            sh.hang_up()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, req_id: int, req: dict[str, Any]) -> None:
        op = req.get("op")
        handler = {
            "read": self._op_read,
            "write": self._op_write,
            "edit": self._op_edit,
            "list": self._op_list,
            "glob": self._op_glob,
            "grep": self._op_grep,
            "fetch": self._op_fetch,
            "shell": self._op_shell,
            "shell_input": self._op_shell_input,
            "shell_resize": self._op_shell_resize,
            "shell_signal": self._op_shell_signal,
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

    def _path(self, req: dict[str, Any], key: str = "path", default: str | None = None) -> str:
        """``req[key]`` made absolute against the workspace (absolute paths stay as they are)."""
        path = req.get(key, default)
        if not isinstance(path, str) or not path or "\0" in path:
            raise RequestError("bad_request", f"{key} must be a non-empty string without NUL")
        if len(path) > 4096 * 4:
            raise RequestError("bad_request", f"{key} is longer than any path can be")
        _check_unicode(path, key)
        return os.path.join(self._workspace, path)

    # -- ops ----------------------------------------------------------------

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

    async def _op_edit(self, req_id: int, req: dict[str, Any]) -> dict[str, Any]:
        """Replace ``old`` by ``new`` in a file: exactly one match unless ``replace_all``.

        Works on the file's bytes (``old`` and ``new`` are UTF-8), keeps its
        inode, mode and links. Errors: ``no_match``, ``multiple_matches``
        (with where), ``too_large`` (over ``EDIT_MAX``), and those of ``read``.
        Answers ``replacements``, the new ``size`` and ``first_line``.
        """
        path = self._path(req)
        old, new = req.get("old"), req.get("new")
        if not isinstance(old, str) or not old:
            raise RequestError("bad_request", "old must be a non-empty string")
        if not isinstance(new, str):
            raise RequestError("bad_request", "new must be a string")
        if old == new:
            raise RequestError("bad_request", "old and new are the same: nothing to change")
        replace_all = req.get("replace_all", False)
        if not isinstance(replace_all, bool):
            raise RequestError("bad_request", "replace_all must be a boolean")
        old_b = _encode_text(old, "old")
        new_b = _encode_text(new, "new")
        return await asyncio.get_running_loop().run_in_executor(
            None, _edit_file, path, old_b, new_b, replace_all
        )

    async def _op_list(self, req_id: int, req: dict[str, Any]) -> dict[str, Any]:
        """A directory's entries (default: the workspace), sorted by name.

        Each entry has ``name``, ``type`` (file, dir, symlink, fifo, socket,
        char, block, other), ``size``, ``mode`` (permission bits), ``mtime``;
        symlinks are described, never followed, and carry their ``target``.
        At most ``limit`` entries (``truncated`` says when there were more).
        """
        path = self._path(req, default=".")
        limit = _int_param(req, "limit", LIST_DEFAULT, 1, LIST_MAX)
        return await asyncio.get_running_loop().run_in_executor(None, _list_dir, path, limit)

    async def _op_glob(self, req_id: int, req: dict[str, Any]) -> dict[str, Any]:
        """Absolute paths that match ``pattern`` below ``path`` (default: the workspace).

        ``*``, ``?`` and ``[...]`` match within one name, ``**`` any number
        of directories, ``{a,b}`` either; wildcards do not match a leading
        dot unless the pattern has one there, and ``**`` does not descend
        into hidden or symlinked directories. At most ``limit`` paths, sorted.
        """
        base = self._path(req, default=".")
        pattern = req.get("pattern")
        if not isinstance(pattern, str) or not pattern or "\0" in pattern:
            raise RequestError("bad_request", "pattern must be a non-empty string without NUL")
        if len(pattern) > PATTERN_MAX:
            raise RequestError("bad_request", f"pattern is longer than {PATTERN_MAX} characters")
        _check_unicode(pattern, "pattern")
        patterns = _expand_braces(pattern)
        limit = _int_param(req, "limit", GLOB_DEFAULT, 1, GLOB_MAX)
        return await asyncio.get_running_loop().run_in_executor(None, _glob, base, patterns, limit)

    async def _op_grep(self, req_id: int, req: dict[str, Any]) -> dict[str, Any]:
        """Lines matching the regular expression ``pattern`` (Python syntax) in ``path``.

        ``path`` is a file or a directory searched recursively (default: the
        workspace; symlinks and ``.git``/``.hg``/``.svn`` are skipped);
        ``glob`` filters file names (or relative paths when it has a ``/``);
        ``case_insensitive``; ``max_results`` lines. Binary files (a NUL in
        their first 8 KiB) and files over ``GREP_FILE_MAX`` are skipped and
        counted. It runs in a child process killed after ``timeout_ms``, so
        a pathological expression cannot stall the helper.
        """
        path = self._path(req, default=".")
        pattern = req.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise RequestError("bad_request", "pattern must be a non-empty string")
        if len(pattern) > REGEX_MAX:
            raise RequestError("bad_request", f"pattern is longer than {REGEX_MAX} characters")
        _check_unicode(pattern, "pattern")
        name_glob = req.get("glob")
        if name_glob is not None:
            if not isinstance(name_glob, str) or not name_glob or "\0" in name_glob:
                raise RequestError("bad_request", "glob must be a non-empty string without NUL")
            if len(name_glob) > PATTERN_MAX:
                raise RequestError("bad_request", f"glob is longer than {PATTERN_MAX} characters")
            _check_unicode(name_glob, "glob")
            _expand_braces(name_glob)  # refuse a bad one here, not in the worker
        case_insensitive = req.get("case_insensitive", False)
        if not isinstance(case_insensitive, bool):
            raise RequestError("bad_request", "case_insensitive must be a boolean")
        max_results = _int_param(req, "max_results", GREP_DEFAULT, 1, GREP_MAX)
        timeout_ms = _int_param(req, "timeout_ms", GREP_DEFAULT_TIMEOUT_MS, 1, GREP_MAX_TIMEOUT_MS)
        params = {
            "path": path,
            "pattern": pattern,
            "glob": name_glob,
            "case_insensitive": case_insensitive,
            "max_results": max_results,
        }
        return await self._run_worker("--grep-worker", params, timeout_ms / 1000)

    async def _run_worker(
        self, flag: str, params: dict[str, Any], timeout_s: float
    ) -> dict[str, Any]:
        """Run this file in a child Python (``flag`` picks the job), bounded in time."""
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                "-S",
                os.path.abspath(__file__),
                flag,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                cwd=self._workspace if os.path.isdir(self._workspace) else "/",
            )
        except OSError as exc:
            raise RequestError("spawn_failed", f"cannot start a worker: {exc}")
        self._workers.add(proc)
        try:
            out, _ = await asyncio.wait_for(
                proc.communicate(json.dumps(params).encode("utf-8")), timeout_s
            )
        except _ASYNC_TIMEOUT:
            raise RequestError(
                "timeout",
                f"gave up after {timeout_s:g} s (a pathological pattern, or too much to search?)",
            )
        finally:
            self._workers.discard(proc)
            _kill(proc)
        try:
            answer = json.loads(out)
        except ValueError:
            raise RequestError("internal", f"the worker died (status {proc.returncode})")
        if not isinstance(answer, dict):
            raise RequestError("internal", "the worker answered nonsense")
        error = answer.get("error")
        if isinstance(error, dict):
            raise RequestError(str(error.get("code")), str(error.get("message")))
        result: dict[str, Any] = answer
        return result

    async def _op_fetch(self, req_id: int, req: dict[str, Any]) -> dict[str, Any]:
        """HTTP(S) GET ``url`` through the sandbox's own proxy, hence through egress.

        Follows up to ``MAX_REDIRECTS`` redirects, each through the proxy
        again. Answers ``url`` (the last one), ``status``, ``reason``,
        ``headers`` (``[name, value]`` pairs), ``content`` (base64, at most
        ``max_bytes``), ``truncated`` and ``redirects`` (the URLs followed).
        A refusal by the proxy is an answer too (its status and reason body),
        so the caller sees why. ``headers`` may add request headers.
        """
        url = req.get("url")
        if not isinstance(url, str) or not url or len(url) > 16 * 1024:
            raise RequestError("bad_request", "url must be a non-empty string (at most 16 KiB)")
        _check_unicode(url, "url")
        if any(c in url for c in "\0\r\n\t "):
            raise RequestError(
                "bad_request", "url must not contain whitespace or control characters"
            )
        max_bytes = _int_param(req, "max_bytes", FETCH_MAX, 0, FETCH_MAX)
        timeout_ms = _int_param(
            req, "timeout_ms", FETCH_DEFAULT_TIMEOUT_MS, 1, FETCH_MAX_TIMEOUT_MS
        )
        headers = req.get("headers") or {}
        if not isinstance(headers, dict) or len(headers) > FETCH_HEADERS_MAX:
            raise RequestError(
                "bad_request", f"headers must map at most {FETCH_HEADERS_MAX} names to values"
            )
        for name, value in headers.items():
            if _HEADER_NAME is None or not _HEADER_NAME.match(name) or not isinstance(value, str):
                raise RequestError("bad_request", f"invalid header name {name[:64]!r}")
            if any(c in value for c in "\0\r\n") or len(value) > 8192:
                raise RequestError("bad_request", f"invalid value for header {name}")
        if self._network is None or self._network.proxy_port is None:
            raise RequestError(
                "no_proxy", "this helper runs no proxy (it is not inside an isolated sandbox)"
            )
        async with self._fetch_slots:
            result: dict[str, Any] = await _in_daemon_thread(
                _fetch,
                url,
                max_bytes,
                timeout_ms / 1000,
                headers,
                self._network.proxy_port,
            )
        return result

    async def _op_shell(self, req_id: int, req: dict[str, Any]) -> dict[str, Any]:
        """Run a shell (``command`` null) or ``sh -c command`` for a user, until it exits.

        ``tty`` true: on a new pseudo-terminal of ``rows`` x ``cols`` that is
        the process's controlling terminal, output streamed as ``pty``;
        otherwise on pipes, streamed as ``stdout`` and ``stderr``. ``env``
        adds to the environment. Input, window size and signals come as
        ``shell_input``, ``shell_resize`` and ``shell_signal`` naming this
        request's id as ``target``. Answers ``exit_code`` (128 + N after
        signal N) and ``signal``. No timeout: a shell runs until it ends.
        """
        command = req.get("command")
        if command is not None and (not isinstance(command, str) or "\0" in command):
            raise RequestError("bad_request", "command must be null or a string without NUL")
        tty = req.get("tty", True)
        if not isinstance(tty, bool):
            raise RequestError("bad_request", "tty must be a boolean")
        rows = _int_param(req, "rows", 24, 1, 1000)
        cols = _int_param(req, "cols", 80, 1, 1000)
        extra = req.get("env") or {}
        if not isinstance(extra, dict) or not all(
            isinstance(k, str) and k and "=" not in k and "\0" not in k
            and isinstance(v, str) and "\0" not in v
            for k, v in extra.items()
        ):
            raise RequestError("bad_request", "env must map variable names to strings")
        env = dict(os.environ)
        env.update(extra)
        if command is None:
            interactive = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
            argv = [interactive, "-i"] if tty else [interactive]
        else:
            argv = ["/bin/sh", "-c", command]
        sh = _Shell(tty)
        self._shells[req_id] = sh
        try:
            try:
                await sh.spawn(argv, self._workspace, env, rows, cols)
            except OSError as exc:
                raise RequestError("spawn_failed", f"cannot start {argv[0]}: {exc}")

            async def on_output(stream: str, data: bytes) -> None:
                await self._send({"id": req_id, "stream": stream,
                                  "data": base64.b64encode(data).decode("ascii")})

            code = await sh.run(on_output)
            return {"exit_code": code if code >= 0 else 128 - code, "signal": -code if code < 0 else None}
        finally:
            self._shells.pop(req_id, None)
            sh.hang_up()
            sh.close()

    def _shell_target(self, req: dict[str, Any]) -> _Shell | None:
        target = req.get("target")
        if type(target) is not int:
            raise RequestError("bad_request", "target must be the id of a shell request")
        return self._shells.get(target)

    async def _op_shell_input(self, req_id: int, req: dict[str, Any]) -> dict[str, Any]:
        """Write ``data`` (base64) to a shell's input, in order; ``eof`` then closes a pipe's stdin."""
        data = req.get("data", "")
        eof = req.get("eof", False)
        if not isinstance(data, str) or len(data) > SHELL_INPUT_MAX * 2 or not isinstance(eof, bool):
            raise RequestError("bad_request", "data must be base64 text and eof a boolean")
        try:
            raw = base64.b64decode(data, validate=True)
        except ValueError:
            raise RequestError("bad_request", "data is not valid base64")
        sh = self._shell_target(req)
        if sh is None:
            return {"found": False}
        await sh.write(raw, eof)
        return {"found": True}

    async def _op_shell_resize(self, req_id: int, req: dict[str, Any]) -> dict[str, Any]:
        """Set a shell's terminal to ``rows`` x ``cols`` (its foreground group gets SIGWINCH)."""
        rows = _int_param(req, "rows", 24, 1, 1000)
        cols = _int_param(req, "cols", 80, 1, 1000)
        sh = self._shell_target(req)
        if sh is None:
            return {"found": False}
        sh.resize(rows, cols)
        return {"found": True}

    async def _op_shell_signal(self, req_id: int, req: dict[str, Any]) -> dict[str, Any]:
        """Send ``signal`` (INT, TERM, HUP, QUIT, KILL, …) to a shell's foreground process group."""
        name = req.get("signal")
        if not isinstance(name, str) or name not in SHELL_SIGNALS:
            raise RequestError("bad_request", f"signal must be one of {', '.join(SHELL_SIGNALS)}")
        sh = self._shell_target(req)
        if sh is None:
            return {"found": False}
        sh.signal(SHELL_SIGNALS[name])
        return {"found": True}


class _Shell:
    """A user's process on a pseudo-terminal (or on pipes) and the descriptors we hold to it."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.proc: asyncio.subprocess.Process | None = None
        self.master = -1
        """The pty's master side (tty), read for output and written for input."""
        self.stdin = -1
        self.outputs: list[tuple[str, int]] = []
        self._write_lock = asyncio.Lock()

    async def spawn(self, argv: list[str], cwd: str, env: dict[str, str], rows: int, cols: int) -> None:
        if self.tty:
            self.master, slave = os.openpty()
            try:
                _set_winsize(slave, rows, cols)
                self.proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
                    preexec_fn=_take_terminal,
                )
            finally:
                os.close(slave)
            self.outputs = [("pty", self.master)]
        else:
            in_r, in_w = os.pipe()
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            self.stdin = in_w
            self.outputs = [("stdout", out_r), ("stderr", err_r)]
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=in_r, stdout=out_w, stderr=err_w, cwd=cwd, env=env,
                    start_new_session=True,
                )
            finally:
                for fd in (in_r, out_w, err_w):
                    os.close(fd)
        for _, fd in self.outputs:
            os.set_blocking(fd, False)
        if self.stdin >= 0:
            os.set_blocking(self.stdin, False)

    async def run(self, on_output: Callable[[str, bytes], Awaitable[None]]) -> int:
        """Stream output until the process exits (and its output ends, or lingers); its return code."""
        assert self.proc is not None

        async def pump(name: str, fd: int) -> None:
            while True:
                data = await _read_fd(fd, SHELL_CHUNK)
                if not data:
                    return
                await on_output(name, data)

        pumps = [asyncio.ensure_future(pump(name, fd)) for name, fd in self.outputs]
        try:
            code = await self.proc.wait()
            # Background jobs may keep the terminal or pipes open: take what is
            # there, then stop reading, as exec does.
            _, lingering = await asyncio.wait(pumps, timeout=PIPE_LINGER_S)
            for p in lingering:
                p.cancel()
            await asyncio.gather(*lingering, return_exceptions=True)
            for p in pumps:
                if p not in lingering:
                    p.result()
            return code
        finally:
            for p in pumps:
                p.cancel()

    async def write(self, data: bytes, eof: bool) -> None:
        fd = self.master if self.tty else self.stdin
        async with self._write_lock:  # requests run concurrently; input must stay in order
            if fd < 0:
                return
            await _write_fd(fd, data)
            if eof and not self.tty and self.stdin >= 0:
                os.close(self.stdin)
                self.stdin = -1
            elif eof and self.tty:
                await _write_fd(fd, b"\x04")  # the terminal's end-of-file character

    def resize(self, rows: int, cols: int) -> None:
        if self.master >= 0:
            _set_winsize(self.master, rows, cols)

    def signal(self, signum: int) -> None:
        """Signal the terminal's foreground process group (else the process's own group)."""
        if self.proc is None or self.proc.returncode is not None:
            return
        pgid = self.proc.pid
        if self.master >= 0:
            try:
                pgid = os.tcgetpgrp(self.master)
            except OSError:
                pass  # no foreground group: fall back to the shell's own
        try:
            os.killpg(pgid, signum)
        except (ProcessLookupError, PermissionError):
            pass  # the group is already gone

    def hang_up(self) -> None:
        """Kill the process's group; closing the terminal then hangs up the rest of its session."""
        if self.proc is not None and self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, _signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass  # the group is already gone

    def close(self) -> None:
        fds = [fd for _, fd in self.outputs] + [self.stdin]
        self.outputs = []
        self.master = self.stdin = -1
        for fd in fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass  # closed already


def _take_terminal() -> None:
    # In the child, before exec: a new session whose controlling terminal is our pty.
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


async def _wait_fd(fd: int, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if writable else loop.add_reader)(fd, wake)
    try:
        await ready
    finally:
        (loop.remove_writer if writable else loop.remove_reader)(fd)


async def _read_fd(fd: int, most: int) -> bytes:
    """Up to ``most`` bytes from a non-blocking descriptor; b"" at its end (EIO: a pty hung up)."""
    while True:
        try:
            return os.read(fd, most)
        except BlockingIOError:
            await _wait_fd(fd, writable=False)
        except OSError as exc:
            if exc.errno == errno.EIO:
                return b""
            raise


async def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            await _wait_fd(fd, writable=True)
            continue
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EPIPE):
                return  # the process is gone; nobody reads this input
            raise
        view = view[n:]


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


def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        try:
            proc.kill()
        except ProcessLookupError:
            pass  # it just exited


def _check_unicode(value: str, key: str) -> None:
    # A lone surrogate from JSON would fail deep inside os.* or the answer's
    # encoding; say so up front instead.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError("bad_request", f"{key} is not valid Unicode text")


def _encode_text(value: str, key: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError("bad_request", f"{key} is not valid Unicode text")


def _int_param(req: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = req.get(key, default)
    if type(value) is not int or not low <= value <= high:
        raise RequestError("bad_request", f"{key} must be an integer from {low} to {high}")
    return value


def _text(name: str) -> str:
    """A file name fit for a JSON answer: undecodable bytes become U+FFFD."""
    return os.fsencode(name).decode("utf-8", errors="replace")


def _tidy(path: str) -> str:
    """``path`` without ``.`` components and doubled slashes, for answers.

    Left alone when it has a ``..``: whether that climbs out of a symlink
    or out of its textual parent is the kernel's to decide, not ours.
    """
    return path if ".." in path.split("/") else os.path.normpath(path)


def _read_all(fd: int, most: int) -> bytes:
    chunks = []
    got = 0
    while got < most:
        piece = os.read(fd, min(most - got, 1024 * 1024))
        if not piece:
            break
        chunks.append(piece)
        got += len(piece)
    return b"".join(chunks)


def _edit_file(path: str, old: bytes, new: bytes, replace_all: bool) -> dict[str, Any]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise RequestError("not_found", f"no such file: {path}")
    except IsADirectoryError:
        raise RequestError("is_directory", f"{path} is a directory")
    except OSError as exc:
        raise RequestError("io_error", f"cannot open {path} for editing: {exc.strerror}")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RequestError("not_regular", f"{path} is not a regular file")
        data = _read_all(fd, EDIT_MAX + 1)
        if len(data) > EDIT_MAX:
            raise RequestError(
                "too_large", f"{path} is larger than {EDIT_MAX} bytes; edit it with a command"
            )
        count = data.count(old)
        if count == 0:
            hint = ""
            if b"\r\n" in data and b"\n" in old and b"\r\n" not in old:
                hint = " (the file has CRLF line endings; old has bare LF)"
            elif old.strip() and data.count(old.strip()):
                hint = " (it does occur without its leading/trailing whitespace)"
            raise RequestError("no_match", f"old text not found in {path}{hint}")
        if count > 1 and not replace_all:
            lines: list[str] = []
            pos = data.find(old)
            while pos >= 0 and len(lines) < 10:
                lines.append(str(data.count(b"\n", 0, pos) + 1))
                pos = data.find(old, pos + len(old))
            more = ", …" if count > len(lines) else ""
            raise RequestError(
                "multiple_matches",
                f"old text occurs {count} times in {path} (lines {', '.join(lines)}{more}); "
                "include more surrounding text to make it unique, or set replace_all",
            )
        first_line = data.count(b"\n", 0, data.find(old)) + 1
        result = data.replace(old, new) if replace_all else data.replace(old, new, 1)
        # In place (not write-and-rename): keeps the inode, so its mode,
        # owner and hard links stay as they were.
        view = memoryview(result)
        pos = 0
        while pos < len(result):
            pos += os.pwrite(fd, view[pos:], pos)
        os.ftruncate(fd, len(result))
        return {
            "path": path,
            "replacements": count if replace_all else 1,
            "size": len(result),
            "first_line": first_line,
        }
    except OSError as exc:
        raise RequestError("io_error", f"cannot edit {path}: {exc.strerror}")
    finally:
        os.close(fd)


def _entry_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "char"),
        (stat.S_ISBLK, "block"),
    ):
        if test(mode):
            return name
    return "other"


def _open_dir(path: str) -> Any:
    try:
        return os.scandir(path)
    except FileNotFoundError:
        raise RequestError("not_found", f"no such directory: {path}")
    except NotADirectoryError:
        raise RequestError("not_a_directory", f"{path} is not a directory")
    except OSError as exc:
        raise RequestError("io_error", f"cannot list {path}: {exc.strerror}")


def _list_dir(path: str, limit: int) -> dict[str, Any]:
    path = _tidy(path)
    # The named directory itself may be reached through a symlink (as `ls
    # dir/` would); its entries are described with lstat, never followed.
    with _open_dir(path) as it:
        found = []
        total = 0
        for entry in it:
            total += 1
            if total <= GLOB_VISIT_MAX:
                found.append(entry)
    found.sort(key=lambda e: e.name)
    entries = []
    for entry in found[:limit]:
        item: dict[str, Any] = {"name": _text(entry.name)}
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            item.update(type="other", size=0, mode=0, mtime=0)
            entries.append(item)
            continue
        kind = _entry_type(st.st_mode)
        item.update(
            type=kind,
            size=st.st_size,
            mode=stat.S_IMODE(st.st_mode),
            mtime=round(st.st_mtime, 3),
        )
        if kind == "symlink":
            try:
                item["target"] = _text(os.readlink(entry.path))
            except OSError:
                item["target"] = ""
        entries.append(item)
    return {"path": path, "entries": entries, "total": total, "truncated": total > limit}


def _expand_braces(pattern: str) -> list[str]:
    """``a{b,c}d`` → ``abd``, ``acd`` (nested too), at most ``BRACE_EXPANSIONS_MAX``.

    Scans by hand rather than with a regular expression: a hostile pattern
    must not cost more than linear time per expansion.
    """
    todo = [pattern]
    done: list[str] = []
    while todo:
        current = todo.pop()
        group = _brace_group(current)
        if group is None:
            if current not in done:
                done.append(current)
            continue
        start, end = group
        for alternative in reversed(current[start + 1 : end].split(",")):
            todo.append(current[:start] + alternative + current[end + 1 :])
        if len(todo) + len(done) > BRACE_EXPANSIONS_MAX:
            raise RequestError(
                "bad_request", f"pattern expands to more than {BRACE_EXPANSIONS_MAX} patterns"
            )
    return done


def _brace_group(pattern: str) -> tuple[int, int] | None:
    """The first innermost ``{…,…}`` group's bounds, or None."""
    start = -1
    for i, c in enumerate(pattern):
        if c == "{":
            start = i
        elif c == "}" and start >= 0:
            if "," in pattern[start + 1 : i]:
                return start, i
            start = -1  # "{x}" is literal
    return None


class _Budget:
    """How many more directory entries a walk may look at."""

    def __init__(self, entries: int) -> None:
        self.left = entries
        self.exhausted = False

    def scan(self, path: str) -> list[Any]:
        """``path``'s entries sorted by name; [] when unreadable or out of budget."""
        if self.left <= 0:
            self.exhausted = True
            return []
        found = []
        try:
            with os.scandir(path) as it:
                for entry in it:
                    self.left -= 1
                    if self.left < 0:
                        self.exhausted = True
                        break
                    found.append(entry)
        except OSError:
            return []
        found.sort(key=lambda e: e.name)
        return found


def _is_dir_entry(entry: Any) -> bool:
    try:
        return bool(entry.is_dir(follow_symlinks=False))
    except OSError:
        return False


def _glob(base: str, patterns: list[str], limit: int) -> dict[str, Any]:
    base = _tidy(base)
    if not os.path.isdir(base):
        if os.path.lexists(base):
            raise RequestError("not_a_directory", f"{base} is not a directory")
        raise RequestError("not_found", f"no such directory: {base}")
    found: set[str] = set()
    budget = _Budget(GLOB_VISIT_MAX)
    for pattern in patterns:
        root = "/" if pattern.startswith("/") else base
        segments: list[str] = []
        for seg in pattern.split("/"):
            if seg in ("", ".") or (seg == "**" and segments[-1:] == ["**"]):
                continue
            segments.append(seg)
        if segments:
            _glob_walk(root, segments, found, budget, limit + 1)
    matches = sorted(found)
    truncated = len(matches) > limit or budget.exhausted
    return {"base": base, "matches": [_text(m) for m in matches[:limit]], "truncated": truncated}


def _glob_walk(root: str, segments: list[str], found: set[str], budget: _Budget, most: int) -> None:
    stack = [(root, 0)]
    seen: set[tuple[str, int]] = set()
    last = len(segments) - 1
    while stack and len(found) < most and not budget.exhausted:
        directory, i = stack.pop()
        if (directory, i) in seen:
            continue
        seen.add((directory, i))
        seg = segments[i]
        if seg == "**":
            if i < last:
                stack.append((directory, i + 1))  # ** matching no directory at all
            for entry in reversed(budget.scan(directory)):
                if entry.name.startswith("."):
                    continue
                if i == last:
                    found.add(entry.path)
                if _is_dir_entry(entry):
                    stack.append((entry.path, i))
            continue
        if not any(c in seg for c in "*?["):
            # A literal name: no listing needed, and it may be hidden or "..".
            path = os.path.join(directory, seg)
            if i == last:
                if os.path.lexists(path):
                    found.add(path)
            elif os.path.isdir(path):
                stack.append((path, i + 1))
            continue
        for entry in reversed(budget.scan(directory)):
            if entry.name.startswith(".") and not seg.startswith("."):
                continue
            if not fnmatch.fnmatchcase(entry.name, seg):
                continue
            if i == last:
                found.add(entry.path)
            elif _is_dir_entry(entry):
                stack.append((entry.path, i + 1))


def _walk_files(root: str, budget: _Budget) -> Any:
    """Yield ``(path, relative path)`` of every regular file below ``root``.

    Never follows a symlink and skips version-control directories.
    """
    stack = [root]
    while stack:
        directory = stack.pop()
        for entry in reversed(budget.scan(directory)):
            try:
                if entry.is_symlink():
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if entry.name not in _VCS_DIRS:
                        stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    yield entry.path, os.path.relpath(entry.path, root)
            except OSError:
                continue


def _grep(params: dict[str, Any]) -> dict[str, Any]:
    """The grep op's work; runs in the worker process (see ``Helper._op_grep``)."""
    flags = re.IGNORECASE if params["case_insensitive"] else 0
    try:
        regex = re.compile(params["pattern"], flags)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        raise RequestError("bad_pattern", f"invalid regular expression: {exc}")
    globs = _expand_braces(params["glob"]) if params["glob"] else None
    max_results: int = params["max_results"]
    root = _tidy(params["path"])
    try:
        st = os.stat(root)
    except FileNotFoundError:
        raise RequestError("not_found", f"no such file or directory: {root}")
    except OSError as exc:
        raise RequestError("io_error", f"cannot search {root}: {exc.strerror}")
    budget = _Budget(GREP_VISIT_MAX)
    if stat.S_ISDIR(st.st_mode):
        files = _walk_files(root, budget)
    else:
        files = iter([(root, os.path.basename(root))])
    matches: list[dict[str, Any]] = []
    counts = {"files_searched": 0, "binary_skipped": 0, "large_skipped": 0, "unreadable": 0}
    output_left = GREP_OUTPUT_MAX
    truncated = False
    for path, rel in files:
        if globs is not None:
            subject = rel if any("/" in g for g in globs) else os.path.basename(rel)
            if not any(fnmatch.fnmatchcase(subject, g) for g in globs):
                continue
        if counts["files_searched"] >= GREP_VISIT_MAX:
            truncated = True
            break
        data = _grep_read(path, counts)
        if data is None:
            continue
        counts["files_searched"] += 1
        shown_path = _text(path)
        for number, line in enumerate(data.decode("utf-8", errors="replace").split("\n"), 1):
            if regex.search(line) is None:
                continue
            text = line.rstrip("\r")[:GREP_LINE_MAX]
            output_left -= len(text) + len(shown_path)
            if len(matches) >= max_results or output_left < 0:
                truncated = True
                break
            matches.append({"path": shown_path, "line": number, "text": text})
        if truncated:
            break
    answer: dict[str, Any] = {"matches": matches, "truncated": truncated or budget.exhausted}
    answer.update(counts)
    return answer


def _grep_read(path: str, counts: dict[str, int]) -> bytes | None:
    """A text file's bytes, or None (counted) when unreadable, too large or binary."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        counts["unreadable"] += 1
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        if st.st_size > GREP_FILE_MAX:
            counts["large_skipped"] += 1
            return None
        data = _read_all(fd, GREP_FILE_MAX + 1)
    except OSError:
        counts["unreadable"] += 1
        return None
    finally:
        os.close(fd)
    if len(data) > GREP_FILE_MAX:
        counts["large_skipped"] += 1
        return None
    if b"\0" in data[:BINARY_SNIFF]:
        counts["binary_skipped"] += 1
        return None
    return data


def _grep_worker_main() -> int:
    """``helper.py --grep-worker``: parameters as JSON on stdin, the answer on stdout."""
    try:
        answer = _grep(json.loads(sys.stdin.buffer.read()))
    except RequestError as exc:
        answer = {"error": {"code": exc.code, "message": exc.message}}
    except MemoryError:
        answer = {"error": {"code": "too_large", "message": "grep ran out of memory"}}
    except Exception as exc:  # noqa: BLE001 -- reported to the helper, which reports it
        answer = {"error": {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}}
    sys.stdout.buffer.write(_dumps(answer))
    sys.stdout.buffer.flush()
    return 0


def _in_daemon_thread(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """Run ``fn(*args)`` in a new daemon thread; its outcome lands in the returned future.

    Not the loop's default executor: a fetch may wait on the network for
    minutes, and the default executor's few threads must stay free for
    file requests; and a daemon thread does not hold up the helper's exit.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def deliver(ok: bool, value: Any) -> None:
        if future.done():
            return  # the request was cancelled meanwhile
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def run() -> None:
        try:
            value, ok = fn(*args), True
        except BaseException as exc:  # noqa: BLE001 -- handed to the awaiting task
            value, ok = exc, False
        try:
            loop.call_soon_threadsafe(deliver, ok, value)
        except RuntimeError:
            pass  # the loop is closed: the helper is exiting

    threading.Thread(target=run, name="helper-fetch", daemon=True).start()
    return future


class _FetchTarget:
    """One URL taken apart for sending through the proxy."""

    def __init__(self, url: str) -> None:
        import urllib.parse  # see _fetch about imports

        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise RequestError("bad_request", f"invalid URL {url[:200]!r}: {exc}")
        self.scheme = parts.scheme.lower()
        if self.scheme not in ("http", "https"):
            raise RequestError(
                "bad_request",
                f"only http and https URLs can be fetched, not {url[:200]!r}",
            )
        if parts.username is not None or parts.password is not None:
            raise RequestError(
                "bad_request", "URLs with credentials are not fetched; drop the user:password@"
            )
        host = parts.hostname or ""
        if not host:
            raise RequestError("bad_request", f"URL {url[:200]!r} names no host")
        try:
            host = host.encode("idna").decode("ascii")
        except (UnicodeError, ValueError):
            raise RequestError("bad_request", f"invalid host name in {url[:200]!r}")
        self.host = host
        self.port = port or (443 if self.scheme == "https" else 80)
        bracketed = f"[{host}]" if ":" in host else host
        self.authority = f"{bracketed}:{self.port}"
        netloc = bracketed if port is None else self.authority
        path = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=~-._")
        if parts.query:
            path += "?" + urllib.parse.quote(parts.query, safe="/%:@!$&'()*+,;=~-._?")
        self.path = path
        self.absolute = f"{self.scheme}://{netloc}{path}"


def _fetch(
    url: str, max_bytes: int, timeout_s: float, headers: dict[str, str], proxy_port: int
) -> dict[str, Any]:
    """The fetch op's work, blocking (runs in a thread)."""
    # Imported here: together they cost milliseconds of every sandbox's start-up.
    import http.client
    import ssl
    import urllib.parse

    deadline = time.monotonic() + timeout_s
    send = {"User-Agent": "devsilo-fetch/1", "Accept-Encoding": "identity", "Accept": "*/*"}
    send.update(headers)
    redirects: list[str] = []
    current = url
    try:
        while True:
            target = _FetchTarget(current)
            response, close = _fetch_once(target, send, proxy_port, deadline)
            try:
                location = response.getheader("Location")
                if response.status in _REDIRECT_STATUSES and location and close is not None:
                    if len(redirects) >= MAX_REDIRECTS:
                        raise RequestError(
                            "too_many_redirects",
                            f"more than {MAX_REDIRECTS} redirects, the last to {current[:500]}",
                        )
                    _read_body(response, 64 * 1024, deadline)
                    current = urllib.parse.urljoin(current, location.strip())
                    redirects.append(current)
                    continue
                body, truncated = _read_body(response, max_bytes, deadline)
                return {
                    "url": current,
                    "status": response.status,
                    "reason": response.reason,
                    "headers": [
                        [name, value[:8192]]
                        for name, value in response.getheaders()[:FETCH_HEADERS_MAX]
                    ],
                    "content": base64.b64encode(body).decode("ascii"),
                    "truncated": truncated,
                    "redirects": redirects,
                }
            finally:
                response.close()
                if close is not None:
                    close()
    except RequestError:
        raise
    except (_SOCKET_TIMEOUT, TimeoutError):
        raise RequestError("timeout", f"fetching {current[:500]} timed out after {timeout_s:g} s")
    except ssl.SSLCertVerificationError as exc:
        raise RequestError("tls_error", f"certificate of {current[:500]} not trusted: {exc}")
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise RequestError("fetch_failed", f"fetching {current[:500]} failed: {exc}")


def _fetch_once(
    target: _FetchTarget, headers: dict[str, str], proxy_port: int, deadline: float
) -> tuple[Any, Callable[[], None] | None]:
    """Send one GET through the proxy; the response and how to close its connection.

    The closer is None when the response is the proxy's own refusal of a
    CONNECT, which is then the final answer (never followed as a redirect).
    """
    import http.client
    import ssl

    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _SOCKET_TIMEOUT("out of time")
    if target.scheme == "http":
        conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=remaining)
        conn.request("GET", target.absolute, headers=headers)
        return conn.getresponse(), conn.close
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=remaining)
    try:
        head = f"CONNECT {target.authority} HTTP/1.1\r\nHost: {target.authority}\r\n\r\n"
        sock.sendall(head.encode("ascii"))
        reply = http.client.HTTPResponse(sock, method="CONNECT")
        reply.begin()
        if reply.status != 200:
            sock.close()  # the response keeps its own reference to the data
            return reply, None
        context = ssl.create_default_context()
        if os.path.exists(CA_CERT):
            context.load_verify_locations(CA_CERT)
        conn = _tunnelled_https(sock, target.host, target.port, context, remaining)
        conn.request("GET", target.path, headers=headers)
        return conn.getresponse(), conn.close
    except BaseException:
        sock.close()
        raise


def _tunnelled_https(
    sock: socket.socket, host: str, port: int, context: Any, timeout: float
) -> Any:
    """An HTTPSConnection that speaks TLS over an already open CONNECT tunnel."""
    import http.client

    class Tunnelled(http.client.HTTPSConnection):
        def connect(self) -> None:
            self.sock = context.wrap_socket(sock, server_hostname=host)

    return Tunnelled(host, port, timeout=timeout, context=context)


def _read_body(response: Any, most: int, deadline: float) -> tuple[bytes, bool]:
    """Up to ``most`` bytes of the body, and whether there was more."""
    chunks = []
    got = 0
    while got <= most:
        if time.monotonic() > deadline:
            raise _SOCKET_TIMEOUT("out of time")
        piece = response.read(min(_CHUNK, most + 1 - got))
        if not piece:
            break
        chunks.append(piece)
        got += len(piece)
    data = b"".join(chunks)
    return data[:most], got > most


# -- the sandbox's network ----------------------------------------------------


def only_loopback() -> bool:
    """Whether this network namespace has no interface but loopback.

    The helper runs its proxy and resolver only then: on a host with real
    interfaces (the helper run outside a sandbox, as in tests) they would be
    a hole in that host's loopback, not a sandbox's only way out.
    """
    try:
        return all(name == "lo" for _, name in _socket.if_nameindex())
    except OSError:
        return False


async def splice(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
    counts: list[int] | None = None,
) -> None:
    """Copy a→b and b→a until both directions ended, then close both.

    Backpressure: each direction reads 64 KiB at most and waits for the other
    side to drain before reading more, so a slow reader slows the writer
    instead of filling memory. An end of stream is passed on as a half-close;
    an error in either direction ends both. ``counts[0]`` and ``counts[1]``
    grow by the bytes copied a→b and b→a, as they go.
    """
    tally = counts if counts is not None else [0, 0]

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, index: int) -> None:
        while True:
            data = await src.read(_CHUNK)
            if not data:
                break
            dst.write(data)
            tally[index] += len(data)
            await dst.drain()
        if dst.can_write_eof() and not dst.is_closing():
            dst.write_eof()

    tasks = [
        asyncio.ensure_future(pump(a_reader, b_writer, 0)),
        asyncio.ensure_future(pump(b_reader, a_writer, 1)),
    ]
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(not t.cancelled() and t.exception() is not None for t in done):
                break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in (a_writer, b_writer):
            writer.close()


async def read_head(
    reader: asyncio.StreamReader, limit: int = HEAD_MAX, timeout: float = 5.0
) -> bytes:
    """What the client sends up to its request head's blank line (bounded, timed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    buf = b""
    while b"\r\n\r\n" not in buf and b"\n\n" not in buf and len(buf) < limit:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            chunk = await asyncio.wait_for(reader.read(4096), remaining)
        except (_ASYNC_TIMEOUT, OSError):
            break
        if not chunk:
            break
        buf += chunk
    return buf


def blocked_response(reason: str) -> bytes:
    """An HTTP 502 whose one-line body is ``blocked: <reason>``."""
    body = f"blocked: {reason}\n".encode()
    header = reason.encode("ascii", errors="replace").decode("ascii")
    return (
        "HTTP/1.1 502 Bad Gateway\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{BLOCKED_HEADER}: {header}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii") + body


async def answer_blocked(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reason: str
) -> None:
    """Refuse one proxy client: read its request head, answer 502, close."""
    try:
        await read_head(reader)
        writer.write(blocked_response(reason))
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        # Swallow what else the client sends (a body) until it closes: closing
        # with unread data would reset the connection before it read the 502.
        await asyncio.wait_for(_discard(reader, 1024 * 1024), 2.0)
    except (OSError, _ASYNC_TIMEOUT):
        pass  # the client is gone or dawdles; it had its answer
    finally:
        writer.close()


async def _discard(reader: asyncio.StreamReader, most: int) -> None:
    while most > 0:
        data = await reader.read(_CHUNK)
        if not data:
            return
        most -= len(data)


def _dns_question_end(message: bytes) -> int | None:
    """Where the first question of a DNS message ends, or None if it is malformed."""
    pos = 12
    for _ in range(128):
        if pos >= len(message):
            return None
        length = message[pos]
        if length == 0:
            pos += 1 + 4  # the root label, then type and class
            return pos if pos <= len(message) else None
        if length & 0xC0:
            return None  # no compression in a query's question
        pos += 1 + length
    return None


def dns_error_reply(query: bytes, rcode: int) -> bytes | None:
    """An answer to ``query`` with only ``rcode`` (REFUSED, SERVFAIL); None for a non-query."""
    if len(query) < 12:
        return None
    flags, qdcount = struct.unpack(">HH", query[2:6])
    if flags & 0x8000:
        return None  # a response, not a query
    question = b""
    end = _dns_question_end(query) if qdcount == 1 else None
    if end is not None:
        question = query[12:end]
    # QR set; opcode and RD copied; RA clear.
    out_flags = 0x8000 | (flags & 0x7800) | (flags & 0x0100) | (rcode & 0xF)
    return query[:2] + struct.pack(">HHHHH", out_flags, 1 if question else 0, 0, 0, 0) + question


async def answer_dns_frames(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    rcode: int,
    *,
    most: int = 64,
    idle: float = 10.0,
) -> None:
    """Answer length-prefixed DNS queries with ``rcode`` until EOF (bounded), then close."""
    try:
        for _ in range(most):
            size = struct.unpack(">H", await asyncio.wait_for(reader.readexactly(2), idle))[0]
            query = await asyncio.wait_for(reader.readexactly(size), idle)
            reply = dns_error_reply(query, rcode)
            if reply is None:
                break
            writer.write(struct.pack(">H", len(reply)) + reply)
            await writer.drain()
    except (asyncio.IncompleteReadError, _ASYNC_TIMEOUT, OSError):
        pass  # the client closed or went quiet
    finally:
        writer.close()


def _fit_udp(query: bytes, answer: bytes) -> bytes:
    """``answer`` cut down to what a UDP client accepts: header and question, TC set.

    512 bytes without EDNS (no additional record in the query), else 1232,
    the size the DNS flag day settled on; the client then asks over TCP.
    """
    limit = _DNS_UDP_EDNS if query[10:12] != b"\0\0" else _DNS_UDP_PLAIN
    if len(answer) <= limit:
        return answer
    flags, qdcount = struct.unpack(">HH", answer[2:6])
    end = _dns_question_end(answer) if qdcount == 1 else None
    question = answer[12:end] if end is not None else b""
    header = struct.pack(">HHHHH", flags | 0x0200, 1 if question else 0, 0, 0, 0)
    return answer[:2] + header + question


class _DnsUpstream:
    """One framed DNS connection through the relay, shared by every UDP query.

    Each query goes out under a fresh 16-bit id (clients pick theirs
    independently, so theirs may collide) and its answer comes back under
    the client's own.
    """

    def __init__(self, relay_path: str) -> None:
        self._relay_path = relay_path
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Future[None] | None = None
        self._connecting = asyncio.Lock()
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._next_id = int.from_bytes(os.urandom(2), "big")

    async def resolve(self, query: bytes) -> bytes | None:
        """The answer to ``query``, REFUSED without egress, SERVFAIL when that fails."""
        if len(self._pending) >= DNS_MAX_PENDING:
            return dns_error_reply(query, DNS_RCODE_SERVFAIL)
        try:
            writer = await self._connect()
        except FileNotFoundError:
            return dns_error_reply(query, DNS_RCODE_REFUSED)
        except (OSError, _ASYNC_TIMEOUT):
            return dns_error_reply(query, DNS_RCODE_SERVFAIL)
        while self._next_id in self._pending:
            self._next_id = (self._next_id + 1) & 0xFFFF
        our_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFF
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[our_id] = waiter
        try:
            writer.write(struct.pack(">HH", len(query), our_id) + query[2:])
            await writer.drain()
            answer = await asyncio.wait_for(waiter, DNS_TIMEOUT_S)
        except (OSError, _ASYNC_TIMEOUT):
            return dns_error_reply(query, DNS_RCODE_SERVFAIL)
        finally:
            self._pending.pop(our_id, None)
        return query[:2] + answer[2:]

    async def _connect(self) -> asyncio.StreamWriter:
        async with self._connecting:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self._relay_path), RELAY_CONNECT_TIMEOUT_S
            )
            writer.write(STREAM_DNS)
            self._writer = writer
            self._reader_task = asyncio.ensure_future(self._read_answers(reader, writer))
            return writer

    async def _read_answers(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                size = struct.unpack(">H", await reader.readexactly(2))[0]
                answer = await reader.readexactly(size)
                if len(answer) < 12:
                    continue
                waiter = self._pending.get(struct.unpack(">H", answer[:2])[0])
                if waiter is not None and not waiter.done():
                    waiter.set_result(answer)
        except (asyncio.IncompleteReadError, OSError):
            pass  # the relay went away; the next query reconnects
        finally:
            writer.close()
            if self._writer is writer:
                self._writer = None
            for waiter in self._pending.values():
                if not waiter.done():
                    waiter.set_exception(ConnectionResetError("the relay closed"))

    def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()


if TYPE_CHECKING:
    _DatagramProtocol = asyncio.DatagramProtocol
else:
    _DatagramProtocol = object  # asyncio is not imported yet when this runs


class _DnsUdp(_DatagramProtocol):
    """The UDP side of the resolver (an ``asyncio.DatagramProtocol``)."""

    def __init__(self, upstream: _DnsUpstream, spawn: Callable[[Awaitable[None]], None]) -> None:
        self._upstream = upstream
        self._spawn = spawn
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) < 12 or data[2] & 0x80:
            return  # not a query: nothing to answer
        self._spawn(self._answer(data, addr))

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error for an answer we sent: the client is gone

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def pause_writing(self) -> None:
        pass  # answers are small and few; a full buffer drops them, as UDP may

    def resume_writing(self) -> None:
        """Nothing was held back (see ``pause_writing``), so nothing to resume."""

    async def _answer(self, query: bytes, addr: tuple[str, int]) -> None:
        answer = await self._upstream.resolve(query)
        transport = self._transport
        if answer is not None and transport is not None and not transport.is_closing():
            transport.sendto(_fit_udp(query, answer), addr)


class Network:
    """The helper's proxy and resolver listeners (see the module docstring)."""

    def __init__(self, relay_path: str = RELAY_SOCKET) -> None:
        self.relay_path = relay_path
        self.proxy_port: int | None = None
        """The port the proxy listens on, None if it could not."""
        self.dns_ports: list[int] = []
        """The ports the resolver answers on (UDP and TCP)."""
        self.errors: list[str] = []
        """Why a listener could not start (port 53 in most sandboxes)."""
        self._servers: list[asyncio.AbstractServer] = []
        self._udp: list[asyncio.BaseTransport] = []
        self._upstream = _DnsUpstream(relay_path)
        self._active = 0
        self._tasks: set[asyncio.Future[None]] = set()

    async def start(
        self,
        proxy_port: int = PROXY_PORT,
        dns_ports: tuple[int, ...] = (DNS_PORT, DNS_STANDARD_PORT),
    ) -> None:
        """Bind what can be bound; failures land in ``errors``, never raise."""
        try:
            server = await asyncio.start_server(self._proxy_client, "127.0.0.1", proxy_port)
            self._servers.append(server)
            self.proxy_port = proxy_port
        except OSError as exc:
            self.errors.append(f"proxy on port {proxy_port}: {exc.strerror}")
        loop = asyncio.get_running_loop()
        for port in dns_ports:
            try:
                udp, _ = await loop.create_datagram_endpoint(
                    lambda: _DnsUdp(self._upstream, self._spawn), local_addr=("127.0.0.1", port)
                )
            except OSError as exc:
                self.errors.append(f"dns on port {port}: {exc.strerror}")
                continue
            try:
                tcp = await asyncio.start_server(self._dns_client, "127.0.0.1", port)
            except OSError as exc:
                udp.close()
                self.errors.append(f"dns over tcp on port {port}: {exc.strerror}")
                continue
            self._udp.append(udp)
            self._servers.append(tcp)
            self.dns_ports.append(port)

    async def adopt(self, bound: _Listeners) -> None:
        """Serve on the sockets that ``_bind_listeners`` bound already."""
        loop = asyncio.get_running_loop()
        self.errors.extend(bound.errors)
        if bound.proxy is not None:
            server = await asyncio.start_server(self._proxy_client, sock=_adopt(bound.proxy))
            self._servers.append(server)
            self.proxy_port = bound.proxy_port
        for port, udp_sock, tcp_sock in bound.dns:
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _DnsUdp(self._upstream, self._spawn), sock=_adopt(udp_sock)
            )
            tcp = await asyncio.start_server(self._dns_client, sock=_adopt(tcp_sock))
            self._udp.append(udp)
            self._servers.append(tcp)
            self.dns_ports.append(port)

    def close(self) -> None:
        """Stop listening and drop every connection in flight."""
        for server in self._servers:
            server.close()
        for transport in self._udp:
            transport.close()
        for task in self._tasks:
            task.cancel()
        self._upstream.close()

    def _spawn(self, coro: Awaitable[None]) -> None:
        if len(self._tasks) >= DNS_MAX_PENDING:
            return  # a flood: the client will retry
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open_relay(
        self, first_line: bytes
    ) -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None, str]:
        """A new relay connection announced as ``first_line``, or None and why not."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.relay_path), RELAY_CONNECT_TIMEOUT_S
            )
        except FileNotFoundError:
            return None, NO_EGRESS
        except _ASYNC_TIMEOUT:
            return None, "egress relay unavailable: timed out"
        except OSError as exc:
            return None, f"egress relay unavailable: {exc.strerror or exc}"
        writer.write(first_line)
        return (reader, writer), ""

    async def _proxy_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await self._serve(reader, writer, STREAM_TCP)

    async def _dns_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._serve(reader, writer, STREAM_DNS)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, kind: bytes
    ) -> None:
        if self._active >= MAX_PROXY_CONNECTIONS:
            writer.close()
            return
        self._active += 1
        try:
            relay, why = await self._open_relay(kind)
            if relay is not None:
                await splice(reader, writer, *relay)
            elif kind == STREAM_TCP:
                await answer_blocked(reader, writer, why)
            else:
                rcode = DNS_RCODE_REFUSED if why == NO_EGRESS else DNS_RCODE_SERVFAIL
                await answer_dns_frames(reader, writer, rcode)
        except (OSError, asyncio.IncompleteReadError):
            pass  # either end went away
        finally:
            self._active -= 1
            writer.close()


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


def _adopt(sock: Any) -> socket.socket:
    """A ``socket.socket`` for a ``_socket.socket``, as asyncio wants one."""
    return socket.socket(fileno=sock.detach())


def _load_rest(event_loop: bool = True) -> None:
    """Import what the core started without (see the imports at the top).

    ``event_loop``: asyncio too, and what the ops on it need (the grep
    worker needs only json, re and fnmatch).
    """
    g = globals()
    if event_loop:
        # The core's exec imports subprocess too (asyncio needs it anyway).
        import asyncio
        import fcntl
        import socket
        import termios
        import threading

        g.update(asyncio=asyncio, fcntl=fcntl, socket=socket, termios=termios, threading=threading)
        # Before Python 3.11 it is not the builtin TimeoutError.
        g["_ASYNC_TIMEOUT"] = asyncio.TimeoutError
    import base64
    import fnmatch
    import json
    import re

    g.update(base64=base64, fnmatch=fnmatch, json=json, re=re)
    g["_HEADER_NAME"] = re.compile(_HEADER_NAME_PATTERN)


_USAGE = "usage: helper.py [-h] [--fd FD] [--workspace WORKSPACE]\n"


def _usage_error(message: str) -> int:
    sys.stderr.write(f"{_USAGE}helper.py: error: {message}\n")
    return 2


def _watch_children_without_threads() -> None:
    """Reap commands through pidfds where the kernel has them, not a thread per child.

    asyncio's default watcher starts a thread for every child *after* the child
    exists: a command that fills the sandbox's pids limit at once (a fork bomb)
    can leave the helper unable to start that thread, and the command's own exec
    then fails with "can't start new thread" instead of being stopped by the
    limit. A pidfd needs no new task. Where ``pidfd_open`` is missing (an older
    gVisor), the default watcher stays.
    """
    if not hasattr(os, "pidfd_open"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # child watchers are deprecated in 3.12
        asyncio.set_child_watcher(asyncio.PidfdChildWatcher())


def main(argv: list[str] | None = None) -> int:
    """Entry point inside the sandbox: ``helper.py --fd N [--workspace DIR]``.

    (``--grep-worker``: the helper starting itself as a grep worker, see
    ``Helper._op_grep``.) Parsed by hand: argparse costs a start-up
    milliseconds.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    fd: int | None = None
    workspace = DEFAULT_WORKSPACE
    grep_worker = False
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in ("-h", "--help"):
            sys.stdout.write(f"{_USAGE}\n{__doc__.splitlines()[0]}\n")
            return 0
        if arg == "--grep-worker":
            grep_worker = True
            continue
        name, eq, value = arg.partition("=")
        if name not in ("--fd", "--workspace"):
            return _usage_error(f"unrecognized arguments: {arg}")
        if not eq:
            if i >= len(args):
                return _usage_error(f"argument {name}: expected one argument")
            value = args[i]
            i += 1
        if name == "--workspace":
            workspace = value
            continue
        try:
            fd = int(value)
        except ValueError:
            return _usage_error(f"argument --fd: invalid int value: {value!r}")
    if grep_worker:
        _load_rest(event_loop=False)
        return _grep_worker_main()
    if fd is None:
        return _usage_error("--fd is required")
    _close_other_fds(fd)
    os.set_inheritable(fd, False)  # commands we run must not get the connection
    os.set_blocking(fd, True)  # the core reads and writes it from threads, blocking
    sock = _socket.socket(fileno=fd)
    kind = sock.type
    sock.detach()
    if kind != _socket.SOCK_STREAM:
        raise SystemExit(f"helper: fd {fd} is not a stream socket")
    _init_json()
    listeners = _bind_listeners() if only_loopback() else None
    try:
        return _Core(fd, workspace, listeners).run()
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    _status = main()
    for _stream in (sys.stdout, sys.stderr):
        try:
            _stream.flush()
        except (OSError, ValueError):
            pass  # nowhere to write to
    # Not sys.exit: threads may still be busy (an import, a file request in
    # asyncio's executor, an exec lingering on its pipes); none has anything
    # left to say, and the interpreter would wait for some of them.
    os._exit(_status)
else:
    _init_json()
    _load_rest()
