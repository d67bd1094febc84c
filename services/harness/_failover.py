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
    next_n: int = 0
    ended: bool = False


def rebuild(entries: list[JournalEntry]) -> Rebuilt:
    """The main agent's conversation and the loop's position, from a session's journal entries."""
    out = Rebuilt()
    prompts: list[str] = []
    turns = 0
    last_response: dict[str, Any] | None = None
    called: set[str] = set()
    results: dict[str, dict[str, Any]] = {}
    requested_since_turn = False
    for e in entries:
        if e.n is not None:
            out.next_n = max(out.next_n, e.n + 1)
        if e.incomplete:
            continue
        d = e.data
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
        elif e.kind == "llm_request" and e.agent == "main":
            start = int(d.get("from", 0))
            out.messages = out.messages[:start] + [dict(m) for m in d.get("messages", [])]
            last_response, called, results = None, set(), {}
            requested_since_turn = True
        elif e.kind == "llm_response":
            out.responses += 1
            if e.agent == "main":
                last_response = d
        elif e.kind == "tool_exec" and e.agent == "main":
            if d.get("phase") == "call":
                called.add(str(d.get("id")))
            elif d.get("phase") == "result":
                results[str(d.get("id"))] = d
    if last_response is not None:
        calls = [ToolUse(id=str(c["id"]), name=str(c["name"]), input=dict(c.get("input") or {}),
                         input_error=c.get("input_error")) for c in last_response.get("tool_calls", [])]
        out.messages.append({"role": "assistant", "content": last_response.get("text", ""),
                             "tool_calls": [{"id": c.id, "name": c.name, "input": c.input} for c in calls]})
        for call in calls:
            if call.id in results:
                r = results[call.id]
                out.messages.append({"role": "tool", "tool_call_id": call.id, "content": r.get("content", ""),
                                     "is_error": bool(r.get("is_error"))})
            elif call.id in called:
                out.unknown.append(call)
                out.messages.append({"role": "tool", "tool_call_id": call.id, "content": UNKNOWN_RESULT,
                                     "is_error": True})
            else:
                out.pending.append(call)
    if out.in_turn and not requested_since_turn and 0 < turns <= len(prompts):
        # the turn's first model request was under way (requests are journaled once answered):
        # the conversation goes on from the turn's prompt
        out.messages.append({"role": "user", "content": prompts[turns - 1]})
    out.queued = prompts[turns:]
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
