"""Agents of a session: each one's conversation, its tool calls in order, and its subagents.

The top-level agent is ``main``; subagents get ids ``a1``, ``a2``, ... in the order they are
started, run concurrently in the same sandbox, and are cancelled when the agent that started
them ends its turn without collecting them (AwaitAgent). After a takeover the harness that
resumes the session rebuilds them from the journal (``_failover.rebuild``) and holds them as
before: running ones go on (``start_child``), ended ones keep their answers (``adopt_ended``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from devsilo.protocol import (
    HARNESS_TOOLS,
    SANDBOX_TOOLS,
    AgentInput,
    AskUserQuestionInput,
    AwaitAgentInput,
    ExitInput,
    SendUserFileInput,
    ToolResult,
)
from devsilo.protocol._messages import EventKind
from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError

from ._model import ASKING_AGENT, ModelFailure, ModelResponse, ToolUse

if TYPE_CHECKING:
    from ._session import SessionRunner

MAX_DEPTH = 3
"""Subagents nest at most this deep (main is depth 0)."""
MAX_RUNNING = 8
"""Subagents running at once in one session."""
MAX_HEADLESS_NUDGES = 3
HEADLESS_REMINDER = "You are running headless. Continue the task, then call Exit with a summary."
HEADLESS_QUESTION_REMINDER = (
    "You are running headless: nobody can answer questions. Decide for yourself, continue the task, "
    "then call Exit with a summary."
)
NOT_RUN = "not run: the turn was interrupted or the session ended first"
SUBAGENT_INSTRUCTION = (
    "You are subagent {id} ({name}), started by agent {parent} and working in the same workspace. "
    "Do the task below; your last reply without tool calls is your answer to {parent}."
)



class LoopMetrics:
    """The agent loop's metrics (labels: status, reason, outcome; never session or agent ids)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = registry if registry is not None else CollectorRegistry()
        self.subagents = Counter("silo_subagents_total", "Subagents by how they ended.", ["status"],
                                 registry=reg)
        self.output_dropped = Counter("silo_tool_output_dropped_total",
                                      "Streamed tool output chunks dropped, by why.", ["reason"], registry=reg)
        self.calls_asked_again = Counter(
            "silo_tool_calls_asked_again_total",
            "Sandbox calls asked again after a lost NATS connection (their reply may have been lost).",
            registry=reg)
        self.resumed = Counter(
            "silo_subagents_after_takeover_total",
            "Subagents a takeover found, by outcome: resumed (it runs on), held (it had ended; its answer "
            "kept for AwaitAgent), not_resumable (the journal could not rebuild it: it ends failed).",
            ["outcome"], registry=reg)
        self.answers = Counter("silo_question_answers_total", "Answers to questions by outcome.", ["outcome"],
                               registry=reg)


TOP_LEVEL_TOOLS = [*SANDBOX_TOOLS, "Agent", "AwaitAgent", "AskUserQuestion", "SendUserFile"]
HEADLESS_TOOLS = [*SANDBOX_TOOLS, "Agent", "AwaitAgent", "Exit"]
SUBAGENT_TOOLS = [*SANDBOX_TOOLS, "Agent", "AwaitAgent"]


def spawned_text(child_id: str, name: str) -> str:
    """The ``Agent`` tool's result for a subagent it started."""
    return f"started subagent {child_id} ({name}); collect its answer with AwaitAgent"


def tools_for(*, top_level: bool, headless: bool) -> list[str]:
    """The tools an agent of this kind is offered (REQUIREMENTS §5)."""
    if not top_level:
        return list(SUBAGENT_TOOLS)
    return list(HEADLESS_TOOLS if headless else TOP_LEVEL_TOOLS)


@dataclass
class Child:
    """A subagent as its parent sees it."""

    agent: AgentLoop
    task: asyncio.Future[tuple[str, str]]
    """Its run (status, text); for a subagent that had ended before a takeover, a settled future."""
    collected: bool = False
    finished: int | None = None
    """Order in which the session's subagents finished (for AwaitAgent without an id)."""


