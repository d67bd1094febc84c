"""One session's agent loop: model turns, tool routing, and its event stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from devsilo.protocol import (
    SANDBOX_TOOLS,
    Ack,
    CloseSession,
    GrantError,
    RemoteError,
    Role,
    SandboxClosed,
    SessionEvent,
    SessionGrant,
    SiloError,
    ToolCall,
    ToolResult,
    subjects,
)
from devsilo.protocol._messages import AccessReport, EventKind
from devsilo.runtime import Bus
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._gate import ModelPolicy
from ._journal import SessionJournal
from ._model import ModelBackend, ModelFailure, ToolUse

HEADLESS_INSTRUCTION = (
    "You are running headless: nobody will answer questions. When the task is done, "
    "call the Exit tool with a short summary."
)
HEADLESS_REMINDER = "You are running headless. Continue the task, then call Exit with a summary."
MAX_HEADLESS_NUDGES = 3
# Exit codes, shared with the CLI (REQUIREMENTS §1).
EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_MODEL = 3


class UploadNotice(BaseModel):
    """What the gateway says about a file a client uploaded into the workspace."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str = Field(min_length=1, max_length=4096)
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class SessionEvents:
    """Publishes a session's events with seq from 0 and no gaps.

    One writer per session; each event is acknowledged by JetStream before
    the next is sent, and its dedupe id makes a retried publish idempotent.
    """

    def __init__(self, bus: Bus, session_id: str, clock: Callable[[], float] = time.time, *,
                 journal: SessionJournal | None = None, next_seq: int = 0) -> None:
        self._bus = bus
        self._sid = session_id
        self._subject = subjects.session_events(session_id)
        self._seq = next_seq
        self._lock = asyncio.Lock()
        self._clock = clock
        self._journal = journal

    async def emit(self, kind: EventKind, data: dict[str, Any] | None = None, agent: str = "main") -> int:
        """Publish one event; return its seq."""
        async with self._lock:
            seq = self._seq
            event = SessionEvent(
                session_id=self._sid, seq=seq, kind=kind, agent=agent, ts=self._clock(), data=data or {}
            )
            await self._bus.js_publish(self._subject, event, sid=self._sid, dedupe_id=f"{self._sid}:{seq}")
            self._seq += 1
            if self._journal is not None:
                await self._journal.event(event)
            return seq


