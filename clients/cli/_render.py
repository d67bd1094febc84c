"""Printing a session's events for people (and as JSON lines for tools)."""

from __future__ import annotations

import json
from typing import Any, TextIO

from devsilo.protocol.client import EventFrame


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.rstrip("\n").splitlines()) or prefix


def render_event(ev: EventFrame) -> str:
    """One event as a short human line (or a few)."""
    d: dict[str, Any] = ev.data
    who = "" if ev.agent == "main" else f"[{ev.agent}] "
    k = ev.kind
    if k == "session_started":
        return (f"{who}session {ev.session_id} started: workspace {d.get('workspace')} on "
                f"{d.get('executor')} ({d.get('sandbox')}), model {d.get('model')}")
    if k == "access_report":
        lines = [f"{who}access: {d.get('backend')} sandbox, workspace {d.get('workspace')}"]
        lines += [f"    readable: {p}" for p in d.get("readable_paths", [])]
        doms = d.get("allowed_domains") or []
        lines.append(f"    network: {', '.join(doms) if doms else 'none'}")
        lines += [f"    warning: {w}" for w in d.get("warnings", [])]
        return "\n".join(lines)
    if k == "user_prompt":
        return f"{who}> {d.get('text', '')}"
    if k == "assistant_text":
        # Deltas stream ahead of the whole text, which is printed once it is final.
        return f"{who}assistant: {d.get('text', '')}" if d.get("final", True) else ""
    if k == "tool_output":
        return ""  # the result that follows shows the whole output
    if k == "agent_spawned":
        return f"{who}⇢ subagent {d.get('id')} ({d.get('name')}): {str(d.get('prompt', ''))[:200]}"
    if k == "agent_completed":
        return f"{who}⇠ subagent {d.get('id')} {d.get('status')}"
    if k == "question_asked":
        opts = "\n".join(f"    - {o.get('label')}: {o.get('description', '')}" for o in d.get("options", []))
        return f"{who}? {d.get('question')} [{d.get('id')}]" + (f"\n{opts}" if opts else "")
    if k == "question_answered":
        if d.get("cancelled"):
            return f"{who}  question {d.get('id')} cancelled"
        picked = ", ".join(d.get("selected") or []) or d.get("text") or ""
        return f"{who}  {d.get('client')} answered {d.get('id')}: {picked}"
    if k == "file_shared":
        return f"{who}file {d.get('path')} ({d.get('size')} bytes) {d.get('caption') or ''}".rstrip()
    if k == "tool_use":
        inp = d.get("input", {})
        arg = inp.get("command") or inp.get("path") or inp.get("message") or json.dumps(inp)[:200]
        return f"{who}● {d.get('name')}: {arg}"
    if k == "tool_result":
        mark = "✗" if d.get("is_error") else "✓"
        return f"{who}  {mark} {d.get('name')}\n{_indent(str(d.get('content', '')))}"
    if k == "error":
        return f"{who}error: {d.get('message')}"
    if k == "shutdown":
        return f"{who}session ended (exit code {d.get('exit_code')}): {d.get('reason')}"
    if k in ("busy", "turn_complete", "awaiting_input"):
        return ""
    return f"{who}{k}: {json.dumps(d)[:300]}"


def print_event(ev: EventFrame, out: TextIO, *, as_json: bool) -> None:
    """Print one event in the chosen format."""
    if as_json:
        out.write(ev.model_dump_json() + "\n")
    else:
        line = render_event(ev)
        if line:
            out.write(line + "\n")
    out.flush()
