"""One session's agent loop: model turns, tool routing, and its event stream."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from devsilo.protocol import (
    SANDBOX_TOOLS,
    Ack,
    AskUserQuestionInput,
    CloseSession,
    GrantError,
    InputRefused,
    RemoteError,
    Role,
    SandboxClosed,
    SendUserFileInput,
    SessionEvent,
    SessionGrant,
    SiloError,
    ToolCall,
    ToolCancel,
    ToolOutput,
    ToolResult,
    subjects,
)
from devsilo.protocol._messages import AccessReport, EventKind
from devsilo.runtime import Bus
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._agents import AgentLoop, LoopMetrics, answer_text
from ._failover import UNKNOWN_RESULT, Rebuilt
from ._gate import ModelPolicy
from ._journal import SessionJournal
from ._model import ModelBackend, ModelFailure, ModelResponse, TextSink, ToolUse
from ._questions import Answer, QuestionBoard

HEADLESS_INSTRUCTION = (
    "You are running headless: nobody will answer questions. When the task is done, "
    "call the Exit tool with a short summary."
)
STOP_WAIT_S = 5.0
"""How long a stop waits for the running turn to wind down before the session ends regardless."""
TOOL_TIMEOUT_S = 660.0
"""How long a sandbox call may take, asked again or not, before the model hears it timed out."""
NO_RESPONDERS_GRACE_S = 10.0
"""How long a call nobody received is sent again (NATS or the executor reconnecting), counted from
this harness's last reconnect; after that the session's executor is lost and the session ends."""
OUTPUT_DRAIN_S = 5.0
"""After a call's result, how long its streamed output that is still on the way is waited for."""
# Exit codes, shared with the CLI (REQUIREMENTS §1).
EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_MODEL = 3


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
        self._silent = False

    def silence(self) -> None:
        """Publish nothing more (another harness now writes this session's events)."""
        self._silent = True

    async def emit(self, kind: EventKind, data: dict[str, Any] | None = None, agent: str = "main") -> int:
        """Publish one event; return its seq.

        A cancelled caller does not cut a publish short (shielded): a publish that landed
        without its seq being counted would make the next event reuse the seq, and the
        stream would drop that one as a duplicate.
        """
        return await asyncio.shield(self._emit(kind, data, agent))

    async def _emit(self, kind: EventKind, data: dict[str, Any] | None, agent: str) -> int:
        async with self._lock:
            if self._silent:
                return self._seq
            seq = self._seq
            event = SessionEvent(
                session_id=self._sid, seq=seq, kind=kind, agent=agent, ts=self._clock(), data=data or {}
            )
            await self._bus.js_publish(self._subject, event, sid=self._sid, dedupe_id=f"{self._sid}:{seq}")
            self._seq += 1
            if self._journal is not None:
                await self._journal.event(event)
            return seq


