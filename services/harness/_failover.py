"""Sessions that outlive their harness: who owns each one, and how another harness takes over.

Ownership lives in the JetStream KV bucket ``silo_sessions``: key = session
id, value = a signed :class:`SessionOwnership` (owner harness and instance,
the sealed grant, the model choice, headless, executor, access report). The
owner renews its entries every second by compare-and-set on the revision it
last wrote; a renewal that fails means another harness took the session, and
the owner drops it at once without a word (it never answers for a session it
does not own). Every replica watches the bucket; an entry that has not
changed for ``takeover_after_s`` (or at once, when it names this service id
with an older instance: this process is the restart of that owner) is taken
by compare-and-set on the revision seen, so exactly one replica wins, and
the winner rebuilds the session from its journal (:func:`rebuild`).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from devsilo.protocol import MessageRejected, Role, SessionOwnership, subjects
from devsilo.runtime import Bus
from devsilo.runtime._kvwatch import follow_kv
from nats.errors import Error as NatsError
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from ._agents import MAX_DEPTH, MAX_RUNNING, SUBAGENT_INSTRUCTION, spawned_text
from ._journal import JournalEntry
from ._model import ToolUse

BEAT_S = 1.0
TAKEOVER_AFTER_S = 3.0
RESUME_ATTEMPTS = 5
"""Tries at resuming a won session when NATS fails under it (1, 2, 4, 8 s apart), before letting it go."""
UNKNOWN_RESULT = "the harness restarted while this tool ran; its result is unknown"

Takeover = Callable[[SessionOwnership, int], Awaitable[None]]
"""Called with the entry this harness just won and its revision."""
Lost = Callable[[str], Awaitable[None]]
"""Called with a session id this harness no longer owns."""


@dataclass
class _Seen:
    revision: int
    changed_at: float
    value: SessionOwnership | None


class SessionOwners:
    """This harness's side of the ownership bucket: claim, renew, release, watch, take over."""

    def __init__(self, bus: Bus, service_id: str, instance: str, log: Any, *,
                 takeover_after_s: float = TAKEOVER_AFTER_S) -> None:
        self._bus = bus
        self.service_id = service_id
        self.instance = instance
        self._log = log
        self._after = takeover_after_s
        self._kv: KeyValue | None = None
        self._owned: dict[str, tuple[SessionOwnership, int]] = {}
        self._seen: dict[str, _Seen] = {}
        self._taking: set[str] = set()
        self._takes: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        """Open (or create) the bucket."""
        js = self._bus.js
        try:
            self._kv = await js.key_value(subjects.SESSION_OWNERS)
        except BucketNotFoundError:
            try:
                self._kv = await js.create_key_value(KeyValueConfig(
                    bucket=subjects.SESSION_OWNERS, history=1, storage=StorageType.FILE))
            except Exception as exc:  # noqa: BLE001 — another replica created it first
                self._log.info("owners_bucket_raced", error=str(exc))
                self._kv = await js.key_value(subjects.SESSION_OWNERS)

    @property
    def kv(self) -> KeyValue:
        """The bucket (after ``open``)."""
        assert self._kv is not None, "SessionOwners.open() first"
        return self._kv

    def owns(self, sid: str) -> bool:
        """Whether this harness holds the session now."""
        return sid in self._owned

    def _seal(self, own: SessionOwnership) -> bytes:
        wire, _ = self._bus.signer.seal(own, subjects.session_owner(own.session_id), sid=own.session_id)
        return wire

    def _open(self, key: str, data: bytes) -> SessionOwnership | None:
        try:
            env = self._bus.open(data, subjects.session_owner(key), fresh=False)
        except MessageRejected:
            return None
        body = env.body
        if (not isinstance(body, SessionOwnership) or env.header.role is not Role.HARNESS
                or body.session_id != key):
            self._log.warning("owner_entry_rejected", key=key, sender=env.header.sender)
            return None
        return body

    async def claim(self, own: SessionOwnership) -> None:
        """Record a new session as ours; fails if the session id is taken."""
        rev = await self.kv.create(own.session_id, self._seal(own))
        self._owned[own.session_id] = (own, rev)

    def adopt(self, own: SessionOwnership, revision: int) -> None:
        """Hold an entry won by ``take``."""
        self._owned[own.session_id] = (own, revision)

    async def release(self, sid: str) -> None:
        """The session ended here: remove its entry (if it is still ours)."""
        held = self._owned.pop(sid, None)
        if held is None:
            return
        try:
            await self.kv.delete(sid, last=held[1])
        except KeyWrongLastSequenceError:
            self._log.warning("owner_release_lost", session=sid)

    async def renew(self, lost: Lost) -> None:
        """Renew every entry we hold; report each one someone else took."""
        for sid, (own, rev) in list(self._owned.items()):
            nxt = own.model_copy(update={"beat": own.beat + 1})
            try:
                new_rev = await self.kv.update(sid, self._seal(nxt), last=rev)
            except KeyWrongLastSequenceError:
                if self._owned.pop(sid, None) is not None:
                    self._log.warning("session_ownership_lost", session=sid)
                    await lost(sid)
                continue
            if sid in self._owned:
                self._owned[sid] = (nxt, new_rev)

    async def watch(self, takeover: Takeover) -> None:
        """Follow the bucket and take over sessions whose owner went silent (runs until cancelled).

        The watch is made again after every NATS reconnect (:func:`follow_kv`); an entry seen
        again at the same revision keeps the time it last changed.
        """
        checker = asyncio.create_task(self._check_loop(takeover))

        async def on_entry(entry: KeyValue.Entry) -> None:
            key = entry.key
            if entry.operation in ("DEL", "PURGE") or entry.value is None:
                self._seen.pop(key, None)
                return
            revision = int(entry.revision or 0)
            seen = self._seen.get(key)
            if seen is None or seen.revision != revision:
                self._seen[key] = _Seen(revision, time.monotonic(), self._open(key, entry.value))

        def on_current(keys: set[str]) -> None:
            for gone in set(self._seen) - keys:  # deleted while we could not hear it
                del self._seen[gone]

        try:
            await follow_kv(self.kv, self._bus, on_entry, on_current=on_current, log=self._log)
        finally:
            checker.cancel()
            for task in self._takes:
                task.cancel()
            await asyncio.gather(checker, *self._takes, return_exceptions=True)

    async def _check_loop(self, takeover: Takeover) -> None:
        while True:
            await asyncio.sleep(BEAT_S / 2)
            now = time.monotonic()
            for key, seen in list(self._seen.items()):
                own = seen.value
                if own is None or key in self._owned or key in self._taking:
                    continue
                restarted = own.owner == self.service_id and own.instance != self.instance
                if not restarted and now - seen.changed_at < self._after:
                    continue
                # Each on its own task: a dead harness leaves many sessions, and one slow
                # resume (a journal read, an executor that is also gone) must not hold the rest.
                self._taking.add(key)
                task = asyncio.create_task(self._take_then_forget(own, seen.revision, takeover),
                                           name=f"takeover-{key}")
                self._takes.add(task)
                task.add_done_callback(self._takes.discard)

    async def _take_then_forget(self, own: SessionOwnership, revision: int, takeover: Takeover) -> None:
        try:
            await self._take(own, revision, takeover)
        finally:
            self._taking.discard(own.session_id)

    async def _take(self, own: SessionOwnership, revision: int, takeover: Takeover) -> None:
        mine = own.model_copy(update={"owner": self.service_id, "instance": self.instance,
                                      "beat": own.beat + 1})
        try:
            rev = await self.kv.update(own.session_id, self._seal(mine), last=revision)
        except KeyWrongLastSequenceError:
            return  # another replica won, or the owner was only slow
        except NatsError as exc:  # NATS failing under us: the next check tries again
            self._log.warning("session_take_failed", session=own.session_id, error=f"{type(exc).__name__}: {exc}")
            return
        self._log.info("session_taken_over", session=own.session_id, previous=own.owner)
        self.adopt(mine, rev)
        for attempt in range(RESUME_ATTEMPTS):
            try:
                await takeover(mine, rev)
                return
            except NatsError as exc:  # NATS itself failing (a restart, a timeout): ours still, try again
                failure: Exception = exc
                if attempt + 1 == RESUME_ATTEMPTS or own.session_id not in self._owned:
                    break
                self._log.warning("session_resume_retry", session=own.session_id, attempt=attempt + 1,
                                  error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(2.0 ** attempt)
            except Exception as exc:  # noqa: BLE001 — logged; the session is let go, not the harness
                failure = exc
                break
        self._log.error("session_resume_failed", session=own.session_id, exc_info=failure)
        await self.release(own.session_id)


AGENT_ID = re.compile(r"a[1-9][0-9]{0,8}")
"""A subagent id as the harness makes them (``a1``, ``a2``, ...)."""
FINISHED = ("done", "failed", "cancelled")


@dataclass
class AgentRebuilt:
    """One agent's state as the journal tells it: its conversation, where its loop stood, and (for a
    subagent) how it ended, if it did."""

    id: str
    name: str = "main"
    parent: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    pending: list[ToolUse] = field(default_factory=list)
    """Calls of its last response that had not started: run first when it goes on."""
    unknown: list[ToolUse] = field(default_factory=list)
    """Calls that started but whose result was never journaled."""
    recovered: list[tuple[ToolUse, str, dict[str, Any]]] = field(default_factory=list)
    """Calls cut short whose result the journal shows all the same (an ``Agent`` call whose
    subagent was spawned): (call, content, meta), to journal and show."""
    again: ToolUse | None = None
    """An ``AwaitAgent`` cut short: waiting has no effect to repeat, so it is run again (first)."""
    status: str | None = None
    """None while it runs (it is resumed); else ``done``, ``failed`` or ``cancelled``."""
    text: str = ""
    finished: int | None = None
    """Order in which the session's subagents finished."""
    collected: bool = False
    reported: bool = False
    """Its ``agent_completed`` event is in the journal (else the resuming harness emits it)."""
    error: str | None = None
    """Why it cannot be resumed (then it ends ``failed`` with this in its text)."""


@dataclass
class Rebuilt:
    """A session's state as its journal tells it, for the harness that resumes it."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    pending: list[ToolUse] = field(default_factory=list)
    unknown: list[ToolUse] = field(default_factory=list)
    """Calls that started but whose result was never journaled."""
    in_turn: bool = False
    queued: list[str] = field(default_factory=list)
    responses: int = 0
    """``llm_response`` records of every agent: where a scripted model goes on."""
    response_agents: list[str] = field(default_factory=list)
    """The agent of each ``llm_response`` record, in order."""
    next_n: int = 0
    ended: bool = False
    main: AgentRebuilt = field(default_factory=lambda: AgentRebuilt("main"))
    """The main agent (``messages``, ``pending`` and ``unknown`` above are its)."""
    agents: dict[str, AgentRebuilt] = field(default_factory=dict)
    """Subagents, in the order they were spawned."""
    last_agent: int = 0
    """The highest subagent number used: new ones count on from it."""
    finished_count: int = 0
    problems: list[str] = field(default_factory=list)
    """Journal records about subagents that made no sense (logged by the resuming harness)."""


@dataclass
class _Conv:
    """One agent's conversation while the journal is read."""

    messages: list[dict[str, Any]]
    last_response: dict[str, Any] | None = None
    called: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    spawned_by: dict[str, str] = field(default_factory=dict)
    """Call id of an ``Agent`` call cut short -> the subagent the journal shows it spawned."""
    broken: str | None = None


def _request(conv: _Conv, d: dict[str, Any], n: int | None) -> None:
    start, messages = d.get("from", 0), d.get("messages", [])
    if (not isinstance(start, int) or not 0 <= start <= len(conv.messages) or not isinstance(messages, list)
            or not all(isinstance(m, dict) for m in messages)):
        conv.broken = f"its model request (journal record {n}) is malformed"
        return
    conv.messages = conv.messages[:start] + [dict(m) for m in messages]
    conv.last_response, conv.called, conv.names, conv.results, conv.spawned_by = None, [], {}, {}, {}


def _calls(response: dict[str, Any]) -> list[ToolUse] | None:
    raw = response.get("tool_calls", [])
    if not isinstance(raw, list):
        return None
    calls = []
    for c in raw:
        if not (isinstance(c, dict) and isinstance(c.get("id"), str) and isinstance(c.get("name"), str)
                and isinstance(c.get("input") or {}, dict)):
            return None
        error = c.get("input_error")
        calls.append(ToolUse(id=c["id"], name=c["name"], input=dict(c.get("input") or {}),
                             input_error=error if isinstance(error, str) else None))
    return calls


def _settle(conv: _Conv, state: AgentRebuilt, agents: dict[str, AgentRebuilt], *, runs: bool) -> None:
    """Fill ``state`` from ``conv``: its messages up to the last response, and what its calls need."""
    state.messages = conv.messages
    if conv.last_response is None:
        return
    calls = _calls(conv.last_response)
    if calls is None:
        state.error = state.error or "its last model response in the journal is malformed"
        return
    text = conv.last_response.get("text", "")
    state.messages.append({"role": "assistant", "content": text if isinstance(text, str) else "",
                           "tool_calls": [{"id": c.id, "name": c.name, "input": c.input} for c in calls]})
    for call in calls:
        if call.id in conv.results:
            r = conv.results[call.id]
            state.messages.append({"role": "tool", "tool_call_id": call.id, "content": str(r.get("content", "")),
                                   "is_error": bool(r.get("is_error"))})
        elif call.id in conv.spawned_by:
            child = agents[conv.spawned_by[call.id]]
            content = spawned_text(child.id, child.name)
            state.recovered.append((call, content, {"agent": child.id}))
            state.messages.append({"role": "tool", "tool_call_id": call.id, "content": content, "is_error": False})
        elif call.id in conv.called:
            if runs and call.name == "AwaitAgent" and call.input_error is None:
                state.again = call  # its tool message comes when it is run again
            else:
                state.unknown.append(call)
                state.messages.append({"role": "tool", "tool_call_id": call.id, "content": UNKNOWN_RESULT,
                                       "is_error": True})
        else:
            state.pending.append(call)


def _spawned(d: dict[str, Any], sender: str | None, agents: dict[str, AgentRebuilt]) -> AgentRebuilt | str:
    """A subagent from its ``agent_spawned`` event, or why the event makes no sense."""
    info = d.get("data")
    if not isinstance(info, dict):
        return "an agent_spawned event without data"
    cid, name, parent, prompt = (info.get(k) for k in ("id", "name", "parent", "prompt"))
    if not isinstance(cid, str) or not AGENT_ID.fullmatch(cid):
        return f"an agent_spawned event with a malformed id {str(cid)[:40]!r}"
    if cid in agents:
        return f"a second agent_spawned event for {cid}"
    child = AgentRebuilt(cid, name=name if isinstance(name, str) else "?", parent=None)
    if isinstance(parent, str) and parent == sender and (parent == "main" or parent in agents):
        child.parent = parent  # its parent can collect it, even when it cannot go on
    depth = 1
    up = agents.get(str(parent))
    while up is not None:
        depth += 1
        up = agents.get(up.parent or "")
    if child.parent is None and isinstance(parent, str) and parent != sender:
        child.error = f"its agent_spawned event names parent {parent[:40]!r} but came from {str(sender)[:40]!r}"
    elif child.parent is None:
        child.error = f"its parent {str(parent)[:40]!r} is not an agent of this session"
    elif not (isinstance(name, str) and isinstance(prompt, str)):
        child.error = "its agent_spawned event is malformed"
    elif depth > MAX_DEPTH:
        child.error = f"it would nest {depth} deep (at most {MAX_DEPTH})"
    else:
        child.messages = [{"role": "system", "content": SUBAGENT_INSTRUCTION.format(id=cid, name=name,
                                                                                   parent=parent)},
                          {"role": "user", "content": prompt}]
    return child


def rebuild(entries: list[JournalEntry]) -> Rebuilt:
    """The session's agents (main and subagents) and the loop's position, from its journal entries.

    Every agent's model requests, responses and tool calls are journaled under its id; a
    subagent's start, end and collection are its ``agent_spawned`` / ``agent_completed`` events
    and its parent's ``Agent`` / ``AwaitAgent`` results. Records that make no sense for a
    subagent (a forged or unknown parent, a malformed request) make that subagent end
    ``failed`` with the reason, never the resume.
    """
    out = Rebuilt()
    prompts: list[str] = []
    turns = 0
    requested_since_turn = False
    convs: dict[str, _Conv] = {"main": _Conv([])}
    agents = out.agents
    for e in entries:
        if e.n is not None:
            out.next_n = max(out.next_n, e.n + 1)
        if e.incomplete:
            continue
        d = e.data
        if e.agent is not None and AGENT_ID.fullmatch(e.agent):
            out.last_agent = max(out.last_agent, int(e.agent[1:]))
        conv = convs.get(e.agent or "main") if e.kind in ("llm_request", "llm_response", "tool_exec") else None
        if e.kind == "client_input" and d.get("kind") == "prompt":
            prompts.append(str(d.get("text", "")))
        elif e.kind == "lifecycle" and d.get("what") == "turn":
            turns += 1
            out.in_turn = True
            requested_since_turn = False
        elif e.kind == "lifecycle" and d.get("what") == "ended":
            out.ended = True
        elif e.kind == "event" and d.get("kind") in ("turn_complete", "interrupted"):
            out.in_turn = False
        elif e.kind == "event" and d.get("kind") == "shutdown":
            out.ended = True
        elif e.kind == "event" and d.get("kind") == "agent_spawned":
            made = _spawned(d, e.agent, agents)
            if isinstance(made, str):
                out.problems.append(f"journal record {e.n}: {made}")
                continue
            agents[made.id] = made
            out.last_agent = max(out.last_agent, int(made.id[1:]))
            parent_conv = convs.get(made.parent or "")
            if made.error is None:
                convs[made.id] = _Conv(list(made.messages))
                if (parent_conv is not None and parent_conv.called
                        and parent_conv.names.get(parent_conv.called[-1]) == "Agent"
                        and parent_conv.called[-1] not in parent_conv.results):
                    parent_conv.spawned_by[parent_conv.called[-1]] = made.id
        elif e.kind == "event" and d.get("kind") == "agent_completed":
            info = d.get("data")
            info = info if isinstance(info, dict) else {}
            child = agents.get(str(info.get("id")))
            if child is None or child.reported:
                out.problems.append(f"journal record {e.n}: agent_completed for an unknown or ended subagent")
                continue
            status, text = info.get("status"), info.get("text")
            child.reported = True
            child.status = status if status in FINISHED else "failed"
            child.text = text if isinstance(text, str) else "its agent_completed event is malformed"
            out.finished_count += 1
            child.finished = out.finished_count
        elif e.kind == "llm_request" and conv is not None:
            _request(conv, d, e.n)
            if e.agent in (None, "main"):
                if conv.broken is not None:
                    raise ValueError(f"the main agent's {conv.broken}")
                requested_since_turn = True
        elif e.kind == "llm_response":
            out.responses += 1
            out.response_agents.append(e.agent or "main")
            if conv is not None:
                conv.last_response = d
        elif e.kind == "tool_exec" and conv is not None:
            call_id = str(d.get("id"))
            if d.get("phase") == "call":
                conv.called.append(call_id)
                conv.names[call_id] = str(d.get("name"))
            elif d.get("phase") == "result":
                conv.results[call_id] = d
                meta = d.get("meta")
                cid = meta.get("agent") if isinstance(meta, dict) else None
                if d.get("name") == "Agent" and isinstance(cid, str) and AGENT_ID.fullmatch(cid):
                    out.last_agent = max(out.last_agent, int(cid[1:]))
                    if cid not in agents:  # its start is not in the journal: it cannot go on
                        agents[cid] = AgentRebuilt(cid, name="?", parent=e.agent or "main",
                                                   error="its start (agent_spawned) is not in the journal")
                elif (d.get("name") == "AwaitAgent" and isinstance(cid, str) and cid in agents
                      and agents[cid].parent == (e.agent or "main")):
                    agents[cid].collected = True
    main = out.main
    _settle(convs["main"], main, agents, runs=out.in_turn)
    out.messages, out.pending, out.unknown = main.messages, main.pending, main.unknown
    if out.in_turn and not requested_since_turn and 0 < turns <= len(prompts):
        # the turn's first model request was under way (requests are journaled once answered):
        # the conversation goes on from the turn's prompt
        out.messages.append({"role": "user", "content": prompts[turns - 1]})
    out.queued = prompts[turns:]
    running = 0
    for child in agents.values():  # parents come before their subagents
        conv = convs.get(child.id)
        parent = main if child.parent == "main" else agents.get(child.parent or "")
        parent_runs = out.in_turn if parent is main else parent is not None and parent.status is None
        runs = child.status is None and child.error is None and parent_runs
        if conv is not None and not child.reported:  # (one that had ended is only held for AwaitAgent)
            child.error = child.error or conv.broken
            runs = runs and conv.broken is None
            _settle(conv, child, agents, runs=runs)
            runs = runs and child.error is None
        if child.status is not None:
            continue
        if child.error is not None:
            child.status = "failed"
            child.text = f"it could not be resumed after its harness restarted: {child.error}"
        elif not parent_runs:
            child.status = "cancelled"  # its parent had ended: it was being cancelled
        elif conv is not None and conv.last_response is not None and _calls(conv.last_response) == []:
            child.status, child.text = "done", child.messages[-1]["content"]  # it answered, then the crash
        elif running >= MAX_RUNNING:
            child.status = "failed"
            child.text = f"it could not be resumed after its harness restarted: more than {MAX_RUNNING} ran at once"
            if child.again is not None:  # not run again after all: its result is unknown
                child.unknown.append(child.again)
                child.again = None
        else:
            running += 1
            continue
        out.finished_count += 1
        child.finished = out.finished_count
    return out


def unshown_results(entries: list[JournalEntry]) -> list[JournalEntry]:
    """Tool results in the journal whose ``tool_result`` event never reached the stream.

    A harness journals a result, then emits its event; killed in between, it leaves a result
    no client saw. The harness that resumes the session emits those events.
    """
    shown = {str((e.data.get("data") or {}).get("id")) for e in entries
             if e.kind == "event" and e.data.get("kind") == "tool_result"}
    return [e for e in entries if e.kind == "tool_exec" and not e.incomplete
            and e.data.get("phase") == "result" and str(e.data.get("id")) not in shown]


def shown_uses(entries: list[JournalEntry]) -> set[str]:
    """Ids of the calls whose ``tool_use`` event reached the stream (a call is journaled first)."""
    return {str((e.data.get("data") or {}).get("id")) for e in entries
            if e.kind == "event" and e.data.get("kind") == "tool_use"}
