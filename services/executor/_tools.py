"""Sandbox tools: a ToolCall's input checked, run through the helper, shaped for the model."""

from __future__ import annotations

from typing import Any

from devsilo.protocol import (
    SANDBOX_TOOLS,
    BashInput,
    EditInput,
    GlobInput,
    GrepInput,
    ReadInput,
    SandboxError,
    ToolCall,
    ToolError,
    ToolResult,
    WebFetchInput,
    WriteInput,
)
from pydantic import ValidationError

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
        if isinstance(args, EditInput):
            return await _edit(helper, call, args)
        if isinstance(args, GlobInput):
            return await _glob(helper, call, args)
        if isinstance(args, GrepInput):
            return await _grep(helper, call, args)
        if isinstance(args, WebFetchInput):
            return await _fetch(helper, call, args)
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


async def _edit(helper: HelperClient, call: ToolCall, args: EditInput) -> ToolResult:
    res = await helper.edit(args.path, args.old_string, args.new_string, replace_all=args.replace_all)
    return ToolResult(call_id=call.call_id,
                      content=f"replaced {res.replacements} occurrence(s) in {args.path} "
                              f"(first at line {res.first_line})",
                      meta={"replacements": res.replacements, "size": res.size})


async def _glob(helper: HelperClient, call: ToolCall, args: GlobInput) -> ToolResult:
    res = await helper.glob(args.pattern, path=args.path)
    lines = list(res.matches) or [f"no paths match {args.pattern}"]
    if res.truncated:
        lines.append("[more matches not shown]")
    return ToolResult(call_id=call.call_id, content="\n".join(lines),
                      meta={"matches": len(res.matches), "truncated": res.truncated})


async def _grep(helper: HelperClient, call: ToolCall, args: GrepInput) -> ToolResult:
    res = await helper.grep(args.pattern, path=args.path, glob=args.glob,
                            case_insensitive=args.case_insensitive, max_results=args.max_results)
    lines = [f"{m.path}:{m.line}: {m.text}" for m in res.matches] or [f"no lines match {args.pattern}"]
    if res.truncated:
        lines.append(f"[stopped at {args.max_results} matches]")
    if res.binary_skipped or res.large_skipped:
        lines.append(f"[skipped {res.binary_skipped} binary and {res.large_skipped} large files]")
    return ToolResult(call_id=call.call_id, content="\n".join(lines),
                      meta={"matches": len(res.matches), "files_searched": res.files_searched})


async def _fetch(helper: HelperClient, call: ToolCall, args: WebFetchInput) -> ToolResult:
    res = await helper.fetch(args.url, max_bytes=args.max_bytes)
    body = res.content.decode("utf-8", errors="replace")
    if res.blocked:
        return ToolResult(call_id=call.call_id, is_error=True, content=f"{res.status} {body.strip()}",
                          meta={"status": res.status, "blocked": res.blocked})
    head = f"HTTP {res.status} {res.reason} ({res.url})"
    if res.truncated:
        body += f"\n[truncated at {args.max_bytes} bytes]"
    return ToolResult(call_id=call.call_id, content=f"{head}\n\n{body}", is_error=res.status >= 400,
                      meta={"status": res.status, "redirects": len(res.redirects)})
