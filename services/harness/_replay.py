"""Replay: a journal turned into a script, and a deterministic run that checks every step against it.

``script_from_journal`` reads an exported journal (JSONL) and keeps what a
replay needs: the session's start (grant, prompt, headless), the model's
requests and responses in order, the tool calls with their recorded results,
and the network records seen while each tool ran.

``replay`` runs the real agent loop (:class:`SessionRunner`) in this process
with the mock parts the design names: a model that answers with the
recorded responses and checks that each request the loop makes is the
recorded one; a mock sandbox that answers each tool call with its recorded
result, after checking the call; a mock egress that puts each recorded
network record back where it was seen (nothing reaches a network, so there
is nothing of the sandbox's to check there). Time comes from a counter, never
from a timer, and the journal it writes goes to memory, so two runs of the
same script journal byte-identically. The first mismatch stops the run; the
summary names it and every step left unconsumed (exit code 4).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devsilo.protocol import (
    AccessReport,
    Ack,
    CloseSession,
    Message,
    SessionGrant,
    SiloError,
    ToolCall,
    ToolOutput,
    ToolResult,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._journal import JournalEntry, MemorySink, SessionJournal
from ._model import ModelFailure, ModelResponse, TextSink, ToolUse, Usage, stream_words
from ._session import SessionRunner

EXIT_MISMATCH = 4
REPLAY_SESSION = "replay"


class ReplayMismatch(ModelFailure):
    """The loop did something other than what the journal recorded."""


class ReplayStep(BaseModel):
    """One model exchange: the request as journaled and the response to give."""

    model_config = ConfigDict(extra="forbid")
    agent: str = "main"
    request: dict[str, Any]
    response: dict[str, Any]


class ReplayTool(BaseModel):
    """One tool call and its recorded result (``network``: records the egress made meanwhile)."""

    model_config = ConfigDict(extra="forbid")
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)
    owner: str = "harness"
    content: str = ""
    is_error: bool = False
    meta: dict[str, Any] = Field(default_factory=dict)
    network: list[dict[str, Any]] = Field(default_factory=list)
    output: list[dict[str, Any]] = Field(default_factory=list)
    """Its streamed output as recorded (``stream``, ``data``), given to the loop before the result."""


class ReplayScript(BaseModel):
    """What ``silo replay-test`` writes and ``silo run --deterministic`` reads."""

    model_config = ConfigDict(extra="forbid")
    version: int = Field(default=1, ge=1, le=1)
    grant: dict[str, Any]
    llm: dict[str, Any] = Field(default_factory=dict)
    headless: bool = True
    executor: str = "mock"
    access: dict[str, Any] = Field(default_factory=dict)
    prompts: list[str] = Field(default_factory=list)
    steps: list[ReplayStep] = Field(default_factory=list)
    tools: list[ReplayTool] = Field(default_factory=list)


def _entries(path: Path) -> list[JournalEntry]:
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            out.append(JournalEntry(str(doc["kind"]), dict(doc.get("data") or {}), doc.get("n"), doc.get("ts"),
                                    doc.get("agent"), bool(doc.get("incomplete"))))
        except (ValueError, KeyError, TypeError) as exc:
            raise SiloError(f"{path}:{i}: not a journal line ({exc})") from None
    return out


def script_from_journal(path: Path) -> ReplayScript:
    """The replay script of an exported journal; SiloError saying what is missing or broken."""
    entries = _entries(path)
    meta = next((e for e in entries if e.kind == "meta"), None)
    if meta is None:
        raise SiloError(f"{path} has no meta record: export it with `silo journal export`")
    if any(e.incomplete for e in entries):
        raise SiloError(f"{path} has incomplete records (a harness died mid-record); it cannot be replayed")
    if any(e.kind == "lifecycle" and e.data.get("what") == "resumed" for e in entries):
        raise SiloError(f"{path} records a session resumed by another harness; replaying those is not built")
    prompts = [str(e.data.get("text", "")) for e in entries
               if e.kind == "client_input" and e.data.get("kind") == "prompt"]
    steps: list[ReplayStep] = []
    tools: dict[str, ReplayTool] = {}
    order: list[str] = []
    last_tool: str | None = None
    pending_request: tuple[str, dict[str, Any]] | None = None
    for e in entries:
        if e.kind == "llm_request":
            pending_request = (e.agent or "main", e.data)
        elif e.kind == "llm_response" and pending_request is not None:
            steps.append(ReplayStep(agent=pending_request[0], request=pending_request[1], response=e.data))
            pending_request = None
        elif e.kind == "tool_exec" and e.data.get("phase") == "call" and e.data.get("owner") != "harness":
            # only sandbox tools reach the mock sandbox; the loop answers the others itself
            cid = str(e.data["id"])
            tools[cid] = ReplayTool(id=cid, name=str(e.data["name"]), input=dict(e.data.get("input") or {}),
                                    owner=str(e.data.get("owner", "harness")))
            order.append(cid)
            last_tool = cid
        elif e.kind == "tool_exec" and e.data.get("phase") == "result" and str(e.data.get("id")) in tools:
            t = tools[str(e.data["id"])]
            t.content, t.is_error, t.meta = str(e.data.get("content", "")), bool(e.data.get("is_error")), \
                dict(e.data.get("meta") or {})
        elif e.kind == "network" and last_tool is not None:
            tools[last_tool].network.append(e.data)
        elif e.kind == "event" and e.data.get("kind") == "tool_output":
            out = dict(e.data.get("data") or {})
            if str(out.get("id")) in tools:
                tools[str(out["id"])].output.append({"stream": out.get("stream"), "data": out.get("data")})
    return ReplayScript(grant=dict(meta.data.get("grant") or {}), llm=dict(meta.data.get("llm") or {}),
                        headless=bool(meta.data.get("headless", True)),
                        executor=str(meta.data.get("executor", "mock")),
                        access=dict(meta.data.get("access") or {}), prompts=prompts, steps=steps,
                        tools=[tools[c] for c in order])


class FakeClock:
    """Time from a counter: each reading is the next whole second after a fixed start."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start

    def __call__(self) -> float:
        self._now += 1.0
        return self._now


