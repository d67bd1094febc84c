"""`silo tui`: sessions on every gateway the user knows, a chat per session, and the commands."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import secrets
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from devsilo.cli._sessions import GatewayTarget
from devsilo.protocol import SiloError
from devsilo.protocol.client import (
    AccessReportFrame,
    AccessReportRequest,
    AnswerQuestion,
    CostFrame,
    CostRequest,
    CreateSession,
    ErrorFrame,
    EventFrame,
    Interrupt,
    PairingCode,
    PairingCodeRequest,
    Prompt,
    SessionCreated,
    Shutdown,
    UploadChunk,
    UploadDone,
    UploadFile,
    UploadProgress,
    UploadReady,
    WorkspaceCommand,
    WorkspaceResult,
    WorkspaceUploadNeeded,
)
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import ContentSwitcher, DataTable, Header, Input, LoadingIndicator, Static

from ._chat import ChatLog, QuestionPicker
from ._gateways import KnownGateways, gateway_name_for
from ._link import BACKOFF_FIRST, Credentials, GatewayLink, RequestFailed
from ._screens import ConfirmScreen, NewSessionScreen, UnlockReviewScreen

LOCAL = "local"

HELP = """\
Commands (a line without / is a prompt for the open session):
  /new PATH [--model M] [--script FILE] [--gateway NAME]   start a session (Ctrl+N: a dialog)
  /attach SESSION [GATEWAY]   open a session (or pick one in the list)
  /sessions                   refresh the session list (Ctrl+R)
  /upload PATH [AS]           send a file into the session's workspace
  /access                     what the session's sandbox can reach
  /cost                       the session's cost so far
  /interrupt  (Esc)           stop the current turn
  /stop                       end the session
  /unlock [PATH]              unlock the workspace and review its changes
  /pair [NAME]                a pairing code for a new client of this gateway
  /pair CODE URL FINGERPRINT [NAME]   pair with a remote gateway and add it
  /gateways                   the gateways this TUI knows
  /help                       this text;  Ctrl+Q quits"""

CSS = """
Screen { layout: vertical; }
#main { height: 1fr; }
#sessions { width: 46; height: 1fr; border: round $primary; }
#sessions:focus-within { border: round $accent; }
#right { width: 1fr; }
#chats { height: 1fr; }
.chat { border: round $secondary; padding: 0 1; height: 1fr; }
#welcome { padding: 1 2; color: $text-muted; }
#busy { height: 1; display: none; color: $warning; }
#busy.on { display: block; }
#prompt { height: 3; }
#status { height: 1; background: $panel; padding: 0 1; }
.line { margin: 0; }
.prompt { color: $accent; text-style: bold; margin-top: 1; }
.error { color: $error; text-style: bold; }
.ended { color: $warning; text-style: bold; }
.note { color: $text-muted; }
.file { color: $success; }
.agent { color: $secondary; text-style: italic; }
.answered { color: $success; }
.asked { color: $warning; text-style: bold; margin-top: 1; }
.access { color: $text-muted; }
.question { border: round $warning; padding: 0 1; height: auto; margin: 1 0; }
.question-title { margin-bottom: 1; }
.question-options { height: auto; }
.question-buttons { height: auto; }
.question-send { margin-top: 1; }
.assistant { margin: 0; padding: 0; }
.who { text-style: bold; margin-top: 1; }
.tool { margin: 0; padding: 0; border: none; background: $boost; }
.tool CollapsibleTitle { color: $warning; }
.tool.tool-ok CollapsibleTitle { color: $success; }
.tool.tool-error CollapsibleTitle { color: $error; }
.tool-output { color: $text; background: $surface; padding: 0 1; }
.depth-1 { margin-left: 2; }
.depth-2 { margin-left: 4; }
.depth-3 { margin-left: 6; }
.depth-4 { margin-left: 8; }
.agent-0 { border-left: thick magenta; }
.agent-1 { border-left: thick cyan; }
.agent-2 { border-left: thick yellow; }
.agent-3 { border-left: thick green; }
.local { color: $primary-lighten-2; }
.local.error { color: $error; }
.dialog { width: 80; height: auto; max-height: 90%; border: thick $primary; background: $surface;
          padding: 1 2; }
