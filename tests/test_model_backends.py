"""The Anthropic Messages and OpenAI Responses backends against local servers speaking each wire format."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import pytest
from aiohttp import web
from devsilo.harness._anthropic import AnthropicModel
from devsilo.harness._backends import make_model
from devsilo.harness._model import ModelFailure, UnavailableModel, Usage
from devsilo.harness._openai import OpenAIResponsesModel
from devsilo.harness._retry import RetryPolicy
from devsilo.protocol import LLMChoice
from devsilo.testing import Stack
from devsilo.testing._nats import free_port
from test_realtime_local import Reply as WSReply
from test_realtime_local import Server as WSServer
from test_realtime_local import chat_command, realtime_events

ANTHROPIC_KEY = "sk-ant-planted-0123456789abcdef-KEY"
OPENAI_KEY = "sk-proj-planted-fedcba9876543210-KEY"
FAST = RetryPolicy(attempts=4, base_delay_s=0.001, max_delay_s=5.0)


# --- a local API server ----------------------------------------------------------------------

@dataclass
class Reply:
    """One canned answer: an SSE stream, an error status, or a connection dropped mid-stream."""

    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    status: int = 200
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False


class APIServer:
    """An aiohttp server on its own thread that answers POSTs to ``path`` from a queue of replies."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.replies: list[Reply] = []
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    def __enter__(self) -> Self:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post(self.path, self._handle)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = self._runner.addresses[0][1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        if not self.replies:
            return web.json_response({"error": {"type": "api_error", "message": "no reply queued"}},
                                     status=500)
        reply = self.replies.pop(0)
        if reply.status != 200:
            return web.json_response(reply.body, status=reply.status, headers=reply.headers)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await resp.prepare(request)
        for i, (name, data) in enumerate(reply.events):
            if reply.drop and i == len(reply.events) // 2:
                assert request.transport is not None
                request.transport.close()
                return resp
            await resp.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        await resp.write_eof()
        return resp


# --- the wire formats ------------------------------------------------------------------------

def anthropic_stream(text: str, tool: tuple[str, str, dict[str, Any]] | None = None, *,
                     usage: dict[str, int] | None = None, out_tokens: int = 12) -> list[tuple[str, dict[str, Any]]]:
    """A Messages API SSE stream: optional text block, then optional tool_use block in JSON pieces."""
    u = {"input_tokens": 30, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
         "output_tokens": 1, **(usage or {})}
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_01", "type": "message", "role": "assistant", "content": [], "model": "claude-x",
            "stop_reason": None, "stop_sequence": None, "usage": u}}),
        ("ping", {"type": "ping"}),
    ]
    index = 0
    if text:
        events += [
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            *[("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": piece}})
              for piece in (text[: len(text) // 2], text[len(text) // 2:])],
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ]
        index = 1
    if tool:
        tid, name, args = tool
        raw = json.dumps(args)
        pieces = ["", raw[:5], raw[5:11], raw[11:]]
        events += [
            ("content_block_start", {"type": "content_block_start", "index": index, "content_block": {
                "type": "tool_use", "id": tid, "name": name, "input": {}}}),
            *[("content_block_delta", {"type": "content_block_delta", "index": index,
                                       "delta": {"type": "input_json_delta", "partial_json": p}})
              for p in pieces],
            ("content_block_stop", {"type": "content_block_stop", "index": index}),
        ]
    events += [
        ("message_delta", {"type": "message_delta",
                           "delta": {"stop_reason": "tool_use" if tool else "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": out_tokens}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    return events


def openai_stream(text: str, tool: tuple[str, str, dict[str, Any]] | None = None, *,
                  input_tokens: int = 40, cached: int = 0, out_tokens: int = 9) -> list[tuple[str, dict[str, Any]]]:
    """A Responses API SSE stream: optional message item with text deltas, optional function_call item."""
    seq = iter(range(1000))
    base = {"id": "resp_1", "object": "response", "created_at": 1700000000, "model": "gpt-x",
            "output": [], "usage": None, "error": None, "incomplete_details": None, "instructions": None,
            "metadata": {}, "parallel_tool_calls": True, "temperature": 1.0, "tool_choice": "auto",
            "tools": [], "top_p": 1.0}
    events: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"type": "response.created", "sequence_number": next(seq),
                              "response": {**base, "status": "in_progress"}}),
        ("response.in_progress", {"type": "response.in_progress", "sequence_number": next(seq),
                                  "response": {**base, "status": "in_progress"}}),
    ]
    output: list[dict[str, Any]] = []
    if text:
        done_msg = {"id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}
        events += [
            ("response.output_item.added", {"type": "response.output_item.added", "sequence_number": next(seq),
                                            "output_index": 0, "item": {
                                                "id": "msg_1", "type": "message", "status": "in_progress",
                                                "role": "assistant", "content": []}}),
            ("response.content_part.added", {"type": "response.content_part.added", "sequence_number": next(seq),
                                             "item_id": "msg_1", "output_index": 0, "content_index": 0,
                                             "part": {"type": "output_text", "text": "", "annotations": []}}),
            *[("response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": next(seq),
                                              "item_id": "msg_1", "output_index": 0, "content_index": 0,
                                              "delta": piece, "logprobs": []})
              for piece in (text[: len(text) // 2], text[len(text) // 2:])],
            ("response.output_text.done", {"type": "response.output_text.done", "sequence_number": next(seq),
                                           "item_id": "msg_1", "output_index": 0, "content_index": 0,
                                           "text": text, "logprobs": []}),
            ("response.content_part.done", {"type": "response.content_part.done", "sequence_number": next(seq),
                                            "item_id": "msg_1", "output_index": 0, "content_index": 0,
                                            "part": done_msg["content"][0]}),
            ("response.output_item.done", {"type": "response.output_item.done", "sequence_number": next(seq),
                                           "output_index": 0, "item": done_msg}),
        ]
        output.append(done_msg)
    if tool:
        call_id, name, args = tool
        raw = json.dumps(args)
        idx = len(output)
        done_call = {"id": "fc_1", "type": "function_call", "status": "completed", "arguments": raw,
                     "call_id": call_id, "name": name}
        events += [
            ("response.output_item.added", {"type": "response.output_item.added", "sequence_number": next(seq),
                                            "output_index": idx, "item": {**done_call, "status": "in_progress",
                                                                          "arguments": ""}}),
            *[("response.function_call_arguments.delta", {
                "type": "response.function_call_arguments.delta", "sequence_number": next(seq),
                "item_id": "fc_1", "output_index": idx, "delta": p}) for p in (raw[:7], raw[7:])],
            ("response.function_call_arguments.done", {
                "type": "response.function_call_arguments.done", "sequence_number": next(seq),
                "item_id": "fc_1", "output_index": idx, "name": name, "arguments": raw}),
            ("response.output_item.done", {"type": "response.output_item.done", "sequence_number": next(seq),
                                           "output_index": idx, "item": done_call}),
        ]
        output.append(done_call)
    usage = {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": cached},
             "output_tokens": out_tokens, "output_tokens_details": {"reasoning_tokens": 0},
             "total_tokens": input_tokens + out_tokens}
    events.append(("response.completed", {"type": "response.completed", "sequence_number": next(seq),
                                          "response": {**base, "status": "completed", "output": output,
                                                       "usage": usage}}))
    return events


def anthropic_error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status=status, body={"type": "error", "error": {"type": kind, "message": message}},
                 headers=headers or {})


def openai_error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status=status, body={"error": {"message": message, "type": kind, "param": None,
                                                "code": None}}, headers=headers or {})


CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are running headless."},
    {"role": "user", "content": "count the files"},
]


def sent_credentials(headers: dict[str, str]) -> str:
    """The credential headers of a request (the SDK sends Anthropic's key as x-api-key or bearer)."""
    return headers.get("x-api-key", "") + " " + headers.get("authorization", "")


class Sleeps:
    """A sleep that records how long it was asked to wait and returns at once."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest.fixture
def anthropic_server() -> Iterator[APIServer]:
    with APIServer("/v1/messages") as server:
        yield server


@pytest.fixture
def openai_server() -> Iterator[APIServer]:
    with APIServer("/v1/responses") as server:
        yield server


# --- Anthropic, unit level -------------------------------------------------------------------

async def test_anthropic_tool_conversation_sends_tools_results_and_cache_control(
        anthropic_server: APIServer) -> None:
    anthropic_server.replies += [
        Reply(anthropic_stream("Let me look.", ("toolu_01", "Bash", {"command": "ls | wc -l"}))),
        Reply(anthropic_stream("", ("toolu_02", "Exit", {"message": "3 files"}))),
    ]
    model = AnthropicModel("claude-x", ANTHROPIC_KEY, base_url=anthropic_server.url, policy=FAST)
    try:
        messages = list(CONVERSATION)
        first = await model.complete(messages, ["Bash", "Read", "Exit"])
        assert first.text == "Let me look."
        assert [(c.id, c.name, c.input) for c in first.tool_calls] == [("toolu_01", "Bash", {"command": "ls | wc -l"})]
        messages += [
            {"role": "assistant", "content": first.text,
             "tool_calls": [{"id": "toolu_01", "name": "Bash", "input": {"command": "ls | wc -l"}}]},
            {"role": "tool", "tool_call_id": "toolu_01", "content": "3\n", "is_error": False},
        ]
        second = await model.complete(messages, ["Bash", "Read", "Exit"])
        assert second.tool_calls[0].name == "Exit" and second.tool_calls[0].input == {"message": "3 files"}
    finally:
        await model.aclose()

    req1, req2 = anthropic_server.requests
    assert req1["stream"] is True and req1["model"] == "claude-x" and req1["max_tokens"] > 0
    assert req1["system"] == [{"type": "text", "text": "You are running headless.",
                               "cache_control": {"type": "ephemeral"}}]
    assert [t["name"] for t in req1["tools"]] == ["Bash", "Read", "Exit"]
    assert req1["tools"][0]["input_schema"]["properties"]["command"]["type"] == "string"
    assert req1["tools"][0]["input_schema"]["required"] == ["command"]
    assert req1["tools"][-1]["cache_control"] == {"type": "ephemeral"}
    assert "cache_control" not in req1["tools"][0]
    assert req1["messages"] == [{"role": "user", "content": [{"type": "text", "text": "count the files"}]}]
    assert req2["messages"][1:] == [
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_01", "name": "Bash", "input": {"command": "ls | wc -l"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": "3\n", "is_error": False}]},
    ]
    assert ANTHROPIC_KEY in sent_credentials(anthropic_server.headers[0])
    assert "anthropic-version" in anthropic_server.headers[0]


async def test_anthropic_usage_counts_cache_reads_and_writes(anthropic_server: APIServer) -> None:
    anthropic_server.replies.append(Reply(anthropic_stream(
        "hi", usage={"input_tokens": 7, "cache_read_input_tokens": 1200, "cache_creation_input_tokens": 300},
        out_tokens=42)))
    model = AnthropicModel("claude-x", ANTHROPIC_KEY, base_url=anthropic_server.url, policy=FAST)
    try:
        response = await model.complete(CONVERSATION, ["Bash"])
    finally:
        await model.aclose()
    assert response.usage == Usage(input_tokens=1507, output_tokens=42, cached_tokens=1200,
                                   cache_write_tokens=300)


async def test_anthropic_retries_429_with_retry_after_and_503_then_succeeds(anthropic_server: APIServer) -> None:
    anthropic_server.replies += [
        anthropic_error(429, "rate_limit_error", "slow down", {"retry-after": "3"}),
        anthropic_error(503, "api_error", "unavailable"),
        Reply(anthropic_stream("made it")),
    ]
    sleeps = Sleeps()
    model = AnthropicModel("claude-x", ANTHROPIC_KEY, base_url=anthropic_server.url, policy=FAST, sleep=sleeps)
    try:
        response = await model.complete(CONVERSATION, [])
    finally:
        await model.aclose()
    assert response.text == "made it"
    assert len(anthropic_server.requests) == 3
    assert sleeps.waits[0] == 3.0  # the server's retry-after
    assert len(sleeps.waits) == 2 and 0 < sleeps.waits[1] <= FAST.base_delay_s * 2


async def test_anthropic_does_not_retry_a_400(anthropic_server: APIServer) -> None:
    anthropic_server.replies += [anthropic_error(400, "invalid_request_error", "max_tokens: too large"),
                                 Reply(anthropic_stream("never"))]
    sleeps = Sleeps()
    model = AnthropicModel("claude-x", ANTHROPIC_KEY, base_url=anthropic_server.url, policy=FAST, sleep=sleeps)
    try:
        with pytest.raises(ModelFailure, match="HTTP 400: max_tokens: too large"):
            await model.complete(CONVERSATION, [])
    finally:
        await model.aclose()
    assert len(anthropic_server.requests) == 1 and sleeps.waits == []


async def test_anthropic_retries_a_connection_dropped_mid_stream(anthropic_server: APIServer) -> None:
    anthropic_server.replies += [Reply(anthropic_stream("lost", ("toolu_x", "Bash", {"command": "ls"})), drop=True),
                                 Reply(anthropic_stream("again"))]
    sleeps = Sleeps()
    model = AnthropicModel("claude-x", ANTHROPIC_KEY, base_url=anthropic_server.url, policy=FAST, sleep=sleeps)
    try:
        response = await model.complete(CONVERSATION, [])
    finally:
        await model.aclose()
    assert response.text == "again" and response.tool_calls == ()
    assert len(anthropic_server.requests) == 2 and len(sleeps.waits) == 1


async def test_anthropic_gives_a_clear_error_after_the_last_attempt(anthropic_server: APIServer) -> None:
    anthropic_server.replies += [anthropic_error(529, "overloaded_error", "Overloaded")] * FAST.attempts
    model = AnthropicModel("claude-x", ANTHROPIC_KEY, base_url=anthropic_server.url, policy=FAST,
                           sleep=Sleeps())
    try:
        with pytest.raises(ModelFailure, match=r"claude-x failed after 4 attempts; last error: HTTP 529"):
            await model.complete(CONVERSATION, [])
    finally:
        await model.aclose()
    assert len(anthropic_server.requests) == FAST.attempts


async def test_anthropic_retries_an_overloaded_error_event_inside_the_stream(anthropic_server: APIServer) -> None:
    overloaded = ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    anthropic_server.replies += [Reply([*anthropic_stream("partial")[:3], overloaded]),
                                 Reply(anthropic_stream("whole"))]
    model = AnthropicModel("claude-x", ANTHROPIC_KEY, base_url=anthropic_server.url, policy=FAST,
                           sleep=Sleeps())
    try:
        response = await model.complete(CONVERSATION, [])
    finally:
        await model.aclose()
    assert response.text == "whole" and len(anthropic_server.requests) == 2


async def test_streamed_text_deltas_reach_the_text_sink(anthropic_server: APIServer,
                                                        openai_server: APIServer) -> None:
    anthropic_server.replies.append(Reply(anthropic_stream("abcdef")))
    openai_server.replies.append(Reply(openai_stream("uvwxyz")))
    pieces: list[str] = []

    async def sink(text: str) -> None:
        pieces.append(text)

    claude = AnthropicModel("claude-x", ANTHROPIC_KEY, base_url=anthropic_server.url, on_text=sink)
    gpt = OpenAIResponsesModel("gpt-x", OPENAI_KEY, base_url=openai_server.url + "/v1", on_text=sink)
    try:
        await claude.complete(CONVERSATION, [])
        await gpt.complete(CONVERSATION, [])
    finally:
        await claude.aclose()
        await gpt.aclose()
    assert pieces == ["abc", "def", "uvw", "xyz"]


@pytest.mark.parametrize(("failed", "retry_after", "jitter", "expected"), [
    (1, None, 0.0, 0.5),   # first retry: half the base delay at the lowest jitter
    (1, None, 0.5, 0.75),
    (3, None, 0.0, 2.0),   # doubles per failure
    (10, None, 0.0, 5.0),  # capped at max_delay_s, then jittered
    (1, 7.0, 0.9, 7.0),    # the server's retry-after, without jitter
    (1, 99.0, 0.0, 10.0),  # ... but never beyond max_delay_s
])
def test_retry_delay_backs_off_exponentially_with_jitter(failed: int, retry_after: float | None,
                                                         jitter: float, expected: float) -> None:
    assert RetryPolicy(attempts=5, base_delay_s=1.0, max_delay_s=10.0).delay(failed, retry_after, jitter) == expected


# --- OpenAI Responses, unit level ------------------------------------------------------------

async def test_openai_tool_conversation_sends_functions_and_call_outputs(openai_server: APIServer) -> None:
    openai_server.replies += [
        Reply(openai_stream("Checking.", ("call_1", "Bash", {"command": "ls | wc -l"}))),
        Reply(openai_stream("", ("call_2", "Exit", {"message": "3 files"}))),
    ]
    model = OpenAIResponsesModel("gpt-x", OPENAI_KEY, base_url=openai_server.url + "/v1", policy=FAST)
    try:
        messages = list(CONVERSATION)
        first = await model.complete(messages, ["Bash", "Exit"])
        assert first.text == "Checking."
        assert [(c.id, c.name, c.input) for c in first.tool_calls] == [("call_1", "Bash", {"command": "ls | wc -l"})]
        messages += [
            {"role": "assistant", "content": first.text,
             "tool_calls": [{"id": "call_1", "name": "Bash", "input": {"command": "ls | wc -l"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "3\n", "is_error": False},
        ]
        second = await model.complete(messages, ["Bash", "Exit"])
        assert second.tool_calls[0].name == "Exit" and second.tool_calls[0].input == {"message": "3 files"}
    finally:
        await model.aclose()

    req1, req2 = openai_server.requests
    assert req1["stream"] is True and req1["model"] == "gpt-x" and req1["store"] is False
    assert req1["instructions"] == "You are running headless."
    assert req1["tools"][0]["type"] == "function" and req1["tools"][0]["name"] == "Bash"
    assert req1["tools"][0]["parameters"]["required"] == ["command"]
    assert req1["input"] == [{"role": "user", "content": "count the files"}]
    assert req2["input"][1:] == [
        {"role": "assistant", "content": "Checking."},
        {"type": "function_call", "call_id": "call_1", "name": "Bash", "arguments": '{"command": "ls | wc -l"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "3\n"},
    ]
    assert openai_server.headers[0]["authorization"] == f"Bearer {OPENAI_KEY}"


async def test_openai_usage_counts_cached_tokens(openai_server: APIServer) -> None:
    openai_server.replies.append(Reply(openai_stream("hi", input_tokens=2000, cached=1536, out_tokens=17)))
    model = OpenAIResponsesModel("gpt-x", OPENAI_KEY, base_url=openai_server.url + "/v1", policy=FAST)
    try:
        response = await model.complete(CONVERSATION, [])
    finally:
        await model.aclose()
    assert response.usage == Usage(input_tokens=2000, output_tokens=17, cached_tokens=1536)


async def test_openai_retries_429_with_retry_after_and_503_then_succeeds(openai_server: APIServer) -> None:
    openai_server.replies += [
        openai_error(429, "requests", "Rate limit reached", {"retry-after": "2"}),
        openai_error(503, "server_error", "unavailable"),
        Reply(openai_stream("made it")),
    ]
    sleeps = Sleeps()
    model = OpenAIResponsesModel("gpt-x", OPENAI_KEY, base_url=openai_server.url + "/v1", policy=FAST,
                                 sleep=sleeps)
    try:
        response = await model.complete(CONVERSATION, [])
    finally:
        await model.aclose()
    assert response.text == "made it"
    assert len(openai_server.requests) == 3
    assert sleeps.waits[0] == 2.0 and len(sleeps.waits) == 2


async def test_openai_does_not_retry_a_400(openai_server: APIServer) -> None:
    openai_server.replies += [openai_error(400, "invalid_request_error", "Unknown parameter"),
                              Reply(openai_stream("never"))]
    sleeps = Sleeps()
    model = OpenAIResponsesModel("gpt-x", OPENAI_KEY, base_url=openai_server.url + "/v1", policy=FAST,
                                 sleep=sleeps)
    try:
        with pytest.raises(ModelFailure, match="HTTP 400: Unknown parameter"):
            await model.complete(CONVERSATION, [])
    finally:
        await model.aclose()
    assert len(openai_server.requests) == 1 and sleeps.waits == []


async def test_openai_retries_a_connection_dropped_mid_stream(openai_server: APIServer) -> None:
    openai_server.replies += [Reply(openai_stream("lost", ("call_x", "Bash", {"command": "ls"})), drop=True),
                              Reply(openai_stream("again"))]
    sleeps = Sleeps()
    model = OpenAIResponsesModel("gpt-x", OPENAI_KEY, base_url=openai_server.url + "/v1", policy=FAST,
                                 sleep=sleeps)
    try:
        response = await model.complete(CONVERSATION, [])
    finally:
        await model.aclose()
    assert response.text == "again" and response.tool_calls == ()
    assert len(openai_server.requests) == 2 and len(sleeps.waits) == 1


# --- choosing a backend ----------------------------------------------------------------------

async def test_missing_key_makes_an_unavailable_model_naming_the_variable() -> None:
    options = {"models": {"anthropic": {"api_key_env": "DEVSILO_TEST_NO_SUCH_KEY"}}}
    model = make_model(LLMChoice(backend="anthropic", model="claude-x"), options)
    assert isinstance(model, UnavailableModel)
    with pytest.raises(ModelFailure, match="DEVSILO_TEST_NO_SUCH_KEY is not set"):
        await model.complete(CONVERSATION, [])


async def test_key_file_is_read(tmp_path: Path, openai_server: APIServer) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(OPENAI_KEY + "\n")
    openai_server.replies.append(Reply(openai_stream("ok")))
    options = {"models": {"openai": {"api_key_file": str(key_file), "base_url": openai_server.url + "/v1"}}}
    model = make_model(LLMChoice(backend="openai", model="gpt-x"), options)
    try:
        assert (await model.complete(CONVERSATION, [])).text == "ok"
    finally:
        await model.aclose()
    assert openai_server.headers[0]["authorization"] == f"Bearer {OPENAI_KEY}"


# --- end to end through `silo up` ------------------------------------------------------------

@pytest.fixture(scope="module")
def model_server() -> Iterator[APIServer]:
    with APIServer("/v1/messages") as server:
        yield server


@pytest.fixture(scope="module")
def ws_server() -> Iterator[WSServer]:
    with WSServer() as server:
        yield server


LOCAL_REPLIES = [{"text": "Counting locally.", "tool": ["Bash", {"command": "ls | wc -l"}]},
                 {"text": "", "tool": ["Exit", {"message": "local done"}]}]


@pytest.fixture(scope="module")
def model_stack(tmp_path_factory: pytest.TempPathFactory, model_server: APIServer,
                ws_server: WSServer) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("models")
    key_file = root / "anthropic-key"
    key_file.write_text(ANTHROPIC_KEY)
    openai_key = root / "openai-key"
    openai_key.write_text(OPENAI_KEY)
    local_port = free_port()
    options = {"models": {
        "anthropic": {"api_key_file": str(key_file), "base_url": model_server.url,
                      "retry": {"attempts": 3, "base_delay_s": 0.01}},
        "openai": {"api_key_env": "DEVSILO_TEST_NO_SUCH_KEY"},
        "openai-ws": {"api_key_file": str(openai_key), "base_url": ws_server.url,
                      "retry": {"attempts": 3, "base_delay_s": 0.01}},
        "local": {"base_url": f"http://127.0.0.1:{local_port}/v1", "health_path": "/health",
                  "command": chat_command(root, local_port, LOCAL_REPLIES, 0.2)},
    }}
    s = Stack(root / "state", services={"harness": {"options": options}})
    s.start()
    try:
        yield s
    finally:
        s.stop()


def silo(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "devsilo.cli", "--state-dir", str(stack.state_dir), *args],
                          check=False, capture_output=True, text=True, timeout=120)


def test_headless_anthropic_session_runs_a_tool_and_exits(model_stack: Stack, model_server: APIServer,
                                                          workspace: Path) -> None:
    (workspace / "a.txt").write_text("x")
    model_server.replies += [
        anthropic_error(429, "rate_limit_error", "slow down", {"retry-after": "0"}),
        Reply(anthropic_stream("Counting.", ("toolu_01", "Bash", {"command": "ls | wc -l"}),
                               usage={"cache_creation_input_tokens": 500})),
        Reply(anthropic_stream("Done.", ("toolu_02", "Exit", {"message": "1 file"}),
                               usage={"cache_read_input_tokens": 500})),
    ]
    r = silo(model_stack, "run", "--headless", "--llm", "anthropic", "--model", "claude-x",
             "--workspace", str(workspace), "--prompt", "count the files", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    bash = [e["data"] for e in events if e["kind"] == "tool_result" and e["data"]["name"] == "Bash"]
    assert bash[0]["content"].splitlines()[0] == "1" and not bash[0]["is_error"]
    assert events[-1]["kind"] == "shutdown" and events[-1]["data"]["reason"] == "1 file"
    costs = [e["data"] for e in events if e["kind"] == "cost"]
    assert [(c["model"], c["cached_tokens"], c["cache_write_tokens"]) for c in costs] == [
        ("anthropic:claude-x", 0, 500), ("anthropic:claude-x", 500, 0)]
    # claude-x has no price: its dollars are unknown (not 0), with one warning.
    assert [(c["usd"], c.get("price_unknown"), "warning" in c) for c in costs] == [
        (None, True, True), (None, True, False)]
    assert costs[-1]["totals"]["total"]["usd"] is None and costs[-1]["totals"]["total"]["completions"] == 2
    sent_back = model_server.requests[-1]["messages"][-1]["content"][0]
    assert sent_back["type"] == "tool_result" and sent_back["tool_use_id"] == "toolu_01"
    assert sent_back["content"] == bash[0]["content"]
    assert ANTHROPIC_KEY in sent_credentials(model_server.headers[-1])

    # The key was used, and appears in no event, log line or stored stream byte.
    assert ANTHROPIC_KEY not in r.stdout + r.stderr + model_stack.output()
    leaks = [p for p in model_stack.state_dir.rglob("*")
             if p.is_file() and ANTHROPIC_KEY.encode() in p.read_bytes()]
    assert leaks == []


def test_headless_session_without_a_key_ends_with_exit_code_3(model_stack: Stack, workspace: Path) -> None:
    r = silo(model_stack, "run", "--headless", "--llm", "openai", "--model", "gpt-x",
             "--workspace", str(workspace), "--prompt", "hello", "--json")
    assert r.returncode == 3, r.stdout + r.stderr
    errors = [json.loads(line)["data"]["message"] for line in r.stdout.splitlines()
              if json.loads(line)["kind"] == "error"]
    assert errors and "DEVSILO_TEST_NO_SUCH_KEY is not set" in errors[0]


def test_headless_realtime_session_runs_a_tool_and_exits(model_stack: Stack, ws_server: WSServer,
                                                         workspace: Path) -> None:
    (workspace / "a.txt").write_text("x")
    ws_server.replies += [
        WSReply(status=503, body={"error": {"message": "overloaded"}}),
        WSReply(realtime_events("Counting.", ("call_rt1", "Bash", '{"command": "ls | wc -l"}'),
                                usage=(300, 128, 11))),
        WSReply(realtime_events("Done.", ("call_rt2", "Exit", '{"message": "realtime done"}'))),
    ]
    r = silo(model_stack, "run", "--headless", "--llm", "openai-ws", "--model", "gpt-realtime",
             "--workspace", str(workspace), "--prompt", "count the files", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    bash = [e["data"] for e in events if e["kind"] == "tool_result" and e["data"]["name"] == "Bash"]
    assert bash[0]["content"].splitlines()[0] == "1"
    assert events[-1]["kind"] == "shutdown" and events[-1]["data"]["reason"] == "realtime done"
    first_cost = next(e["data"] for e in events if e["kind"] == "cost")
    assert (first_cost["model"], first_cost["cached_tokens"]) == ("openai-ws:gpt-realtime", 128)
    assert first_cost["usd"] == pytest.approx((172 * 4 + 128 * 0.4 + 11 * 16) / 1e6)
    # The second connection replayed the tool result the sandbox produced.
    outputs = [e["item"] for e in ws_server.received[-1] if e["type"] == "conversation.item.create"
               and e["item"]["type"] == "function_call_output"]
    assert outputs == [{"type": "function_call_output", "call_id": "call_rt1", "output": bash[0]["content"]}]
    assert OPENAI_KEY not in r.stdout + r.stderr + model_stack.output()


def test_headless_local_session_starts_the_configured_server(model_stack: Stack, workspace: Path) -> None:
    (workspace / "a.txt").write_text("x")
    r = silo(model_stack, "run", "--headless", "--llm", "local", "--model", "local-x",
             "--workspace", str(workspace), "--prompt", "count the files", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    bash = [e["data"] for e in events if e["kind"] == "tool_result" and e["data"]["name"] == "Bash"]
    assert bash[0]["content"].splitlines()[0] == "1"
    assert events[-1]["data"]["reason"] == "local done"
    costs = [e["data"] for e in events if e["kind"] == "cost"]
    assert costs[0]["model"] == "local:local-x" and costs[0]["output_tokens"] == 7 and costs[0]["usd"] == 0