@dataclass
class ReplayLedger:
    """What the replay consumed, and the first thing that did not match."""

    script: ReplayScript
    step: int = 0
    tool: int = 0
    mismatch: str | None = None
    network: list[dict[str, Any]] = field(default_factory=list)

    def fail(self, what: str) -> ReplayMismatch:
        """Record the first mismatch; return the error that ends the run."""
        if self.mismatch is None:
            self.mismatch = what
        return ReplayMismatch(f"replay mismatch: {what}")

    def summary(self) -> str:
        """The first mismatch and the steps left over, one line each."""
        lines = [f"first mismatch: {self.mismatch}"] if self.mismatch else []
        left_steps = len(self.script.steps) - self.step
        left_tools = len(self.script.tools) - self.tool
        if left_steps:
            lines.append(f"unconsumed model responses: {left_steps} (from step {self.step})")
        if left_tools:
            names = ", ".join(t.name for t in self.script.tools[self.tool:self.tool + 5])
            lines.append(f"unconsumed tool results: {left_tools} (next: {names})")
        return "\n".join(lines)


class ReplayModel:
    """The mock model of a replay: checks each request, answers with the recorded response."""

    def __init__(self, ledger: ReplayLedger, name: str) -> None:
        self._ledger = ledger
        self.name = name
        self._sent: list[dict[str, Any]] = []

    async def complete(self, messages: list[dict[str, Any]], tools: list[str], *,
                       on_text: TextSink | None = None) -> ModelResponse:
        """The next recorded response, after checking ``messages`` and ``tools`` against the record."""
        led = self._ledger
        if led.step >= len(led.script.steps):
            raise led.fail(f"model request {led.step + 1} was never recorded (the journal has "
                           f"{len(led.script.steps)})")
        step = led.script.steps[led.step]
        sent = self._sent
        start = len(sent) if len(sent) <= len(messages) and messages[:len(sent)] == sent else 0
        got = {"from": start, "count": len(messages), "messages": messages[start:], "tools": list(tools)}
        want = {k: step.request.get(k) for k in got}
        if json.loads(json.dumps(got, default=str)) != want:
            diff = next(k for k in got if json.loads(json.dumps(got[k], default=str)) != want[k])
            raise led.fail(f"model request {led.step + 1}: {diff} is {_short(got[diff])}, "
                           f"the journal has {_short(want[diff])}")
        self._sent = [dict(m) for m in messages]
        led.step += 1
        r = step.response
        calls = tuple(ToolUse(id=str(c["id"]), name=str(c["name"]), input=dict(c.get("input") or {}),
                              input_error=c.get("input_error")) for c in r.get("tool_calls", []))
        text = str(r.get("text", ""))
        if on_text is not None:
            await stream_words(text, on_text)  # as the mock streamed it when it was recorded
        u = dict(r.get("usage") or {})
        return ModelResponse(text, calls, Usage(**{k: int(v) for k, v in u.items()
                                                   if k in Usage.__dataclass_fields__}))

    async def aclose(self) -> None:
        """Nothing to release."""


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 200 else text[:200] + f"... ({len(text)} chars)"


