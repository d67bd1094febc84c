"""A session's chat: events as widgets, and the question picker."""

from __future__ import annotations

import json
from typing import Any

from devsilo.cli._render import render_event
from devsilo.protocol.client import EventFrame
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import (
    Button,
    Collapsible,
    Input,
    Markdown,
    RadioButton,
    RadioSet,
    SelectionList,
    Static,
)

OUTPUT_KEEP = 20_000
"""Characters of a tool's streamed output kept on screen (the tail)."""
RESULT_SHOW = 4_000
AGENT_COLOURS = ("magenta", "cyan", "yellow", "green", "blue", "red")


class QuestionPicker(Vertical):
    """Options of a ``question_asked`` (one, several, and/or free text) and a Send button."""

    class Answered(Message):
        """The user picked an answer."""

        def __init__(self, picker: QuestionPicker, selected: list[str], text: str | None) -> None:
            super().__init__()
            self.picker, self.selected, self.text = picker, selected, text

    def __init__(self, session_key: str, data: dict[str, Any]) -> None:
        super().__init__(classes="question")
        self.session_key = session_key
        self.question_id = str(data.get("id"))
        self.data = data
        self.multi = bool(data.get("multi_select"))
        self.free = bool(data.get("allow_free_text", True)) or not data.get("options")

    def compose(self) -> ComposeResult:
        yield Static(Text.assemble(("? ", "bold yellow"), (str(self.data.get("question", "")), "bold")),
                     classes="question-title")
        options = [o for o in self.data.get("options") or [] if isinstance(o, dict)]
        if options and self.multi:
            yield SelectionList[str](*[(self._option_label(o), str(o.get("label"))) for o in options],
                                     classes="question-options")
        elif options:
            with RadioSet(classes="question-options"):
                for o in options:
                    yield RadioButton(self._option_label(o), name=str(o.get("label")))
        if self.free:
            yield Input(placeholder="your answer (free text)", classes="question-text")
        with Horizontal(classes="question-buttons"):
            yield Button("Send answer", variant="primary", classes="question-send")

    @staticmethod
    def _option_label(o: dict[str, Any]) -> Text:
        desc = o.get("description")
        return Text.assemble((str(o.get("label")), "bold"), (f"  {desc}" if desc else "", "dim"))

    def choice(self) -> tuple[list[str], str | None]:
        """What is picked now."""
        selected: list[str] = []
        for sl in self.query(SelectionList):
            selected = [str(v) for v in sl.selected]
        for rs in self.query(RadioSet):
            if rs.pressed_button is not None and rs.pressed_button.name:
                selected = [rs.pressed_button.name]
        text = None
        for inp in self.query(Input):
            text = inp.value.strip() or None
        return selected, text

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.post_message(self.Answered(self, *self.choice()))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.post_message(self.Answered(self, *self.choice()))


class ToolCall(Collapsible):
    """A tool call with its streamed output folded under it, then its result."""

    def __init__(self, data: dict[str, Any], classes: str) -> None:
        self.name_ = str(data.get("name"))
        self.arg = _tool_arg(data.get("input"))
        self.output = Static("", classes="tool-output")
        self.text = ""
        self.shown = Text()
        """The output with stderr in red (its last ``OUTPUT_KEEP`` characters)."""
        super().__init__(self.output, title=f"● {self.name_}: {self.arg}", collapsed=False, classes=classes)

    def add_output(self, data: dict[str, Any]) -> None:
        """More output (stdout or stderr) as it streams."""
        chunk = str(data.get("data", ""))
        self.text = (self.text + chunk)[-OUTPUT_KEEP:]
        self.shown.append(chunk, style="red" if data.get("stream") == "stderr" else "")
        if len(self.shown) > OUTPUT_KEEP:
            self.shown = self.shown[len(self.shown) - OUTPUT_KEEP:]
        view = self.shown.copy()
        view.rstrip()
        self.output.update(view)

    async def finish(self, data: dict[str, Any]) -> None:
        """The result: mark the title, show the content, fold the output away when it went well."""
        bad = bool(data.get("is_error"))
        self.title = f"{'✗' if bad else '✓'} {self.name_}: {self.arg}"
        self.add_class("tool-error" if bad else "tool-ok")
        content = str(data.get("content", ""))
        if len(content) > RESULT_SHOW:
            content = content[:RESULT_SHOW] + f"\n… ({len(content) - RESULT_SHOW} more characters)"
        if not self.text.strip() or bad:
            await self.query_one(Collapsible.Contents).mount(
                Static(Text(content, style="red" if bad else "green"), classes="tool-result"))
        self.collapsed = not bad


def _tool_arg(inp: Any) -> str:
    if not isinstance(inp, dict):
        return str(inp)[:120]
    arg = inp.get("command") or inp.get("path") or inp.get("question") or inp.get("prompt") \
        or inp.get("message") or json.dumps(inp)
    return str(arg).replace("\n", " ")[:120]