class AgentLoop:
    """One agent: its conversation with the model and the tools it may call."""

    def __init__(self, host: SessionRunner, agent_id: str, *, name: str, parent: AgentLoop | None,
                 messages: list[dict[str, Any]]) -> None:
        self.host = host
        self.id = agent_id
        self.name = name
        self.parent = parent
        self.depth: int = 0 if parent is None else parent.depth + 1
        self.messages = messages
        self.tools = tools_for(top_level=parent is None, headless=host.headless)
        self.children: dict[str, Child] = {}

    async def emit(self, kind: EventKind, data: dict[str, Any] | None = None) -> int:
        """Emit an event labelled with this agent."""
        return await self.host.events.emit(kind, data, agent=self.id)

    async def converse(self, pending: list[ToolUse] | None = None, announced: Collection[str] = ()) -> str:
        """Ask the model and run its tool calls in order until it answers without any (or the
        session ends); return that answer. Children not collected by then are cancelled.

        ``pending``: calls of a response given before (a resumed session) to run first;
        ``announced``: the ids among them already journaled and shown (run again).
        """
        nudges = 0
        text = ""
        try:
            for call in pending or ():
                result = await self.call_tool(call, announced=call.id in announced)
                self.messages.append({"role": "tool", "tool_call_id": call.id, "content": result.content,
                                      "is_error": result.is_error})
                if self.host.exit_code is not None:
                    return text
            while self.host.exit_code is None:
                response = await self._complete()
                text = response.text
                self.messages.append({
                    "role": "assistant", "content": response.text,
                    "tool_calls": [{"id": c.id, "name": c.name, "input": c.input} for c in response.tool_calls],
                })
                if not response.tool_calls:
                    if not (self.parent is None and self.host.headless):
                        break
                    nudges += 1
                    if nudges > MAX_HEADLESS_NUDGES:
                        raise ModelFailure(f"model stopped {nudges} times without calling Exit")
                    self.messages.append({"role": "user", "content": HEADLESS_REMINDER})
                    continue
                answered = 0
                try:
                    for call in response.tool_calls:
                        result = await self.call_tool(call)
                        self.messages.append({"role": "tool", "tool_call_id": call.id, "content": result.content,
                                              "is_error": result.is_error})
                        answered += 1
                        if self.host.exit_code is not None:
                            break
                finally:
                    # Every call the model made gets a result, or the next request would be refused.
                    for call in response.tool_calls[answered:]:
                        self.messages.append({"role": "tool", "tool_call_id": call.id, "is_error": True,
                                              "content": NOT_RUN})
            return text
        finally:
            await self.cancel_children()

    async def run_as_subagent(self, pending: list[ToolUse] | None = None,
                              announced: Collection[str] = ()) -> tuple[str, str]:
        """Run a subagent to its end: (status, text), status ``done`` or ``failed``; emits
        ``agent_completed`` (also when cancelled, then re-raises). ``pending``, ``announced``:
        as for :meth:`converse` (a subagent resumed after a takeover)."""
        try:
            text = await self.converse(pending, announced)
            status = "done"
        except asyncio.CancelledError:
            self.host.metrics.subagents.labels(status="cancelled").inc()
            await self.emit("agent_completed", {"id": self.id, "status": "cancelled", "text": ""})
            raise
        except ModelFailure as exc:
            status, text = "failed", f"model failed: {exc}"
        except Exception as exc:  # this subagent ends; its parent and the session go on
            self.host.log.exception("subagent_failed", agent=self.id)
            status, text = "failed", f"subagent failed: {exc}"
        self.host.metrics.subagents.labels(status=status).inc()
        await self.emit("agent_completed", {"id": self.id, "status": status, "text": text})
        return status, text

    async def cancel_children(self) -> None:
        """Cancel this agent's subagents that still run (each reports ``cancelled``)."""
        running = [c.task for c in self.children.values() if not c.task.done()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)

    async def _complete(self) -> ModelResponse:
        async def on_text(delta: str) -> None:
            await self.emit("assistant_text", {"text": delta, "final": False})

        ASKING_AGENT.set(self.id)  # in this agent's own task (each agent runs in its own)
        response = await self.host.complete(self, on_text)
        if response.text:
            await self.emit("assistant_text", {"text": response.text, "final": True})
        return response

    async def call_tool(self, call: ToolUse, *, announced: bool = False) -> ToolResult:
        """Run one tool call and emit its ``tool_use`` and ``tool_result``; failures are error results.

        ``announced``: the call was journaled and its ``tool_use`` shown before (a call run again
        after a takeover): neither is repeated.
        """
        if not announced:
            await self.host.journal_tool(self, call, None)
        try:  # an emit cut short by a cancel was still published (see SessionEvents.emit)
            if not announced:
                await self.emit("tool_use", {"id": call.id, "name": call.name, "input": call.input})
            result = await self._dispatch(call)
        except asyncio.CancelledError:
            stopped = ToolResult(call_id=call.id, content="interrupted", is_error=True, meta={"cancelled": True})
            await self.host.journal_tool(self, call, stopped)
            await self.emit("tool_result", {"id": call.id, "name": call.name, "content": stopped.content,
                                            "is_error": True, "meta": stopped.meta})
            raise
        await self.host.journal_tool(self, call, result)
        await self.emit("tool_result", {
            "id": call.id, "name": call.name, "content": result.content,
            "is_error": result.is_error, "meta": result.meta,
        })
        await self.host.tool_done(self, call, result)
        return result

    async def _dispatch(self, call: ToolUse) -> ToolResult:
        if call.input_error is not None:
            return _error(call, f"{call.name}: {call.input_error}; call it again with a JSON object")
        if call.name == "AskUserQuestion" and self.host.headless:
            return ToolResult(call_id=call.id, content=HEADLESS_QUESTION_REMINDER)
        if call.name not in self.tools:
            return _error(call, f"unknown tool {call.name!r}; available: {', '.join(self.tools)}")
        if call.name in SANDBOX_TOOLS:
            return await self.host.run_in_sandbox(self, call)
        try:
            args = HARNESS_TOOLS[call.name].model_validate(call.input)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err.get("loc", ())) or "input"
            return _error(call, f"{call.name}: invalid {where}: {err.get('msg')}")
        if isinstance(args, AgentInput):
            return await self._spawn(call, args)
        if isinstance(args, AwaitAgentInput):
            return await self._await(call, args)
        if isinstance(args, AskUserQuestionInput):
            return await self.host.ask(self, call, args)
        if isinstance(args, SendUserFileInput):
            return await self.host.share_file(self, call, args)
        if isinstance(args, ExitInput):
            return ToolResult(call_id=call.id, content="exiting")
        return _error(call, f"tool {call.name} has no harness implementation")

    async def _spawn(self, call: ToolUse, args: AgentInput) -> ToolResult:
        if self.depth + 1 > MAX_DEPTH:
            return _error(call, f"Agent: subagents nest at most {MAX_DEPTH} deep and {self.id} is at "
                                f"depth {self.depth}; do this part yourself")
        if self.host.running_subagents >= MAX_RUNNING:
            return _error(call, f"Agent: {MAX_RUNNING} subagents already run in this session; "
                                "collect one with AwaitAgent first")
        child_id = self.host.next_agent_id()
        system = SUBAGENT_INSTRUCTION.format(id=child_id, name=args.name, parent=self.id)
        child = AgentLoop(self.host, child_id, name=args.name, parent=self,
                          messages=[{"role": "system", "content": system}, {"role": "user", "content": args.prompt}])
        try:
            await self.emit("agent_spawned", {"id": child_id, "name": args.name, "parent": self.id,
                                              "prompt": args.prompt})
        except asyncio.CancelledError:  # spawned as far as clients know: say it ended
            await self.host.events.emit("agent_completed", {"id": child_id, "status": "cancelled", "text": ""},
                                        agent=child_id)
            raise
        self.start_child(child)
        return ToolResult(call_id=call.id, content=spawned_text(child_id, args.name), meta={"agent": child_id})

    def start_child(self, child: AgentLoop, pending: list[ToolUse] | None = None,
                    announced: Collection[str] = ()) -> Child:
        """Run ``child`` as this agent's subagent (counted against ``MAX_RUNNING`` until it ends)."""
        self.host.running_subagents += 1
        task = asyncio.create_task(child.run_as_subagent(pending, announced), name=f"agent-{child.id}")
        entry = self.children[child.id] = Child(child, task)

        def finished(_: asyncio.Future[tuple[str, str]]) -> None:
            self.host.running_subagents -= 1
            entry.finished = next(self.host.finish_order)

        task.add_done_callback(finished)
        return entry

    def adopt_ended(self, child: AgentLoop, status: str, text: str, *, finished: int | None,
                    collected: bool) -> Child:
        """Hold a subagent that ended before a takeover: AwaitAgent gets its (status, text)."""
        done: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()
        done.set_result((status, text))
        entry = self.children[child.id] = Child(child, done, collected=collected, finished=finished)
        return entry

    async def _await(self, call: ToolUse, args: AwaitAgentInput) -> ToolResult:
        if args.agent is not None:
            entry = self.children.get(args.agent)
            if entry is None:
                yours = ", ".join(self.children) or "none"
                return _error(call, f"AwaitAgent: {args.agent} is not a subagent of {self.id} (yours: {yours})")
            await asyncio.wait({entry.task})
        else:
            pending = [c for c in self.children.values() if not c.collected]
            if not pending:
                return _error(call, f"AwaitAgent: {self.id} has no subagent left to wait for; start one with Agent")
            if not any(c.task.done() for c in pending):
                await asyncio.wait({c.task for c in pending}, return_when=asyncio.FIRST_COMPLETED)
            done = [c for c in pending if c.task.done()]
            entry = min(done, key=lambda c: c.finished if c.finished is not None else 1 << 62)
        entry.collected = True
        if entry.task.cancelled():
            status, text = "cancelled", ""
        else:
            status, text = entry.task.result()
        meta = {"agent": entry.agent.id, "status": status}
        if status != "done":
            return ToolResult(call_id=call.id, is_error=True, meta=meta,
                              content=f"subagent {entry.agent.id} ({entry.agent.name}) {status}: {text}")
        return ToolResult(call_id=call.id, content=text or f"subagent {entry.agent.id} answered with no text",
                          meta=meta)


def _error(call: ToolUse, text: str) -> ToolResult:
    return ToolResult(call_id=call.id, content=text, is_error=True)


def answer_text(selected: tuple[str, ...], text: str | None, client: str) -> str:
    """A question's answer as the model reads it."""
    return json.dumps({"answered_by": client, "selected": list(selected), "text": text})

