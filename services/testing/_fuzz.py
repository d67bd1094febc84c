"""Fuzz targets for devsilo's untrusted inputs, shared by the CI tests and ``bench/fuzz.py``.

Each target is a :class:`FuzzTarget`: ``start()`` brings up what it needs
(real listeners, a real sandbox, real keys), ``one(data)`` feeds one input
and checks the target's invariant, raising :class:`FuzzFailure` when it
breaks, ``stop()`` tears it down. The invariant is always the same promise:
every hostile input gets a clear error of the project's kind (a
:class:`~devsilo.protocol.SiloError` subclass with a message, an HTTP
refusal that says why, a DNS error code) or a closed connection — never
another exception, never a hang, never a connection or a file where there
should be none — and the service answers a good input afterwards.

Hypothesis tests (``tests/test_fuzz.py``) call ``one`` with inputs they
build; atheris (coverage guided) calls it with mutated bytes in a subprocess,
started by :func:`run_target` (``tests/test_fuzz_atheris.py``,
``bench/fuzz.py``), which loads this file by its path and imports each
target's ``modules`` under atheris's instrumentation. It returns the run's
figures (executions, crashes, corpus size). An input that breaks an
invariant is saved in the crash directory (named by its SHA-1, with the
traceback beside it) and fuzzing goes on, so that a long run counts every
distinct crash instead of stopping at the first.

Coverage comes from Python code only: where a target's work is done in C or
Rust (``json``, pydantic-core) or in another process (the helper inside its
sandbox), atheris is guided by the Python around it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import socket
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

T = TypeVar("T")

HANG_S = 5.0
"""How long one input may take before it counts as a hang."""


class FuzzFailure(AssertionError):
    """An input broke a target's invariant (a crash, a hang, an unclear error, a forbidden effect)."""


class FuzzTarget:
    """One fuzz target: start it, feed it inputs with ``one``, stop it."""

    name: ClassVar[str] = ""
    instrument: ClassVar[tuple[str, ...]] = ("devsilo",)
    """Top-level packages atheris instruments for coverage (what is imported inside its hook)."""
    modules: ClassVar[tuple[str, ...]] = ()
    """The modules the target exercises, imported under the hook so that their code is instrumented."""
    plain: ClassVar[tuple[str, ...]] = ()
    """Modules imported before, uninstrumented (dependencies whose coverage does not guide this target)."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._loop_errors: list[str] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Bring the target up (listeners, keys, sandboxes)."""
        self._tmp = tempfile.TemporaryDirectory(prefix=f"silo-fuzz-{self.name}-")
        self.tmp = Path(self._tmp.name)
        if self._needs_loop():
            self.loop = asyncio.new_event_loop()
            self.loop.set_exception_handler(self._on_loop_error)
            self.run(self._astart(), timeout=60.0)

    def stop(self) -> None:
        """Tear the target down."""
        if self.loop is not None:
            with contextlib.suppress(Exception):
                self.run(self._astop(), timeout=30.0)
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()
            self.loop = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def seeds(self) -> list[bytes]:
        """Good and nearly good inputs to start the corpus from."""
        return []

    def one(self, data: bytes) -> None:
        """Feed one input; FuzzFailure when an invariant breaks."""
        raise NotImplementedError

    def healthy(self) -> None:
        """FuzzFailure unless the target still serves a good input (checked after fuzzing)."""

    # -- async plumbing ---------------------------------------------------------------

    def _needs_loop(self) -> bool:
        return type(self)._astart is not FuzzTarget._astart

    async def _astart(self) -> None:
        return None

    async def _astop(self) -> None:
        return None

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        self._loop_errors.append(f"{context.get('message')}: {exc!r}")

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = HANG_S) -> T:
        """Run ``coro`` on the target's loop; FuzzFailure when it takes longer than ``timeout``."""
        assert self.loop is not None
        try:
            result = self.loop.run_until_complete(asyncio.wait_for(coro, timeout))
        except TimeoutError:
            raise FuzzFailure(f"hang: no outcome within {timeout:g} s") from None
        finally:
            errors, self._loop_errors = self._loop_errors, []  # this input's, whatever else it raised
        if errors:
            raise FuzzFailure("unhandled exception in the event loop: " + "; ".join(errors)[:2000])
        return result


def _take(data: bytes, n: int) -> tuple[bytes, bytes]:
    return data[:n], data[n:]


