"""Anthropic Messages API backend: streaming, tool use, prompt caching, through the official SDK."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx2

from ._model import ModelFailure, ModelResponse, TextSink, ToolUse, Usage, tool_use_from_json
from ._retry import RetryableFailure, RetryPolicy, Sleep, parse_retry_after, with_retries
from ._toolspec import tool_specs

CACHE = {"type": "ephemeral"}
# Error types Anthropic sends inside a 200 stream that another attempt may clear.
RETRYABLE_STREAM_ERRORS = {"overloaded_error", "api_error", "rate_limit_error"}



def anthropic_tools(names: list[str]) -> list[dict[str, Any]]:
    """The harness's tools in Messages API form; the last carries the cache breakpoint."""
    tools: list[dict[str, Any]] = [
        {"name": s.name, "description": s.description, "input_schema": s.input_schema}
        for s in tool_specs(names)
    ]
    if tools:
        tools[-1]["cache_control"] = CACHE
    return tools


def anthropic_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split the harness conversation into (system blocks, messages) in Messages API form.

    Consecutive turns of one role are merged, as the API wants user and
    assistant to alternate; tool results go back as ``tool_result`` blocks.
    """
    system_texts: list[str] = []
    out: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})

    for m in messages:
        role = m["role"]
        if role == "system":
            system_texts.append(str(m["content"]))
        elif role == "user":
            add("user", [{"type": "text", "text": m["content"]}] if m["content"] else [])
        elif role == "assistant":
            blocks: list[dict[str, Any]] = [{"type": "text", "text": m["content"]}] if m["content"] else []
            blocks += [{"type": "tool_use", "id": c["id"], "name": c["name"], "input": c["input"]}
                       for c in m.get("tool_calls", [])]
            add("assistant", blocks)
        elif role == "tool":
            result: dict[str, Any] = {"type": "tool_result", "tool_use_id": m["tool_call_id"],
                                      "is_error": bool(m.get("is_error"))}
            if m["content"]:  # the API refuses empty text; a result without content is fine
                result["content"] = m["content"]
            add("user", [result])
        else:
            raise ValueError(f"unknown message role {role!r}")
    system = [{"type": "text", "text": "\n\n".join(system_texts), "cache_control": CACHE}] if system_texts else []
    return system, out


class AnthropicModel:
    """Claude through the Messages API, streamed; retries per ``policy``.

    ``on_text`` receives text deltas as they arrive; a retried attempt
    streams again from its start.
    """

    def __init__(self, model: str, api_key: str, *, base_url: str | None = None, max_tokens: int = 8192,
                 policy: RetryPolicy | None = None, timeout_s: float = 600.0,
                 sleep: Sleep | None = None, on_text: TextSink | None = None) -> None:
        self.name = f"anthropic:{model}"
        self.model = model
        self.max_tokens = max_tokens
        self.policy = policy or RetryPolicy()
        self._key = api_key
        self._sleep = sleep
        self._on_text = on_text
        # The SDK's own retries are off: ours honour the policy and are testable.
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key, base_url=base_url, max_retries=0,
            timeout=httpx2.Timeout(timeout_s, connect=30.0),
        )

    async def complete(self, messages: list[dict[str, Any]], tools: list[str], *,
                       on_text: TextSink | None = None) -> ModelResponse:
        """Stream one completion; ModelFailure when it cannot be had."""
        system, msgs = anthropic_messages(messages)
        request: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens, "messages": msgs}
        if system:
            request["system"] = system
        if tools:
            request["tools"] = anthropic_tools(tools)
        return await with_retries(lambda: self._attempt(request, on_text or self._on_text), self.policy,
                                  f"Anthropic model {self.model}", sleep=self._sleep)

    async def aclose(self) -> None:
        """Close the SDK client's connections."""
        await self._client.close()

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "[api key]") if self._key else text

    async def _attempt(self, request: dict[str, Any], on_text: TextSink | None) -> ModelResponse:
        try:
            return await self._stream(request, on_text)
        except anthropic.APIStatusError as exc:
            detail = self._redact(f"HTTP {exc.status_code}: {exc.api_message or exc.message}")[:1000]
            if exc.status_code == 429 or exc.status_code >= 500 or exc.type in RETRYABLE_STREAM_ERRORS:
                raise RetryableFailure(detail, parse_retry_after(exc.response.headers)) from None
            raise ModelFailure(f"Anthropic model {self.model} refused the request: {detail}") from None
        except (anthropic.APIConnectionError, httpx2.TransportError) as exc:
            raise RetryableFailure(self._redact(f"transport error: {exc!r}")[:1000]) from None

    async def _stream(self, request: dict[str, Any], on_text: TextSink | None) -> ModelResponse:
        text: list[str] = []
        blocks: dict[int, dict[str, Any]] = {}
        usage = {"input": 0, "output": 0, "read": 0, "write": 0}
        stopped = False
        stream = await self._client.messages.create(**request, stream=True)
        async with stream:
            async for event in stream:
                kind = event.type
                if kind == "message_start":
                    u = event.message.usage
                    usage.update(input=u.input_tokens, output=u.output_tokens,
                                 read=u.cache_read_input_tokens or 0, write=u.cache_creation_input_tokens or 0)
                elif kind == "content_block_start":
                    block = event.content_block
                    if block.type == "tool_use":
                        blocks[event.index] = {"id": block.id, "name": block.name, "json": []}
                elif kind == "content_block_delta":
                    delta = event.delta
                    if delta.type == "text_delta":
                        text.append(delta.text)
                        if on_text is not None:
                            await on_text(delta.text)
                    elif delta.type == "input_json_delta" and event.index in blocks:
                        blocks[event.index]["json"].append(delta.partial_json)
                elif kind == "message_delta":
                    u2 = event.usage
                    usage["output"] = u2.output_tokens
                    if u2.input_tokens is not None:
                        usage["input"] = u2.input_tokens
                    if u2.cache_read_input_tokens is not None:
                        usage["read"] = u2.cache_read_input_tokens
                    if u2.cache_creation_input_tokens is not None:
                        usage["write"] = u2.cache_creation_input_tokens
                elif kind == "message_stop":
                    stopped = True
        if not stopped:
            raise RetryableFailure("the message stream ended before message_stop")
        calls = tuple(self._tool_use(blocks[i]) for i in sorted(blocks))
        return ModelResponse("".join(text), calls, Usage(
            input_tokens=usage["input"] + usage["read"] + usage["write"], output_tokens=usage["output"],
            cached_tokens=usage["read"], cache_write_tokens=usage["write"],
        ))

    def _tool_use(self, block: dict[str, Any]) -> ToolUse:
        return tool_use_from_json(block["id"], block["name"], "".join(block["json"]))