.dialog.wide { width: 95%; height: 90%; }
.dialog-title { text-style: bold; margin-bottom: 1; }
.dialog-buttons { height: auto; margin-top: 1; }
.dialog-buttons Button { margin-right: 2; }
.review { height: 1fr; }
ModalScreen { align: center middle; }
"""


class EventArrived(Message):
    """An event of a followed session."""

    def __init__(self, gateway: str, event: EventFrame) -> None:
        super().__init__()
        self.gateway, self.event = gateway, event


class LinkChanged(Message):
    """A gateway connected, or lost its connection."""

    def __init__(self, gateway: str, reconnected: bool) -> None:
        super().__init__()
        self.gateway, self.reconnected = gateway, reconnected


class GatewayNotice(Message):
    """A frame nobody waited for (mostly an error answering a prompt or an answer)."""

    def __init__(self, gateway: str, frame: Any) -> None:
        super().__init__()
        self.gateway, self.frame = gateway, frame


@dataclass
class SessionRow:
    """A line of the session list."""

    gateway: str
    session_id: str
    workspace: str
    state: str
    user: str


def _hash_file(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _read_at(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def session_key(gateway: str, sid: str) -> str:
    """The id of a session across gateways."""
    return f"{gateway}/{sid}"


class SiloApp(App[None]):
    """The devsilo terminal UI."""

    TITLE = "devsilo"
    CSS = CSS
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "interrupt", "interrupt", priority=True),
        Binding("ctrl+n", "new_session", "new session"),
        Binding("ctrl+r", "refresh", "refresh"),
        Binding("ctrl+q", "quit", "quit"),
    ]

    def __init__(self, local: GatewayTarget | None, known: KnownGateways | None = None, *,
                 backoff_first: float = BACKOFF_FIRST) -> None:
        super().__init__()
        self.local = local
        self.known = known or KnownGateways()
        self.backoff_first = backoff_first
        self.links: dict[str, GatewayLink] = {}
        self.rows: dict[str, SessionRow] = {}
        self.chats: dict[str, ChatLog] = {}
        self.current: str | None = None
        self.notes: list[str] = []
        self.main: Any = None
        """Every line the TUI itself showed (command output and errors), oldest first."""

    # -- layout -----------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            table: DataTable[str] = DataTable(id="sessions", cursor_type="row", zebra_stripes=True)
            table.border_title = "sessions"
            yield table
            with Vertical(id="right"):
                with ContentSwitcher(id="chats", initial="welcome"):
                    yield Static(Text.from_markup(
                        "[b]devsilo[/b]: pick a session on the left, or [b]/new PATH[/b] to start one.\n\n"
                        + HELP.replace("[", r"\[")), id="welcome")
                yield LoadingIndicator(id="busy")
                yield Input(placeholder="prompt, or /help", id="prompt")
        yield Static("", id="status")

    async def on_mount(self) -> None:
        self.main = self.screen
        table = self.main.query_one("#sessions", DataTable)
        table.add_columns("gateway", "session", "state", "workspace")
        if self.local is not None:
            self._add_link(LOCAL, self.local.url, self.local.fingerprint, Credentials(token=self.local.token))
        try:
            for gw in self.known.load():
                self._add_link(gw.name, gw.url, gw.fingerprint, Credentials(key_id=gw.key_id, key=self.known.key(gw)))
        except SiloError as exc:
            self.notify(str(exc), severity="error")
        self.set_interval(5.0, self._refresh_quietly)
        self.main.query_one("#prompt", Input).focus()
        self._status()

    def _add_link(self, name: str, url: str, fingerprint: str, creds: Credentials) -> GatewayLink:
        def on_state(link: GatewayLink) -> None:
            self.post_message(LinkChanged(link.name, link.state.connected and link.state.connects > 1))

        def on_event(link: GatewayLink, ev: EventFrame) -> None:
            self.post_message(EventArrived(link.name, ev))

        def on_frame(frame: Any) -> None:
            self.post_message(GatewayNotice(name, frame))

        link = GatewayLink(name, url, fingerprint, creds, on_event=on_event, on_state=on_state,
                           backoff_first=self.backoff_first)
        link.listen(on_frame)
        self.links[name] = link
        link.start()
        return link

    async def on_unmount(self) -> None:
        for link in self.links.values():
            await link.stop()

    # -- status -----------------------------------------------------------------------------

    def _status(self) -> None:
        parts: list[tuple[str, str] | str] = []
        for name, link in self.links.items():
            if link.state.connected:
                parts.append((f"● {name} ", "green"))
            elif link.state.retry_in is not None:
                parts.append((f"○ {name} (retry in {link.state.retry_in:.0f} s) ", "red"))
            else:
                parts.append((f"○ {name} ", "yellow"))
        chat = self.chats.get(self.current or "")
        if chat is not None and self.current is not None:
            parts.append(("│ ", "dim"))
            parts.append((f"{self.current.split('/', 1)[1]} ", "bold"))
            if chat.ended:
                parts.append(("ended ", "yellow"))
            elif chat.busy:
                parts.append(("working… ", "bold yellow"))
            else:
                parts.append(("idle ", "green"))
            parts.append(("│ ", "dim"))
            parts.append((f"cost ${chat.usd:.4f} · {chat.tokens:,} tokens", "cyan"))
        self.main.query_one("#status", Static).update(Text.assemble(*parts))
        busy = self.main.query_one("#busy", LoadingIndicator)
        busy.set_class(bool(chat is not None and chat.busy and not chat.ended), "on")

    def status_text(self) -> str:
        """The status bar as plain text (tests read it)."""
        return str(self.main.query_one("#status", Static).render())

    async def note(self, text: str | Text, style: str = "note") -> None:
        """A line from the TUI in the open chat (or a notification without one)."""
        self.notes.append(str(text))
        chat = self.chats.get(self.current or "")
        if chat is None:
            self.notify(str(text), severity="error" if style == "error" else "information")
        else:
            await chat.note(text, style)

    # -- gateway messages ---------------------------------------------------------------------

    async def on_event_arrived(self, msg: EventArrived) -> None:
        key = session_key(msg.gateway, msg.event.session_id)
        chat = await self._chat(key)
        picker = await chat.add_event(msg.event)
        if picker is not None and key == self.current:
            self.call_after_refresh(self._focus_picker, picker)
        row = self.rows.get(key)
        if row is not None and msg.event.kind in ("busy", "turn_complete", "shutdown", "awaiting_input"):
            row.state = "ended" if chat.ended else ("busy" if chat.busy else "idle")
            self._render_rows()
        self._status()

    def _focus_picker(self, picker: QuestionPicker) -> None:
        if picker.is_attached:
            target = next(iter(picker.query("RadioSet, SelectionList, Input")), None)
            if target is not None:
                target.focus()

    async def on_link_changed(self, msg: LinkChanged) -> None:
        link = self.links[msg.gateway]
        if msg.reconnected:
            await self.note(f"reconnected to {msg.gateway}; resuming from the last event", "answered")
        elif not link.state.connected:
            await self.note(f"{msg.gateway}: {link.state.message}; retrying in {link.state.retry_in:.0f} s",
                            "error")
        self._status()
        if link.state.connected:
            self._refresh_quietly()

    async def on_gateway_notice(self, msg: GatewayNotice) -> None:
        frame = msg.frame
        if isinstance(frame, ErrorFrame):
            await self.note(f"{msg.gateway}: {frame.message}", "error")

    # -- sessions -----------------------------------------------------------------------------

    async def _chat(self, key: str) -> ChatLog:
        chat = self.chats.get(key)
        if chat is None:
            chat = ChatLog(key, id=f"chat-{len(self.chats)}")
            self.chats[key] = chat
            await self.main.query_one("#chats", ContentSwitcher).mount(chat)
        return chat

    def _refresh_quietly(self) -> None:
        self.run_worker(self.refresh_sessions(), group="refresh", exclusive=True)

    async def refresh_sessions(self) -> None:
        """Ask every connected gateway for its sessions and show them all."""
        rows: dict[str, SessionRow] = {}
        for name, link in list(self.links.items()):
            if not link.state.connected:
                rows.update({k: r for k, r in self.rows.items() if r.gateway == name})
                continue
            try:
                listed = await link.sessions()
            except (SiloError, TimeoutError):
                continue
            for s in listed.sessions:
                rows[session_key(name, s.session_id)] = SessionRow(name, s.session_id, s.workspace, s.state, s.user)
        self.rows = rows
        self._render_rows()

    def _render_rows(self) -> None:
        table = self.main.query_one("#sessions", DataTable)
        cursor = table.cursor_row
        table.clear()
        styles = {"busy": "bold yellow", "idle": "green", "ended": "dim", "new": "cyan"}
        for key, r in sorted(self.rows.items(), key=lambda kv: (kv[1].state == "ended", kv[0])):
            mark = "▶ " if key == self.current else ""
            table.add_row(Text(r.gateway, "magenta"), Text(mark + r.session_id[:14], "bold"),
                          Text(r.state, styles.get(r.state, "")), Text(Path(r.workspace).name or r.workspace),
                          key=key)
        if table.row_count:
            table.move_cursor(row=min(cursor, table.row_count - 1))

    async def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        key = event.row_key.value
        if key:
            gw, sid = key.split("/", 1)
            await self.open_session(gw, sid)

    async def open_session(self, gateway: str, sid: str) -> None:
        """Show a session's chat, attaching to it (from its first event) the first time."""
        link = self._link(gateway)
        key = session_key(gateway, sid)
        chat = await self._chat(key)
        self.current = key
        self.main.query_one("#chats", ContentSwitcher).current = chat.id
        await link.follow(sid, 0)
        self._render_rows()
        self._status()
        self.main.query_one("#prompt", Input).focus()

    def _link(self, name: str | None = None) -> GatewayLink:
        if name is None:
            if self.current is not None:
                name = self.current.split("/", 1)[0]
            elif self.links:
                name = next(iter(self.links))
            else:
                raise SiloError("no gateway: run `silo up`, or /pair with a remote gateway")
        link = self.links.get(name)
        if link is None:
            raise SiloError(f"no gateway named {name!r} (known: {', '.join(self.links) or 'none'})")
        return link

    def _session(self) -> tuple[GatewayLink, str, ChatLog]:
        if self.current is None:
            raise SiloError("no session is open: pick one in the list or /new PATH")
        gw, sid = self.current.split("/", 1)
        return self._link(gw), sid, self.chats[self.current]

    # -- input -------------------------------------------------------------------------------

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "prompt":
            return
        text = event.value.strip()
        event.input.value = ""
        if not text:
            return
        self.run_worker(self.execute(text), group="commands")

    async def execute(self, line: str) -> None:
        """Run one line from the prompt: a /command, or a prompt for the open session."""
        try:
            if line.startswith("/"):
                name, *args = shlex.split(line[1:]) or [""]
                handler = getattr(self, f"cmd_{name.replace('-', '_')}", None)
                if handler is None:
                    raise SiloError(f"unknown command /{name}; /help lists them")
                await handler(args)
            else:
                link, sid, _ = self._session()
                await link.send(Prompt(session_id=sid, text=line))
        except RequestFailed as exc:
            await self.note(f"{exc.frame.request or 'request'} failed: {exc.frame.message}", "error")
        except (SiloError, OSError, ValueError, TimeoutError) as exc:
            await self.note(f"error: {exc}", "error")

    async def on_question_picker_answered(self, msg: QuestionPicker.Answered) -> None:
        gw, sid = msg.picker.session_key.split("/", 1)
        try:
            await self._link(gw).send(AnswerQuestion(session_id=sid, question_id=msg.picker.question_id,
                                                     selected=tuple(msg.selected), text=msg.text))
        except (SiloError, ValueError) as exc:
            await self.note(f"error: {exc}", "error")

    # -- commands ------------------------------------------------------------------------------

    async def cmd_help(self, args: list[str]) -> None:
        """/help"""
        await self.note(HELP)

    async def cmd_sessions(self, args: list[str]) -> None:
        """/sessions"""
        await self.refresh_sessions()

    async def cmd_gateways(self, args: list[str]) -> None:
        """/gateways"""
        for name, link in self.links.items():
            await self.note(f"{name}: {link.url} (SHA256 {link.fingerprint}) {link.state.message}")

    async def cmd_attach(self, args: list[str]) -> None:
        """/attach SESSION [GATEWAY]"""
        if not args:
            raise SiloError("usage: /attach SESSION [GATEWAY]")
        await self.open_session(self._link(args[1] if len(args) > 1 else None).name, args[0])

    async def cmd_new(self, args: list[str]) -> None:
        """/new PATH [--model M] [--script FILE] [--gateway NAME]"""
        opts: dict[str, str] = {}
        rest: list[str] = []
        it = iter(args)
        for a in it:
            if a in ("--model", "--script", "--gateway", "--llm"):
                opts[a[2:]] = next(it, "")
            else:
                rest.append(a)
        if len(rest) != 1:
            raise SiloError("usage: /new PATH [--model M] [--script FILE] [--gateway NAME]")
        await self.create_session(rest[0], opts.get("model", "mock"), opts.get("script", ""),
                                  opts.get("gateway") or None, opts.get("llm"))

    async def create_session(self, workspace: str, model: str, script: str, gateway: str | None,
                             llm: str | None = None) -> str:
        """Start a session and open it."""
        link = self._link(gateway)
        model = model or "mock"
        backend = llm or ("mock" if model == "mock" else "anthropic")
        req = CreateSession(workspace=os.path.abspath(os.path.expanduser(workspace)), model=model,
                            llm=backend,
                            script=Path(script).expanduser().read_text() if script else None)
        created: SessionCreated = await link.request(req, SessionCreated, timeout=120)
        await self.open_session(link.name, created.session_id)
        await self.refresh_sessions()
        return str(created.session_id)

    async def cmd_interrupt(self, args: list[str]) -> None:
        """/interrupt"""
        link, sid, _ = self._session()
        await link.send(Interrupt(session_id=sid))

    async def action_interrupt(self) -> None:
        """Esc: close a dialog, or interrupt the open session's turn."""
        if len(self.screen_stack) > 1:
            screen = self.screen
            action = getattr(screen, "action_cancel", None) or getattr(screen, "action_no", None) \
                or getattr(screen, "action_close", None)
            if action is not None:
                action()
            return
        if self.current is not None:
            self.run_worker(self.execute("/interrupt"), group="commands")

    async def cmd_stop(self, args: list[str]) -> None:
        """/stop"""
        link, sid, _ = self._session()
        await link.send(Shutdown(session_id=sid))

    async def cmd_cost(self, args: list[str]) -> None:
        """/cost"""
        link, sid, _ = self._session()
        cost: CostFrame = await link.request(CostRequest(session_id=sid), CostFrame,
                                             match=lambda f: f.session_id == sid)
        t = cost.totals
        lines = [(f"cost of {sid}: ${t.get('usd', 0.0):.6f}, {int(t.get('input_tokens', 0)):,} tokens in, "
                 f"{int(t.get('output_tokens', 0)):,} out ({cost.cost_events} model calls)")]
        lines += [f"  model {m}: ${v.get('usd', 0.0):.6f}, {int(v.get('input_tokens', 0) + v.get('output_tokens', 0)):,}"
                  " tokens" for m, v in cost.by_model.items()]
        lines += [f"  agent {a}: ${v.get('usd', 0.0):.6f}" for a, v in cost.by_agent.items()]
        await self.note("\n".join(lines), "answered")

    async def cmd_access(self, args: list[str]) -> None:
        """/access"""
        link, sid, _ = self._session()
        rep: AccessReportFrame = await link.request(AccessReportRequest(session_id=sid), AccessReportFrame,
                                                    match=lambda f: f.session_id == sid)
        r = rep.report
        lines = [f"access of {sid}: {r.get('backend')} sandbox, workspace {r.get('workspace')}"]
        lines += [f"  readable: {p}" for p in r.get("readable_paths", [])]
        doms = r.get("allowed_domains") or []
        lines.append(f"  network: {', '.join(doms) if doms else 'none'}")
        for k, v in r.items():
            if k not in ("backend", "workspace", "readable_paths", "allowed_domains", "warnings"):
                lines.append(f"  {k}: {json.dumps(v) if not isinstance(v, str) else v}")
        await self.note("\n".join(lines), "access")
        for w in r.get("warnings", []):
            await self.note(f"  ⚠ {w}", "error")

    async def cmd_upload(self, args: list[str]) -> None:
        """/upload PATH [AS]"""
        if not args:
            raise SiloError("usage: /upload PATH [NAME IN THE WORKSPACE]")
        link, sid, _ = self._session()
        src = Path(args[0]).expanduser()
        dest = args[1] if len(args) > 1 else src.name
        size, sha256 = await asyncio.to_thread(_hash_file, src)
        uid = secrets.token_hex(8)
        ready: UploadReady = await link.request(
            UploadFile(session_id=sid, upload_id=uid, path=dest, size=size, sha256=sha256),
            UploadReady, match=lambda fr: fr.upload_id == uid)
        await self.note(f"uploading {src} ({size:,} bytes) as {dest}…")
        offset = 0
        done: Any = None
        while done is None:
            data = await asyncio.to_thread(_read_at, src, offset, ready.chunk_size)
            reply = await link.request(UploadChunk(upload_id=uid, offset=offset,
                                                   data=base64.b64encode(data).decode()),
                                       UploadProgress, UploadDone, match=lambda fr: fr.upload_id == uid)
            offset += len(data)
            if isinstance(reply, UploadDone):
                done = reply
            elif not data:
                raise SiloError(f"{src} changed while uploading")
        await self.note(f"uploaded {done.path} ({done.size:,} bytes, sha256 {done.sha256[:12]}…)", "file")

    async def cmd_pair(self, args: list[str]) -> None:
        """/pair [NAME] or /pair CODE URL FINGERPRINT [NAME]"""
        if len(args) >= 3:
            code, url, fingerprint = args[:3]
            name = args[3] if len(args) > 3 else gateway_name_for(url, set(self.links))
            if name in self.links:
                raise SiloError(f"a gateway named {name} is already known")
            gw = await self.known.pair(name, url, fingerprint, code)
            self._add_link(gw.name, gw.url, gw.fingerprint, Credentials(key_id=gw.key_id, key=self.known.key(gw)))
            await self.note(f"paired with {gw.url} as {gw.user} (key {gw.key_id}); it is now gateway {gw.name}",
                            "answered")
            return
        if len(args) > 1:
            raise SiloError("usage: /pair [NAME] or /pair CODE URL FINGERPRINT [NAME]")
        link = self._link()
        name = args[0] if args else "client"
        got: PairingCode = await link.request(PairingCodeRequest(client_name=name), PairingCode)
        await self.note(Text.assemble(
            ("pairing code ", "bold"), (got.code, "bold reverse green"),
            f"  for {got.client_name} of user {got.user}, valid {got.valid_s:.0f} s, once\n",
            f"  gateway: {link.url}\n  fingerprint: SHA256 {link.fingerprint}\n",
            ("  on the new machine: ", "dim"), f"/pair {got.code} {link.url} {link.fingerprint}"))

    async def cmd_unlock(self, args: list[str]) -> None:
        """/unlock [PATH]"""
        path = args[0] if args else None
        if path is None:
            _, _, chat = self._session()
            path = chat.workspace
        if not path:
            raise SiloError("usage: /unlock PATH (the open session names no workspace)")
        path = os.path.abspath(os.path.expanduser(path))
        link = self._link()
        ok = await self.push_screen_wait(ConfirmScreen(
            "Unlock workspace?",
            Text.assemble(("Unlock ", ""), (path, "bold"), (
                ("?\nSessions on it end, and its files become yours again. The change report "
                "follows, auto-exec surfaces first."), "")), yes="Unlock"))
        if not ok:
            await self.note("unlock cancelled")
            return
        res = await link.request(WorkspaceCommand(op="unlock", path=path), WorkspaceResult,
                                 WorkspaceUploadNeeded, timeout=120)
        if isinstance(res, WorkspaceUploadNeeded):
            raise SiloError(f"{res.reason}; use `silo workspace unlock {path}` for an uploaded workspace")
        await self.note(f"unlocked {path}: {res.report.get('changes_since_lock', 0)} changes"
                        + ("; ⚠ an auto-exec surface changed" if res.auto_exec_changed else ""),
                        "error" if res.auto_exec_changed else "answered")
        await self.push_screen_wait(UnlockReviewScreen(path, res))

    # -- key actions ------------------------------------------------------------------------

    def action_new_session(self) -> None:
        """Ctrl+N: the new-session dialog."""
        async def run() -> None:
            got = await self.push_screen_wait(NewSessionScreen(list(self.links)))
            if got:
                await self.execute_create(got)
        self.run_worker(run(), group="commands")

    async def execute_create(self, got: dict[str, str]) -> None:
        """Create a session from the dialog's fields, reporting errors in the TUI."""
        try:
            await self.create_session(got["workspace"], got["model"], got["script"], got["gateway"] or None)
        except (SiloError, OSError, ValueError) as exc:
            await self.note(f"error: {exc}", "error")

    def action_refresh(self) -> None:
        """Ctrl+R: refresh the session list."""
        self._refresh_quietly()


async def run_tui(local: GatewayTarget | None, known: KnownGateways | None = None) -> None:
    """Run the TUI until the user quits."""
    await SiloApp(local, known).run_async()