class SessionRunner:
    """Drives one session: the top-level agent's turns, its tools, and its end."""

    def __init__(
        self,
        bus: Bus,
        grant: SessionGrant,
        executor_id: str,
        access: AccessReport,
        model: ModelBackend,
        *,
        headless: bool,
        log: Any,
        policy: ModelPolicy | None = None,
        journal: SessionJournal | None = None,
        next_seq: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bus = bus
        self.grant = grant
        self.sid = grant.session_id
        self.executor_id = executor_id
        self.access = access
        self.model = model
        self.headless = headless
        self.journal = journal
        self.events = SessionEvents(bus, self.sid, clock, journal=journal, next_seq=next_seq)
        self.log = log.bind(session=self.sid)
        self.llm = (policy or ModelPolicy.from_options({})).gate(model, grant, self.events.emit, logger=self.log)
        self.inputs: asyncio.Queue[str] = asyncio.Queue()
        self.notes: list[str] = []
        """Things the model is told with the next prompt (files users uploaded)."""
        self.messages: list[dict[str, Any]] = []
        self.exit_code: int | None = None
        self._turn: asyncio.Task[None] | None = None
        self._executor_lost = False
        self._abandoned = False
        self.leased_at = time.monotonic()
        self.tools = [*SANDBOX_TOOLS, "Exit"] if headless else list(SANDBOX_TOOLS)

    async def run(self, prompt: str | None) -> None:
        """Run until the agent exits, the session is stopped, or the model fails."""
        await self.events.emit("session_started", {
            "workspace": self.grant.workspace, "executor": self.executor_id,
            "sandbox": self.grant.sandbox, "model": self.model.name, "headless": self.headless,
            "user": self.grant.user,
        })
        await self.events.emit("access_report", self.access.model_dump(mode="json"))
        if self.headless:
            self.messages.append({"role": "system", "content": HEADLESS_INSTRUCTION})
        if prompt:
            self.inputs.put_nowait(prompt)
        await self._loop()

    async def resume(self, messages: list[dict[str, Any]], pending: list[ToolUse], in_turn: bool,
                     queued: list[str]) -> None:
        """Go on with a session another harness ran (rebuilt from its journal, see ``_failover``).

        ``in_turn``: the turn was under way; ``pending`` are the tool calls of
        its last response that had not started, run before the model is asked again.
        """
        self.messages = messages
        for text in queued:
            self.inputs.put_nowait(text)
        if in_turn:
            self._turn = asyncio.create_task(self._run_turn(None, pending))
        await self._loop()

    async def _loop(self) -> None:
        try:
            if self._turn is not None:
                await self._await_turn()
            while self.exit_code is None:
                if self.inputs.empty():
                    if self.headless:
                        await self._finish(EXIT_RUNTIME, "headless session has no prompt")
                        break
                    await self.events.emit("awaiting_input")
                text = await self.inputs.get()
                if self.exit_code is not None:
                    break
                self._turn = asyncio.create_task(self._run_turn(text))
                await self._await_turn()
        except ModelFailure as exc:
            await self.events.emit("error", {"message": str(exc)})
            await self._finish(EXIT_MODEL, str(exc))
        except Exception as exc:  # the session ends; the service goes on
            self.log.exception("session_failed")
            await self.events.emit("error", {"message": f"session failed: {exc}"})
            await self._finish(EXIT_RUNTIME, "session failed")
        finally:
            await self.model.aclose()
            await self._close_sandbox()

    async def _await_turn(self) -> None:
        assert self._turn is not None
        try:
            await self._turn
        except asyncio.CancelledError:
            if self.exit_code is not None or asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise
            if self._executor_lost:
                return  # executor_lost() reports and ends the session
            await self.events.emit("interrupted", {"reason": "user interrupt"})

    def abandon(self) -> None:
        """Another harness owns the session now: end here without events and leave its sandbox be."""
        self._abandoned = True

    def interrupt(self) -> bool:
        """Cancel the running turn (its tool calls included); True when one was running."""
        if self._turn is not None and not self._turn.done():
            self._turn.cancel()
            return True
        return False

    async def stop(self, reason: str) -> None:
        """End the session from outside (a client's stop)."""
        if self.exit_code is None:
            self.interrupt()
            await self._finish(EXIT_OK, reason)
            self.inputs.put_nowait("")

    async def file_uploaded(self, notice: str, client: str) -> None:
        """A client's file landed in the workspace: show it to every client, tell the model next turn.

        ``notice`` is the gateway's JSON ``{"path", "size", "sha256"}`` (the executor's report).
        """
        try:
            info = UploadNotice.model_validate_json(notice)
        except ValidationError as exc:
            raise GrantError(f"upload notice is not {{path, size, sha256}}: {exc.errors()[0]['msg']}") from None
        await self.events.emit("file_shared", {**info.model_dump(), "client": client, "direction": "upload"})
        self.notes.append(f"[{client or 'a user'} uploaded {info.path} into the workspace: {info.size} bytes, "
                          f"sha256 {info.sha256}]")

    async def executor_lost(self, reason: str) -> None:
        """The session's executor is gone: end the session with a clear error."""
        if self.exit_code is not None:
            return
        self._executor_lost = True
        self.interrupt()
        await self.events.emit("error", {"message": reason})
        await self._finish(EXIT_RUNTIME, reason)
        self.inputs.put_nowait("")

    async def _run_turn(self, text: str | None, pending: list[ToolUse] | None = None) -> None:
        if text is not None:
            if self.journal is not None:
                await self.journal.lifecycle("turn")
            await self.events.emit("user_prompt", {"text": text})
            await self.events.emit("busy", {"busy": True})
            notes, self.notes = self.notes, []
            self.messages.append({"role": "user", "content": "\n\n".join([*notes, text])})
        for call in pending or ():
            result = await self._call_tool(call)
            self.messages.append({"role": "tool", "tool_call_id": call.id, "content": result.content,
                                  "is_error": result.is_error})
            if self.exit_code is not None:
                return
        nudges = 0
        while self.exit_code is None:
            response = await self.llm.complete(self.messages, self.tools, agent="main")
            if self.journal is not None:  # after the call: ``messages`` as sent (compaction works in place)
                await self.journal.llm_request("main", self.model.name, self.messages, self.tools)
                await self.journal.llm_response("main", response.text, response.tool_calls,
                                                response.usage.as_dict())
            if response.text:
                await self.events.emit("assistant_text", {"text": response.text, "final": True})
            self.messages.append({
                "role": "assistant", "content": response.text,
                "tool_calls": [{"id": c.id, "name": c.name, "input": c.input} for c in response.tool_calls],
            })
            if not response.tool_calls:
                if not self.headless:
                    break
                nudges += 1
                if nudges > MAX_HEADLESS_NUDGES:
                    raise ModelFailure(f"model stopped {nudges} times without calling Exit")
                self.messages.append({"role": "user", "content": HEADLESS_REMINDER})
                continue
            for call in response.tool_calls:
                result = await self._call_tool(call)
                self.messages.append({"role": "tool", "tool_call_id": call.id, "content": result.content,
                                      "is_error": result.is_error})
                if self.exit_code is not None:
                    return
        await self.events.emit("busy", {"busy": False})
        await self.events.emit("turn_complete")

    async def _call_tool(self, call: ToolUse) -> ToolResult:
        result = await self._run_tool(call)
        if self.journal is not None:
            await self.journal.tool_result("main", call.id, call.name, result.content, result.is_error,
                                           result.meta, self._owner(call))
        return result

    def _owner(self, call: ToolUse) -> str:
        return self.executor_id if call.name in SANDBOX_TOOLS else "harness"

    async def _run_tool(self, call: ToolUse) -> ToolResult:
        if self.journal is not None:
            await self.journal.tool_call("main", call.id, call.name, call.input, self._owner(call))
        await self.events.emit("tool_use", {"id": call.id, "name": call.name, "input": call.input})
        if call.input_error is not None:
            result = ToolResult(call_id=call.id, is_error=True,
                                content=f"{call.name}: {call.input_error}; call it again with a JSON object")
        elif call.name not in self.tools:
            result = ToolResult(call_id=call.id, is_error=True,
                                content=f"unknown tool {call.name!r}; available: {', '.join(self.tools)}")
        elif call.name == "Exit":
            message = str(call.input.get("message", ""))
            result = ToolResult(call_id=call.id, content="exiting")
        else:
            try:
                result = await self.bus.request(
                    subjects.exec_tool(self.executor_id, self.sid),
                    ToolCall(call_id=call.id, name=call.name, input=call.input),
                    ToolResult, from_role=Role.EXECUTOR, sid=self.sid, timeout=660.0,
                )
            except RemoteError as exc:
                result = ToolResult(call_id=call.id, is_error=True, content=f"tool failed: {exc}")
                if exc.code == SandboxClosed.code:
                    # No sandbox, no session: end it here (interrupting would cancel this very turn).
                    self._executor_lost = True
                    await self.events.emit("tool_result", {"id": call.id, "name": call.name,
                                                           "content": result.content, "is_error": True,
                                                           "meta": {}})
                    await self.events.emit("error", {"message": exc.message})
                    await self._finish(EXIT_RUNTIME, exc.message)
                    return result
        await self.events.emit("tool_result", {
            "id": call.id, "name": call.name, "content": result.content,
            "is_error": result.is_error, "meta": result.meta,
        })
        if call.name == "Exit":
            await self._finish(EXIT_OK, message or "done")
        return result

    async def _finish(self, code: int, reason: str) -> None:
        if self.exit_code is not None:
            return
        self.exit_code = code
        await self.events.emit("shutdown", {"exit_code": code, "reason": reason})
        if self.journal is not None:
            await self.journal.lifecycle("ended", exit_code=code, reason=reason)

    async def _close_sandbox(self) -> None:
        if self._executor_lost or self._abandoned:
            return
        try:
            await self.bus.request(
                subjects.exec_close(self.executor_id, self.sid), CloseSession(reason="session ended"),
                Ack, from_role=Role.EXECUTOR, sid=self.sid, timeout=15.0,
            )
        except SiloError as exc:
            self.log.warning("sandbox_close_failed", error=str(exc))
