"""The OpenAI Realtime (WebSocket) and local Chat Completions backends against local servers
speaking each wire format, and the local server process the harness starts from a command."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import pytest
from aiohttp import WSMsgType, web
from chat_server import chunks
from devsilo.harness._backends import make_model
from devsilo.harness._local import LocalChatModel
from devsilo.harness._localserver import LocalServer, LocalServers
from devsilo.harness._model import ModelFailure, Usage
from devsilo.harness._realtime import OpenAIRealtimeModel
from devsilo.harness._retry import RetryPolicy
from devsilo.protocol import LLMChoice
from devsilo.testing._nats import free_port

KEY = "sk-proj-planted-realtime-0123456789-KEY"
FAST = RetryPolicy(attempts=4, base_delay_s=0.001, max_delay_s=5.0)
CHAT_SERVER = Path(__file__).with_name("chat_server.py")
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are running headless."},
    {"role": "user", "content": "count the files"},
    {"role": "assistant", "content": "Looking.",
     "tool_calls": [{"id": "call_1", "name": "Bash", "input": {"command": "ls | wc -l"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "3\n", "is_error": False},
]


@dataclass
class Reply:
    """One canned answer: events (SSE chunks or WebSocket events), or an HTTP error, or a drop."""

    events: list[Any] = field(default_factory=list)
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False
    raw: list[str] = field(default_factory=list)


class Server:
    """An aiohttp server on its own thread: Realtime WebSocket at /v1/realtime, Chat Completions SSE
    at /v1/chat/completions, both answering from one queue of replies."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.received: list[list[dict[str, Any]]] = []
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.queries: list[dict[str, str]] = []
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
        return f"http://127.0.0.1:{self.port}/v1"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/v1/realtime", self._realtime)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = self._runner.addresses[0][1]
        self._ready.set()
        self._loop.run_forever()

    def _next(self, request: web.Request) -> Reply | None:
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        self.queries.append(dict(request.query))
        return self.replies.pop(0) if self.replies else None

    async def _realtime(self, request: web.Request) -> web.StreamResponse:
        reply = self._next(request)
        if reply is None or reply.status != 200:
            return web.json_response(reply.body if reply else {"error": {"message": "no reply queued"}},
                                     status=reply.status if reply else 500, headers=reply.headers if reply else {})
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        got: list[dict[str, Any]] = []
        self.received.append(got)
        await ws.send_json({"type": "session.created", "event_id": "ev_0", "session": {"type": "realtime"}})
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                break
            event = json.loads(msg.data)
            got.append(event)
            if event["type"] == "session.update":
                await ws.send_json({"type": "session.updated", "event_id": "ev_1", "session": event["session"]})
            elif event["type"] == "conversation.item.create":
                await ws.send_json({"type": "conversation.item.added", "event_id": "ev_2",
                                    "previous_item_id": None, "item": {**event["item"], "id": "item_x"}})
            elif event["type"] == "response.create":
                for text in reply.raw:
                    await ws.send_str(text)
                for i, ev in enumerate(reply.events):
                    if reply.drop and i == len(reply.events) // 2:
                        assert request.transport is not None
                        request.transport.close()
                        return ws
                    await ws.send_json(ev)
        return ws

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        reply = self._next(request)
        if reply is None or reply.status != 200:
            return web.json_response(reply.body if reply else {"error": {"message": "no reply queued"}},
                                     status=reply.status if reply else 500, headers=reply.headers if reply else {})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for i, chunk in enumerate(reply.events):
            if reply.drop and i == len(reply.events) // 2:
                assert request.transport is not None
                request.transport.close()
                return resp
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if not reply.drop:
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


class Sleeps:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest.fixture
def server() -> Iterator[Server]:
    with Server() as s:
        yield s


# --- the Realtime wire format -----------------------------------------------------------------