class UploadNotice(BaseModel):
    """What the gateway says about a file a client uploaded into the workspace."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str = Field(min_length=1, max_length=4096)
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


@dataclass
class RunningCall:
    """A sandbox call in flight: whose it is and how much of its streamed output was passed on."""

    agent: str
    call_id: str
    seen: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class SessionRunner:
    """Drives one session: the top-level agent's turns, subagents, tools, questions, and its end."""

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
        metrics: LoopMetrics | None = None,
    ) -> None:
        self.bus = bus
        self.metrics = metrics if metrics is not None else LoopMetrics()
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
        if journal is not None:
            self.llm.on_compacted = self._journal_compaction
        self.notes: list[str] = []
        """Things the model is told with the next prompt (files users uploaded)."""
        self.inputs: asyncio.Queue[str] = asyncio.Queue()
        self.exit_code: int | None = None
        self.questions = QuestionBoard()
        self.running_subagents = 0
        self.finish_order = itertools.count(1)
        self._agent_ids = itertools.count(1)
        self._wire_ids = itertools.count(1)
        self._calls: dict[str, RunningCall] = {}
        self._turn: asyncio.Task[None] | None = None
        self._executor_lost = False
        self._losing_executor = False
        self._abandoned = False
        self._sandbox_gone: str | None = None
        self._stopping: str | None = None
        self._finished = asyncio.Event()
        self._began = asyncio.Event()  # its first events are out: an end may follow them
        self.leased_at = time.monotonic()
        self.main = AgentLoop(self, "main", name="main", parent=None, messages=[])
        self.tools = self.main.tools

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The top-level agent's conversation."""
        return self.main.messages

    @messages.setter
    def messages(self, value: list[dict[str, Any]]) -> None:
        self.main.messages = value

    def next_agent_id(self) -> str:
        """A new subagent id: a1, a2, ..."""
        return f"a{next(self._agent_ids)}"

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
            await self.prompt(prompt, "")
        await self._loop()

    async def restore(self, state: Rebuilt, shown: set[str]) -> None:
        """Before :meth:`resume`: settle what the previous harness left cut short.

        Every agent's call whose result is unknown (or implied by the journal, an ``Agent``
        call whose subagent was spawned) gets that result, journaled and shown; a call that is
        run again gets its ``tool_use`` if it was never shown (``shown``: the ids whose
        ``tool_use`` reached the stream); a subagent that ends here without having said so
        (it could not be resumed, its parent had ended, or it answered just before the crash)
        gets its ``agent_completed``. Subagent ids and their finishing order count on.
        """
        self._agent_ids = itertools.count(state.last_agent + 1)
        self.finish_order = itertools.count(state.finished_count + 1)
        for agent in (state.main, *state.agents.values()):
            settled: list[tuple[ToolUse, str, bool, dict[str, Any]]] = [
                (c, UNKNOWN_RESULT, True, {}) for c in agent.unknown]
            settled += [(c, content, False, meta) for c, content, meta in agent.recovered]
            for call, content, is_error, meta in settled:
                if call.id not in shown:  # journaled as called, killed before its tool_use event
                    await self.events.emit("tool_use", {"id": call.id, "name": call.name, "input": call.input},
                                           agent=agent.id)
                if self.journal is not None:
                    await self.journal.tool_result(agent.id, call.id, call.name, content, is_error, meta, "harness")
                await self.events.emit("tool_result", {"id": call.id, "name": call.name, "content": content,
                                                       "is_error": is_error, "meta": meta}, agent=agent.id)
            if agent.again is not None and agent.again.id not in shown:
                again = agent.again
                await self.events.emit("tool_use", {"id": again.id, "name": again.name, "input": again.input},
                                       agent=agent.id)
        for child in state.agents.values():
            if child.status is not None and not child.reported:
                if child.error is not None:
                    self.log.warning("subagent_not_resumed", agent=child.id, reason=child.error)
                    self.metrics.resumed.labels(outcome="not_resumable").inc()
                self.metrics.subagents.labels(status=child.status).inc()
                await self.events.emit("agent_completed", {"id": child.id, "status": child.status,
                                                           "text": child.text}, agent=child.id)

    async def resume(self, state: Rebuilt) -> None:
        """Go on with a session another harness ran (rebuilt from its journal, see ``_failover``;
        call :meth:`restore` first).

        When the turn was under way, the calls of each agent's last response that had not
        started run before it asks its model again (an ``AwaitAgent`` cut short is run again
        first). Subagents that were running go on in their own tasks, held by their parents as
        before; ended ones are held with their answers for AwaitAgent. Queued prompts were
        shown to clients when they arrived.
        """
        self.messages = state.messages
        loops: dict[str, AgentLoop] = {"main": self.main}
        for child in state.agents.values():  # parents come first
            parent = loops.get(child.parent or "")
            if parent is None:  # no agent of this session can collect it (its end was shown)
                continue
            loop = loops[child.id] = AgentLoop(self, child.id, name=child.name, parent=parent,
                                               messages=child.messages)
            if child.status is None:
                again = [child.again] if child.again is not None else []
                parent.start_child(loop, [*again, *child.pending], {c.id for c in again})
                self.metrics.resumed.labels(outcome="resumed").inc()
            else:
                if child.error is None:
                    self.metrics.resumed.labels(outcome="held").inc()
                parent.adopt_ended(loop, child.status, child.text, finished=child.finished,
                                   collected=child.collected)
        for text in state.queued:
            self.inputs.put_nowait(text)
        if state.in_turn:
            again = [state.main.again] if state.main.again is not None else []
            self._turn = asyncio.create_task(self._run_turn(None, [*again, *state.pending], {c.id for c in again}))
        await self._loop()

    async def _loop(self) -> None:
        self._began.set()
        try:
            if self._turn is not None:
                await self._await_turn()
            while self.exit_code is None:
                if self._stopping is not None:
                    await self._finish(EXIT_OK, self._stopping)
                    break
                if self.inputs.empty() and not self._executor_lost:  # else executor_lost() ends it
                    if self.headless:
                        await self._finish(EXIT_RUNTIME, "headless session has no prompt")
                        break
                    await self.events.emit("awaiting_input")
                text = await self.inputs.get()
                if self.exit_code is not None or self._stopping is not None or self._executor_lost:
                    continue
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
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise
            if self._executor_lost or self.exit_code is not None or self._stopping is not None:
                return  # executor_lost() or the loop's top ends the session
            await self.events.emit("interrupted", {"reason": "user interrupt"})
            await self.events.emit("busy", {"busy": False})

    def abandon(self) -> None:
        """Another harness owns the session now: end here without events and leave its sandbox be."""
        self._abandoned = True
        self.events.silence()

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

    async def prompt(self, text: str, client: str) -> None:
        """A user's prompt: shown to every client at once, then queued for the top-level agent."""
        data: dict[str, Any] = {"text": text}
        if client:
            data["client"] = client
        await self.events.emit("user_prompt", data)
        self.inputs.put_nowait(text)

    def answer(self, question_id: str | None, client: str, raw: str) -> Answer:
        """A client's answer to a question; raises InputRefused unless it is the first valid one."""
        try:
            won = self.questions.answer(question_id, client, raw)
        except InputRefused as exc:
            self.metrics.answers.labels(outcome=exc.code).inc()
            raise
        self.metrics.answers.labels(outcome="won").inc()
        return won

    def interrupt(self) -> bool:
        """Cancel the running turn (its commands, subagents and questions included); True when one ran."""
        if self._turn is not None and not self._turn.done():
            self._turn.cancel()
            return True
        return False

    def request_stop(self, reason: str) -> None:
        """Begin ending the session (a client's stop): the running turn winds down (commands,
        subagents and questions cancelled), then the loop emits ``shutdown``."""
        if self.exit_code is not None or self._stopping is not None:
            return
        self._stopping = reason
        self.interrupt()
        self.inputs.put_nowait("")

    async def stop(self, reason: str) -> None:
        """End the session and wait until it has (``shutdown`` sent), at most ``STOP_WAIT_S``."""
        self.request_stop(reason)
        if self.exit_code is not None:
            return
        try:
            async with asyncio.timeout(STOP_WAIT_S):
                await self._finished.wait()
        except TimeoutError:
            await self._finish(EXIT_OK, reason)

    async def executor_lost(self, reason: str) -> None:
        """The session's executor is gone: end the session with a clear error."""
        if self.exit_code is not None or self._losing_executor:  # told twice (silent, then back)
            return
        self._losing_executor = True
        self._executor_lost = True
        await self._began.wait()  # lost as it started: after its first events, before any turn
        if self.exit_code is not None:
            return
        turn = self._turn
        if self.interrupt() and turn is not None:
            # the cancelled turn emits its calls' results first: shutdown stays the last event
            await asyncio.wait({turn}, timeout=STOP_WAIT_S)
            if self.exit_code is not None:
                return
        await self.events.emit("error", {"message": reason})
        await self._finish(EXIT_RUNTIME, reason)
        self.inputs.put_nowait("")

    async def tool_done(self, agent: AgentLoop, call: ToolUse, result: ToolResult) -> None:
        """After a tool's result is out: end the session if its sandbox is gone or main called Exit."""
        if self._sandbox_gone is not None and self.exit_code is None:
            await self.events.emit("error", {"message": self._sandbox_gone})
            await self._finish(EXIT_RUNTIME, self._sandbox_gone)
        elif call.name == "Exit" and agent.parent is None and not result.is_error:
            await self._finish(EXIT_OK, str(call.input.get("message") or "done"))

    async def _run_turn(self, text: str | None, pending: list[ToolUse] | None = None,
                        announced: Collection[str] = ()) -> None:
        if text is not None:
            if self.journal is not None:
                await self.journal.lifecycle("turn")
            await self.events.emit("busy", {"busy": True})
            notes, self.notes = self.notes, []
            self.messages.append({"role": "user", "content": "\n\n".join([*notes, text])})
        await self.main.converse(pending or [], announced)
        if self.exit_code is None:
            await self.events.emit("busy", {"busy": False})
            await self.events.emit("turn_complete")

    async def complete(self, agent: AgentLoop, on_text: TextSink) -> ModelResponse:
        """One model request of ``agent`` through the session's gate (compaction, quota, cost event)."""
        response = await self.llm.complete(agent.messages, agent.tools, agent=agent.id, on_text=on_text)
        if self.journal is not None:  # after the call: ``messages`` as sent (compaction works in place)
            await self.journal.llm_request(agent.id, self.model.name, agent.messages, agent.tools)
            await self.journal.llm_response(agent.id, response.text, response.tool_calls,
                                            response.usage.as_dict())
        return response

    async def _journal_compaction(self, original: list[dict[str, Any]], replaced_by: list[dict[str, Any]],
                                  summary: str) -> None:
        """Keep what a compaction replaced: the whole original conversation and the summary."""
        assert self.journal is not None
        await self.journal.lifecycle("compacted", summary=summary, original=original,
                                     original_count=len(original), new_count=len(replaced_by))

    async def journal_tool(self, agent: AgentLoop, call: ToolUse, result: ToolResult | None) -> None:
        """Journal a tool call (``result`` None) or its result."""
        if self.journal is None:
            return
        owner = self.executor_id if call.name in (*SANDBOX_TOOLS, "SendUserFile") else "harness"
        if result is None:
            await self.journal.tool_call(agent.id, call.id, call.name, call.input, owner)
        else:
            await self.journal.tool_result(agent.id, call.id, call.name, result.content, result.is_error,
                                           result.meta, owner)

    # -- tools that leave the harness ------------------------------------------------------

    async def run_in_sandbox(self, agent: AgentLoop, call: ToolUse) -> ToolResult:
        """Run a sandbox tool on the session's executor; its output streams as ``tool_output``."""
        result = await self._executor_call(agent, call, call.name, call.input)
        return result.model_copy(update={"call_id": call.id})

    async def share_file(self, agent: AgentLoop, call: ToolUse, args: SendUserFileInput) -> ToolResult:
        """Read a workspace file through the executor and hand it to every client (``file_shared``)."""
        got = await self._executor_call(agent, call, "SendUserFile", args.model_dump())
        if got.is_error:
            return got.model_copy(update={"call_id": call.id})
        meta = got.meta
        if not (isinstance(meta.get("data"), str) and isinstance(meta.get("size"), int)
                and isinstance(meta.get("sha256"), str)):
            return ToolResult(call_id=call.id, is_error=True, content="SendUserFile: the executor's answer was malformed")
        await agent.emit("file_shared", {
            "path": args.path, "caption": args.caption, "size": meta["size"], "sha256": meta["sha256"],
            "data": meta["data"], "direction": "download",
        })
        return ToolResult(call_id=call.id, content=f"sent {args.path} ({meta['size']} bytes) to the user",
                          meta={"size": meta["size"], "sha256": meta["sha256"]})

    async def _executor_call(self, agent: AgentLoop, call: ToolUse, name: str, args: dict[str, Any]) -> ToolResult:
        # The executor knows a call by the model's id (the journal and replays do too), unless that
        # id is unusable or already in flight here (agents run at once; a model may repeat one).
        wire_id = call.id
        if wire_id in self._calls or len(wire_id) > 100:
            wire_id = f"{call.id[:60]}~{next(self._wire_ids)}"
        running = self._calls[wire_id] = RunningCall(agent.id, call.id)
        asked_again = False
        try:
            result, asked_again = await self._ask_executor(ToolCall(call_id=wire_id, name=name, input=args))
        except asyncio.CancelledError:
            await asyncio.shield(self._cancel_call(wire_id))
            raise
        except RemoteError as exc:
            if exc.code in (SandboxClosed.code, "no_responders"):
                # No sandbox (or no executor listening, past the grace: it died), no session: it
                # ends once this result is out (tool_done), not by interrupting, which would cancel
                # this very turn.
                self._executor_lost = True
                self._sandbox_gone = (exc.message if exc.code == SandboxClosed.code else
                                      f"executor {self.executor_id} stopped responding (nobody listened "
                                      f"for {NO_RESPONDERS_GRACE_S:.0f}s); the session cannot continue")
            return ToolResult(call_id=wire_id, is_error=True, content=f"tool failed: {exc}")
        except SiloError as exc:  # e.g. a reply that did not verify: the model hears of it, the session goes on
            self.log.warning("tool_reply_rejected", call=wire_id, error=str(exc))
            return ToolResult(call_id=wire_id, is_error=True, content=f"tool failed: {exc}")
        finally:
            self._calls.pop(wire_id, None)
        chunks = result.meta.get("output_chunks")
        # Asked again: chunks sent while NATS was away are lost for good, the result has the output.
        if isinstance(chunks, int) and running.seen < chunks and not asked_again:
            self._calls[wire_id] = running  # output still on its way: let it land before the result
            try:
                async with asyncio.timeout(OUTPUT_DRAIN_S):
                    while running.seen < chunks:
                        running.changed.clear()
                        await running.changed.wait()
            except TimeoutError:
                self.log.warning("tool_output_missing", call=wire_id, seen=running.seen, sent=chunks)
            finally:
                self._calls.pop(wire_id, None)
        return result

    async def _ask_executor(self, call: ToolCall) -> tuple[ToolResult, bool]:
        """Send a call to the executor and wait for its result; (result, whether it was asked again).

        A reply the executor sent while this harness had no NATS connection is gone (core NATS
        keeps nothing), so after every reconnect the call is asked again with ``again`` set: the
        executor answers with the result of the run it has (running or finished), never runs it
        twice. A call nobody received (no responders while NATS and the executor come back) is
        sent again for ``NO_RESPONDERS_GRACE_S`` after this harness's last reconnect; if nobody
        listens by then the executor died (``_executor_call`` ends the session), whether or not the
        pool's view noticed.
        """
        subject = subjects.exec_tool(self.executor_id, self.sid)
        if not hasattr(self.bus, "wait_reconnected"):  # a transport with no connection to lose (replay)
            result = await self.bus.request(subject, call, ToolResult, from_role=Role.EXECUTOR, sid=self.sid,
                                            timeout=TOOL_TIMEOUT_S)
            return result, False
        deadline = time.monotonic() + TOOL_TIMEOUT_S
        unanswered_since: float | None = None
        asked_again = False
        generation = self.bus.reconnects
        while True:
            if generation != self.bus.reconnects:  # our own outage: the executor's silence then is not its
                unanswered_since = None  # fault, and it reconnects on its own backoff
            generation = self.bus.reconnects
            ask = asyncio.ensure_future(self.bus.request(
                subject, call, ToolResult, from_role=Role.EXECUTOR, sid=self.sid,
                timeout=max(1.0, deadline - time.monotonic())))
            back = asyncio.ensure_future(self.bus.wait_reconnected(generation))
            try:
                await asyncio.wait({ask, back}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in (ask, back):
                    if not waiting.done():
                        waiting.cancel()
                await asyncio.gather(back, return_exceptions=True)
            if ask.done() and not ask.cancelled():
                try:
                    return ask.result(), asked_again
                except RemoteError as exc:
                    if exc.code != "no_responders":
                        raise
                    unanswered_since = unanswered_since or time.monotonic()
                    if time.monotonic() - unanswered_since > NO_RESPONDERS_GRACE_S:
                        raise
                    await asyncio.sleep(0.25)
            else:
                await asyncio.gather(ask, return_exceptions=True)
            self.metrics.calls_asked_again.inc()
            self.log.info("tool_call_asked_again", call=call.call_id, reconnects=self.bus.reconnects)
            call = call.model_copy(update={"again": True})
            asked_again = True

    async def _cancel_call(self, wire_id: str) -> None:
        try:
            await self.bus.request(subjects.exec_cancel(self.executor_id, self.sid), ToolCancel(call_id=wire_id),
                                   Ack, from_role=Role.EXECUTOR, sid=self.sid, timeout=10.0)
        except SiloError as exc:
            self.log.warning("tool_cancel_failed", call=wire_id, error=str(exc))

    async def tool_output(self, sender: str, out: ToolOutput) -> None:
        """Streamed output of a running call, from the executor: passed on as ``tool_output``.

        Chunks from another service, for calls not running, or out of order are dropped.
        """
        running = self._calls.get(out.call_id)
        why = ("other_sender" if sender != self.executor_id else "not_running" if running is None
               else "out_of_order" if out.seq != running.seen else None)
        if why is not None or running is None:
            self.metrics.output_dropped.labels(reason=why).inc()
            self.log.info("tool_output_dropped", reason=why, sender=sender, call=out.call_id, seq=out.seq)
            return
        running.seen += 1
        await self.events.emit("tool_output", {"id": running.call_id, "stream": out.stream, "data": out.data},
                               agent=running.agent)
        running.changed.set()

    # -- the session's users ------------------------------------------------------------------

    async def ask(self, agent: AgentLoop, call: ToolUse, args: AskUserQuestionInput) -> ToolResult:
        """Ask every client; the first valid answer is the result (an interrupt cancels the question)."""
        question = self.questions.ask(args)
        try:  # an emit cut short by a cancel was still published (see SessionEvents.emit)
            await agent.emit("question_asked", {
                "id": question.id, "question": args.question, "options": [o.model_dump() for o in args.options],
                "multi_select": args.multi_select, "allow_free_text": args.allow_free_text,
            })
            won = await question.future
        except asyncio.CancelledError:
            self.questions.cancel(question.id)
            await agent.emit("question_answered", {"id": question.id, "cancelled": True})
            raise
        await agent.emit("question_answered", {"id": question.id, "client": won.client,
                                               "selected": list(won.selected), "text": won.text})
        return ToolResult(call_id=call.id, content=answer_text(won.selected, won.text, won.client),
                          meta={"question": question.id, "client": won.client})

    async def _finish(self, code: int, reason: str) -> None:
        if self.exit_code is not None:
            return
        self.exit_code = code
        self._began.set()  # (ended before it ran, e.g. stopped: nothing waits for it any more)
        await self.events.emit("shutdown", {"exit_code": code, "reason": reason})
        if self.journal is not None:
            await self.journal.lifecycle("ended", exit_code=code, reason=reason)
        self._finished.set()

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
