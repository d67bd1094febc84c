"""Property-based fuzzing (Hypothesis) of every untrusted input, against real listeners and a real sandbox.

The targets and their invariants live in :mod:`devsilo.testing._fuzz` (shared
with the coverage-guided runs of ``tests/test_fuzz_atheris.py`` and
``bench/fuzz.py``): the signed envelope parser, client frames, the helper
protocol both ways (a hostile helper answering the executor; fuzzed requests
into the helper in a bubblewrap sandbox), raw HTTP into a listening egress
proxy, DNS streams into the relay and the egress, and workspace paths for
uploads and tools. Here Hypothesis builds the structured hostile inputs:
traversal, NUL, overlong and odd Unicode paths, malformed request lines,
smuggling headers, bad chunked bodies, huge heads, responses posing as DNS
queries. Every target must give a clear error and keep serving; the inputs
that once broke one are kept below as plain tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
from collections.abc import Iterator
from typing import Any, get_args

import pytest
import structlog
from devsilo.executor._helper_client import HelperClient, HelperRequestError
from devsilo.executor._tools import run_tool
from devsilo.executor._upload import check_landing
from devsilo.executor.helper import helper as helper_module
from devsilo.gateway._uploads import MAX_OPEN_UPLOADS, ConnectionUploads
from devsilo.protocol import SandboxError, ToolCall, UploadError, workspace_relative
from devsilo.protocol import client as client_protocol
from devsilo.testing import _fuzz as fuzz_module
from devsilo.testing._fuzz import (
    ALLOWED,
    HANG_S,
    ClientFramesTarget,
    DnsTarget,
    EgressHttpTarget,
    EnvelopeTarget,
    FuzzTarget,
    HelperAnswersTarget,
    HelperLinesTarget,
    HelperRequestsTarget,
    WorkspacePathsTarget,
    check_inside,
    dns_query,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

# A failing example may be large; Hypothesis warns about printing it, which would hide the failure.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

FUZZ = settings(deadline=HANG_S * 1000 * 2, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large,
                                                                  HealthCheck.function_scoped_fixture])
"""Hypothesis's deadline is the hang check in-process; each target also bounds every input itself."""
SCALE = float(os.environ.get("SILO_FUZZ_SCALE", "1"))
"""``bench/fuzz.py`` runs these tests with many more examples (``SILO_FUZZ_SCALE``)."""


def examples(n: int) -> int:
    """The CI's example count ``n``, scaled for a long run."""
    return max(1, int(n * SCALE))

json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.integers(10**300, 10**310)
                | st.floats() | st.text(max_size=30))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c,
                                                                                              max_size=3),
                           max_leaves=8)


def _started(cls: type[FuzzTarget]) -> Iterator[Any]:
    target = cls()
    target.start()
    try:
        yield target
    finally:
        target.stop()


# -- the signed envelope --------------------------------------------------------------------


@pytest.fixture(scope="module")
def envelope() -> Iterator[EnvelopeTarget]:
    yield from _started(EnvelopeTarget)


HEADER_KEYS = ("v", "type", "sender", "role", "kid", "mid", "sid", "subject", "iat", "exp", "reply_to", "body")


@settings(FUZZ, max_examples=examples(100))
@given(changes=st.dictionaries(st.sampled_from(HEADER_KEYS) | st.text(max_size=6), json_values, max_size=4),
       drop=st.lists(st.sampled_from(HEADER_KEYS), max_size=2),
       body=st.dictionaries(st.sampled_from(("kind", "text", "answer", "extra")), json_values, max_size=3))
def test_signed_envelopes_with_hostile_fields_are_opened_or_rejected_clearly(
        envelope: EnvelopeTarget, changes: dict[str, Any], drop: list[str], body: dict[str, Any]) -> None:
    doc = json.loads(envelope.good[64:])
    doc["body"] = {**doc["body"], **body}
    doc.update(changes)
    for key in drop:
        doc.pop(key, None)
    # Truly signed by a roster key: the checks past the signature see these fields.
    envelope.one(b"\1" + json.dumps(doc).encode())


@settings(FUZZ, max_examples=examples(100))
@given(data=st.binary(max_size=300) | st.builds(lambda i, x: bytes([2]) + i.to_bytes(2, "big") + bytes([x]),
                                                   st.integers(0, 65535), st.integers(1, 255)))
def test_raw_and_bit_flipped_envelopes_are_rejected_clearly(envelope: EnvelopeTarget, data: bytes) -> None:
    envelope.one(data if data[:1] == b"\2" else b"\0" + data)
    envelope.healthy()