def realtime_events(text: str, tool: tuple[str, str, str] | None = None, *, beta: bool = False,
                    usage: tuple[int, int, int] = (120, 0, 15), status: str = "completed",
                    error: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """A response's server events: text deltas, then a function call whose arguments arrive in pieces."""
    n = iter(range(100, 1000))
    rid = "resp_1"
    events: list[dict[str, Any]] = [{"type": "response.created", "event_id": f"ev_{next(n)}",
                                     "response": {"id": rid, "object": "realtime.response", "status": "in_progress",
                                                  "output": [], "usage": None}}]
    output: list[dict[str, Any]] = []
    if text:
        item = {"id": "item_msg", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
        delta_type = "response.text.delta" if beta else "response.output_text.delta"
        done_type = "response.text.done" if beta else "response.output_text.done"
        events += [
            {"type": "response.output_item.added", "event_id": f"ev_{next(n)}", "response_id": rid,
             "output_index": 0, "item": item},
            {"type": "response.content_part.added", "event_id": f"ev_{next(n)}", "response_id": rid,
             "item_id": "item_msg", "output_index": 0, "content_index": 0, "part": {"type": "text", "text": ""}},
            *[{"type": delta_type, "event_id": f"ev_{next(n)}", "response_id": rid, "item_id": "item_msg",
               "output_index": 0, "content_index": 0, "delta": piece}
              for piece in (text[: len(text) // 2], text[len(text) // 2:])],
            {"type": done_type, "event_id": f"ev_{next(n)}", "response_id": rid, "item_id": "item_msg",
             "output_index": 0, "content_index": 0, "text": text},
            {"type": "response.output_item.done", "event_id": f"ev_{next(n)}", "response_id": rid,
             "output_index": 0, "item": {**item, "status": "completed",
                                         "content": [{"type": "output_text", "text": text}]}},
        ]
        output.append(events[-1]["item"])
    if tool:
        call_id, name, raw = tool
        idx = len(output)
        item = {"id": "item_fc", "type": "function_call", "status": "in_progress", "call_id": call_id,
                "name": name, "arguments": ""}
        events += [
            {"type": "response.output_item.added", "event_id": f"ev_{next(n)}", "response_id": rid,
             "output_index": idx, "item": item},
            *[{"type": "response.function_call_arguments.delta", "event_id": f"ev_{next(n)}", "response_id": rid,
               "item_id": "item_fc", "output_index": idx, "call_id": call_id, "delta": piece}
              for piece in (raw[:6], raw[6:])],
            {"type": "response.function_call_arguments.done", "event_id": f"ev_{next(n)}", "response_id": rid,
             "item_id": "item_fc", "output_index": idx, "call_id": call_id, "name": name, "arguments": raw},
            {"type": "response.output_item.done", "event_id": f"ev_{next(n)}", "response_id": rid,
             "output_index": idx, "item": {**item, "status": "completed", "arguments": raw}},
        ]
        output.append(events[-1]["item"])
    inp, cached, out = usage
    done: dict[str, Any] = {"id": rid, "object": "realtime.response", "status": status, "output": output,
                            "usage": {"total_tokens": inp + out, "input_tokens": inp, "output_tokens": out,
                                      "input_token_details": {"cached_tokens": cached, "text_tokens": inp,
                                                              "audio_tokens": 0},
                                      "output_token_details": {"text_tokens": out, "audio_tokens": 0}}}
    if error:
        done["status_details"] = {"type": "failed", "error": error}
    events.append({"type": "response.done", "event_id": f"ev_{next(n)}", "response": done})
    return events


def error_event(code: str, message: str, kind: str = "server_error") -> dict[str, Any]:
    return {"type": "error", "event_id": "ev_err", "error": {"type": kind, "code": code, "message": message,
                                                             "param": None, "event_id": None}}


def realtime(server: Server, sleeps: Sleeps | None = None) -> OpenAIRealtimeModel:
    return OpenAIRealtimeModel("gpt-realtime", KEY, base_url=server.url, policy=FAST, sleep=sleeps or Sleeps())


async def test_realtime_sends_the_conversation_as_items_and_reads_text_and_a_tool_call(server: Server) -> None:
    server.replies.append(Reply(realtime_events("Two more.", ("call_2", "Exit", '{"message": "3 files"}'),
                                                usage=(900, 512, 21))))
    pieces: list[str] = []

    async def sink(delta: str) -> None:
        pieces.append(delta)

    model = realtime(server)
    try:
        response = await model.complete(CONVERSATION, ["Bash", "Exit"], on_text=sink)
    finally:
        await model.aclose()
    assert response.text == "Two more." and pieces == ["Two ", "more."]
    assert [(c.id, c.name, c.input) for c in response.tool_calls] == [("call_2", "Exit", {"message": "3 files"})]
    assert response.usage == Usage(input_tokens=900, output_tokens=21, cached_tokens=512)
    assert server.queries[0] == {"model": "gpt-realtime"}
    assert server.headers[0]["authorization"] == f"Bearer {KEY}"
    sent = server.received[0]
    assert [e["type"] for e in sent] == ["session.update", *["conversation.item.create"] * 4, "response.create"]
    session = sent[0]["session"]
    assert session["instructions"] == "You are running headless."
    assert session["output_modalities"] == ["text"]
    assert [t["name"] for t in session["tools"]] == ["Bash", "Exit"]
    assert session["tools"][0]["parameters"]["required"] == ["command"]
    assert [e["item"] for e in sent[1:5]] == [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "count the files"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Looking."}]},
        {"type": "function_call", "call_id": "call_1", "name": "Bash", "arguments": '{"command": "ls | wc -l"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "3\n"},
    ]


async def test_realtime_reads_the_beta_text_event_names(server: Server) -> None:
    server.replies.append(Reply(realtime_events("old names", beta=True)))
    model = realtime(server)
    try:
        assert (await model.complete(CONVERSATION[:2], [])).text == "old names"
    finally:
        await model.aclose()


async def test_realtime_retries_a_429_handshake_with_retry_after_and_a_500_then_succeeds(server: Server) -> None:
    server.replies += [
        Reply(status=429, body={"error": {"message": "Rate limit reached", "type": "requests"}},
              headers={"retry-after": "2"}),
        Reply(status=500, body={"error": {"message": "boom", "type": "server_error"}}),
        Reply(realtime_events("made it")),
    ]
    sleeps = Sleeps()
    model = realtime(server, sleeps)
    try:
        assert (await model.complete(CONVERSATION[:2], [])).text == "made it"
    finally:
        await model.aclose()
    assert len(server.headers) == 3 and sleeps.waits[0] == 2.0 and len(sleeps.waits) == 2


async def test_realtime_does_not_retry_a_refused_key(server: Server) -> None:
    server.replies += [Reply(status=401, body={"error": {"message": "Incorrect API key provided"}}),
                       Reply(realtime_events("never"))]
    model = realtime(server)
    try:
        with pytest.raises(ModelFailure, match="refused the connection: HTTP 401: Incorrect API key provided"):
            await model.complete(CONVERSATION[:2], [])
    finally:
        await model.aclose()
    assert len(server.headers) == 1


async def test_realtime_retries_a_server_error_event_but_not_an_invalid_request(server: Server) -> None:
    server.replies += [Reply([error_event("server_error", "The server had an error")]),
                       Reply(realtime_events("second try")),
                       Reply([error_event("invalid_value", "Invalid tool schema", "invalid_request_error")])]
    model = realtime(server)
    try:
        assert (await model.complete(CONVERSATION[:2], [])).text == "second try"
        with pytest.raises(ModelFailure, match="failed: invalid_value: Invalid tool schema"):
            await model.complete(CONVERSATION[:2], [])
    finally:
        await model.aclose()
    assert len(server.headers) == 3


async def test_realtime_failed_response_and_dropped_connection(server: Server) -> None:
    server.replies += [
        Reply(realtime_events("lost", ("call_x", "Bash", '{"command": "ls"}')), drop=True),
        Reply(realtime_events("", status="failed", error={"type": "invalid_request_error",
                                                          "code": "context_length_exceeded",
                                                          "message": "too long"})),
    ]
    sleeps = Sleeps()
    model = realtime(server, sleeps)
    try:
        with pytest.raises(ModelFailure, match="context_length_exceeded: too long"):
            await model.complete(CONVERSATION[:2], [])
    finally:
        await model.aclose()
    assert len(server.headers) == 2 and len(sleeps.waits) == 1  # the drop was retried, the failure not


async def test_realtime_bad_arguments_and_malformed_events(server: Server) -> None:
    server.replies += [Reply(realtime_events("", ("call_b", "Bash", '{"command": '))),
                       Reply(raw=["this is not json"])]
    model = realtime(server)
    try:
        bad = await model.complete(CONVERSATION[:2], ["Bash"])
        assert bad.tool_calls[0].input == {} and "not a JSON object" in (bad.tool_calls[0].input_error or "")
        with pytest.raises(ModelFailure, match="sent an event that is not JSON"):
            await model.complete(CONVERSATION[:2], [])
    finally:
        await model.aclose()


async def test_realtime_an_oversized_event_ends_the_attempt_and_is_retried(server: Server) -> None:
    huge = realtime_events("x" * 5000)
    server.replies += [Reply(huge), Reply(realtime_events("small"))]
    sleeps = Sleeps()
    model = OpenAIRealtimeModel("gpt-realtime", KEY, base_url=server.url, policy=FAST, sleep=sleeps,
                                max_event_bytes=4096)
    try:
        assert (await model.complete(CONVERSATION[:2], [])).text == "small"
    finally:
        await model.aclose()
    assert len(server.headers) == 2 and len(sleeps.waits) == 1


# --- Chat Completions (local servers) ---------------------------------------------------------

def local(server: Server, sleeps: Sleeps | None = None) -> LocalChatModel:
    return LocalChatModel("local-x", base_url=server.url, policy=FAST, sleep=sleeps or Sleeps())


async def test_local_chat_streams_text_and_tool_calls_with_usage_from_the_last_chunk(server: Server) -> None:
    server.replies.append(Reply(chunks({"text": "Checking.", "tool": ["Bash", {"command": "ls"}]}, 321)))
    pieces: list[str] = []

    async def sink(delta: str) -> None:
        pieces.append(delta)

    model = local(server)
    try:
        response = await model.complete(CONVERSATION, ["Bash", "Exit"], on_text=sink)
    finally:
        await model.aclose()
    assert response.text == "Checking." and "".join(pieces) == "Checking."
    assert [(c.id, c.name, c.input) for c in response.tool_calls] == [("call_local_1", "Bash", {"command": "ls"})]
    assert response.usage == Usage(input_tokens=321, output_tokens=7)
    req = server.requests[0]
    assert req["stream"] is True and req["stream_options"] == {"include_usage": True}
    assert req["tools"][0] == {"type": "function", "function": {
        "name": "Bash", "description": req["tools"][0]["function"]["description"],
        "parameters": req["tools"][0]["function"]["parameters"]}}
    assert req["messages"] == [
        {"role": "system", "content": "You are running headless."},
        {"role": "user", "content": "count the files"},
        {"role": "assistant", "content": "Looking.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "Bash", "arguments": '{"command": "ls | wc -l"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3\n"},
    ]


async def test_local_chat_retries_429_with_retry_after_and_500_then_succeeds(server: Server) -> None:
    server.replies += [
        Reply(status=429, body={"error": {"message": "busy", "type": "rate_limit_exceeded"}},
              headers={"retry-after": "3"}),
        Reply(status=500, body={"error": {"message": "CUDA out of memory", "type": "server_error"}}),
        Reply(chunks({"text": "ok"}, 10)),
    ]
    sleeps = Sleeps()
    model = local(server, sleeps)
    try:
        assert (await model.complete(CONVERSATION[:2], [])).text == "ok"
    finally:
        await model.aclose()
    assert len(server.requests) == 3 and sleeps.waits[0] == 3.0 and len(sleeps.waits) == 2


async def test_local_chat_error_bodies_and_broken_streams(server: Server) -> None:
    in_stream_error = {"error": {"message": "the model crashed", "type": "server_error", "code": "server_error"}}
    server.replies += [
        Reply(status=400, body={"error": {"message": "the request exceeds the available context size",
                                          "type": "exceed_context_size_error", "code": 400}}),
        Reply([chunks({"text": "half"}, 5)[0], in_stream_error]),
        Reply(chunks({"text": "cut off"}, 5), drop=True),
        Reply(chunks({"text": "whole"}, 5)),
    ]
    sleeps = Sleeps()
    model = local(server, sleeps)
    try:
        with pytest.raises(ModelFailure, match="refused the request: HTTP 400: the request exceeds the available"):
            await model.complete(CONVERSATION[:2], [])
        assert (await model.complete(CONVERSATION[:2], [])).text == "whole"
    finally:
        await model.aclose()
    assert len(server.requests) == 4 and len(sleeps.waits) == 2


# --- a local server the harness starts --------------------------------------------------------

def chat_command(tmp_path: Path, port: int, replies: list[dict[str, Any]], ready_after: float) -> list[str]:
    script = tmp_path / "replies.json"
    script.write_text(json.dumps(replies))
    return [sys.executable, str(CHAT_SERVER), "--port", str(port), "--script", str(script),
            "--requests", str(tmp_path / "requests.jsonl"), "--ready-after", str(ready_after)]


async def test_harness_starts_health_checks_uses_and_stops_a_local_server(tmp_path: Path) -> None:
    port = free_port()
    servers = LocalServers()
    options = {"models": {"local": {"base_url": f"http://127.0.0.1:{port}/v1", "health_path": "/health",
                                    "command": chat_command(tmp_path, port, [{"text": "hello from local"},
                                                                             {"text": "again"}], 1.5),
                                    "retry": {"attempts": 1}}}}  # no retry: only the health wait helps
    model = make_model(LLMChoice(backend="local", model="local-x"), options, local_servers=servers)
    assert isinstance(model, LocalChatModel) and model.server is not None and model.server.process is None
    try:
        first = await model.complete(CONVERSATION[:2], [])
        assert first.text == "hello from local" and first.usage.output_tokens == 7
        # The health check waited for /health to turn 200 (503 for the first half second).
        log = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
        assert len(log) == 1 and log[0]["model"] == "local-x"
        pid = model.server.process.pid  # type: ignore[union-attr]
        second = make_model(LLMChoice(backend="local", model="local-x"), options, local_servers=servers)
        assert (await second.complete(CONVERSATION[:2], [])).text == "again"
        assert model.server.starts == 1  # one process for both sessions
        await second.aclose()
    finally:
        await model.aclose()
        await servers.aclose()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_a_local_server_that_exits_is_a_clear_model_failure(tmp_path: Path) -> None:
    server = LocalServer([sys.executable, "-c", "import sys; print('no GPU found', file=sys.stderr); sys.exit(7)"],
                         f"http://127.0.0.1:{free_port()}/v1", start_timeout_s=20)
    model = LocalChatModel("local-x", base_url=server.base_url, server=server, policy=FAST)
    try:
        with pytest.raises(ModelFailure, match="exited with code 7 before it was healthy: no GPU found"):
            await model.complete(CONVERSATION[:2], [])
    finally:
        await model.aclose()
        await server.aclose()


def test_make_model_builds_realtime_and_local_backends(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    options = {"models": {"openai-ws": {"api_key_file": str(key_file)},
                          "local": {"base_url": "http://127.0.0.1:1/v1"}}}
    rt = make_model(LLMChoice(backend="openai-ws", model="gpt-realtime"), options)
    assert isinstance(rt, OpenAIRealtimeModel) and rt.name == "openai-ws:gpt-realtime"
    lc = make_model(LLMChoice(backend="local", model="qwen"), options)
    assert isinstance(lc, LocalChatModel) and lc.name == "local:qwen" and lc.server is None
