"""Sandbox tools: a ToolCall's input checked, run through the helper, shaped for the model."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus, urlsplit

from devsilo.protocol import (
    DEFAULT_MAX_BYTES,
    SANDBOX_TOOLS,
    BashInput,
    ConfigError,
    EditInput,
    GlobInput,
    GrepInput,
    ReadInput,
    SandboxError,
    SendUserFileInput,
    ToolCall,
    ToolError,
    ToolResult,
    WebFetchInput,
    WebSearchInput,
    WriteInput,
)
from pydantic import ValidationError

from ._helper_client import HelperClient, OutputCallback

WORKSPACE = "/workspace"
SHARE_MAX = 512 * 1024
"""Largest file SendUserFile hands to the harness: it travels base64 in one reply and one event,
and a NATS message is 1 MiB by default."""
SEARCH_MAX_BYTES = 256 * 1024
RESULT_MAX_BYTES = 768 * 1024
"""Most bytes of a result's content as JSON: a result and its event are one NATS message each
(1 MiB by default), with room left for the rest of them. The middle is cut."""

EXECUTOR_TOOLS: dict[str, type[Any]] = {**SANDBOX_TOOLS, "SendUserFile": SendUserFileInput}
"""What the executor runs: the sandbox tools, and reading a file for SendUserFile."""


@dataclass(frozen=True)
class ToolOptions:
    """Operator settings the tools need (the executor's ``options``)."""

    search_url: str | None = None
    """WebSearch endpoint with ``{query}`` where the URL-encoded query goes; None: no WebSearch."""
    share_max: int = SHARE_MAX
    result_max_bytes: int = RESULT_MAX_BYTES

    @classmethod
    def from_options(cls, opts: Mapping[str, Any], max_message_bytes: int = DEFAULT_MAX_BYTES) -> ToolOptions:
        """Read ``search_url`` and ``share_max_bytes`` from an executor's options; results and shared
        files are sized to fit messages of ``max_message_bytes``."""
        url = opts.get("search_url")
        if url is not None and (not isinstance(url, str) or "{query}" not in url
                                or urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname):
            raise ConfigError(f"executor option search_url must be an http(s) URL with {{query}} where the "
                              f"query goes, not {url!r}")
        room = max_message_bytes * 3 // 4
        share = min(int(opts.get("share_max_bytes") or SHARE_MAX), SHARE_MAX, room * 3 // 4)
        return cls(search_url=url or None, share_max=share, result_max_bytes=room)


def _error(call: ToolCall, text: str) -> ToolResult:
    return ToolResult(call_id=call.call_id, content=text, is_error=True)


async def run_tool(helper: HelperClient, call: ToolCall, options: ToolOptions | None = None, *,
                   on_output: OutputCallback | None = None) -> ToolResult:
    """Run one sandbox tool call; bad input and tool failures become error results.

    ``on_output`` gets a Bash command's output as it comes (before the result).
    """
    options = options or ToolOptions()
    result = await _run(helper, call, options, on_output)
    return bounded(result, options.result_max_bytes)


def _json_size(text: str) -> int:
    return len(json.dumps(text, ensure_ascii=False).encode())


def bounded(result: ToolResult, most: int = RESULT_MAX_BYTES) -> ToolResult:
    """``result`` with its content cut to at most ``most`` bytes as JSON (head and tail kept, the cut
    said)."""
    text = result.content
    size = _json_size(text)
    if size <= most:
        return result
    keep = len(text) * most // size // 2
    while True:  # escapes make bytes per character uneven: shrink until it fits
        cut = len(text) - 2 * keep
        shown = f"{text[:keep]}\n[... {cut} characters cut ...]\n{text[len(text) - keep:]}"
        if _json_size(shown) <= most:
            break
        keep = keep * 9 // 10
    return result.model_copy(update={"content": shown, "meta": {**result.meta, "cut_chars": cut}})


async def _run(helper: HelperClient, call: ToolCall, options: ToolOptions,
               on_output: OutputCallback | None) -> ToolResult:
    schema = EXECUTOR_TOOLS.get(call.name)
    if schema is None:
        return _error(call, f"unknown tool {call.name!r}; sandbox tools: {', '.join(EXECUTOR_TOOLS)}")
    try:
        args = schema.model_validate(call.input)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "input"
        return _error(call, f"{call.name}: invalid {where}: {err.get('msg')}")
    try:
        if isinstance(args, BashInput):
            return await _bash(helper, call, args, on_output)
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
        if isinstance(args, WebSearchInput):
            return await _search(helper, call, args, options)
        if isinstance(args, SendUserFileInput):
            return await _share(helper, call, args, options)
    except (SandboxError, ToolError) as exc:
        return _error(call, f"{call.name} failed: {exc}")
    return _error(call, f"tool {call.name} has no executor implementation")


async def _bash(helper: HelperClient, call: ToolCall, args: BashInput,
                on_output: OutputCallback | None) -> ToolResult:
    res = await helper.exec(args.command, timeout_ms=args.timeout_ms, cwd=WORKSPACE, on_output=on_output)
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


async def _search(helper: HelperClient, call: ToolCall, args: WebSearchInput, options: ToolOptions) -> ToolResult:
    if not options.search_url:
        return _error(call, "WebSearch is not configured on this executor (its operator sets the "
                            "`search_url` option); use WebFetch on a known URL instead")
    url = options.search_url.replace("{query}", quote_plus(args.query))
    host = urlsplit(url).hostname or "?"
    res = await helper.fetch(url, max_bytes=SEARCH_MAX_BYTES)
    body = res.content.decode("utf-8", errors="replace")
    if res.blocked:
        return ToolResult(call_id=call.call_id, is_error=True,
                          content=f"WebSearch uses {host}, which this session may not reach: "
                                  f"{res.status} {body.strip()} (the search domain must be among the "
                                  "session's allowed domains)",
                          meta={"status": res.status, "blocked": res.blocked})
    if res.truncated:
        body += f"\n[truncated at {SEARCH_MAX_BYTES} bytes]"
    return ToolResult(call_id=call.call_id, content=f"search results from {host} (HTTP {res.status})\n\n{body}",
                      is_error=res.status >= 400, meta={"status": res.status})


async def _share(helper: HelperClient, call: ToolCall, args: SendUserFileInput, options: ToolOptions) -> ToolResult:
    res = await helper.read(args.path, limit=options.share_max + 1)
    if res.size > options.share_max or len(res.content) > options.share_max:
        return _error(call, f"SendUserFile: {args.path} is {res.size} bytes; files up to "
                            f"{options.share_max} bytes can be sent")
    data = res.content
    return ToolResult(call_id=call.call_id, content=f"read {len(data)} bytes of {args.path}",
                      meta={"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                            "data": base64.b64encode(data).decode()})