# -- client frames ------------------------------------------------------------------------------


REQUEST_MODELS = get_args(get_args(client_protocol.ClientRequest)[0])
GATEWAY_MODELS = get_args(get_args(client_protocol.GatewayFrame)[0])


def _frame(model: Any, fields: dict[str, Any]) -> bytes:
    return json.dumps({"type": model.model_fields["type"].default, **fields}).encode()


def _frames_of(models: tuple[Any, ...]) -> st.SearchStrategy[bytes]:
    return st.sampled_from(models).flatmap(lambda m: st.builds(
        _frame, st.just(m), st.dictionaries(st.sampled_from(sorted(m.model_fields)), json_values, max_size=6)))


@pytest.fixture(scope="module")
def frames() -> Iterator[ClientFramesTarget]:
    yield from _started(ClientFramesTarget)


@settings(FUZZ, max_examples=examples(100))
@given(frame=_frames_of(REQUEST_MODELS) | _frames_of(GATEWAY_MODELS))
def test_every_client_and_gateway_frame_type_parses_or_gets_a_clear_error(
        frames: ClientFramesTarget, frame: bytes) -> None:
    # Every frame type, including those the live gateway fuzzing leaves out because a valid one would
    # start real work (create_session, shells, workspaces, transfers), and the gateway's frames as the
    # CLI parses them.
    assert len(REQUEST_MODELS) > 20 and len(GATEWAY_MODELS) > 20
    frames.one(frame)


# -- the helper protocol ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def helper_answers() -> Iterator[HelperAnswersTarget]:
    yield from _started(HelperAnswersTarget)


TEMPLATE_KEYS = ("ok", "id", "error", "entries", "matches", "headers", "content", "status", "mtime", "size", "line",
                 "text", "exit_code", "stdout", "stream", "data", "dns_ports", "redirects", "replacements", "found",
                 "signal", "truncated", "total", "offset", "eof", "path", "pid", "written", "first_line")
entry_like = st.fixed_dictionaries({}, optional={k: json_values for k in
                                               ("name", "type", "size", "mode", "mtime", "target", "path", "line",
                                                "text")})


@settings(FUZZ, max_examples=examples(100))
@given(op=st.integers(0, 10), mode=st.integers(0, 3),
       fields=st.dictionaries(st.sampled_from(TEMPLATE_KEYS), json_values | st.lists(entry_like, max_size=3),
                              max_size=4))
def test_a_hostile_helper_only_ever_causes_sandbox_or_request_errors(
        helper_answers: HelperAnswersTarget, op: int, mode: int, fields: dict[str, Any]) -> None:
    helper_answers.one(bytes([op, mode]) + json.dumps(fields).encode())


@pytest.fixture(scope="module")
def sandboxed_helper() -> Iterator[HelperRequestsTarget]:
    yield from _started(HelperRequestsTarget)


PARAM_KEYS = ("path", "content", "encoding", "append", "old", "new", "replace_all", "offset", "limit", "pattern",
              "glob", "case_insensitive", "max_results", "target", "rows", "cols", "signal", "data", "eof")


@settings(FUZZ, max_examples=examples(80), deadline=None)
@given(op=st.integers(0, len(HelperRequestsTarget.OPS) - 1),
       params=st.dictionaries(st.sampled_from(PARAM_KEYS), json_values | st.sampled_from(
           ["../../etc/passwd", "/etc/shadow", "link/x", "f.txt", "a\0b", "\ud800", "x" * 5000, "**/*", "(a+)+$"]),
           max_size=5))
def test_the_sandboxed_helper_refuses_hostile_requests_with_a_code(
        sandboxed_helper: HelperRequestsTarget, op: int, params: dict[str, Any]) -> None:
    sandboxed_helper.one(bytes([op]) + json.dumps(params).encode())


@pytest.fixture(scope="module")
def helper_lines() -> Iterator[HelperLinesTarget]:
    yield from _started(HelperLinesTarget)


