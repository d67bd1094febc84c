"""OpenAI Realtime API backend over WebSocket, text only, through the official SDK's realtime client.

The Realtime API keeps a conversation on the server for as long as the
WebSocket lives. The harness's conversation is the source of truth (the
journal, compaction and failover rewrite it), so each request opens a fresh
connection, replays the conversation as items (``conversation.item.create``),
asks for one response (``response.create``) and reads its events until
``response.done``; the server's conversation is then exactly the harness's.
The price is a WebSocket handshake per request; what it buys is that
concurrent requests of one session's agents (subagents share the backend)
never share a server-side conversation.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from ._model import ModelFailure, ModelResponse, TextSink, ToolUse, Usage, tool_use_from_json
from ._retry import RetryableFailure, RetryPolicy, Sleep, parse_retry_after, with_retries
from ._toolspec import tool_specs

MAX_EVENT_BYTES = 16 * 1024 * 1024
"""The largest server event accepted; a bigger one ends the attempt."""
# Error codes/types in an ``error`` event or a failed response that another attempt may clear.
RETRYABLE_CODES = {"server_error", "rate_limit_exceeded", "server_is_overloaded", "internal_error"}
TEXT_DELTAS = {"response.output_text.delta", "response.text.delta"}  # GA and beta names


def realtime_tools(names: list[str]) -> list[dict[str, Any]]:
    """The harness's tools as Realtime session function tools."""
    return [{"type": "function", "name": s.name, "description": s.description,
             "parameters": s.input_schema} for s in tool_specs(names)]