def _json_or_none(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


# -- a trivial target: the baseline every figure is compared with -------------------------


class Baseline(FuzzTarget):
    """Hashes its input: what the fuzzing machinery itself costs per execution."""

    name = "baseline"

    def seeds(self) -> list[bytes]:
        return [b"x"]

    def one(self, data: bytes) -> None:
        if hashlib.sha1(data).digest() == b"":
            raise FuzzFailure("impossible")


# -- the signed envelope ------------------------------------------------------------------


class EnvelopeTarget(FuzzTarget):
    """``Verifier.open`` on raw bytes, on re-signed mutated JSON, and on bit-flipped good envelopes.

    Invariant: a verified :class:`Envelope` of a known type for the subject it
    was received on, or a ``MessageRejected`` subclass with a message.
    """

    name = "envelope"
    modules = ("devsilo.protocol",)
    plain = ("nacl.signing", "pydantic")
    SUBJECT = "silo.session.s1.input"

    def start(self) -> None:
        super().start()
        from devsilo.protocol import (
            Role,
            ServiceIdentity,
            SessionInput,
            Signer,
            TrustRoster,
            Verifier,
        )
        from nacl.signing import SigningKey

        self.gateway = ServiceIdentity("gateway", Role.GATEWAY, SigningKey.generate())
        harness = ServiceIdentity("harness", Role.HARNESS, SigningKey.generate())
        self.roster = TrustRoster([self.gateway.roster_entry(), harness.roster_entry()])
        sealed_at = time.time()
        # "Now" stays the moment the good envelope was sealed: a long run checks freshness as at its start.
        self.verifier_of = lambda: Verifier(self.roster, clock=lambda: sealed_at + 1)
        self.good, _ = Signer(self.gateway, clock=lambda: sealed_at).seal(
            SessionInput(kind="prompt", text="hello"), self.SUBJECT, sid="s1")

    def seeds(self) -> list[bytes]:
        payload = self.good[64:]
        return [b"\0" + self.good, b"\1" + payload, b"\2\0\0\x41", b"\1{}", b"\1[]"]

    def one(self, data: bytes) -> None:
        from devsilo.protocol import Envelope, MessageRejected

        mode, rest = _take(data, 1)
        if mode == b"\1":
            wire = bytes(self.gateway.signing_key.sign(rest))  # a true signature over fuzzed JSON
        elif mode == b"\2" and len(rest) >= 3:
            where = int.from_bytes(rest[:2], "big") % len(self.good)
            wire = self.good[:where] + bytes([self.good[where] ^ (rest[2] or 1)]) + self.good[where + 1:]
        else:
            wire = rest
        verifier = self.verifier_of()
        try:
            env = verifier.open(wire, self.SUBJECT)
        except MessageRejected as exc:
            if not str(exc) or not exc.detail:
                raise FuzzFailure(f"{type(exc).__name__} without a message") from None
            return
        if not isinstance(env, Envelope) or env.header.subject != self.SUBJECT:
            raise FuzzFailure(f"opened an envelope for another subject: {env!r}"[:500])
        if mode != b"\1" and wire != self.good:
            raise FuzzFailure("a changed envelope verified")
        try:
            verifier.open(wire, self.SUBJECT)
        except MessageRejected as exc:
            if exc.reason != "replayed":
                raise FuzzFailure(f"second delivery rejected as {exc.reason}, not replayed") from None
        else:
            raise FuzzFailure("a replayed envelope was accepted")

    def healthy(self) -> None:
        env = self.verifier_of().open(self.good, self.SUBJECT)
        if env.header.sender != "gateway":
            raise FuzzFailure("the good envelope no longer opens")


# -- the client protocol ------------------------------------------------------------------


def gateway_parse_error(exc: Any) -> str:
    """The message the gateway answers an invalid frame with (as ``_server.ClientConnection._parse``)."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"invalid frame at {where or 'top'}: {err.get('msg')}"


class ClientFramesTarget(FuzzTarget):
    """Client requests and gateway frames parsed from raw bytes, as the gateway and the CLI parse them.

    Invariant: a frame model, or a ``ValidationError`` the gateway turns into
    a clear ``error`` frame; a parsed frame survives its own round trip.
    """

    name = "client_frames"
    modules = ("devsilo.protocol",)
    plain = ("pydantic",)

    def seeds(self) -> list[bytes]:
        return [b'{"type":"ping"}', b'{"type":"list_sessions"}',
                b'{"type":"attach","session_id":"abc","from_seq":0}',
                b'{"type":"upload_file","session_id":"abc","upload_id":"u1","path":"a/b","size":1,"sha256":"00"}',
                b'{"type":"prompt","session_id":"abc","text":"hi"}',
                b'{"type":"authenticate","method":"token","token":"t"}',
                b'{"type":"error","code":"x","message":"y"}']

    def one(self, data: bytes) -> None:
        from devsilo.protocol.client import CLIENT_REQUEST, GATEWAY_FRAME, ErrorFrame
        from pydantic import ValidationError

        for adapter in (CLIENT_REQUEST, GATEWAY_FRAME):
            try:
                frame = adapter.validate_json(data)
            except ValidationError as exc:
                message = gateway_parse_error(exc)
                ErrorFrame(code="bad_request", message=message).model_dump_json()
                continue
            again = adapter.validate_json(frame.model_dump_json())
            if again != frame:
                raise FuzzFailure(f"{frame.type} does not survive its round trip: {frame!r} != {again!r}"[:800])


# -- the helper protocol ------------------------------------------------------------------


class HelperJsonTarget(FuzzTarget):
    """The helper's request-line parser (C scanner fast path) against ``json.loads``: same answer, same error."""

    name = "helper_json"
    modules = ("devsilo.executor.helper.helper",)
    plain = ()

    def seeds(self) -> list[bytes]:
        return [b'{"id": 1, "op": "exec", "command": "ls"}', b'{"id":2,"x":[1.5e3,NaN,"\\ud800"]}',
                b'{"id": 1,}', b"{\xff}", b'{"a": 1} x']

    def one(self, data: bytes) -> None:
        from devsilo.executor.helper.helper import _loads

        try:
            expected: Any = ("ok", json.loads(data))
        except Exception as exc:  # noqa: BLE001 -- whatever json raises, the helper must raise too
            expected = ("error", type(exc), str(exc))
        try:
            got: Any = ("ok", _loads(data))
        except Exception as exc:  # noqa: BLE001
            got = ("error", type(exc), str(exc))
        if repr(got) != repr(expected):
            raise FuzzFailure(f"helper parses {data[:200]!r} as {got!r}, json as {expected!r}"[:1000])


_HELPER_OPS = ("hello", "read", "list", "glob", "grep", "fetch", "exec", "edit", "write", "cancel", "shell")
_HELPER_TEMPLATES: dict[str, dict[str, Any]] = {
    "hello": {"ok": True, "pid": 2, "uid": 1000, "gid": 1000, "cwd": "/workspace", "workspace": "/workspace",
              "python": "3.11", "proxy_port": 3128, "dns_ports": [3129], "egress_relay": False},
    "read": {"ok": True, "path": "/workspace/a", "offset": 0, "size": 5, "content": "aGVsbG8=", "eof": True},
    "list": {"ok": True, "path": "/workspace", "total": 1, "truncated": False,
             "entries": [{"name": "a", "type": "file", "size": 1, "mode": 420, "mtime": 1.5, "target": None}]},
    "glob": {"ok": True, "base": "/workspace", "matches": ["/workspace/a"], "truncated": False},
    "grep": {"ok": True, "matches": [{"path": "/workspace/a", "line": 1, "text": "x"}], "truncated": False,
             "files_searched": 1, "binary_skipped": 0, "large_skipped": 0, "unreadable": 0},
    "fetch": {"ok": True, "url": "http://a/", "status": 200, "reason": "OK", "headers": [["a", "b"]],
              "content": "", "truncated": False, "redirects": []},
    "exec": {"ok": True, "exit_code": 0, "stdout": "", "stderr": "", "timed_out": False, "cancelled": False,
             "stdout_truncated": False, "stderr_truncated": False, "duration_ms": 1, "signal": None},
    "edit": {"ok": True, "path": "/workspace/a", "replacements": 1, "size": 3, "first_line": 1},
    "write": {"ok": True, "path": "/workspace/a", "written": 1, "size": 1},
    "cancel": {"ok": True, "found": False},
    "shell": {"ok": True, "exit_code": 0, "signal": None},
}


class HelperAnswersTarget(FuzzTarget):
    """A hostile helper: the executor's :class:`HelperClient` reads whatever the sandbox answers.

    Input: one byte choosing the request, one choosing how the answer is
    built (raw bytes; a JSON value under the request's id; a good answer
    with fuzzed fields over it), then the bytes. The fake helper end sends
    the answer and closes. Invariant: the call returns its result type, or
    fails with ``HelperRequestError`` (a well-formed refusal) or
    ``SandboxError`` (the connection is then closed) — nothing else, never a hang.
    """

    name = "helper_answers"
    modules = ("devsilo.executor._helper_client",)
    plain = ("devsilo.protocol",)

    def seeds(self) -> list[bytes]:
        out = []
        for i, op in enumerate(_HELPER_OPS):
            out.append(bytes([i, 2]) + b"{}")
            out.append(bytes([i, 1]) + json.dumps({"ok": False, "error": {"code": "x", "message": "y"}}).encode())
            out.append(bytes([i, 0]) + b"garbage")
            out.append(bytes([i, 2]) + json.dumps(_HELPER_TEMPLATES[op]).encode())
        out.append(bytes([6, 3]) + b'{"stream":"stdout","data":"hi"}')
        out.append(bytes([10, 3]) + b'{"stream":"pty","data":"aGk="}')
        return out

    async def _astart(self) -> None:
        return None

    def one(self, data: bytes) -> None:
        self.run(self._one(data))

    async def _one(self, data: bytes) -> None:
        from devsilo.executor._helper_client import HelperClient, HelperRequestError
        from devsilo.protocol import SandboxError

        head, body = _take(data, 2)
        if len(head) < 2:
            return
        op = _HELPER_OPS[head[0] % len(_HELPER_OPS)]
        mode = head[1] % 4
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        client = HelperClient(ours, request_timeout=HANG_S)
        await client.start()
        loop = asyncio.get_running_loop()
        got: list[bytes] = []

        def shell_out(stream: str, raw: bytes) -> None:
            got.append(raw)

        calls: dict[str, Callable[[], Coroutine[Any, Any, Any]]] = {
            "hello": client.hello, "read": lambda: client.read("a"), "list": lambda: client.list_dir("."),
            "glob": lambda: client.glob("*"), "grep": lambda: client.grep("x"),
            "fetch": lambda: client.fetch("http://a/"),
            "exec": lambda: client.exec("true", on_output=lambda s, t: None),
            "edit": lambda: client.edit("a", "x", "y"), "write": lambda: client.write("a", "x"),
            "cancel": lambda: client.cancel(1), "shell": lambda: self._shell(client, shell_out),
        }
        task = asyncio.ensure_future(calls[op]())
        try:
            line = b""
            while not line.endswith(b"\n"):
                chunk = await loop.sock_recv(theirs, 65536)
                if not chunk:
                    break
                line += chunk
            request = json.loads(line.splitlines()[0])
            answer = self._answer(op, mode, request["id"], body)
            with contextlib.suppress(OSError):
                await loop.sock_sendall(theirs, answer)
            theirs.close()
            try:
                result = await task
            except HelperRequestError as exc:
                if not exc.code or not isinstance(exc.message, str) or not str(exc):
                    raise FuzzFailure(f"unclear refusal {exc!r}") from None
                return
            except SandboxError as exc:
                if "sandbox helper" not in str(exc) or not client.closed:
                    raise FuzzFailure(f"unclear or non-fatal SandboxError {exc!r}") from None
                return
            except FuzzFailure:
                raise
            except Exception as exc:  # noqa: BLE001 -- the invariant: nothing but the two above
                raise FuzzFailure(f"{op} raised {type(exc).__name__}: {exc}\n{traceback.format_exc()}"[:3000]) from None
            if result is None and op != "shell":
                raise FuzzFailure(f"{op} returned nothing")
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            with contextlib.suppress(OSError):
                theirs.close()
            await client.close()

    @staticmethod
    async def _shell(client: Any, on_output: Callable[[str, bytes], None]) -> Any:
        handle = await client.start_shell(None, tty=True, on_output=on_output)
        return await handle.result()

    @staticmethod
    def _answer(op: str, mode: int, request_id: int, body: bytes) -> bytes:
        if mode == 0:
            return body + b"\n"
        value = _json_or_none(body)
        if mode == 1:
            msg: Any = value if isinstance(value, dict) else {"ok": True, "value": value}
            msg = {**msg, "id": request_id}
        elif mode == 2:
            msg = {**_HELPER_TEMPLATES[op], **(value if isinstance(value, dict) else {}), "id": request_id}
        else:  # a streamed chunk first, then the good answer
            chunk = {**(value if isinstance(value, dict) else {"stream": "stdout", "data": str(value)}),
                     "id": request_id}
            return (json.dumps(chunk).encode() + b"\n"
                    + json.dumps({**_HELPER_TEMPLATES[op], "id": request_id}).encode() + b"\n")
        try:
            return json.dumps(msg).encode() + b"\n"
        except ValueError:
            return body + b"\n"


class HelperRequestsTarget(FuzzTarget):
    """The in-sandbox helper (in a real bubblewrap sandbox) answering fuzzed requests.

    Input: a byte choosing the op, then a JSON object of parameters. Invariant:
    an answer, or a refusal with a code other than ``internal`` (which means
    the helper failed on the input); the connection stays up.
    """

    name = "helper_requests"
    modules = ("devsilo.executor._helper_client",)
    plain = ("devsilo.protocol",)
    OPS = ("read", "write", "edit", "list", "glob", "grep", "cancel", "hello", "shell_resize",
           "shell_signal", "shell_input", "nonsense")

    def seeds(self) -> list[bytes]:
        return [bytes([0]) + b'{"path":"f.txt"}', bytes([1]) + b'{"path":"n/new.txt","content":"x"}',
                bytes([2]) + b'{"path":"f.txt","old":"hello","new":"bye"}', bytes([3]) + b'{"path":"."}',
                bytes([4]) + b'{"pattern":"**/*"}', bytes([5]) + b'{"pattern":"h.l+"}',
                bytes([1]) + b'{"path":"../../x","content":"eA==","encoding":"base64"}',
                bytes([3]) + b'{"path":"link"}', bytes([0]) + b'{"path":"/etc/passwd","limit":10}']

    async def _astart(self) -> None:
        from devsilo.executor._sandbox import BwrapSandbox, prepare_workspace_ownership
        from devsilo.executor._spec import SandboxSpec

        as_root = os.geteuid() == 0
        uid = 64123 if as_root else os.getuid()
        gid = 64123 if as_root else os.getgid()
        self.workspace = self.tmp / "ws"
        self.outside = self.tmp / "outside"
        self.outside.mkdir()
        (self.workspace / "d").mkdir(parents=True)
        (self.workspace / "f.txt").write_text("hello world\n")
        (self.workspace / "link").symlink_to(self.outside)
        if as_root:
            prepare_workspace_ownership(self.workspace, uid, gid)
        spec = SandboxSpec(session_id="fuzz", workspace=self.workspace, sandbox_uid=uid, sandbox_gid=gid,
                           scratch_root=self.tmp / "scratch", env={})
        self.sandbox = BwrapSandbox(spec)
        await self.sandbox.start()

    async def _astop(self) -> None:
        await self.sandbox.close()

    def one(self, data: bytes) -> None:
        self.run(self._one(data))

    async def _one(self, data: bytes) -> None:
        from devsilo.executor._helper_client import HelperRequestError

        if not data:
            return
        op = self.OPS[data[0] % len(self.OPS)]
        params = _json_or_none(data[1:])
        if not isinstance(params, dict):
            params = {"path": data[1:].decode("utf-8", "surrogateescape")}
        params.pop("id", None)
        params.pop("op", None)
        if op == "grep":  # a catastrophic expression ends at its own time limit, well within ours
            params["timeout_ms"] = 1000
        client = self.sandbox.helper
        try:
            await client._call(op, params, timeout=HANG_S - 1)
        except HelperRequestError as exc:
            if exc.code == "internal" or not exc.message:
                raise FuzzFailure(f"the helper failed on {op} {params!r}: {exc}"[:2000]) from None
        except ValueError as exc:  # the client refuses to send an oversized line: fine, it said so
            if "accepts at most" not in str(exc):
                raise FuzzFailure(f"{op}: {exc!r}") from None
        if client.closed:
            raise FuzzFailure(f"the helper connection broke on {op} {params!r}"[:2000])
        if any(self.outside.iterdir()):
            raise FuzzFailure(f"{op} {params!r} put a file outside the workspace"[:2000])

    def healthy(self) -> None:
        async def check() -> None:
            info = await self.sandbox.helper.hello()
            if info.workspace != "/workspace":
                raise FuzzFailure(f"helper reports workspace {info.workspace}")
        self.run(check())


class HelperLinesTarget(FuzzTarget):
    """Raw request lines into the helper's core (its own process, on a socket pair), as the executor's
    end of the wire would carry them.

    Lines that would run something (exec, file ops, shutdown) are never sent as they are: their op is
    made ``hello`` first, decided by the helper's own parser, so that no fuzzed line acts outside a
    sandbox. Invariant: every non-blank line gets exactly one answer line, ``ok: false`` with a
    ``bad_request`` / ``unknown_op`` code and a message (or hello's and cancel's answers), and the
    helper goes on.
    """

    name = "helper_lines"
    modules = ("devsilo.executor.helper.helper",)
    SAFE_OPS = ("hello", "cancel")

    def seeds(self) -> list[bytes]:
        return [b'{"id":1,"op":"hello"}', b'{"id":2,"op":"cancel","target":1}', b'{"id":3,"op":"nope"}',
                b"not json", b"[1,2]", b'{"id":"x"}', b'{"id":9007199254740993,"op":"hello"}', b'{"id":1.5}',
                b'{"id": 4, "op": "hello", "x": NaN}', b"{\xff}"]

    def start(self) -> None:
        super().start()
        import subprocess

        from devsilo.executor.helper import helper

        ws = self.tmp / "ws"
        ws.mkdir()
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, "-I", "-S", helper.__file__, "--fd", str(theirs.fileno()),
                                      "--workspace", str(ws)], pass_fds=(theirs.fileno(),))
        theirs.close()
        ours.settimeout(HANG_S)
        self.sock = ours
        self.buf = b""

    def stop(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(10)
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                self.proc.wait()
        super().stop()

    def _line(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise FuzzFailure(f"no answer within {HANG_S:g} s (helper exit: {self.proc.poll()})") from None
            if not data:
                raise FuzzFailure(f"the helper closed the connection (exit {self.proc.wait(5)})")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        return answer

    def one(self, data: bytes) -> None:
        from devsilo.executor.helper.helper import _loads

        line = data.replace(b"\n", b" ")
        try:
            req = _loads(line)
        except Exception:  # noqa: BLE001 -- sent as it is: the helper must say it is not JSON
            req = None
        if isinstance(req, dict) and type(req.get("id")) is int and req.get("op") not in self.SAFE_OPS and \
                req.get("op") in ("exec", "shutdown", *_HELPER_OPS, "shell_input", "shell_resize", "shell_signal"):
            req["op"] = "hello"
            line = json.dumps(req).encode()
        if not line.strip():
            return  # a blank line (ASCII whitespace only) gets no answer
        self.sock.sendall(line + b"\n")
        answer = self._line()
        if answer.get("ok") is True:
            if not isinstance(req, dict) or req.get("op") not in self.SAFE_OPS or answer.get("id") != req.get("id"):
                raise FuzzFailure(f"{line[:200]!r} was answered ok: {answer!r}"[:600])
            return
        error = answer.get("error")
        if answer.get("ok") is not False or not isinstance(error, dict) or not error.get("message") or \
                error.get("code") not in ("bad_request", "unknown_op"):
            raise FuzzFailure(f"{line[:200]!r} got {answer!r}"[:600])
        if self.proc.poll() is not None:
            raise FuzzFailure(f"the helper exited ({self.proc.returncode}) after {line[:200]!r}")

    def healthy(self) -> None:
        self.sock.sendall(b'{"id": 424242, "op": "hello"}\n')
        answer = self._line()
        if answer.get("id") != 424242 or answer.get("ok") is not True:
            raise FuzzFailure(f"hello after fuzzing got {answer!r}")


# -- HTTP into the egress proxy --------------------------------------------------------------


ALLOWED = "upstream.fuzz.test"
"""The one host the fuzzed session may reach (a local server; the guard lets it reach loopback)."""


class _SpyUpstream:
    """The real :class:`Upstream`, recording every host it is asked to resolve or connect to."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.asked: list[str] = []

    async def resolve(self, host: str) -> Any:
        self.asked.append(host)
        return await self.real.resolve(host)

    async def connect(self, host: str, port: int, **kw: Any) -> Any:
        self.asked.append(host)
        return await self.real.connect(host, port, **kw)


class EgressHttpTarget(FuzzTarget):
    """Raw bytes into a real listening egress proxy, after a session's relay preamble.

    Behind it: a DNS server (dnslib) that knows only :data:`ALLOWED`, and an
    HTTP server for it on loopback. Invariant: the proxy answers with one
    HTTP response — an upstream answer, or a refusal with a 4xx/5xx status
    and the ``X-Devsilo-Blocked`` reason — or closes; it never asks DNS or
    connects for any other host, never leaves a connection open, never
    raises into the event loop, and serves a good request afterwards.
    """

    name = "egress_http"
    modules = ("h11", "devsilo.egress._proxy")
    plain = ("devsilo.protocol", "devsilo.executor._relay", "dns.message", "dns.asyncresolver", "aiohttp")
    instrument = ("devsilo", "h11")

    def seeds(self) -> list[bytes]:
        p = getattr(self, "web_port", 8080)
        return [
            f"GET http://{ALLOWED}:{p}/hello HTTP/1.1\r\nHost: {ALLOWED}:{p}\r\n\r\n".encode(),
            f"POST http://{ALLOWED}:{p}/echo HTTP/1.1\r\nHost: {ALLOWED}:{p}\r\nTransfer-Encoding: chunked\r\n\r\n"
            "5\r\nhello\r\n0\r\n\r\n".encode(),
            f"POST http://{ALLOWED}:{p}/echo HTTP/1.1\r\nHost: {ALLOWED}:{p}\r\nContent-Length: 3\r\n\r\nabc".encode(),
            b"CONNECT other.example:443 HTTP/1.1\r\nHost: other.example:443\r\n\r\n",
            f"CONNECT {ALLOWED}:{p} HTTP/1.1\r\nHost: {ALLOWED}\r\n\r\n".encode(),
            b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            f"GET http://{ALLOWED}:{p}/ HTTP/1.1\r\nHost: evil.example\r\n\r\n".encode(),
            b"GET http://[::1]:80/ HTTP/1.1\r\nHost: [::1]\r\n\r\n",
            f"SILO-SESSION other\nTCP\nGET http://{ALLOWED}:{p}/ HTTP/1.1\r\nHost: {ALLOWED}:{p}\r\n\r\n".encode(),
            b"SILO-RELAY AAAAAAAAAAAAAAAAAAAAAAAA\nTCP\nGET / HTTP/1.1\r\n\r\n",
            b"SILO-SESSION fuzz\nXYZ\n",
        ]

    async def _astart(self) -> None:
        from aiohttp import web
        from devsilo.egress._guard import GuardExceptions
        from devsilo.egress._policy import PolicyTable
        from devsilo.egress._proxy import EgressProxy
        from devsilo.egress._upstream import Upstream
        from devsilo.protocol import SessionGrant

        self.dns = await _LocalDns.start({ALLOWED: "127.0.0.1"})

        async def answer(request: web.Request) -> web.Response:
            body = await request.read()
            return web.Response(text=f"upstream {request.method} {request.path} {len(body)}\n")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", answer)
        self.web = web.AppRunner(app, access_log=None)
        await self.web.setup()
        site = web.TCPSite(self.web, "127.0.0.1", 0)
        await site.start()
        self.web_port = self.web.addresses[0][1]
        self.upstream = _SpyUpstream(Upstream(nameservers=["127.0.0.1"], dns_port=self.dns.port,
                                              exceptions=GuardExceptions.of([ALLOWED])))
        self.policies = PolicyTable()
        self.proxy = EgressProxy(policies=self.policies, upstream=self.upstream)  # type: ignore[arg-type]
        now = time.time()
        grant = SessionGrant(grant_id="fuzz", session_id="fuzz", user="alice", workspace="/w",
                             allow_domains=(ALLOWED,), issued_at=now, expires_at=now + 10 * 365 * 86400)
        self.proxy.open_session(self.policies.install(grant))
        self.server = await asyncio.start_server(self.proxy.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _astop(self) -> None:
        self.server.close()
        await self.server.wait_closed()
        self.proxy.close()
        await self.web.cleanup()
        self.dns.close()

    def one(self, data: bytes) -> None:
        self.run(self._one(data), timeout=HANG_S + 3)

    async def exchange(self, payload: bytes, *, preamble: bytes = b"SILO-SESSION fuzz\nTCP\n") -> bytes:
        """Send ``payload`` as a sandbox's proxy client, half-close, and read everything the proxy says."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(preamble + payload)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
                writer.write_eof()
            out = b""
            with contextlib.suppress(ConnectionError):
                async with asyncio.timeout(HANG_S):
                    while chunk := await reader.read(65536):
                        out += chunk
            return out
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _one(self, data: bytes) -> None:
        self.upstream.asked.clear()
        # An input starting "SILO" brings its own relay preamble (forged, malformed, another session's).
        preamble = b"" if data.startswith(b"SILO") else b"SILO-SESSION fuzz\nTCP\n"
        try:
            out = await self.exchange(data, preamble=preamble)
        except TimeoutError:
            raise FuzzFailure("the proxy neither answered nor closed the connection") from None
        check_proxy_answer(out)
        others = [h for h in self.upstream.asked if h != ALLOWED]
        if others:
            raise FuzzFailure(f"the egress asked for {others} (only {ALLOWED} is allowed)")
        if self.dns.queries - {ALLOWED}:
            raise FuzzFailure(f"the egress looked up {sorted(self.dns.queries - {ALLOWED})}")
        for _ in range(100):
            if self.proxy.open_connections == 0:
                break
            await asyncio.sleep(0.01)
        else:
            raise FuzzFailure(f"{self.proxy.open_connections} proxy connections still open after the client left")

    async def good_request(self) -> bytes:
        """A plain good request to the allowed host through the proxy; the upstream's answer."""
        p = self.web_port
        return await self.exchange(f"GET http://{ALLOWED}:{p}/hello HTTP/1.1\r\nHost: {ALLOWED}:{p}\r\n"
                                   "Connection: close\r\n\r\n".encode())

    def healthy(self) -> None:
        out = self.run(self.good_request())
        if not out.startswith(b"HTTP/1.1 200") or not out.endswith(b"upstream GET /hello 0\n"):
            raise FuzzFailure(f"the proxy no longer serves a good request: {out[:300]!r}")


def check_proxy_answer(out: bytes) -> None:
    """FuzzFailure unless ``out`` is nothing, or HTTP responses each of which is a refusal (4xx/5xx)
    that says why, or the upstream server's own answer (the proxy never writes a ``Server`` header)."""
    import h11

    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(out)
    conn.receive_data(b"")
    first = True
    while conn.their_state is not h11.CLOSED and conn.trailing_data[0]:
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        try:
            event = conn.next_event()
            while isinstance(event, h11.InformationalResponse):
                event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            if not first:
                return  # after a HEAD's answer (no body) the next one is not where GET's would end
            raise FuzzFailure(f"the proxy's answer is not valid HTTP ({exc}): {out[:300]!r}") from None
        if not isinstance(event, h11.Response):
            raise FuzzFailure(f"no response in {out[:300]!r}")
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
        blocked = headers.get("x-devsilo-blocked")
        if blocked is not None:
            if event.status_code < 400 or not blocked.strip():
                raise FuzzFailure(f"a {event.status_code} refusal without a reason: {out[:300]!r}")
        elif not headers.get("server", "").startswith("Python/"):
            raise FuzzFailure(f"an answer that is neither a refusal nor the upstream's: {out[:300]!r}")
        try:
            while not isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    return  # the connection closed mid-body (an upstream cut off): nothing more to check
        except h11.RemoteProtocolError:
            return
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            return
        conn.start_next_cycle()
        first = False


class _LocalDns(asyncio.DatagramProtocol):
    """A tiny authoritative DNS server on loopback (dnslib) that knows a few names and records every query."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names
        self.queries: set[str] = set()
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0

    @classmethod
    async def start(cls, names: dict[str, str]) -> _LocalDns:
        proto = cls(names)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: proto, local_addr=("127.0.0.1", 0))
        proto.transport = transport  # type: ignore[assignment]
        proto.port = transport.get_extra_info("sockname")[1]
        return proto

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        from dnslib import QTYPE, RCODE, RR, A, DNSRecord

        try:
            query = DNSRecord.parse(data)
        except Exception:  # noqa: BLE001 -- a test server: garbage gets no answer
            return
        name = str(query.q.qname).rstrip(".").lower()
        self.queries.add(name)
        reply = query.reply()
        address = self.names.get(name)
        if address is None:
            reply.header.rcode = RCODE.NXDOMAIN
        elif query.q.qtype == QTYPE.A:
            reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(address), ttl=30))
        assert self.transport is not None
        self.transport.sendto(reply.pack(), addr)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


# -- DNS into the sandbox's resolver path ------------------------------------------------


DNS_NOERROR, DNS_SERVFAIL, DNS_NXDOMAIN, DNS_REFUSED = 0, 2, 3, 5
DNS_TIMEOUT_S = 5.0
"""The sandbox resolver's own wait for an answer from the egress (the helper's ``DNS_TIMEOUT_S``)."""


def dns_query(name: str, qtype: str = "A", qid: int = 0x1234) -> bytes:
    """A well-formed DNS query."""
    import dns.message

    q = dns.message.make_query(name, qtype)
    q.id = qid
    return q.to_wire()


def _frames(messages: list[bytes]) -> bytes:
    return b"".join(struct.pack(">H", len(m)) + m for m in messages)


def _split_frames(data: bytes) -> list[bytes]:
    """The length-prefixed messages in an input (a short tail is sent as it is)."""
    out = []
    while len(data) >= 2:
        n = struct.unpack(">H", data[:2])[0]
        out.append(data[2:2 + n])
        data = data[2 + n:]
    return out


class DnsTarget(FuzzTarget):
    """DNS messages into the sandbox's resolver, the executor's relay, and the egress.

    Input: one byte choosing where, then length-prefixed messages:

    * ``0``: the stream on a sandbox's DNS connection to a relay that has no
      egress (every query REFUSED);
    * ``1``: the stream on a relay's DNS connection to the egress;
    * ``2``: each message as a UDP datagram to the in-sandbox resolver (the
      helper's :class:`Network`, run here), whose queries go through a relay
      to the egress, as in a sandbox.

    Invariant: each answer carries the query's id, QR set, and an error code
    from REFUSED / SERVFAIL / FORMERR / NXDOMAIN (or NOERROR for an allowed
    name), within the UDP size the query allows; garbage gets no answer; the
    listeners never ask upstream for a name off the allow-list, never raise
    into their loop, and answer a good query afterwards.
    """

    name = "dns"
    modules = ("devsilo.executor._relay", "devsilo.egress._proxy")
    plain = ("devsilo.protocol", "dns.message", "dns.asyncresolver", "aiohttp", "h11")
    instrument = ("devsilo",)

    def seeds(self) -> list[bytes]:
        q = dns_query(ALLOWED)
        return [b"\0" + _frames([q]), b"\1" + _frames([q, dns_query("evil.example", "AAAA")]),
                b"\1" + _frames([dns_query(ALLOWED, "TXT")]), b"\0" + _frames([b"\x12\x34" + b"\0" * 10]),
                b"\1" + _frames([b"\xff" * 11]), b"\0\x00\x05abc", b"\2" + _frames([q]),
                b"\2" + _frames([dns_query("evil.example", "A", 7), dns_query(ALLOWED, "AAAA", 8)])]

    async def _astart(self) -> None:
        from devsilo.executor._relay import SessionRelay
        from devsilo.executor.helper.helper import Network

        self.egress = EgressHttpTarget()
        self.egress.tmp = self.tmp
        await self.egress._astart()
        uid = 64123 if os.geteuid() == 0 else os.getuid()
        self.relay = SessionRelay("fuzz", self.tmp / "relay.sock", None, uid=uid, first_line_timeout=HANG_S)
        await self.relay.start()
        self.chain = SessionRelay("fuzz", self.tmp / "chain.sock", ("127.0.0.1", self.egress.port), uid=uid,
                                  first_line_timeout=HANG_S)
        await self.chain.start()
        self.network = Network(relay_path=str(self.tmp / "chain.sock"))
        await self.network.start(proxy_port=_free_port(), dns_ports=(_free_port(),))
        if not self.network.dns_ports:
            raise RuntimeError(f"the sandbox resolver did not start: {self.network.errors}")

    async def _astop(self) -> None:
        self.network.close()
        await self.chain.close()
        await self.relay.close()
        await self.egress._astop()

    def one(self, data: bytes) -> None:
        self.run(self._one(data), timeout=DNS_TIMEOUT_S + HANG_S + 3)

    async def _one(self, data: bytes) -> None:
        from devsilo.executor.helper.helper import _fit_udp, dns_error_reply

        where, stream = _take(data, 1)
        queries = _split_frames(stream)
        for q in queries:  # the sandbox resolver's UDP path on the same messages
            reply = dns_error_reply(q, DNS_SERVFAIL)
            if reply is not None:
                check_dns_answer(q, reply, {DNS_SERVFAIL})
                fitted = _fit_udp(q, reply)
                if len(fitted) > max(len(reply), 12) or fitted[:2] != q[:2]:
                    raise FuzzFailure(f"_fit_udp made {fitted!r} of {reply!r}")
        self.egress.upstream.asked.clear()
        if where == b"\0":
            answers = await self.via_relay(stream)
            rcodes = {DNS_REFUSED}
        elif where == b"\2":
            answers = await self.via_resolver(queries)
            rcodes = {DNS_NOERROR, DNS_NXDOMAIN, DNS_REFUSED, DNS_SERVFAIL, 1}
            for a in answers:
                limits = [1232 if q[10:12] != b"\0\0" else 512 for q in queries if q[:2] == a[:2]]
                if limits and len(a) > max(limits):
                    raise FuzzFailure(f"a UDP answer of {len(a)} bytes, over the {max(limits)} its query allows")
        else:
            answers = await self.via_egress(stream)
            rcodes = {DNS_NOERROR, DNS_NXDOMAIN, DNS_REFUSED, DNS_SERVFAIL, 1}
        if len(answers) > len(queries):
            raise FuzzFailure(f"{len(answers)} answers to {len(queries)} queries")
        by_id = {q[:2]: q for q in queries if len(q) >= 12}
        for a in answers:
            asked = by_id.get(a[:2])
            if asked is None:
                raise FuzzFailure(f"an answer {a[:40]!r} with no query of its id")
            check_dns_answer(asked, a, rcodes)
        others = [h for h in self.egress.upstream.asked if h != ALLOWED]
        if others:
            raise FuzzFailure(f"the egress resolved {others} (not allowed)")

    async def via_relay(self, stream: bytes) -> list[bytes]:
        """``stream`` on a sandbox's DNS connection to its relay (no egress); the answers."""
        reader, writer = await asyncio.open_unix_connection(str(self.relay.socket_path))
        return await _converse(reader, writer, b"DNS\n" + stream)

    async def via_resolver(self, queries: list[bytes]) -> list[bytes]:
        """Each query as a datagram to the sandbox's resolver; the answers that came before the answer to a
        good query sent last (UDP: an answer may be lost or late; the good one must come)."""
        loop = asyncio.get_running_loop()
        taken = {q[:2] for q in queries}
        probe_id = next(i for i in range(1, 65536) if i.to_bytes(2, "big") not in taken)
        probe = dns_query(ALLOWED, "A", probe_id)
        # A socket of its own: answers to an earlier input's queries (SERVFAIL after the resolver's own
        # timeout) go to that input's socket, not here.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.connect(("127.0.0.1", self.network.dns_ports[0]))
            udp.setblocking(False)
            for q in queries:
                with contextlib.suppress(OSError):  # e.g. a datagram too large
                    await loop.sock_sendall(udp, q)
            answers: list[bytes] = []
            # As a client does, the good query is sent again until answered: a flood of queries the
            # egress never answers (garbage) holds the resolver's slots until its own timeout, and
            # meanwhile it drops new datagrams.
            for _ in range(int((DNS_TIMEOUT_S + HANG_S) / 0.5)):
                await loop.sock_sendall(udp, probe)
                try:
                    async with asyncio.timeout(0.5):
                        while True:
                            answer = await loop.sock_recv(udp, 65535)
                            if answer[:2] == probe[:2]:
                                check_dns_answer(probe, answer, {DNS_NOERROR})
                                return answers
                            answers.append(answer)
                except TimeoutError:
                    continue
            raise FuzzFailure("the sandbox resolver stopped answering a good query")

    async def via_egress(self, stream: bytes) -> list[bytes]:
        """``stream`` on a relay's DNS connection to the egress; the answers."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.egress.port)
        return await _converse(reader, writer, b"SILO-SESSION fuzz\nDNS\n" + stream)

    def healthy(self) -> None:
        async def check() -> None:
            q = dns_query(ALLOWED)
            refused = await self.via_relay(_frames([q]))
            answered = await self.via_egress(_frames([q]))
            if len(refused) != 1 or refused[0][3] & 0xF != DNS_REFUSED:
                raise FuzzFailure(f"the relay no longer refuses: {refused!r}")
            if len(answered) != 1 or answered[0][3] & 0xF != DNS_NOERROR or b"\x7f\0\0\1" not in answered[0]:
                raise FuzzFailure(f"the egress no longer answers: {answered!r}")
            await self.via_resolver([])  # the sandbox's resolver answers its good query
        self.run(check())


async def _converse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> list[bytes]:
    try:
        writer.write(payload)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            writer.write_eof()
        data = b""
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(HANG_S):
                while chunk := await reader.read(65536):
                    data += chunk
        answers = _split_frames(data)
        if _frames(answers) != data:
            raise FuzzFailure(f"a torn answer frame: {data[-40:]!r}")
        return answers
    except TimeoutError:
        raise FuzzFailure("the DNS stream neither answered nor closed") from None
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def _free_port() -> int:
    # This file also runs loaded by its path, outside the devsilo.testing package (see _BOOTSTRAP).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def check_dns_answer(query: bytes, answer: bytes, rcodes: set[int]) -> None:
    """FuzzFailure unless ``answer`` answers ``query``: its id, QR set, an rcode in ``rcodes``."""
    if len(answer) < 12 or answer[:2] != query[:2]:
        raise FuzzFailure(f"answer {answer[:40]!r} does not carry the id of {query[:40]!r}")
    flags = struct.unpack(">H", answer[2:4])[0]
    if not flags & 0x8000 or flags & 0xF not in rcodes:
        raise FuzzFailure(f"answer flags {flags:#06x} (rcode {flags & 0xF}) to {query[:40]!r}")


# -- workspace paths -------------------------------------------------------------------------


class WorkspacePathsTarget(FuzzTarget):
    """Upload paths checked as the gateway and the executor check them, on a workspace with traps.

    The workspace holds a symlink out, a symlink in, a file where a directory
    would be, a FIFO. Invariant: ``upload_bad_path`` with a message, or a path
    whose every existing component is a real directory inside the workspace
    (then a regular file or nothing), so writing it cannot leave the workspace.
    """

    name = "workspace_paths"
    modules = ("devsilo.protocol", "devsilo.executor._upload")
    plain = ("nats",)

    def start(self) -> None:
        super().start()
        self.workspace = self.tmp / "ws"
        outside = self.tmp / "outside"
        outside.mkdir()
        (self.workspace / "dir" / "sub").mkdir(parents=True)
        (self.workspace / "file.txt").write_text("x")
        (self.workspace / "out").symlink_to(outside)
        (self.workspace / "dir" / "up").symlink_to("..")
        (self.workspace / "abs").symlink_to("/etc")
        os.mkfifo(self.workspace / "fifo")
        self.root = os.path.realpath(self.workspace)

    def seeds(self) -> list[bytes]:
        return [p.encode("utf-8", "surrogatepass") for p in (
            "a.txt", "dir/sub/new.txt", "../x", "/etc/passwd", "out/x", "dir/up/x", "abs/passwd", "file.txt/x",
            "fifo", "dir//x", "./x", "a\0b", "é/\u202e.txt", "x" * 300, "\ud800", "dir/sub/" * 40 + "f")]

    def one(self, data: bytes) -> None:
        from devsilo.executor._upload import check_landing
        from devsilo.protocol import UploadError, workspace_relative

        path = data.decode("utf-8", "surrogatepass") if _utf8ish(data) else data.decode("latin-1")
        try:
            rel = workspace_relative(path)
            check_landing(self.workspace, rel)
        except UploadError as exc:
            if exc.code != "upload_bad_path" or not str(exc):
                raise FuzzFailure(f"{path!r}: unclear refusal {exc.code}: {exc}") from None
            return
        except Exception as exc:  # noqa: BLE001 -- the invariant: nothing but UploadError
            raise FuzzFailure(f"{path!r}: {type(exc).__name__}: {exc}") from None
        check_inside(self.workspace, self.root, rel)


def _utf8ish(data: bytes) -> bool:
    try:
        data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return False
    return True


def check_inside(workspace: Path, root: str, rel: str) -> None:
    """FuzzFailure unless ``rel`` under ``workspace`` resolves inside it, through real directories only."""
    here = workspace
    for part in rel.split("/"):
        here = here / part
        if os.path.islink(here):
            raise FuzzFailure(f"accepted {rel!r} through the link {here}")
    real = os.path.realpath(workspace / rel)
    if not real.startswith(root + os.sep):
        raise FuzzFailure(f"accepted {rel!r}, which resolves to {real}, outside {root}")


class AllTargets(FuzzTarget):
    """Every target in one process, the first byte of an input choosing which (for a short CI run:
    one start-up instead of one per target). ``counts`` says how many inputs each target got."""

    name = "all"
    PARTS: ClassVar[tuple[type[FuzzTarget], ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        self.parts = [cls() for cls in self.PARTS]
        self.counts = {cls.name: 0 for cls in self.PARTS}

    def start(self) -> None:
        super().start()
        for part in self.parts:
            part.start()

    def stop(self) -> None:
        for part in self.parts:
            with contextlib.suppress(Exception):
                part.stop()
        super().stop()

    def seeds(self) -> list[bytes]:
        return [bytes([i]) + seed for i, part in enumerate(self.parts) for seed in part.seeds()]

    def one(self, data: bytes) -> None:
        if not data:
            return
        part = self.parts[data[0] % len(self.parts)]
        self.counts[part.name] += 1
        try:
            part.one(data[1:])
        except FuzzFailure as exc:
            raise FuzzFailure(f"[{part.name}] {exc}") from None
        except Exception as exc:
            raise FuzzFailure(f"[{part.name}] {type(exc).__name__}: {exc}") from exc

    def healthy(self) -> None:
        for part in self.parts:
            try:
                part.healthy()
            except Exception as exc:  # noqa: BLE001 -- said with the target's name
                raise FuzzFailure(f"[{part.name}] {exc}") from None


TARGETS: dict[str, type[FuzzTarget]] = {t.name: t for t in (
    Baseline, EnvelopeTarget, ClientFramesTarget, HelperJsonTarget, HelperAnswersTarget, HelperRequestsTarget,
    HelperLinesTarget, EgressHttpTarget, DnsTarget, WorkspacePathsTarget)}
"""Every target by name."""


def _combine() -> None:
    parts = tuple(t for name, t in TARGETS.items() if name != "baseline")
    modules = tuple(dict.fromkeys(m for t in parts for m in t.modules))

    def overlaps(a: str, b: str) -> bool:
        return a == b or a.startswith(b + ".") or b.startswith(a + ".")

    AllTargets.PARTS = parts
    AllTargets.modules = modules
    AllTargets.plain = tuple(dict.fromkeys(p for t in parts for p in t.plain
                                           if not any(overlaps(p, m) for m in modules)))
    AllTargets.instrument = tuple(dict.fromkeys(i for t in parts for i in t.instrument))
    TARGETS[AllTargets.name] = AllTargets


_combine()


# -- the atheris runner (a subprocess per target) ------------------------------------------


class _Recorder:
    """Wraps a target's ``one`` for atheris: counts executions, saves crashing inputs, keeps going."""

    def __init__(self, target: FuzzTarget, crashes: Path) -> None:
        self.target = target
        self.crashes = crashes
        self.execs = 0
        self.found: set[str] = set()

    def __call__(self, data: bytes) -> None:
        self.execs += 1
        try:
            self.target.one(data)
        except Exception as exc:  # noqa: BLE001 -- every failure is saved, then fuzzing goes on
            digest = hashlib.sha1(data).hexdigest()
            if digest not in self.found:
                self.found.add(digest)
                self.crashes.mkdir(parents=True, exist_ok=True)
                (self.crashes / f"crash-{digest}").write_bytes(data)
                (self.crashes / f"crash-{digest}.txt").write_text(
                    f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}")


def import_exercised(cls: type[FuzzTarget]) -> None:
    """Import what target ``cls`` exercises: ``plain`` as it is, then ``modules`` instrumented by atheris.

    Only modules imported inside atheris's hook are instrumented, and a module already imported is not
    imported again: importing the big dependencies first keeps the instrumenting (slow) to what counts.
    """
    import importlib

    import atheris

    for module in cls.plain:
        importlib.import_module(module)
    with atheris.instrument_imports(include=list(cls.instrument)):
        for module in cls.modules:
            importlib.import_module(module)


_BOOTSTRAP = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("devsilo_fuzz", sys.argv[1])
fuzz = importlib.util.module_from_spec(spec)
sys.modules["devsilo_fuzz"] = fuzz
spec.loader.exec_module(fuzz)
sys.exit(fuzz.main(sys.argv[2:]))
"""
"""This file loaded by its path: importing ``devsilo.testing`` would first load the whole stack runner."""


def main(argv: list[str] | None = None) -> int:
    """Run one target under atheris for ``--seconds``; print its figures as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, choices=sorted(TARGETS))
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--crashes", type=Path, required=True)
    parser.add_argument("--max-len", type=int, default=4096)
    args = parser.parse_args(argv)
    cls = TARGETS[args.target]
    import_exercised(cls)
    import atheris

    target = cls()
    target.start()
    args.corpus.mkdir(parents=True, exist_ok=True)
    seeds = {hashlib.sha1(seed).hexdigest(): seed for seed in target.seeds()}
    for digest, seed in seeds.items():
        (args.corpus / f"seed-{digest}").write_bytes(seed)
    recorder = _Recorder(target, args.crashes)
    started = time.monotonic()
    stats = args.crashes / f"{args.target}.stats.json"
    args.crashes.mkdir(parents=True, exist_ok=True)

    def report() -> None:
        elapsed = time.monotonic() - started
        stats.write_text(json.dumps({
            "target": args.target, "executions": recorder.execs, "seconds": round(elapsed, 3),
            "crashes": len(recorder.found), "corpus": sum(1 for _ in args.corpus.iterdir()), "seeds": len(seeds),
            "per_target": getattr(target, "counts", None),
        }))

    stop_at = started + args.seconds
    last_report = [started]

    def one(data: bytes) -> None:
        recorder(data)
        now = time.monotonic()
        if now - last_report[0] > 0.5 or now >= stop_at:
            last_report[0] = now
            report()
            if now >= stop_at:
                # libFuzzer's own exit skips Python's; finish cleanly here instead.
                try:
                    target.healthy()
                except Exception as exc:  # noqa: BLE001 -- reported as a crash of the run
                    (args.crashes / "unhealthy.txt").write_text(f"{exc}\n")
                    recorder.found.add("unhealthy")
                report()
                print(stats.read_text(), flush=True)
                sys.stdout.flush()
                os._exit(0)

    atheris.Setup([sys.argv[0], str(args.corpus), f"-max_len={args.max_len}", f"-timeout={int(HANG_S * 4)}",
                   "-rss_limit_mb=4096", f"-max_total_time={int(args.seconds) + 60}"], one)
    atheris.Fuzz()
    return 0


def run_target(name: str, seconds: float, workdir: Path, *, timeout: float | None = None) -> dict[str, Any]:
    """Run target ``name`` under atheris in a subprocess; its figures (executions, crashes, corpus...)."""
    import subprocess

    corpus, crashes = workdir / "corpus" / name, workdir / "crashes" / name
    proc = subprocess.run(
        [sys.executable, "-c", _BOOTSTRAP, __file__, "--target", name,
         "--seconds", str(seconds), "--corpus", str(corpus), "--crashes", str(crashes)],
        capture_output=True, text=True, timeout=timeout or seconds + 120, check=False)
    stats_file = crashes / f"{name}.stats.json"
    if proc.returncode != 0 or not stats_file.exists():
        raise RuntimeError(f"fuzz target {name} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-4000:]}")
    figures: dict[str, Any] = json.loads(stats_file.read_text())
    figures["crash_files"] = sorted(str(p) for p in crashes.glob("crash-*") if not p.name.endswith(".txt"))
    figures["unhealthy"] = (crashes / "unhealthy.txt").read_text() if (crashes / "unhealthy.txt").exists() else ""
    return figures


def b64(data: bytes) -> str:
    """An input as base64, for reports."""
    return base64.b64encode(data).decode("ascii")


if __name__ == "__main__":
    sys.exit(main())
