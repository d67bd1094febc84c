"""A small OpenAI-compatible Chat Completions server, run as a process by the local-backend tests.

It stands in for llama-server: ``/health`` and completions answer 503 until
``--ready-after`` seconds have passed; ``/v1/models`` lists one model; each POST to
``/v1/chat/completions`` streams the next reply of ``--script`` (a JSON list of
``{"text": ..., "tool": [name, {args}]}``) as SSE chunks with usage in the last
one, and appends the request body to ``--requests`` (JSON lines).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from aiohttp import web


def chunks(reply: dict[str, Any], n_prompt: int) -> list[dict[str, Any]]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "local-x"}
    out = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "finish_reason": None}]}]
    text = reply.get("text", "")
    for piece in (text[: len(text) // 2], text[len(text) // 2:]):
        if piece:
            out.append({**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
    if reply.get("tool"):
        name, args = reply["tool"]
        raw = json.dumps(args)
        out.append({**base, "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_local_1", "type": "function", "function": {"name": name, "arguments": ""}}]},
            "finish_reason": None}]})
        for piece in (raw[:4], raw[4:]):
            out.append({**base, "choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "function": {"arguments": piece}}]}, "finish_reason": None}]})
    out.append({**base, "choices": [{"index": 0, "delta": {},
                                     "finish_reason": "tool_calls" if reply.get("tool") else "stop"}]})
    out.append({**base, "choices": [], "usage": {"prompt_tokens": n_prompt, "completion_tokens": 7,
                                                 "total_tokens": n_prompt + 7}})
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--script", required=True)
    p.add_argument("--requests", required=True)
    p.add_argument("--ready-after", type=float, default=0.0)
    args = p.parse_args()
    replies = json.loads(Path(args.script).read_text())
    started = time.monotonic()

    def record(body: object) -> None:
        with Path(args.requests).open("a") as f:
            f.write(json.dumps(body) + "\n")

    async def health(_: web.Request) -> web.Response:
        ready = time.monotonic() - started >= args.ready_after
        return web.json_response({"status": "ok" if ready else "loading model"}, status=200 if ready else 503)

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "local-x", "object": "model"}]})

    async def completions(request: web.Request) -> web.StreamResponse:
        if time.monotonic() - started < args.ready_after:  # as llama-server while it loads
            return web.json_response({"error": {"code": 503, "message": "Loading model",
                                                "type": "unavailable_error"}}, status=503)
        body = await request.json()
        record(body)
        if not replies:
            return web.json_response({"error": {"message": "script exhausted", "type": "server_error"}},
                                     status=500)
        reply = replies.pop(0)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in chunks(reply, len(json.dumps(body["messages"])) // 4):
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", completions)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, handle_signals=True)


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
