"""OpenAI Responses API backend: streaming and function calls, through the official SDK."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx2
import openai

from ._model import ModelFailure, ModelResponse, TextSink, ToolUse, Usage, tool_use_from_json
from ._retry import RetryableFailure, RetryPolicy, Sleep, parse_retry_after, with_retries
from ._toolspec import tool_specs

# Error codes in a streamed ``error`` / ``response.failed`` that another attempt may clear.
RETRYABLE_STREAM_CODES = {"server_error", "rate_limit_exceeded", "server_is_overloaded"}



def openai_tools(names: list[str]) -> list[dict[str, Any]]:
    """The harness's tools as Responses API function tools."""
    return [{"type": "function", "name": s.name, "description": s.description,
             "parameters": s.input_schema, "strict": False} for s in tool_specs(names)]


def openai_input(messages: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """Split the harness conversation into (instructions, input items) in Responses API form.

    Tool calls go back as ``function_call`` items and their results as
    ``function_call_output`` items; nothing is stored server-side.
    """
    instructions: list[str] = []
    items: list[dict[str, Any]] = []
    for m in messages:
        role = m["role"]
        if role == "system":
            instructions.append(str(m["content"]))
        elif role == "user":
            items.append({"role": "user", "content": m["content"]})
        elif role == "assistant":
            if m["content"]:
                items.append({"role": "assistant", "content": m["content"]})
            items += [{"type": "function_call", "call_id": c["id"], "name": c["name"],
                       "arguments": json.dumps(c["input"])} for c in m.get("tool_calls", [])]
        elif role == "tool":
            output = m["content"]
            items.append({"type": "function_call_output", "call_id": m["tool_call_id"],
                          "output": f"error: {output}" if m.get("is_error") else output})
        else:
            raise ValueError(f"unknown message role {role!r}")
    return ("\n\n".join(instructions) if instructions else None), items


class OpenAIResponsesModel:
    """An OpenAI model through the Responses API, streamed; retries per ``policy``.

    ``on_text`` receives text deltas as they arrive; a retried attempt
    streams again from its start.
    """

    def __init__(self, model: str, api_key: str, *, base_url: str | None = None,
                 max_output_tokens: int | None = None, policy: RetryPolicy | None = None,
                 timeout_s: float = 600.0, sleep: Sleep | None = None,
                 on_text: TextSink | None = None) -> None:
        self.name = f"openai:{model}"
        self.model = model
        self.max_output_tokens = max_output_tokens
        self.policy = policy or RetryPolicy()
        self._key = api_key
        self._sleep = sleep
        self._on_text = on_text
        # The SDK's own retries are off: ours honour the policy and are testable.
        self._client = openai.AsyncOpenAI(
            api_key=api_key, base_url=base_url, max_retries=0,
            timeout=httpx2.Timeout(timeout_s, connect=30.0),
        )

    async def complete(self, messages: list[dict[str, Any]], tools: list[str], *,
                       on_text: TextSink | None = None) -> ModelResponse:
        """Stream one response; ModelFailure when it cannot be had."""
        instructions, items = openai_input(messages)
        request: dict[str, Any] = {"model": self.model, "input": items, "store": False}
        if instructions:
            request["instructions"] = instructions
        if tools:
            request["tools"] = openai_tools(tools)
        if self.max_output_tokens:
            request["max_output_tokens"] = self.max_output_tokens
        return await with_retries(lambda: self._attempt(request, on_text or self._on_text), self.policy,
                                  f"OpenAI model {self.model}", sleep=self._sleep)

    async def aclose(self) -> None:
        """Close the SDK client's connections."""
        await self._client.close()

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "[api key]") if self._key else text

    async def _attempt(self, request: dict[str, Any], on_text: TextSink | None) -> ModelResponse:
        try:
            return await self._stream(request, on_text)
        except REQUEST_ERRORS as exc:
            raise request_failure(exc, f"OpenAI model {self.model}", self._redact) from None

    def _stream_error(self, code: str | None, message: str) -> Exception:
        detail = self._redact(f"{code or 'error'}: {message}")[:1000]
        if code in RETRYABLE_STREAM_CODES:
            return RetryableFailure(detail)
        return ModelFailure(f"OpenAI model {self.model} failed: {detail}")

    async def _stream(self, request: dict[str, Any], on_text: TextSink | None) -> ModelResponse:
        text: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        usage: Any = None
        completed = False
        stream = await self._client.responses.create(**request, stream=True)
        async with stream:
            async for event in stream:
                kind = event.type
                if kind == "response.output_text.delta":
                    text.append(event.delta)
                    if on_text is not None:
                        await on_text(event.delta)
                elif kind == "response.output_item.added" and event.item.type == "function_call":
                    calls[event.output_index] = {"call_id": event.item.call_id, "name": event.item.name,
                                                 "args": [getattr(event.item, "arguments", "") or ""]}
                elif kind == "response.function_call_arguments.delta" and event.output_index in calls:
                    calls[event.output_index]["args"].append(event.delta)
                elif kind == "response.output_item.done" and event.item.type == "function_call":
                    # The finished item carries the whole arguments string: it wins over the deltas.
                    calls[event.output_index] = {"call_id": event.item.call_id, "name": event.item.name,
                                                 "args": [event.item.arguments]}
                elif kind in ("response.completed", "response.incomplete"):
                    usage = event.response.usage
                    completed = True
                elif kind == "response.failed":
                    err = event.response.error
                    raise self._stream_error(getattr(err, "code", None), getattr(err, "message", "failed"))
                elif kind == "error":
                    raise self._stream_error(event.code, event.message)
        if not completed:
            raise RetryableFailure("the response stream ended before response.completed")
        tool_calls = tuple(self._tool_use(calls[i]) for i in sorted(calls))
        return ModelResponse("".join(text), tool_calls, _usage(usage))

    def _tool_use(self, call: dict[str, Any]) -> ToolUse:
        return tool_use_from_json(call["call_id"], call["name"], "".join(call["args"]))


REQUEST_ERRORS = (openai.APIStatusError, openai.APIConnectionError, httpx2.TransportError)
"""What a request to an OpenAI-style API raises when it fails before or while streaming."""


def request_failure(exc: Exception, who: str, redact: Callable[[str], str]) -> Exception:
    """The failure to raise for one of ``REQUEST_ERRORS``: retryable on transport errors, 429
    (with its retry-after) and 5xx; otherwise the model refused the request."""
    if isinstance(exc, openai.APIStatusError):
        detail = redact(f"HTTP {exc.status_code}: {openai_error_message(exc)}")[:1000]
        if exc.status_code == 429 or exc.status_code >= 500:
            return RetryableFailure(detail, parse_retry_after(exc.response.headers))
        return ModelFailure(f"{who} refused the request: {detail}")
    return RetryableFailure(redact(f"transport error: {exc!r}")[:1000])


def openai_error_message(exc: openai.APIStatusError) -> str:
    """The message an OpenAI-style error body carries, else the SDK's own."""
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else None
        if isinstance(message, str):
            return message
    return exc.message


def _usage(u: Any) -> Usage:
    if u is None:
        return Usage()
    details = getattr(u, "input_tokens_details", None)
    return Usage(
        input_tokens=getattr(u, "input_tokens", 0) or 0,
        output_tokens=getattr(u, "output_tokens", 0) or 0,
        cached_tokens=getattr(details, "cached_tokens", 0) or 0,
        cache_write_tokens=getattr(details, "cache_write_tokens", 0) or 0,
    )