def realtime_items(messages: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """Split the harness conversation into (instructions, conversation items) in Realtime form."""
    instructions: list[str] = []
    items: list[dict[str, Any]] = []
    for m in messages:
        role = m["role"]
        if role == "system":
            instructions.append(str(m["content"]))
        elif role == "user":
            items.append({"type": "message", "role": "user",
                          "content": [{"type": "input_text", "text": m["content"]}]})
        elif role == "assistant":
            if m["content"]:
                items.append({"type": "message", "role": "assistant",
                              "content": [{"type": "output_text", "text": m["content"]}]})
            items += [{"type": "function_call", "call_id": c["id"], "name": c["name"],
                       "arguments": json.dumps(c["input"])} for c in m.get("tool_calls", [])]
        elif role == "tool":
            output = m["content"]
            items.append({"type": "function_call_output", "call_id": m["tool_call_id"],
                          "output": f"error: {output}" if m.get("is_error") else output})
        else:
            raise ValueError(f"unknown message role {role!r}")
    return ("\n\n".join(instructions) if instructions else None), items


class OpenAIRealtimeModel:
    """An OpenAI model through the Realtime API over WebSocket (text in, text and tool calls out).

    ``base_url`` is the HTTP(S) API base (``https://api.openai.com/v1``); the
    SDK turns it into the ``wss://…/realtime?model=…`` address. Retries per
    ``policy`` on transport errors, a refused handshake with 429 or 5xx, and
    server ``error`` events whose code says to try again.
    """

    def __init__(self, model: str, api_key: str, *, base_url: str | None = None,
                 max_output_tokens: int | None = None, policy: RetryPolicy | None = None,
                 timeout_s: float = 600.0, sleep: Sleep | None = None,
                 on_text: TextSink | None = None, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.name = f"openai-ws:{model}"
        self.max_event_bytes = max_event_bytes
        self.model = model
        self.max_output_tokens = max_output_tokens
        self.policy = policy or RetryPolicy()
        self.timeout_s = timeout_s
        self._key = api_key
        self._sleep = sleep
        self._on_text = on_text
        self._client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url, max_retries=0)

    async def complete(self, messages: list[dict[str, Any]], tools: list[str], *,
                       on_text: TextSink | None = None) -> ModelResponse:
        """One response over a fresh connection; ModelFailure when it cannot be had."""
        instructions, items = realtime_items(messages)
        session: dict[str, Any] = {"type": "realtime", "output_modalities": ["text"]}
        if instructions:
            session["instructions"] = instructions
        if tools:
            session["tools"] = realtime_tools(tools)
            session["tool_choice"] = "auto"
        if self.max_output_tokens:
            session["max_output_tokens"] = self.max_output_tokens
        return await with_retries(lambda: self._attempt(session, items, on_text or self._on_text),
                                  self.policy, f"OpenAI Realtime model {self.model}", sleep=self._sleep)

    async def aclose(self) -> None:
        """Close the SDK client."""
        await self._client.close()

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "[api key]") if self._key else text

    async def _attempt(self, session: dict[str, Any], items: list[dict[str, Any]],
                       on_text: TextSink | None) -> ModelResponse:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._exchange(session, items, on_text)
        except InvalidStatus as exc:
            status = exc.response.status_code
            body = exc.response.body.decode("utf-8", "replace") if exc.response.body else ""
            detail = self._redact(f"HTTP {status}: {_error_text(body)}")[:1000]
            if status == 429 or status >= 500:
                raise RetryableFailure(detail, parse_retry_after(exc.response.headers)) from None
            raise ModelFailure(f"OpenAI Realtime model {self.model} refused the connection: {detail}") from None
        except TimeoutError:  # before OSError, of which it is a subclass
            raise RetryableFailure(f"no response.done within {self.timeout_s:.0f}s") from None
        except (ConnectionClosed, WebSocketException, OSError) as exc:
            raise RetryableFailure(self._redact(f"transport error: {exc!r}")[:1000]) from None

    def _failure(self, code: str | None, message: str) -> Exception:
        detail = self._redact(f"{code or 'error'}: {message}")[:1000]
        if code in RETRYABLE_CODES:
            return RetryableFailure(detail)
        return ModelFailure(f"OpenAI Realtime model {self.model} failed: {detail}")

    async def _exchange(self, session: dict[str, Any], items: list[dict[str, Any]],
                        on_text: TextSink | None) -> ModelResponse:
        manager = self._client.realtime.connect(
            model=self.model, websocket_connection_options={"max_size": self.max_event_bytes})
        async with manager as conn:
            await conn.send({"type": "session.update", "session": session})
            for item in items:
                await conn.send({"type": "conversation.item.create", "item": item})
            await conn.send({"type": "response.create"})
            text: list[str] = []
            calls: dict[str, dict[str, Any]] = {}
            while True:
                raw = await conn.recv_bytes()
                try:
                    event = json.loads(raw)
                except ValueError:
                    raise ModelFailure(f"OpenAI Realtime model {self.model} sent an event that is "
                                       f"not JSON: {raw[:200]!r}") from None
                if not isinstance(event, dict):
                    raise ModelFailure(f"OpenAI Realtime model {self.model} sent a non-object event")
                kind = event.get("type")
                if kind in TEXT_DELTAS:
                    delta = str(event.get("delta", ""))
                    text.append(delta)
                    if on_text is not None and delta:
                        await on_text(delta)
                elif kind == "response.output_item.added" and _item_type(event) == "function_call":
                    item = event["item"]
                    calls.setdefault(str(item.get("call_id")), {"name": item.get("name"), "args": []})
                elif kind == "response.function_call_arguments.delta":
                    call = calls.setdefault(str(event.get("call_id")), {"name": None, "args": []})
                    call["args"].append(str(event.get("delta", "")))
                elif kind == "response.function_call_arguments.done":
                    call = calls.setdefault(str(event.get("call_id")), {"name": None, "args": []})
                    call["args"] = [str(event.get("arguments", ""))]  # the whole string wins
                    call["name"] = event.get("name") or call["name"]
                elif kind == "response.output_item.done" and _item_type(event) == "function_call":
                    item = event["item"]
                    calls[str(item.get("call_id"))] = {"name": item.get("name"),
                                                       "args": [str(item.get("arguments", ""))]}
                elif kind == "error":
                    err = event.get("error") or {}
                    raise self._failure(err.get("code") or err.get("type"), str(err.get("message", "")))
                elif kind == "response.done":
                    return self._finish(event.get("response") or {}, text, calls)

    def _finish(self, response: dict[str, Any], text: list[str],
                calls: dict[str, dict[str, Any]]) -> ModelResponse:
        status = response.get("status")
        if status in ("failed", "cancelled"):
            err = ((response.get("status_details") or {}).get("error")) or {}
            raise self._failure(err.get("code") or err.get("type") or status,
                                str(err.get("message") or f"the response was {status}"))
        tool_calls = tuple(self._tool_use(cid, c) for cid, c in calls.items())
        return ModelResponse("".join(text), tool_calls, _usage(response.get("usage")))

    def _tool_use(self, call_id: str, call: dict[str, Any]) -> ToolUse:
        return tool_use_from_json(call_id, str(call.get("name") or ""), "".join(call["args"]))


def _item_type(event: dict[str, Any]) -> str | None:
    item = event.get("item")
    return item.get("type") if isinstance(item, dict) else None


def _error_text(body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body[:300] or "no body"
    inner = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(inner, dict) and isinstance(inner.get("message"), str):
        return str(inner["message"])
    return body[:300]


def _usage(u: Any) -> Usage:
    if not isinstance(u, dict):
        return Usage()
    details = u.get("input_token_details") or {}
    return Usage(input_tokens=_int(u.get("input_tokens")), output_tokens=_int(u.get("output_tokens")),
                 cached_tokens=_int(details.get("cached_tokens") if isinstance(details, dict) else 0))


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
