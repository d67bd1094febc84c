"""A local OpenAI-compatible server (llama.cpp's llama-server, Ollama, vLLM): Chat Completions,
streamed through the official SDK, and the server process the harness may start for it.

Harness options (every field optional; see ``_backends.py``)::

    "models": {"local": {
        "base_url": "http://127.0.0.1:8080/v1",
        "command": ["llama-server", "-m", "/models/qwen.gguf", "--port", "8080"],
        "health_path": "/health", "start_timeout_s": 120}}

With ``command`` the harness starts the server before the first request of
any session, waits until ``health_path`` (default: ``/health``, then
``/v1/models``) answers 200, restarts it when it has died, and stops it when
the harness stops. Without it the server is expected to be running.
"""

from __future__ import annotations

import json
from typing import Any

import httpx2
import openai
import structlog

from ._localserver import LocalServer
from ._model import ModelFailure, ModelResponse, TextSink, ToolUse, Usage, tool_use_from_json
from ._openai import REQUEST_ERRORS, request_failure
from ._retry import RetryableFailure, RetryPolicy, Sleep, with_retries
from ._toolspec import tool_specs

RETRYABLE_STREAM_CODES = {"server_error", "rate_limit_exceeded", "server_is_overloaded", "unavailable"}
log = structlog.get_logger("devsilo.harness.local")


def chat_tools(names: list[str]) -> list[dict[str, Any]]:
    """The harness's tools as Chat Completions function tools."""
    return [{"type": "function", "function": {"name": s.name, "description": s.description,
                                              "parameters": s.input_schema}} for s in tool_specs(names)]


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The harness conversation in Chat Completions form."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m["role"]
        if role in ("system", "user"):
            out.append({"role": role, "content": m["content"]})
        elif role == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": m["content"] or None}
            if m.get("tool_calls"):
                msg["tool_calls"] = [{"id": c["id"], "type": "function",
                                      "function": {"name": c["name"], "arguments": json.dumps(c["input"])}}
                                     for c in m["tool_calls"]]
            out.append(msg)
        elif role == "tool":
            output = m["content"]
            out.append({"role": "tool", "tool_call_id": m["tool_call_id"],
                        "content": f"error: {output}" if m.get("is_error") else output})
        else:
            raise ValueError(f"unknown message role {role!r}")
    return out


class LocalChatModel:
    """A model on a local OpenAI-compatible server through Chat Completions, streamed.

    Tool calls are assembled from ``delta.tool_calls``; usage comes from the
    last chunk (``stream_options.include_usage``; zero when the server sends
    none). With ``server`` set, it is started and health-checked before each
    request.
    """

    def __init__(self, model: str, *, base_url: str, api_key: str = "none", server: LocalServer | None = None,
                 max_tokens: int | None = None, policy: RetryPolicy | None = None, timeout_s: float = 600.0,
                 sleep: Sleep | None = None, on_text: TextSink | None = None) -> None:
        self.name = f"local:{model}"
        self.model = model
        self.server = server
        self.max_tokens = max_tokens
        self.policy = policy or RetryPolicy()
        self._key = api_key
        self._sleep = sleep
        self._on_text = on_text
        self._client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url, max_retries=0,
                                          timeout=httpx2.Timeout(timeout_s, connect=30.0))

    async def complete(self, messages: list[dict[str, Any]], tools: list[str], *,
                       on_text: TextSink | None = None) -> ModelResponse:
        """Stream one completion; ModelFailure when it cannot be had."""
        request: dict[str, Any] = {"model": self.model, "messages": chat_messages(messages),
                                   "stream": True, "stream_options": {"include_usage": True}}
        if tools:
            request["tools"] = chat_tools(tools)
        if self.max_tokens:
            request["max_tokens"] = self.max_tokens

        async def attempt() -> ModelResponse:
            if self.server is not None:
                await self.server.ensure_running()
            return await self._attempt(request, on_text or self._on_text)

        return await with_retries(attempt, self.policy, f"local model {self.model}", sleep=self._sleep)

    async def aclose(self) -> None:
        """Close the SDK client (the server, shared, stays up)."""
        await self._client.close()

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "[api key]") if self._key and self._key != "none" else text

    async def _attempt(self, request: dict[str, Any], on_text: TextSink | None) -> ModelResponse:
        try:
            return await self._stream(request, on_text)
        except REQUEST_ERRORS as exc:
            raise request_failure(exc, f"local model {self.model}", self._redact) from None
        except openai.APIError as exc:  # an error object inside the stream
            body = exc.body if isinstance(exc.body, dict) else {}
            code = body.get("code") or body.get("type")
            detail = self._redact(f"{code or 'error'}: {exc.message}")[:1000]
            if code in RETRYABLE_STREAM_CODES:
                raise RetryableFailure(detail) from None
            raise ModelFailure(f"local model {self.model} failed: {detail}") from None

    async def _stream(self, request: dict[str, Any], on_text: TextSink | None) -> ModelResponse:
        text: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        usage: Any = None
        finished = False
        stream = await self._client.chat.completions.create(**request)
        async with stream:
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices or ():
                    delta = choice.delta
                    if delta is not None and delta.content:
                        text.append(delta.content)
                        if on_text is not None:
                            await on_text(delta.content)
                    for tc in (delta.tool_calls if delta is not None else None) or ():
                        call = calls.setdefault(tc.index, {"id": None, "name": "", "args": []})
                        if tc.id:
                            call["id"] = tc.id
                        if tc.function is not None:
                            if tc.function.name:
                                call["name"] += tc.function.name
                            if tc.function.arguments:
                                call["args"].append(tc.function.arguments)
                    if choice.finish_reason is not None:
                        finished = True
        if not finished:
            raise RetryableFailure("the completion stream ended without a finish_reason")
        tool_calls = tuple(self._tool_use(i, calls[i]) for i in sorted(calls))
        return ModelResponse("".join(text), tool_calls, _usage(usage))

    def _tool_use(self, index: int, call: dict[str, Any]) -> ToolUse:
        return tool_use_from_json(call["id"] or f"call_{index}", call["name"], "".join(call["args"]))


def _usage(u: Any) -> Usage:
    if u is None:
        return Usage()
    details = getattr(u, "prompt_tokens_details", None)
    return Usage(input_tokens=getattr(u, "prompt_tokens", 0) or 0,
                 output_tokens=getattr(u, "completion_tokens", 0) or 0,
                 cached_tokens=getattr(details, "cached_tokens", 0) or 0)