class ReplayBus:
    """The loop's transport in a replay: events to memory, tool calls to the mock sandbox.

    The mock sandbox answers each call with the recorded result after checking
    its name and input; the mock egress then puts the network records recorded
    during that call into the journal.
    """

    def __init__(self, ledger: ReplayLedger, journal_sink: MemorySink) -> None:
        self._ledger = ledger
        self.events: list[Message] = []
        self._sink = journal_sink
        self.runner: SessionRunner | None = None

    async def js_publish(self, subject: str, body: Message, *, sid: str | None, dedupe_id: str) -> None:
        """Keep the event."""
        self.events.append(body)

    async def request(self, subject: str, body: Message, expect: type[Any], **_: Any) -> Any:
        """Answer a tool call (or a sandbox close) from the script."""
        if isinstance(body, CloseSession):
            return Ack()
        if not isinstance(body, ToolCall):
            raise self._ledger.fail(f"unexpected request {body.TYPE} on {subject}")
        led = self._ledger
        if led.tool >= len(led.script.tools):
            raise led.fail(f"tool call {body.name} {_short(body.input)} was never recorded")
        t = led.script.tools[led.tool]
        if (t.id, t.name, t.input) != (body.call_id, body.name, body.input):
            raise led.fail(f"tool call {led.tool + 1}: {body.name} {_short(body.input)} (id {body.call_id}), "
                           f"the journal has {t.name} {_short(t.input)} (id {t.id})")
        led.tool += 1
        led.network.extend(t.network)
        for seq, chunk in enumerate(t.output):  # as the executor streamed it
            if self.runner is not None:
                await self.runner.tool_output(self.runner.executor_id, ToolOutput(
                    call_id=body.call_id, seq=seq, stream=chunk["stream"], data=chunk["data"]))
        return ToolResult(call_id=t.id, content=t.content, is_error=t.is_error, meta=t.meta)


class _Log:
    def bind(self, **_: Any) -> _Log:
        return self

    def __getattr__(self, _: str) -> Any:
        return lambda *a, **k: None


@dataclass
class ReplayOutcome:
    """A replay's result: exit code, the summary, and the journal it wrote (JSONL)."""

    code: int
    summary: str
    journal: str
    events: list[Any]


async def replay(script: ReplayScript) -> ReplayOutcome:
    """Run the agent loop against ``script``; 0 when every step matched and was consumed, else 4."""
    ledger = ReplayLedger(script)
    sink = MemorySink()
    clock = FakeClock()
    bus = ReplayBus(ledger, sink)
    try:
        grant = SessionGrant.model_validate({**script.grant, "session_id": REPLAY_SESSION,
                                             "grant_id": REPLAY_SESSION})
        access = AccessReport.model_validate(script.access)
    except ValidationError as exc:
        raise SiloError(f"the script's grant or access report is not valid: {exc.errors()[0]['msg']}") from None
    journal = SessionJournal(sink, REPLAY_SESSION, clock=clock)
    model = ReplayModel(ledger, str(script.llm.get("model", "mock")))
    runner = SessionRunner(bus, grant, script.executor, access, model,  # type: ignore[arg-type]
                           headless=script.headless, log=_Log(), journal=journal, clock=clock)
    bus.runner = runner
    await journal.meta(grant=grant.model_dump(mode="json"), llm=script.llm, headless=script.headless,
                       executor=script.executor, access=access.model_dump(mode="json"), harness="replay",
                       tools=runner.tools)
    await journal.lifecycle("started", harness="replay")
    prompt = script.prompts[0] if script.prompts else None
    if prompt is not None:
        await journal.client_input("prompt", "start", prompt)
    for text in script.prompts[1:]:
        runner.inputs.put_nowait(text)
    await runner.run(prompt)
    lines = []
    net = iter(ledger.network)
    for rec in sink.records:
        lines.append(JournalEntry(rec.kind, rec.data, rec.n, rec.ts, rec.agent).line())
        if rec.kind == "tool_exec" and rec.data.get("phase") == "result":
            lines.extend(JournalEntry("network", n).line() for n in _take_for(ledger, rec.data, net))
    ok = ledger.mismatch is None and ledger.step == len(script.steps) and ledger.tool == len(script.tools)
    return ReplayOutcome(0 if ok else EXIT_MISMATCH, ledger.summary(), "".join(x + "\n" for x in lines),
                         bus.events)


def _take_for(ledger: ReplayLedger, result: dict[str, Any], net: Any) -> list[dict[str, Any]]:
    tool = next((t for t in ledger.script.tools if t.id == result.get("id")), None)
    return [next(net) for _ in (tool.network if tool is not None else [])]