class ChatLog(VerticalScroll):
    """One session's events, rendered as they arrive."""

    def __init__(self, key: str, **kwargs: Any) -> None:
        super().__init__(classes="chat", **kwargs)
        self.key = key
        self.depth: dict[str, int] = {"main": 0}
        self.names: dict[str, str] = {}
        self.streams: dict[str, tuple[Markdown, str]] = {}
        self.tools: dict[str, ToolCall] = {}
        self.pickers: dict[str, QuestionPicker] = {}
        self.busy = False
        self.ended = False
        self.usd = 0.0
        self.tokens = 0
        self.cost_events = 0
        self.workspace = ""
        self.events: list[EventFrame] = []
        """Every event shown, in order (each once)."""

    def _css_for(self, ev: EventFrame, *extra: str) -> str:
        depth = self.depth.get(ev.agent, 1)
        parts = [f"depth-{min(depth, 4)}", *extra]
        if ev.agent != "main":
            parts.append(f"agent-{(depth - 1) % len(AGENT_COLOURS)}")
        return " ".join(parts)

    def _agent_label(self, ev: EventFrame) -> str:
        if ev.agent == "main":
            return ""
        name = self.names.get(ev.agent)
        return f"[{ev.agent}{' ' + name if name else ''}] "

    async def _put(self, *widgets: Any) -> None:
        await self.mount_all(widgets)
        self.scroll_end(animate=False)

    async def add_event(self, ev: EventFrame) -> QuestionPicker | None:
        """Render one event; returns a question picker when it asks one."""
        self.events.append(ev)
        d, k, label = ev.data, ev.kind, self._agent_label(ev)
        if k == "assistant_text":
            md, text = self.streams.get(ev.agent, (None, ""))
            if d.get("final", True):
                full = str(d.get("text", ""))
                self.streams.pop(ev.agent, None)
                if md is None:
                    if not full.strip():
                        return None
                    md = Markdown(classes=self._css_for(ev, "assistant"))
                    await self._put(self._who_label(ev), md) if label else await self._put(md)
                await md.update(full)
            else:
                text += str(d.get("text", ""))
                if md is None:
                    md = Markdown(classes=self._css_for(ev, "assistant"))
                    await self._put(self._who_label(ev), md) if label else await self._put(md)
                self.streams[ev.agent] = (md, text)
                await md.update(text)
            self.scroll_end(animate=False)
            return None
        if k == "tool_use":
            tool = ToolCall(d, self._css_for(ev, "tool"))
            self.tools[str(d.get("id"))] = tool
            await self._put(tool) if not label else await self._put(self._who_label(ev), tool)
            return None
        if k == "tool_output":
            t = self.tools.get(str(d.get("id")))
            if t is not None:
                t.add_output(d)
                self.scroll_end(animate=False)
            return None
        if k == "tool_result":
            t = self.tools.get(str(d.get("id")))
            if t is not None:
                await t.finish(d)
                self.scroll_end(animate=False)
            return None
        if k == "cost":
            self.cost_events += 1
            if isinstance(d.get("usd"), int | float):
                self.usd += float(d["usd"])
            self.tokens += int(d.get("input_tokens", 0) or 0) + int(d.get("output_tokens", 0) or 0)
            return None
        if k == "busy":
            self.busy = bool(d.get("busy"))
            return None
        if k in ("turn_complete", "awaiting_input"):
            self.busy = False
            return None
        if k == "agent_spawned":
            child = str(d.get("id"))
            self.depth[child] = self.depth.get(ev.agent, 0) + 1
            self.names[child] = str(d.get("name") or "")
        if k == "question_asked":
            await self._show_line(ev, "asked")
            picker = QuestionPicker(self.key, d)
            self.pickers[picker.question_id] = picker
            await self._put(picker)
            return picker
        if k == "question_answered":
            answered = self.pickers.pop(str(d.get("id")), None)
            if answered is not None:
                await answered.remove()
        if k == "shutdown":
            self.busy, self.ended = False, True
            for p in list(self.pickers.values()):
                await p.remove()
            self.pickers.clear()
        if k == "session_started":
            self.workspace = str(d.get("workspace", ""))
        style = {"error": "error", "user_prompt": "prompt", "shutdown": "ended", "file_shared": "file",
                 "agent_spawned": "agent", "agent_completed": "agent", "question_answered": "answered",
                 "access_report": "access", "interrupted": "error"}.get(k, "note")
        await self._show_line(ev, style)
        return None

    def _who_label(self, ev: EventFrame) -> Static:
        return Static(Text(self._agent_label(ev).strip()), classes=self._css_for(ev, "who"))

    async def _show_line(self, ev: EventFrame, style: str) -> None:
        text = render_event(ev)
        if ev.kind == "user_prompt":
            text = f"{self._agent_label(ev)}❯ {ev.data.get('text', '')}"
        elif ev.kind == "file_shared":
            d = ev.data
            text = (f"{self._agent_label(ev)}📎 {d.get('path')} ({d.get('size')} bytes, "
                    f"{d.get('direction', 'shared')} by {d.get('client') or 'the agent'})")
        elif ev.kind == "interrupted":
            text = f"{self._agent_label(ev)}⏹ interrupted"
        if text:
            await self._put(Static(Text(text), classes=self._css_for(ev, f"line {style}")))

    async def note(self, text: str | Text, style: str = "note") -> None:
        """A line from the TUI itself (command output, errors)."""
        await self._put(Static(text if isinstance(text, Text) else Text(text),
                               classes=f"line depth-0 local {style}"))
