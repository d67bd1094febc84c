"""Hypothesis-generated frames against a real gateway over real TLS WebSocket.

Malformed JSON, wrong types, huge fields, binary frames, unknown types and
deep nesting, before and after authentication: the gateway never crashes,
answers every frame (``error``, or ``auth_error`` before authentication),
and a normal request works afterwards. Valid frames about transfers, shells,
sessions, uploads and keys the client does not have reach the handlers and
get a clear error too. (``tests/test_fuzz.py`` parses every frame type in
process; ``tests/test_fuzz_atheris.py`` fuzzes the parsing coverage-guided.)
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar, get_args

import aiohttp
import pytest
from devsilo.cli._client import GatewayClient
from devsilo.protocol._messages import ShellSignalName
from devsilo.protocol.client import (
    CLIENT_REQUEST,
    GATEWAY_FRAME,
    Attach,
    CostRequest,
    JournalExport,
    ListSessions,
    Ping,
    Pong,
    RevokeClient,
    Sessions,
    ShellInputFrame,
    ShellResizeFrame,
    ShellSignalFrame,
    UploadChunk,
    UploadFile,
    WorkspaceChunk,
    WorkspaceFetchChunk,
    WorkspaceTransferDone,
    WorkspaceUploadCommit,
)
from devsilo.runtime._state import StateDir
from devsilo.testing import Stack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

T = TypeVar("T")
# A failing example of a megabyte would be printed whole; Hypothesis warns about that, which would hide the failure.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
FRAME_LIMIT = 1024 * 1024  # the gateway's MAX_CLIENT_FRAME: larger frames close the socket (1009)
ANSWER_TIMEOUT_S = 15.0

# Request types whose fields the fuzzer mutates. Session-creating, shell and workspace
# requests are left out: a mutation that happens to be valid would start real work.
TYPES = ("attach", "request_events", "prompt", "interrupt", "shutdown", "access_report", "cost",
         "upload_file", "upload_chunk", "ping", "list_sessions", "authenticate", "answer_question")
FIELDS = ("session_id", "from_seq", "limit", "text", "upload_id", "path", "size", "sha256", "offset", "data",
          "v", "method", "token", "client_name", "question_id")

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=40)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)

wrong_types = st.builds(lambda t, fields: json.dumps({"type": t, **fields}),
                        st.sampled_from(TYPES), st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=5))
unknown_types = st.builds(lambda t, rest: json.dumps({"type": t, **rest}), st.text(max_size=30),
                          st.dictionaries(st.text(max_size=8), json_values, max_size=3))
huge_fields = st.builds(lambda t, f, n: json.dumps({"type": t, "session_id": "s", f: "A" * n}),
                        st.sampled_from(TYPES), st.sampled_from(FIELDS), st.integers(100_000, 900_000))
deep_nesting = st.builds(lambda d, opener: opener[0] * d + opener[1] * d, st.integers(100, 100_000),
                         st.sampled_from([("[", "]"), ('{"type":', "}")]))
malformed = st.text(max_size=200).filter(lambda s: not _is_json(s)) | st.builds(
    lambda t: '{"type": "ping"' + t, st.text(max_size=20))
any_json = st.builds(json.dumps, json_values)
binary = st.binary(max_size=2000)

frames = wrong_types | unknown_types | huge_fields | deep_nesting | malformed | any_json | binary


def _is_json(s: str) -> bool:
    try:
        json.loads(s)
    except ValueError:
        return False
    return True


def is_valid_request(frame: str | bytes) -> bool:
    if isinstance(frame, bytes):
        return False
    try:
        CLIENT_REQUEST.validate_json(frame)
    except ValidationError:
        return False
    return True


class LoopThread:
    """An event loop in a thread, so that synchronous Hypothesis examples can drive one connection."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack whose gateway does not rate-limit (every frame must get its answer, not overloaded)."""
    s = Stack(tmp_path_factory.mktemp("fuzz") / "state",
              services={"gateway": {"options": {"client_rate": 100_000}}})
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


class RawClient:
    """A WebSocket client that sends whatever it is given (no frame models)."""

    def __init__(self, stack: Stack) -> None:
        self.state = StateDir(stack.state_dir)
        self.url = f"wss://127.0.0.1:{stack.gateway_port}/ws"
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.client: GatewayClient | None = None

    async def open(self) -> list[dict[str, Any]]:
        """Connect; the gateway's greeting (hello, then the challenge a paired key would sign)."""
        self.session = aiohttp.ClientSession()
        fp = bytes.fromhex(self.state.gateway_fingerprint().replace(":", "").lower())
        self.ws = await self.session.ws_connect(self.url, ssl=aiohttp.Fingerprint(fp), max_msg_size=16 << 20)
        return [await self.answer(), await self.answer()]

    async def authenticate(self) -> None:
        """Connect and authenticate with the local token, as the CLI does."""
        self.client = GatewayClient(self.url, self.state.gateway_fingerprint(), client_name="fuzzer")
        await self.client.connect(self.state.client_token())
        self.ws = self.client._ws

    async def send(self, frame: str | bytes) -> None:
        assert self.ws is not None
        if isinstance(frame, bytes):
            await self.ws.send_bytes(frame)
        else:
            await self.ws.send_str(frame)

    async def answer(self) -> dict[str, Any]:
        """The next frame, checked against the gateway's frame models."""
        assert self.ws is not None
        msg = await self.ws.receive(timeout=ANSWER_TIMEOUT_S)
        assert msg.type == aiohttp.WSMsgType.TEXT, f"connection ended: {msg.type.name} {msg.data!r}"
        GATEWAY_FRAME.validate_json(msg.data)
        data: dict[str, Any] = json.loads(msg.data)
        return data

    async def until_closed(self, most: int) -> list[dict[str, Any]]:
        """Every frame until the gateway closes the connection (at most ``most``)."""
        assert self.ws is not None
        got: list[dict[str, Any]] = []
        while True:
            msg = await self.ws.receive(timeout=ANSWER_TIMEOUT_S)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return got
            assert msg.type == aiohttp.WSMsgType.TEXT and len(got) < most, (msg, got)
            GATEWAY_FRAME.validate_json(msg.data)
            got.append(json.loads(msg.data))

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        elif self.ws is not None:
            await self.ws.close()
        if self.session is not None:
            await self.session.close()


