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

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import time
from collections import deque
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx2
import openai
import structlog

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


def _open_log(path: str) -> Any:
    """The server's output file (appended to; the child keeps its own descriptor)."""
    return open(path, "ab", buffering=0)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the harness dies, even by SIGKILL."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


class LocalServer:
    """A model server process the harness starts from a configured command and health-checks.

    Shared by every session that uses it; ``aclose`` stops it (the harness
    does so when it stops). Its output goes to ``log_path`` when given.
    """

    def __init__(self, command: list[str], base_url: str, *, health_path: str | None = None,
                 start_timeout_s: float = 120.0, log_path: str | None = None) -> None:
        self.command = command
        self.base_url = base_url
        self.health_path = health_path
        self.start_timeout_s = start_timeout_s
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0
        self._lock = asyncio.Lock()
        self._stderr_tail: deque[str] = deque(maxlen=20)
        self._reader: asyncio.Task[None] | None = None

    def _root(self) -> str:
        parts = urlsplit(self.base_url)
        return urlunsplit((parts.scheme, parts.netloc, "", "", ""))

    async def healthy(self, client: httpx2.AsyncClient) -> bool:
        """Whether the server answers its health check with 200 now."""
        paths = [self.health_path] if self.health_path else ["/health", "/v1/models"]
        for path in paths:
            try:
                r = await client.get(self._root() + path, timeout=2.0)
            except httpx2.HTTPError:
                return False
            if r.status_code == 200:
                return True
        return False

    async def ensure_running(self) -> None:
        """Start the server unless it runs, and wait until it is healthy; ModelFailure saying why not."""
        async with self._lock:
            alive = self.process is not None and self.process.returncode is None
            async with httpx2.AsyncClient() as client:
                if alive and await self.healthy(client):
                    return
                if not alive:
                    await self._spawn()
                await self._wait_healthy(client)

    async def _spawn(self) -> None:
        out: Any = _open_log(self.log_path) if self.log_path else asyncio.subprocess.DEVNULL
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.command, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=asyncio.subprocess.PIPE, start_new_session=True,
                preexec_fn=_die_with_parent)  # async-signal-safe: one prctl call
        except OSError as exc:
            raise ModelFailure(f"cannot start the local model server {self.command[0]!r}: "
                               f"{exc.strerror or exc}") from None
        finally:
            if out is not asyncio.subprocess.DEVNULL:
                out.close()
        self.starts += 1
        self._stderr_tail.clear()
        self._reader = asyncio.ensure_future(self._read_stderr(self.process))
        log.info("local_server_started", pid=self.process.pid, command=self.command[0])

    async def _read_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            self._stderr_tail.append(line.decode("utf-8", "replace").rstrip()[:500])

    async def _wait_healthy(self, client: httpx2.AsyncClient) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                tail = " | ".join(list(self._stderr_tail)[-3:]) or "no output"
                raise ModelFailure(f"the local model server {self.command[0]!r} exited with code "
                                   f"{self.process.returncode} before it was healthy: {tail}")
            if await self.healthy(client):
                return
            await asyncio.sleep(0.1)
        raise ModelFailure(f"the local model server {self.command[0]!r} was not healthy at "
                           f"{self._root()}{self.health_path or '/health or /v1/models'} within "
                           f"{self.start_timeout_s:.0f}s")

    async def aclose(self) -> None:
        """Stop the server (SIGTERM to its process group, SIGKILL after 10 s)."""
        proc, self.process = self.process, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
            log.info("local_server_stopped", pid=proc.pid, code=proc.returncode)
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None


class LocalServers:
    """The local model servers of one harness, by command; the harness closes them when it stops."""

    def __init__(self) -> None:
        self._servers: dict[tuple[str, ...], LocalServer] = {}

    def get(self, command: list[str], base_url: str, **kwargs: Any) -> LocalServer:
        """The server for ``command`` (one process however many sessions use it)."""
        key = (base_url, *command)
        if key not in self._servers:
            self._servers[key] = LocalServer(command, base_url, **kwargs)
        return self._servers[key]

    async def aclose(self) -> None:
        """Stop every server started."""
        await asyncio.gather(*(s.aclose() for s in self._servers.values()), return_exceptions=True)


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