request_lines = (
    st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(st.sampled_from(("id", "op", "target", "x")),
                                                                 json_values | st.sampled_from(["hello", "cancel"])))
    | st.builds(lambda n: b"[" * n + b"]" * n, st.integers(1, 100_000))
    | st.builds(lambda n: b'{"id": ' + str(n).encode() + b', "op": "hello"}', st.integers(-(2**64), 2**64))
    | st.sampled_from([b'{"id": 1, "id": 2, "op": "hello"}', b'{"id": 1, "op": "hello"', b'\xef\xbb\xbf{"id": 1}',
                       b'{"id": 1, "op": "\\ud800"}', b'{"id": NaN}', b'{"id": 1e3, "op": "hello"}', b"\x00{}",
                       b'{"id": true, "op": "hello"}'])
    | st.binary(max_size=200)
)


@settings(FUZZ, max_examples=examples(100))
@given(line=request_lines)
def test_the_helper_core_answers_every_hostile_line_with_a_code(helper_lines: HelperLinesTarget, line: bytes) -> None:
    helper_lines.one(line)
    helper_lines.healthy()


# -- workspace paths ------------------------------------------------------------------------------


PATH_PARTS = st.sampled_from([
    "..", ".", "", "out", "abs", "dir", "up", "sub", "file.txt", "fifo", "new.txt", "a\0b", "x" * 256, "é" * 128,
    "\u202etxt.exe", "\u2024\u2024", "\uff0e\uff0e", "e\u0301", "\ud800", "\U0001f600", " ", "\\..\\", "~", "$HOME",
    "%2e%2e", "\n", "-rf",
]) | st.text(max_size=12)
hostile_paths = st.builds(lambda lead, parts: lead + "/".join(parts), st.sampled_from(["", "/", "./", "//"]),
                          st.lists(PATH_PARTS, min_size=1, max_size=6)) | st.text(max_size=5000)


@pytest.fixture(scope="module")
def paths() -> Iterator[WorkspacePathsTarget]:
    yield from _started(WorkspacePathsTarget)


@settings(FUZZ, max_examples=examples(300))
@given(path=hostile_paths)
def test_upload_paths_are_refused_clearly_or_stay_inside_the_workspace(paths: WorkspacePathsTarget, path: str) -> None:
    paths.one(path.encode("utf-8", "surrogatepass"))


UPLOAD_IDS = st.sampled_from(["u1", "u2", "u3", "u4", "u5", "u6"])
upload_steps = st.lists(st.one_of(
    st.builds(lambda uid, path, size: ("begin", {"type": "upload_file", "session_id": "s1", "upload_id": uid,
                                                 "path": path, "size": size, "sha256": "0" * 64}),
              UPLOAD_IDS, hostile_paths, st.integers(0, 2**40) | st.integers(0, 8)),
    st.builds(lambda uid, offset, data: ("chunk", {"type": "upload_chunk", "upload_id": uid, "offset": offset,
                                                   "data": data}),
              UPLOAD_IDS, st.integers(0, 2**40) | st.integers(0, 8),
              st.sampled_from(["", "YWJj", "YQ==", "!!!", "YWJj\n", "Y", "=" * 8, "AAAA" * 3]) | st.text(max_size=12)),
), max_size=12)


@settings(FUZZ, max_examples=examples(100))
@given(steps=upload_steps)
def test_the_gateways_upload_frames_get_clear_errors_and_keep_nothing_open(
        helper_answers: HelperAnswersTarget, steps: list[tuple[str, dict[str, Any]]]) -> None:
    # The gateway's side of uploads (services/gateway/_uploads.py) on hostile frames as a client sends
    # them: every step is answered (ready, progress) or refused with an upload error code and message.
    # The announced hash never matches, so a finished upload stops at the hash check, before landing.
    uploads = ConnectionUploads(None, "fuzz", structlog.get_logger())  # type: ignore[arg-type]
    try:
        for kind, frame in steps:
            try:
                req = client_protocol.CLIENT_REQUEST.validate_python(frame)
            except ValidationError:
                continue  # the gateway answers it with a bad_request error (tested in-process above)
            try:
                if kind == "begin":
                    answer: Any = uploads.begin(req, record=None)  # type: ignore[arg-type]
                    assert answer.upload_id == req.upload_id and workspace_relative(req.path) == req.path
                else:
                    answer = helper_answers.run(uploads.chunk(req))  # (any target's event loop will do)
                    assert 0 <= answer.received <= 8  # (an empty chunk is a no-op)
            except UploadError as exc:
                assert exc.code in {"upload_bad_path", "upload_too_large", "upload_bad_chunk", "upload_unknown",
                                    "upload_hash_mismatch"} and str(exc), exc
            assert len(uploads._open) <= MAX_OPEN_UPLOADS
    finally:
        spools = [up.spool for up in uploads._open.values()]
        uploads.close()
        assert all(spool.closed for spool in spools) and not uploads._open