@pytest.fixture(scope="module")
def authed(stack: Stack, loop: LoopThread) -> Iterator[RawClient]:
    client = RawClient(stack)
    loop.run(client.authenticate())
    yield client
    loop.run(client.close())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow, HealthCheck.data_too_large])
@given(frame=frames)
def test_authenticated_gateway_answers_every_generated_frame(stack: Stack, loop: LoopThread, authed: RawClient,
                                                             frame: str | bytes) -> None:
    assert len(frame) < FRAME_LIMIT
    loop.run(authed.send(frame))
    answer = loop.run(authed.answer())
    if not is_valid_request(frame):
        assert answer["type"] == "error" and answer["message"], answer


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow, HealthCheck.data_too_large])
@given(frame=frames)
def test_unauthenticated_gateway_answers_every_generated_frame_with_auth_error(stack: Stack, loop: LoopThread,
                                                                               frame: str | bytes) -> None:
    async def attempt() -> list[dict[str, Any]]:
        client = RawClient(stack)
        try:
            assert [g["type"] for g in await client.open()] == ["hello", "challenge"]
            await client.send(frame)
            return await client.until_closed(most=3)
        finally:
            await client.close()

    answers = loop.run(attempt())
    # An auth_error, and then the connection closes; a frame that is not even valid may also get an error.
    auth_errors = [a for a in answers if a["type"] == "auth_error"]
    assert len(auth_errors) == 1 and auth_errors[0]["message"], answers
    assert all(a["type"] in ("auth_error", "error") for a in answers), answers


ids = st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z")
sha256s = st.from_regex(r"\A[0-9a-f]{64}\Z")
b64_or_not = st.binary(max_size=48).map(lambda b: base64.b64encode(b).decode()) | st.text(max_size=16)
offsets = st.integers(0, 2**63) | st.integers(0, 4)
# Valid frames, hostile values: past parsing, into the handlers (transfers, shells, journal, uploads, keys),
# for transfers, shells, sessions and keys this client does not have. None starts real work.
valid_hostile = st.one_of(
    st.builds(WorkspaceChunk, transfer_id=ids, index=offsets, sha256=sha256s, data=b64_or_not),
    st.builds(WorkspaceUploadCommit, transfer_id=ids),
    st.builds(WorkspaceFetchChunk, transfer_id=ids, index=offsets),
    st.builds(WorkspaceTransferDone, transfer_id=ids),
    st.builds(ShellInputFrame, shell_id=ids, data=b64_or_not, eof=st.booleans()),
    st.builds(ShellResizeFrame, shell_id=ids, rows=st.integers(1, 1000), cols=st.integers(1, 1000)),
    st.builds(ShellSignalFrame, shell_id=ids, signal=st.sampled_from(get_args(ShellSignalName))),
    st.builds(JournalExport, session_id=ids, after=offsets, offset=offsets),
    st.builds(RevokeClient, key_id=st.from_regex(r"\A[0-9a-f]{16,64}\Z")),
    st.builds(UploadFile, session_id=ids, upload_id=ids, size=offsets, sha256=sha256s,
              path=st.sampled_from(["../x", "/etc/passwd", "a\0b", "ok.txt", "é/" * 200 + "f"])),
    st.builds(UploadChunk, upload_id=ids, offset=offsets, data=b64_or_not),
    st.builds(Attach, session_id=ids), st.builds(CostRequest, session_id=ids),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(frame=valid_hostile)
def test_valid_frames_about_what_the_client_does_not_have_get_a_clear_error(
        stack: Stack, loop: LoopThread, authed: RawClient, frame: Any) -> None:
    loop.run(authed.send(frame.model_dump_json()))
    answer = loop.run(authed.answer())
    assert answer["type"] == "error" and answer["code"] != "internal" and answer["message"], (frame, answer)
    assert answer.get("request") == frame.type, answer


def test_gateway_still_serves_after_the_fuzzing(stack: Stack, loop: LoopThread, authed: RawClient) -> None:
    started = stack.health("gateway")
    assert started is not None and started["ok"]

    async def normal() -> None:
        state = StateDir(stack.state_dir)
        async with GatewayClient(authed.url, state.gateway_fingerprint(), client_name="after") as client:
            await client.connect(state.client_token())
            await client.send(Ping())
            assert isinstance(await client.receive(), Pong)
            await client.send(ListSessions())
            assert isinstance(await client.receive(), Sessions)

    loop.run(normal())
    loop.run(authed.send(Ping().model_dump_json()))  # the fuzzed connection itself goes on too
    assert loop.run(authed.answer())["type"] == "pong"
    assert "Traceback" not in (stack.state_dir / "logs" / "gateway.log").read_text()
    # The supervisor never had to restart it: it is the first gateway process.
    assert stack.live_pid("gateway") == stack.service_pid("gateway")
