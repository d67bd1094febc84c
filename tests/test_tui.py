"""`silo tui` driven with Textual's pilot against a whole stack (real gateway, NATS, bwrap, mock model).

One `silo up` for the module. Each test runs the app headless, types into it
as a person would, and checks what it shows against what the gateway says.
Screenshots go to ``docs/tui-*.svg`` for review with ``DEVSILO_UPDATE_SCREENSHOTS=1``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from devsilo.cli._client import ClientKeyPair, GatewayClient
from devsilo.cli._sessions import GatewayTarget
from devsilo.protocol import ConfigError
from devsilo.protocol.client import (
    AnswerQuestion,
    Attach,
    CostFrame,
    CostRequest,
    CreateSession,
    ErrorFrame,
    EventFrame,
    EventsFrame,
    RequestEvents,
    WorkspaceCommand,
    WorkspaceResult,
)
from devsilo.runtime._state import StateDir
from devsilo.testing import Stack
from devsilo.tui._chat import ChatLog, QuestionPicker, ToolCall
from devsilo.tui._gateways import KnownGateway, KnownGateways, normalize_fingerprint
from devsilo.tui._link import Credentials, GatewayLink
from devsilo.tui._screens import ConfirmScreen, NewSessionScreen, UnlockReviewScreen
from devsilo.tui.app import SiloApp
from textual.pilot import Pilot
from textual.widgets import Button, Input, Markdown, RadioSet, SelectionList, Static

DOCS = Path(__file__).resolve().parent.parent / "docs"
SIZE = (120, 40)
WAIT_FLAG = "while [ ! -e {0} ]; do sleep 0.05; done; echo released"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One stack; the mock model is priced so the cost shown is not zero."""
    s = Stack(tmp_path_factory.mktemp("tui") / "state", services={"harness": {"options": {
        "prices": {"mock": {"input": 3.0, "output": 15.0}}}}})
    s.start()
    try:
        yield s
    finally:
        s.stop()


def target(stack: Stack) -> GatewayTarget:
    state = StateDir(stack.state_dir)
    return GatewayTarget(f"wss://127.0.0.1:{stack.gateway_port}/ws", state.gateway_fingerprint(),
                         state.client_token())


async def plain_client(stack: Stack, name: str) -> GatewayClient:
    t = target(stack)
    client = GatewayClient(t.url, t.fingerprint, client_name=name)
    await client.connect(t.token)
    return client


def call(tool: str, **args: Any) -> dict[str, Any]:
    return {"name": tool, "input": args}


def step(agent: str, text: str = "", *calls: dict[str, Any]) -> dict[str, Any]:
    return {"agent": agent, "text": text, "tool_calls": list(calls)}


def script_file(tmp_path: Path, steps: list[dict[str, Any]]) -> Path:
    path = tmp_path / "script.json"
    path.write_text(json.dumps({"responses": steps}))
    return path