def _outside_snapshot(target: HelperRequestsTarget) -> set[str]:
    """Every path under the target's temp dir, except the workspace and the sandbox's own scratch."""
    root = target.tmp
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel.split(os.sep)[0] in ("ws", "scratch"):
            dirnames.clear()
            continue
        seen.update(os.path.join(rel, n) for n in dirnames + filenames)
    return seen


# Grep resolves its path as Read does, and a search of the whole sandbox ("/", "../..") is legitimate
# work bounded by the helper's own 30 s limit: too slow to repeat here, so it is left out.
TOOL_INPUTS = st.sampled_from(["Write", "Read", "Edit", "Glob"]).flatmap(lambda name: st.builds(
    lambda path, text: (name, {
        "Write": {"path": path, "content": text},
        "Read": {"path": path},
        "Edit": {"path": path, "old_string": "hello", "new_string": text},
        "Glob": {"pattern": path or "*", "path": "."},
    }[name]), hostile_paths.filter(lambda p: 0 < len(p) <= 4096), st.text(max_size=20)))


@settings(FUZZ, max_examples=examples(60), deadline=None)
@given(tool=TOOL_INPUTS)
def test_tool_paths_get_clear_errors_and_never_reach_outside_the_workspace(
        sandboxed_helper: HelperRequestsTarget, tool: tuple[str, dict[str, Any]]) -> None:
    before = _outside_snapshot(sandboxed_helper)
    name, args = tool
    call = ToolCall(call_id="c1", name=name, input=args)
    # Past the helper's own limits (a Glob walks at most 200,000 entries), 30 s is a hang.
    result = sandboxed_helper.run(run_tool(sandboxed_helper.sandbox.helper, call), timeout=30)
    if result.is_error:
        assert result.content.strip() and (name in result.content or "invalid" in result.content), result
    assert not any(sandboxed_helper.outside.iterdir()), f"{name} {args!r} wrote through the link out"
    assert _outside_snapshot(sandboxed_helper) == before, f"{name} {args!r} changed files outside the workspace"
    assert not sandboxed_helper.sandbox.helper.closed


@settings(FUZZ, max_examples=examples(60), deadline=None)
@given(path=hostile_paths)
def test_an_upload_lands_inside_the_workspace_or_is_refused(sandboxed_helper: HelperRequestsTarget,
                                                            path: str) -> None:
    # As the executor lands an upload: the path checks, then the write through the sandbox's helper.
    workspace = sandboxed_helper.workspace
    before = _outside_snapshot(sandboxed_helper)
    try:
        rel = workspace_relative(path)
        check_landing(workspace, rel)
    except UploadError as exc:
        assert exc.code == "upload_bad_path" and str(exc), exc
        return
    check_inside(workspace, os.path.realpath(workspace), rel)
    try:
        sandboxed_helper.run(sandboxed_helper.sandbox.helper.write(rel, b"uploaded"))
    except HelperRequestError as exc:  # e.g. a name the file system refuses: said, not crashed
        assert exc.code != "internal" and exc.message, exc
    else:
        assert (workspace / rel).read_bytes() == b"uploaded"
    assert _outside_snapshot(sandboxed_helper) == before
    assert not any(sandboxed_helper.outside.iterdir())


# -- HTTP into the egress -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def egress() -> Iterator[EgressHttpTarget]:
    yield from _started(EgressHttpTarget)


