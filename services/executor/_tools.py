"""Sandbox tools: a ToolCall's input checked, run through the helper, shaped for the model."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from devsilo.protocol import (
    SANDBOX_TOOLS,
    BashInput,
    ReadInput,
    SandboxError,
    ToolCall,
    ToolError,
    ToolResult,
    WriteInput,
)

from ._helper_client import HelperClient

WORKSPACE = "/workspace"


def _error(call: ToolCall, text: str) -> ToolResult:
    return ToolResult(call_id=call.call_id, content=text, is_error=True)


async def run_tool(helper: HelperClient, call: ToolCall) -> ToolResult:
    """Run one sandbox tool call; bad input and tool failures become error results."""
    schema = SANDBOX_TOOLS.get(call.name)
    if schema is None:
        return _error(call, f"unknown tool {call.name!r}; sandbox tools: {', '.join(SANDBOX_TOOLS)}")
    try:
        args = schema.model_validate(call.input)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "input"
        return _error(call, f"{call.name}: invalid {where}: {err.get('msg')}")
    try:
        if isinstance(args, BashInput):
            return await _bash(helper, call, args)
        if isinstance(args, ReadInput):
            return await _read(helper, call, args)
        if isinstance(args, WriteInput):
            return await _write(helper, call, args)
    except (SandboxError, ToolError) as exc:
        return _error(call, f"{call.name} failed: {exc}")
    return _error(call, f"tool {call.name} has no executor implementation")


async def _bash(helper: HelperClient, call: ToolCall, args: BashInput) -> ToolResult:
    res = await helper.exec(args.command, timeout_ms=args.timeout_ms, cwd=WORKSPACE)
    parts = []
    if res.stdout:
        parts.append(res.stdout.rstrip("\n"))
    if res.stderr:
        parts.append(("[stderr]\n" if res.stdout else "") + res.stderr.rstrip("\n"))
    status = f"exit code {res.exit_code}"
    if res.timed_out:
        status = f"timed out after {args.timeout_ms} ms"
    elif res.cancelled:
        status = "cancelled"
    parts.append(f"[{status}]")
    meta: dict[str, Any] = {
        "exit_code": res.exit_code, "timed_out": res.timed_out, "cancelled": res.cancelled,
        "truncated": res.truncated, "duration_ms": res.duration_ms,
    }
    failed = res.timed_out or res.cancelled or res.exit_code != 0
    return ToolResult(call_id=call.call_id, content="\n".join(parts), is_error=failed, meta=meta)


async def _read(helper: HelperClient, call: ToolCall, args: ReadInput) -> ToolResult:
    res = await helper.read(args.path, offset=args.offset, limit=args.limit)
    data = res.content
    text = data.decode("utf-8", errors="replace")
    return ToolResult(call_id=call.call_id, content=text,
                      meta={"size": res.size, "bytes": len(data), "eof": res.eof})


async def _write(helper: HelperClient, call: ToolCall, args: WriteInput) -> ToolResult:
    data = args.content.encode()
    await helper.write(args.path, data, append=args.append)
    verb = "appended" if args.append else "wrote"
    return ToolResult(call_id=call.call_id, content=f"{verb} {len(data)} bytes to {args.path}",
                      meta={"bytes": len(data)})
