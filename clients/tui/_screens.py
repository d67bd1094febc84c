"""Dialogs: confirmation, the unlock review, a new session, and pairing."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.console import Group, RenderableType
from rich.syntax import Syntax
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; dismissed with True for yes."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "no", "cancel")]

    def __init__(self, title: str, body: str | Text, yes: str = "Yes", no: str = "Cancel") -> None:
        super().__init__()
        self.title_, self.body, self.yes, self.no = title, body, yes, no

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_, classes="dialog-title")
            yield Static(self.body, classes="dialog-body")
            with Horizontal(classes="dialog-buttons"):
                yield Button(self.yes, variant="warning", id="yes")
                yield Button(self.no, id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_no(self) -> None:
        self.dismiss(False)


def review_renderables(result: Any) -> list[RenderableType]:
    """An unlock's change report: auto-exec warnings first, then each change with its diff."""
    report: dict[str, Any] = result.report or {}
    parts: list[RenderableType] = []
    auto = report.get("auto_exec") or []
    if auto:
        parts.append(Text("⚠ auto-exec surfaces changed: these run by themselves (git hooks, build "
                          "files, editor and shell configuration). Review them before running anything.",
                          style="bold red"))
        for a in auto:
            parts.append(Text(f"  ⚠ {a.get('path')}  [{', '.join(a.get('kinds') or [])}]  {a.get('reason', '')}",
                              style="red"))
        parts.append(Text(""))
    counts = ", ".join(f"{len(report.get(k) or [])} {k}" for k in ("added", "modified", "deleted")
                       if report.get(k))
    parts.append(Text(f"{report.get('changes_since_lock', 0)} changes since the lock"
                      + (f": {counts}" if counts else ""), style="bold"))
    if result.report_text:
        parts.append(Syntax(result.report_text, "diff", theme="monokai", word_wrap=True,
                            background_color="default"))
    return parts


class UnlockReviewScreen(ModalScreen[bool]):
    """The change report after an unlock; an auto-exec change must be acknowledged explicitly."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "close", "close")]

    def __init__(self, path: str, result: Any) -> None:
        super().__init__()
        self.path, self.result = path, result

    @property
    def plain(self) -> str:
        """The review as plain text, in the order shown."""
        return "\n".join(p.code if isinstance(p, Syntax) else p.plain if isinstance(p, Text) else str(p)
                         for p in review_renderables(self.result))

    def compose(self) -> ComposeResult:
        auto = bool(self.result.auto_exec_changed)
        with Vertical(classes="dialog wide"):
            yield Label(f"Unlocked {self.path}: the change report", classes="dialog-title")
            with VerticalScroll(classes="review"):
                yield Static(Group(*review_renderables(self.result)), classes="review-body")
            with Horizontal(classes="dialog-buttons"):
                if auto:
                    yield Button("I reviewed the auto-exec changes", variant="error", id="ack")
                else:
                    yield Button("Close", variant="primary", id="ack")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(True)

    def action_close(self) -> None:
        if not self.result.auto_exec_changed:
            self.dismiss(True)


class NewSessionScreen(ModalScreen[dict[str, str] | None]):
    """Workspace path, model and (for the mock model) a script file."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "cancel")]

    def __init__(self, gateways: list[str], workspace: str = "") -> None:
        super().__init__()
        self.gateways, self.workspace = gateways, workspace

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("New session", classes="dialog-title")
            yield Input(self.workspace, placeholder="workspace path", id="workspace")
            yield Input("mock", placeholder="model (mock, or e.g. claude-sonnet-4-5)", id="model")
            yield Input("", placeholder="script file for the mock model (JSON)", id="script")
            yield Input(self.gateways[0] if self.gateways else "", placeholder="gateway", id="gateway")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Create", variant="primary", id="create")
                yield Button("Cancel", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id != "create":
            self.dismiss(None)
            return
        self.dismiss({i: self.query_one(f"#{i}", Input).value.strip()
                      for i in ("workspace", "model", "script", "gateway")})

    def action_cancel(self) -> None:
        self.dismiss(None)