async def until(pilot: Pilot[Any], cond: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Let the app run until ``cond()`` is true (the timeout only ends a hung test)."""
    async def wait() -> Any:
        while not (got := cond()):
            await pilot.pause(0.05)
        return got
    try:
        return await asyncio.wait_for(wait(), timeout)
    except TimeoutError:
        app = pilot.app
        chat = app.chats.get(app.current or "") if isinstance(app, SiloApp) else None
        raise AssertionError(f"never happened: {what}; the TUI said: {getattr(app, 'notes', None)}; "
                             f"events: {[(e.kind, e.data) for e in chat.events][-6:] if chat else None}") from None


async def type_line(pilot: Pilot[Any], line: str) -> None:
    prompt = pilot.app.query_one("#prompt", Input)
    prompt.focus()
    prompt.value = line
    await pilot.press("enter")


def current_chat(app: SiloApp) -> ChatLog:
    assert app.current is not None
    return app.chats[app.current]


def kinds(chat: ChatLog) -> list[str]:
    return [e.kind for e in chat.events]


def notes(chat: ChatLog) -> list[str]:
    return [str(w.render()) for w in chat.query(".local").results(Static)]


def screenshot(app: SiloApp, name: str) -> str:
    """The screen as SVG; kept in ``docs/`` for review when ``DEVSILO_UPDATE_SCREENSHOTS=1``."""
    svg = app.export_screenshot(title=f"silo tui: {name}")
    assert svg.startswith("<svg") and "rich-terminal" in svg
    if os.environ.get("DEVSILO_UPDATE_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        (DOCS / f"tui-{name}.svg").write_text(svg)
    return svg


async def new_session(pilot: Pilot[Any], app: SiloApp, ws: Path, script: Path) -> ChatLog:
    await type_line(pilot, f"/new {ws} --script {script}")
    await until(pilot, lambda: app.current and "session_started" in kinds(current_chat(app)), "session started")
    return current_chat(app)


# -- chat: streamed Markdown, tools with folded output, subagents, errors, busy, cost ---------------


async def test_chat_streams_markdown_tools_subagents_errors_and_cost(stack: Stack, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    script = script_file(tmp_path, [
        step("main", "## Plan\nI will **run** a command, then `delegate`.",
             call("Bash", command="echo hello; echo oops >&2; " + WAIT_FLAG.format("go.flag"))),
        step("main", "Now a helper.", call("Agent", prompt="count files", name="counter"), call("AwaitAgent")),
        step("a1", "Counting *files*.", call("Bash", command="ls | wc -l"), call("Teleport", to="mars")),
        step("a1", "There are files."),
        step("main", "All done:\n\n- one\n- two"),
    ])
    app = SiloApp(target(stack), KnownGateways(tmp_path / "config"))
    async with app.run_test(size=SIZE) as pilot:
        chat = await new_session(pilot, app, ws, script)
        await type_line(pilot, "please start")
        tool = await until(pilot, lambda: next(iter(chat.query(ToolCall)), None), "first tool call shown")
        await until(pilot, lambda: "released" not in tool.text and "hello" in tool.text, "streamed output")
        # Mid-turn: the busy indicator runs and the output streams under the open tool call.
        assert chat.busy and app.query_one("#busy").has_class("on")
        assert "working" in app.status_text()
        assert not tool.collapsed and tool.title.startswith("● Bash")
        screenshot(app, "busy")
        (ws / "go.flag").touch()
        await until(pilot, lambda: "turn_complete" in kinds(chat), "turn complete")
        await pilot.pause(0.1)
        # Streamed text ends as the final Markdown, one widget per message.
        md = [m.source for m in chat.query(Markdown)]
        assert "## Plan\nI will **run** a command, then `delegate`." in md
        assert "All done:\n\n- one\n- two" in md
        assert len([s for s in md if "Plan" in s]) == 1
        # The tool's output streamed into its fold (stderr too); the fold closed when it succeeded.
        assert "hello" in tool.text and "oops" in tool.text and "released" in tool.text
        assert tool.title.startswith("✓ Bash") and tool.collapsed and tool.has_class("tool-ok")
        # The subagent: labelled, indented, its failed tool call red and open.
        spawned = [str(w.render()) for w in chat.query(".agent").results(Static)]
        assert any("subagent a1 (counter)" in s for s in spawned), spawned
        sub_tools = [t for t in chat.query(ToolCall) if t.has_class("depth-1")]
        assert [t.name_ for t in sub_tools] == ["Bash", "Teleport"]
        assert sub_tools[1].has_class("tool-error") and not sub_tools[1].collapsed
        labels = [str(w.render()) for w in chat.query(".who").results(Static)]
        assert "[a1 counter]" in labels
        assert next(m for m in chat.query(Markdown) if "Counting" in m.source).has_class("depth-1")
        # Cost in the status bar: the sum of the cost events, as the gateway counts it.
        client = await plain_client(stack, "cost-check")
        try:
            await client.send(CostRequest(session_id=app.current.split("/", 1)[1]))  # type: ignore[union-attr]
            cost = await client.receive()
        finally:
            await client.close()
        assert isinstance(cost, CostFrame) and cost.totals["usd"] > 0
        tokens = int(cost.totals["input_tokens"] + cost.totals["output_tokens"])
        assert f"cost ${cost.totals['usd']:.4f} · {tokens:,} tokens" in app.status_text()
        assert not app.query_one("#busy").has_class("on") and "idle" in app.status_text()
        screenshot(app, "chat")
        # Errors are red: a command that fails says so in the chat.
        await type_line(pilot, "/upload /no/such/file")
        await until(pilot, lambda: any("No such file" in n for n in notes(chat)), "upload error shown")
        bad = [w for w in chat.query(".local.error").results(Static) if "No such file" in str(w.render())]
        assert bad and bad[0].has_class("error")
        await type_line(pilot, "/stop")
        await until(pilot, lambda: chat.ended, "session ended")


# -- questions ------------------------------------------------------------------------------------


async def test_question_picker_single_multi_free_text_and_a_race_lost_to_another_client(
        stack: Stack, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    colours = [{"label": "red", "description": "warm"}, {"label": "blue", "description": "cool"}]
    script = script_file(tmp_path, [
        step("main", "", call("AskUserQuestion", question="Which colour?", options=colours,
                              multi_select=False, allow_free_text=False)),
        step("main", "", call("AskUserQuestion", question="Which parts?", multi_select=True,
                              options=[{"label": "docs"}, {"label": "tests"}, {"label": "code"}])),
        step("main", "", call("AskUserQuestion", question="Anything else?", allow_free_text=True)),
        step("main", "", call("AskUserQuestion", question="Race?", options=[{"label": "me"}, {"label": "you"}])),
        step("main", "thanks"),
    ])
    app = SiloApp(target(stack), KnownGateways(tmp_path / "config"))
    async with app.run_test(size=SIZE) as pilot:
        chat = await new_session(pilot, app, ws, script)
        sid = app.current.split("/", 1)[1]  # type: ignore[union-attr]
        await type_line(pilot, "ask me")

        def picker() -> QuestionPicker | None:
            return next(iter(chat.query(QuestionPicker)), None)

        # Single choice: a radio set; pick "blue" and send.
        p = await until(pilot, picker, "first question")
        assert "Which colour?" in str(p.query_one(".question-title", Static).render())
        assert not p.query(Input)  # no free text for this one
        screenshot(app, "question")
        radios = p.query_one(RadioSet)
        await pilot.click(list(radios.query("RadioButton"))[1])
        p.query_one(Button).press()
        await until(pilot, lambda: picker() is not p and "question_answered" in kinds(chat), "answer 1 taken")
        # Several: a selection list.
        p = await until(pilot, lambda: (q := picker()) and q.data.get("question") == "Which parts?" and q,
                        "second question")
        sl = p.query_one(SelectionList)
        sl.select("docs")
        sl.select("code")
        p.query_one(Button).press()
        # Free text only.
        p = await until(pilot, lambda: (q := picker()) and q.data.get("question") == "Anything else?" and q,
                        "third question")
        assert not p.query(RadioSet) and not p.query(SelectionList)
        p.query_one(Input).value = "ship it on friday"
        p.query_one(Input).focus()
        await pilot.press("enter")
        # The race: another client answers first; the picker goes away, its answer shown.
        p = await until(pilot, lambda: (q := picker()) and q.data.get("question") == "Race?" and q, "race")
        other = await plain_client(stack, "phone")
        try:
            await other.send(AnswerQuestion(session_id=sid, question_id=p.question_id, selected=("you",)))
            await until(pilot, lambda: picker() is None and kinds(chat).count("question_answered") == 4,
                        "picker gone after the other client answered")
            # The TUI answering late loses with the gateway's error, shown in red; nothing else changes.
            await app.on_question_picker_answered(QuestionPicker.Answered(p, ["me"], None))
            await until(pilot, lambda: any("already answered" in n for n in notes(chat)), "late answer refused")
        finally:
            await other.close()
        await until(pilot, lambda: "turn_complete" in kinds(chat), "turn complete")
        results = [json.loads(e.data["content"]) for e in chat.events if e.kind == "tool_result"]
        assert [(r["selected"], r["text"]) for r in results] == [
            (["blue"], None), (["docs", "code"], None), ([], "ship it on friday"), (["you"], None)]
        assert results[3]["answered_by"] == "phone"
        answered = [str(w.render()) for w in chat.query(".answered").results(Static)]
        assert any("phone answered" in a and "you" in a for a in answered), answered
        await type_line(pilot, "/stop")
        await until(pilot, lambda: chat.ended, "session ended")


# -- commands -------------------------------------------------------------------------------------


async def test_commands_upload_access_cost_help_interrupt_pair_and_stop(stack: Stack, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    script = script_file(tmp_path, [
        step("main", "waiting", call("Bash", command="sleep 300")),
        step("main", "stopped waiting"),
        step("main", "", call("Bash", command="sha256sum blob.bin")),
        step("main", "checked"),
    ])
    config = tmp_path / "config"
    app = SiloApp(target(stack), KnownGateways(config))
    async with app.run_test(size=SIZE) as pilot:
        chat = await new_session(pilot, app, ws, script)
        sid = app.current.split("/", 1)[1]  # type: ignore[union-attr]
        # /help
        await type_line(pilot, "/help")
        await until(pilot, lambda: any("/unlock [PATH]" in n for n in notes(chat)), "help")
        # Esc interrupts the running turn.
        await type_line(pilot, "go")
        await until(pilot, lambda: "tool_use" in kinds(chat), "long tool call")
        await pilot.press("escape")
        await until(pilot, lambda: "interrupted" in kinds(chat), "interrupted by Esc")
        await until(pilot, lambda: not chat.busy, "idle again")
        # /upload: a binary file lands in the workspace byte for byte; every client sees file_shared.
        blob = bytes(range(256)) * 4000 + b"\0tail"
        (tmp_path / "blob.bin").write_bytes(blob)
        await type_line(pilot, f"/upload {tmp_path / 'blob.bin'}")
        await until(pilot, lambda: "file_shared" in kinds(chat), "file shared")
        assert (ws / "blob.bin").read_bytes() == blob
        shared = next(e for e in chat.events if e.kind == "file_shared").data
        assert shared["size"] == len(blob) and shared["direction"] == "upload"
        await until(pilot, lambda: any(f"uploaded blob.bin ({len(blob):,} bytes" in n for n in notes(chat)),
                    "upload confirmed")
        # /interrupt as a command too (nothing runs: the harness says so or ignores it; no crash).
        await type_line(pilot, "/interrupt")
        # /access
        await type_line(pilot, "/access")
        await until(pilot, lambda: any(n.startswith(f"access of {sid}: bwrap sandbox") for n in notes(chat)),
                    "access report")
        access = next(n for n in notes(chat) if n.startswith("access of"))
        assert f"workspace {ws}" in access and "network: none" in access
        # /cost agrees with the gateway.
        await type_line(pilot, "/cost")
        await until(pilot, lambda: any(n.startswith(f"cost of {sid}") for n in notes(chat)), "cost")
        client = await plain_client(stack, "cost-check")
        try:
            await client.send(CostRequest(session_id=sid))
            cost = await client.receive()
        finally:
            await client.close()
        shown = next(n for n in notes(chat) if n.startswith("cost of"))
        assert f"${cost.totals['usd']:.6f}" in shown and f"({cost.cost_events} model calls)" in shown
        # /pair: a code for a new client; then /pair CODE URL FINGERPRINT pairs "a remote gateway"
        # (this same one, reached with a key instead of the token) and adds it to the list.
        await type_line(pilot, "/pair laptop")
        code_note = await until(pilot, lambda: next((n for n in notes(chat) if n.startswith("pairing code")), None),
                                "pairing code")
        pair_line = code_note.split("on the new machine: ", 1)[1].strip()
        assert pair_line.startswith("/pair ") and target(stack).fingerprint in pair_line
        await type_line(pilot, pair_line + " remote")
        await until(pilot, lambda: "remote" in app.links and app.links["remote"].state.connected, "remote linked")
        known = json.loads((config / "gateways.json").read_text())["gateways"]
        assert [(g["name"], g["url"], g["fingerprint"]) for g in known] == [
            ("remote", target(stack).url, target(stack).fingerprint)]
        key_file = config / "keys" / "remote.pem"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert stat.S_IMODE((config / "gateways.json").stat().st_mode) == 0o600
        # Sessions from both gateways in the list.
        await app.refresh_sessions()
        assert f"local/{sid}" in app.rows and f"remote/{sid}" in app.rows
        # A second TUI starts with the paired gateway only, from the file, with the key.
        again = SiloApp(None, KnownGateways(config))
        async with again.run_test(size=SIZE) as pilot2:
            await until(pilot2, lambda: "remote" in again.links and again.links["remote"].state.connected,
                        "paired gateway from the known-gateways file")
            await until(pilot2, lambda: f"remote/{sid}" in again.rows, "its sessions")
            assert list(again.links) == ["remote"]
        # A wrong fingerprint is refused before any credential goes out.
        await type_line(pilot, f"/pair ABCDEFGH {target(stack).url} {'0' * 64} wrong")
        await until(pilot, lambda: any("does not match the pinned fingerprint" in n for n in notes(chat)),
                    "pinning refused")
        assert "wrong" not in app.links
        # /gateways names both, with what is pinned.
        await type_line(pilot, "/gateways")
        await until(pilot, lambda: any(n.startswith("remote: ") for n in notes(chat)), "gateways listed")
        assert any(n.startswith(f"local: {target(stack).url} (SHA256 {target(stack).fingerprint})")
                   for n in notes(chat))
        # /stop
        await type_line(pilot, "/stop")
        await until(pilot, lambda: chat.ended, "stopped")
        assert chat.events[-1].kind == "shutdown" and "stopped by" in chat.events[-1].data["reason"]
        assert "ended" in app.status_text()
        # Ctrl+N: the new-session dialog (workspace, model, script). (The paired key is not an
        # operator's, so it may not start sessions on the executor's own files: the local one does.)
        await pilot.press("ctrl+n")
        dialog = await until(pilot, lambda: isinstance(app.screen, NewSessionScreen) and app.screen, "dialog")
        dialog.query_one("#workspace", Input).value = str(ws)
        dialog.query_one("#script", Input).value = str(script)
        assert dialog.query_one("#gateway", Input).value == "local"
        dialog.query_one("#create", Button).press()
        await until(pilot, lambda: app.current and app.current != f"local/{sid}"
                    and "session_started" in kinds(current_chat(app)), "session from the dialog")
        second = current_chat(app)
        assert second is not chat and second.workspace == str(ws)
        # /attach goes back to the first one, whose events are all there once.
        await type_line(pilot, f"/attach {sid} local")
        await until(pilot, lambda: app.current == f"local/{sid}", "attached")
        assert [e.seq for e in chat.events] == list(range(len(chat.events)))
        await type_line(pilot, f"/attach {second.key.split('/', 1)[1]} remote")
        # ...the same session through the paired gateway: its own chat, the same events.
        third = await until(pilot, lambda: app.current == "remote/" + second.key.split("/", 1)[1]
                            and "session_started" in kinds(current_chat(app)) and current_chat(app),
                            "the second session through the paired gateway")
        await type_line(pilot, "/stop")
        await until(pilot, lambda: second.ended and third.ended, "second stopped, seen through both")
        assert [e.model_dump() for e in third.events] == [e.model_dump() for e in second.events]


async def workspace_phase(stack: Stack, ws: Path) -> str:
    client = await plain_client(stack, "status")
    try:
        await client.send(WorkspaceCommand(op="status", path=str(ws)))
        res = await client.receive()
    finally:
        await client.close()
    assert isinstance(res, WorkspaceResult), res
    return str(res.workspaces[0]["phase"])


# -- unlock review ----------------------------------------------------------------------------------


async def test_unlock_asks_first_then_shows_auto_exec_warnings_before_the_diffs(
        stack: Stack, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "notes.txt").write_text("first line\n")
    client = await plain_client(stack, "locker")
    try:
        await client.send(WorkspaceCommand(op="lock", path=str(ws), workspace_host=socket.gethostname()))
        locked = await client.receive()
        assert isinstance(locked, WorkspaceResult), locked
    finally:
        await client.close()
    script = script_file(tmp_path, [
        step("main", "", call("Bash", command="echo second line >> notes.txt; printf 'all:\\n\\techo hi\\n' > Makefile")),
        step("main", "edited"),
    ])
    app = SiloApp(target(stack), KnownGateways(tmp_path / "config"))
    async with app.run_test(size=SIZE) as pilot:
        chat = await new_session(pilot, app, ws, script)
        await type_line(pilot, "edit")
        await until(pilot, lambda: "turn_complete" in kinds(chat), "edits made")
        # Cancelling the confirmation leaves the workspace locked.
        await type_line(pilot, "/unlock")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "confirmation")
        await pilot.click("#no")
        await until(pilot, lambda: any("unlock cancelled" in n for n in notes(chat)), "cancelled")
        assert await workspace_phase(stack, ws) == "locked"
        await type_line(pilot, "/unlock")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "confirmation")
        await pilot.click("#yes")
        review = await until(pilot, lambda: isinstance(app.screen, UnlockReviewScreen) and app.screen, "review")
        body = review.plain
        assert "auto-exec surfaces changed" in body and "Makefile" in body
        assert body.index("Makefile") < body.index("+second line")  # warnings first, then the diffs
        assert "-first line" not in body and "+second line" in body
        ack = review.query_one("#ack", Button)
        assert "reviewed the auto-exec" in str(ack.label)
        await pilot.press("escape")  # an auto-exec change is not waved away with Esc
        assert app.screen is review
        screenshot(app, "unlock")
        await pilot.click("#ack")
        await until(pilot, lambda: not isinstance(app.screen, UnlockReviewScreen), "review closed")
        assert (ws / "notes.txt").read_text() == "first line\nsecond line\n"
        assert await workspace_phase(stack, ws) != "locked"
        await until(pilot, lambda: chat.ended, "the session on it ended")


# -- reconnect ------------------------------------------------------------------------------------------


async def test_reconnects_after_a_gateway_restart_and_resumes_without_duplicates(
        stack: Stack, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    script = script_file(tmp_path, [
        step("main", "before", call("Bash", command="echo one; " + WAIT_FLAG.format("go.flag") + "; echo two")),
        step("main", "after the restart", call("Bash", command="echo three")),
        step("main", "done", call("Exit", message="finished")),
    ])
    app = SiloApp(target(stack), KnownGateways(tmp_path / "config"))
    async with app.run_test(size=SIZE) as pilot:
        chat = await new_session(pilot, app, ws, script)
        sid = app.current.split("/", 1)[1]  # type: ignore[union-attr]
        await type_line(pilot, "go")
        await until(pilot, lambda: any("one" in t.text for t in chat.query(ToolCall)), "first output")
        link = app.links["local"]
        old = stack.live_pid("gateway")
        assert old is not None
        os.kill(old, 9)
        await until(pilot, lambda: not link.state.connected, "disconnect noticed")
        assert "retry in" in app.status_text()
        # Events written while the gateway is down arrive after the reconnect.
        (ws / "go.flag").touch()
        await until(pilot, lambda: link.state.connects == 2, "reconnected", timeout=90)
        assert stack.live_pid("gateway") not in (None, old)
        await until(pilot, lambda: chat.ended, "session finished")
        assert any("reconnected to local" in n for n in notes(chat))
        seqs = [e.seq for e in chat.events]
        assert seqs == list(range(len(seqs)))
        # The same events as the gateway stores, each once.
        client = await plain_client(stack, "check")
        try:
            await client.send(RequestEvents(session_id=sid, from_seq=0))
            stored = await client.receive()
        finally:
            await client.close()
        assert isinstance(stored, EventsFrame) and stored.complete, stored
        assert [e.model_dump() for e in stored.events] == [e.model_dump() for e in chat.events]
        outputs = "".join(t.text for t in chat.query(ToolCall))
        assert outputs.count("two") == 1 and outputs.count("three") == 1
        assert not isinstance(stored, ErrorFrame)


# -- the link's defences, and the known-gateways file ------------------------------------------------


async def test_a_gap_in_the_events_is_filled_from_the_stored_ones_each_once(stack: Stack, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    client = await plain_client(stack, "maker")
    try:
        await client.send(CreateSession(workspace=str(ws), headless=True, prompt="go", script=json.dumps(
            {"responses": [step("main", "one", call("Bash", command="echo a")),
                           step("main", "", call("Exit", message="ok"))]})))
        sid = (await client.receive()).session_id
        await client.send(Attach(session_id=sid))
        stored = []
        while not stored or stored[-1].kind != "shutdown":
            frame = await client.receive()
            if isinstance(frame, EventFrame):
                stored.append(frame)
    finally:
        await client.close()
    t = target(stack)
    got: list[EventFrame] = []
    link = GatewayLink("local", t.url, t.fingerprint, Credentials(token=t.token),
                       on_event=lambda _, ev: got.append(ev), on_state=lambda _: None)
    link.start()
    try:
        await link.wait_up()
        link.next_seq[sid] = 0
        # An event from the middle (as if some were lost) is held back; the gap is fetched, then it.
        link._deliver(stored[5])
        link._deliver(stored[2])
        deadline = asyncio.get_running_loop().time() + 30
        while len(got) < len(stored):
            assert asyncio.get_running_loop().time() < deadline, [e.seq for e in got]
            await asyncio.sleep(0.02)
        link._deliver(stored[3])  # already had: dropped
        assert [e.model_dump() for e in got] == [e.model_dump() for e in stored]
    finally:
        await link.stop()


def test_known_gateways_file_and_keys_are_checked(tmp_path: Path) -> None:
    known = KnownGateways(tmp_path / "cfg")
    assert known.load() == []
    key = ClientKeyPair.generate()
    gw = KnownGateway(name="box", url="wss://box.example:8443/ws", fingerprint="ab" * 32, key_id="0123456789abcdef")
    known.add(gw, key)
    assert known.load() == [gw]
    assert known.key(gw).public_key() == key.public_key()
    known.key_path("box").chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        known.key(gw)
    known.path.write_text('{"gateways": [{"name": "x", "url": "http://plain", "fingerprint": "zz"}]}')
    with pytest.raises(ConfigError, match="not a valid known-gateways file"):
        known.load()
    assert normalize_fingerprint("SHA256 " + ":".join(["AB"] * 32)) == "ab" * 32
    for bad in ("", "ab" * 31, "xy" * 32):
        with pytest.raises(ConfigError):
            normalize_fingerprint(bad)


async def test_malformed_frames_from_a_gateway_are_reported_and_skipped(stack: Stack) -> None:
    """A TLS WebSocket server with the gateway's certificate that sends garbage between good frames."""
    import ssl

    from aiohttp import web
    from devsilo.testing import free_ports

    state = StateDir(stack.state_dir)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(state.gateway_cert_path, state.gateway_key_path)

    def event(seq: int) -> str:
        return json.dumps({"type": "event", "session_id": "s1", "seq": seq, "kind": "tool_output",
                           "agent": "main", "ts": 1.0, "data": {"n": seq}})

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(json.dumps({"type": "hello", "gateway": "fake", "auth_methods": ["token"],
                                      "auth_deadline_s": 5}))
        await ws.send_str(json.dumps({"type": "challenge", "nonce": "AA" * 22}))
        await ws.receive()
        await ws.send_str(json.dumps({"type": "auth_ok", "user": "u"}))
        await ws.receive()  # the attach
        for text in [event(0), "not json", json.dumps({"type": "teleport"}),
                     json.dumps({"type": "event", "seq": "x"}), event(1)]:
            await ws.send_str(text)
        await ws.receive()
        return ws

    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_ports(1)[0]
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls).start()
    got: list[EventFrame] = []
    errors: list[str] = []
    link = GatewayLink("fake", f"wss://127.0.0.1:{port}/ws", state.gateway_fingerprint(),
                       Credentials(token="t" * 64), on_event=lambda _, ev: got.append(ev),
                       on_state=lambda _: None)
    link.listen(lambda f: errors.append(f.message))
    link.next_seq["s1"] = 0
    link.start()
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while len(got) < 2:
            assert asyncio.get_running_loop().time() < deadline, (got, errors)
            await asyncio.sleep(0.02)
        assert [e.data["n"] for e in got] == [0, 1]
        assert len(errors) == 3 and all("cannot read" in m for m in errors)
        assert link.state.connected
    finally:
        await link.stop()
        await runner.cleanup()