def _http(egress_port: int) -> st.SearchStrategy[bytes]:
    allowed = f"{ALLOWED}:{egress_port}"
    methods = st.sampled_from(["GET", "POST", "CONNECT", "HEAD", "PUT", "get", "G\0T", "GET GET", ""]) | st.text(
        max_size=8)
    targets = st.sampled_from([
        f"http://{allowed}/hello", "http://evil.example/", f"http://{ALLOWED}:99999/", f"http://{ALLOWED}:0/",
        f"http://user:pw@{allowed}/", f"http://{allowed}@evil.example/", "http://[::1]/", "http://[::1/",
        "http://upstream]]].x/", "http://127.0.0.1/", "http://0x7f.1/", "http://169.254.169.254/latest",
        f"https://{allowed}/", f"ftp://{allowed}/", "/relative", "*", f"{allowed}", "evil.example:443",
        "[::1]:443", "[::1", "host:", ":443", f"{ALLOWED}:443:1", f"{ALLOWED.upper()}:443", f"{ALLOWED}.:443",
        "xn--nxasmq6b.example:443", "\u00e9.example:443", "%65vil.example:443", f"http://{allowed}/\u00e9",
        f"http://{allowed}/a b", "http://" + "a" * 300 + ".example/",
    ]) | st.text(max_size=40)
    versions = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/0.9", "HTTP/2", "HTTP/1.1 x", "", "HTTP/1.10"])
    header_names = st.sampled_from(["Host", "host", "HOST", "Content-Length", "Transfer-Encoding", "Connection",
                                    "Proxy-Authorization", "Upgrade", "Expect", "X-A", "Bad Name", "X\0", ""])
    header_values = st.sampled_from([allowed, "evil.example", f"{ALLOWED}:1", "0", "-1", "3", "99999999999999999999",
                                     "chunked", "gzip, chunked", "chunked, identity", "close", "Upgrade",
                                     "websocket", "100-continue", "a\rb", "\u00e9", "x" * 70_000, ""]) | st.text(
        max_size=20)
    headers = st.lists(st.tuples(header_names, header_values), max_size=5)
    bodies = st.sampled_from([b"", b"abc", b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\nx\r\n", b"ffffffffffffffff\r\n",
                              b"5\r\nhel", b"0\r\nTrailer: x\r\n\r\n", b"3;ext=1\r\nabc\r\n0\r\n\r\n"]) | st.binary(
        max_size=100)
    line_ends = st.sampled_from(["\r\n", "\n", "\r"])

    def build(method: str, target: str, version: str, hdrs: list[tuple[str, str]], body: bytes, eol: str,
              second: bool) -> bytes:
        head = f"{method} {target} {version}{eol}" + "".join(f"{k}: {v}{eol}" for k, v in hdrs) + eol
        data = head.encode("utf-8", "surrogatepass") + body
        if second:  # a pipelined good request after the hostile one
            data += f"GET http://{allowed}/hello HTTP/1.1\r\nHost: {allowed}\r\n\r\n".encode()
        return data

    return st.builds(build, methods, targets, versions, headers, bodies, line_ends, st.booleans())


@settings(FUZZ, max_examples=examples(50))
@given(data=st.data())
def test_malformed_http_into_the_egress_gets_a_clear_refusal_or_a_close(egress: EgressHttpTarget,
                                                                        data: st.DataObject) -> None:
    preambles = st.sampled_from([b"SILO-SESSION other\nTCP\n", b"SILO-SESSION fuzz\nDNS\n", b"SILO-SESSION fuzz\n",
                                 b"SILO-RELAY " + b"A" * 40 + b"\nTCP\n", b"SILO-SESSION " + b"f" * 70 + b"\nTCP\n",
                                 b"SILO-SESSION fu\0zz\nTCP\n"])
    own_preamble = st.builds(lambda pre, rest: pre + rest, preambles, _http(egress.web_port))
    egress.one(data.draw(_http(egress.web_port) | own_preamble | st.binary(max_size=300)))
    egress.healthy()  # and a good request right after is served


def test_a_relay_line_for_another_session_or_forged_gets_nothing_through(egress: EgressHttpTarget) -> None:
    good = f"GET http://{ALLOWED}:{egress.web_port}/hello HTTP/1.1\r\nHost: {ALLOWED}:{egress.web_port}\r\n\r\n"
    egress.upstream.asked.clear()
    other = egress.run(egress.exchange(good.encode(), preamble=b"SILO-SESSION other\nTCP\n"))
    assert other.startswith(b"HTTP/1.1 403 ") and b"X-Devsilo-Blocked: no policy for this session" in other, other
    forged = egress.run(egress.exchange(good.encode(), preamble=b"SILO-RELAY " + b"A" * 40 + b"\nTCP\n"))
    assert forged == b""  # a signed line where nothing checks signatures: closed unanswered
    assert egress.proxy.refused_preambles >= 1 and egress.upstream.asked == []


def test_the_egress_refuses_an_oversized_head_and_still_serves(egress: EgressHttpTarget) -> None:
    huge = f"GET http://{ALLOWED}:{egress.web_port}/ HTTP/1.1\r\nHost: {ALLOWED}\r\nX-Big: {'a' * 200_000}\r\n\r\n"
    out = egress.run(egress.exchange(huge.encode()))
    assert out.startswith(b"HTTP/1.1 4") and b"X-Devsilo-Blocked: " in out, out[:300]
    egress.healthy()
    assert set(egress.upstream.asked) <= {ALLOWED} and egress.dns.queries <= {ALLOWED}


def test_an_unsplittable_url_gets_a_400_that_says_why(egress: EgressHttpTarget) -> None:
    # Found by fuzzing: urlsplit's ValueError ("Invalid IPv6 URL") escaped the proxy, which then
    # dropped the connection unanswered and logged an unhandled exception.
    for target in (b"http://upstream]]]]].fuzz.test:1/echo", b"http://[::1/", b"http://a]b/"):
        request = b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        egress.one(request)
        out = egress.run(egress.exchange(request))
        assert out.startswith(b"HTTP/1.1 400 ") and b"X-Devsilo-Blocked: bad request target" in out, out
    egress.healthy()


# -- DNS into the relay and the egress --------------------------------------------------------


@pytest.fixture(scope="module")
def resolver() -> Iterator[DnsTarget]:
    yield from _started(DnsTarget)


def _dns_message(name: str, qtype: str, qid: int, flags: int, cut: int | None) -> bytes:
    wire = bytearray(dns_query(name, qtype, qid))
    struct.pack_into(">H", wire, 2, flags)
    return bytes(wire[:cut])


dns_names = st.sampled_from([ALLOWED, ALLOWED.upper(), "evil.example", "169.254.169.254", "localhost",
                             "a" * 63 + "." + ALLOWED, "xn--80ak6aa92e.com", "*." + ALLOWED, ALLOWED + "."])
dns_messages = st.builds(_dns_message, dns_names, st.sampled_from(["A", "AAAA", "TXT", "ANY", "PTR", "AXFR", "CNAME"]),
                         st.integers(0, 65535), st.integers(0, 65535), st.none() | st.integers(0, 40)) | st.binary(
    max_size=80)


@settings(FUZZ, max_examples=examples(60))
@given(where=st.sampled_from([b"\0", b"\1", b"\2"]), messages=st.lists(dns_messages, min_size=1, max_size=4),
       tail=st.sampled_from([b"", b"\0", b"\x00\x20abc", b"\xff\xff"]))
def test_odd_dns_gets_an_error_code_or_is_dropped_and_the_resolver_goes_on(
        resolver: DnsTarget, where: bytes, messages: list[bytes], tail: bytes) -> None:
    stream = b"".join(struct.pack(">H", len(m)) + m for m in messages) + tail
    resolver.one(where + stream)
    resolver.healthy()


def test_a_dns_response_sent_as_a_query_is_dropped_and_the_stream_goes_on(resolver: DnsTarget) -> None:
    # Found by fuzzing: a message with QR set made dnspython's make_response raise FormError, which
    # escaped the egress's DNS loop: the relay connection died, and the queries after it with it.
    response = _dns_message(ALLOWED, "A", 7, 0x8100, None)
    good = dns_query(ALLOWED, "A", 8)
    stream = b"".join(struct.pack(">H", len(m)) + m for m in (response, good))
    resolver.one(b"\1" + stream)
    answers = resolver.run(resolver.via_egress(stream))
    assert [a[:2] for a in answers] == [b"\0\x08"] and answers[0][3] & 0xF == 0, answers
    resolver.healthy()


def test_the_harness_waits_as_long_as_the_sandbox_resolver() -> None:
    assert fuzz_module.DNS_TIMEOUT_S == helper_module.DNS_TIMEOUT_S


def test_a_hostile_helper_mtime_past_any_float_is_a_protocol_violation(helper_answers: HelperAnswersTarget) -> None:
    # Found by fuzzing: float() of a huge JSON integer raised OverflowError out of list_dir.
    entry = {"name": "a", "type": "file", "size": 1, "mode": 420, "mtime": 10**400}
    helper_answers.one(bytes([2, 2]) + json.dumps({"entries": [entry]}).encode())

    async def listing() -> None:
        ours, theirs = socket.socketpair()
        client = HelperClient(ours)
        await client.start()
        try:
            task = asyncio.ensure_future(client.list_dir("."))
            request = json.loads(await asyncio.get_running_loop().run_in_executor(None, theirs.recv, 65536))
            answer = {"id": request["id"], "ok": True, "path": "/workspace", "total": 1, "truncated": False,
                      "entries": [entry]}
            theirs.sendall(json.dumps(answer).encode() + b"\n")
            with pytest.raises(SandboxError, match="mtime out of range"):
                await task
            assert client.closed
        finally:
            theirs.close()
            await client.close()

    helper_answers.run(listing())
