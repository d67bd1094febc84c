"""A session's journal: what happened, in order, in JetStream; read back for export and resume.

Every session has one writer (the harness that runs it). Records are
numbered ``n`` from 0 without gaps and published on ``silo.journal.<sid>``
with the dedupe id ``<sid>:j<n>:<part>``, so a retried publish is stored once.
Kinds (REQUIREMENTS §6): ``meta`` (session start), ``event`` (every session
event), ``llm_request`` (the messages sent since the agent's previous request,
and the tool names), ``llm_response``, ``tool_exec`` (a call as it starts and
its result, with the executor that ran it, the *owner*), ``client_input``,
``lifecycle`` (started, resumed, ended). The egress adds ``network`` records
on ``silo.journal.<sid>.network``.

A record larger than one message is split into parts that carry fragments of
its JSON text; the reader joins them, and a record whose writer died mid-way
is exported with an ``incomplete`` marker, never dropped. No secret enters a
record: the harness's own API keys are scrubbed from every record as a last
line of defence (they are never put into one on purpose), and egress
credentials never reach the harness at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from devsilo.protocol import (
    DEFAULT_MAX_BYTES,
    JournalKind,
    JournalRecord,
    MessageRejected,
    NetworkRecord,
    Role,
    SessionEvent,
    subjects,
)
from devsilo.runtime import Bus
from nats.js.errors import NotFoundError
from prometheus_client import Counter

REDACTED = "[redacted]"
ENVELOPE_ROOM = 4096
"""Bytes kept free in each message for the signed envelope around a record."""


class JournalSink(Protocol):
    """Where records go: JetStream in the harness, memory in a replay run."""

    async def write(self, record: JournalRecord, dedupe_id: str) -> None:
        """Store one record (idempotent for the same ``dedupe_id``)."""
        ...


class StreamSink:
    """Publishes records into the SILO_JOURNAL stream, each acknowledged before the next.

    ``counter`` (labels ``kind``) counts the messages written, a split record once per part.
    """

    def __init__(self, bus: Bus, session_id: str, counter: Counter | None = None) -> None:
        self._bus = bus
        self._sid = session_id
        self._subject = subjects.journal(session_id)
        self._counter = counter

    async def write(self, record: JournalRecord, dedupe_id: str) -> None:
        """Publish and wait for JetStream's acknowledgement."""
        await self._bus.js_publish(self._subject, record, sid=self._sid, dedupe_id=dedupe_id)
        if self._counter is not None:
            self._counter.labels(kind=record.kind).inc()


@dataclass
class MemorySink:
    """Keeps records in a list (replay runs, unit tests)."""

    records: list[JournalRecord] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set)

    async def write(self, record: JournalRecord, dedupe_id: str) -> None:
        """Append unless ``dedupe_id`` was written already."""
        if dedupe_id not in self._seen:
            self._seen.add(dedupe_id)
            self.records.append(record)


def _scrubbed(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
        escaped = json.dumps(secret, ensure_ascii=False)[1:-1]
        if escaped != secret and escaped in text:
            text = text.replace(escaped, REDACTED)
    return text


def _encoded_len(text: str) -> int:
    return len(json.dumps(text, ensure_ascii=False).encode())


def split_text(text: str, budget: int) -> list[str]:
    """``text`` in pieces each of which, as a JSON string, takes at most ``budget`` bytes."""
    pieces: list[str] = []
    i = 0
    step = max(1, budget // 4)
    while i < len(text):
        size = step
        while True:
            piece = text[i:i + size]
            if _encoded_len(piece) <= budget or size == 1:
                break
            size = max(1, size // 2)
        # grow while it still fits (keeps the number of parts low for plain text)
        while i + size < len(text):
            bigger = text[i:i + size * 2]
            if _encoded_len(bigger) > budget:
                break
            size *= 2
            piece = bigger
        pieces.append(piece)
        i += len(piece)
    return pieces or [""]


class SessionJournal:
    """Writes one session's journal records, numbered from ``next_n``."""

    def __init__(self, sink: JournalSink, session_id: str, *, clock: Callable[[], float] = time.time,
                 max_bytes: int = DEFAULT_MAX_BYTES, secrets: Iterable[str] = (), next_n: int = 0) -> None:
        self._sink = sink
        self.session_id = session_id
        self._clock = clock
        self._budget = max(1024, max_bytes - ENVELOPE_ROOM)
        self._secrets = tuple(s for s in secrets if len(s) >= 8)
        self._n = next_n
        self._lock = asyncio.Lock()
        self._sent: dict[str, list[dict[str, Any]]] = {}
        """Per agent: the conversation as last sent, so each request journals only what is new."""

    @property
    def next_n(self) -> int:
        """The number the next record will get."""
        return self._n

    async def write(self, kind: JournalKind, data: dict[str, Any], agent: str | None = None) -> int:
        """Journal one record; return its number."""
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)
        clean = _scrubbed(text, self._secrets)
        if clean != text:
            data = json.loads(clean)
        async with self._lock:
            n = self._n
            ts = self._clock()
            whole = JournalRecord(session_id=self.session_id, n=n, kind=kind, ts=ts, agent=agent, data=data)
            if len(whole.model_dump_json().encode()) <= self._budget:
                await self._sink.write(whole, f"{self.session_id}:j{n}:0")
            else:
                pieces = split_text(clean, self._budget - 1024)
                for i, piece in enumerate(pieces):
                    part = JournalRecord(session_id=self.session_id, n=n, kind=kind, ts=ts, agent=agent,
                                         part=i, parts=len(pieces), fragment=piece)
                    await self._sink.write(part, f"{self.session_id}:j{n}:{i}")
            self._n += 1
            return n

    # -- the record kinds ---------------------------------------------------------------

    async def meta(self, *, grant: dict[str, Any], llm: dict[str, Any], headless: bool, executor: str,
                   access: dict[str, Any], harness: str, tools: Sequence[str]) -> int:
        """The session's start: grant fields (no secret is in a grant), model, executor."""
        return await self.write("meta", {"grant": grant, "llm": llm, "headless": headless,
                                         "executor": executor, "access": access, "harness": harness,
                                         "tools": list(tools)})

    async def event(self, event: SessionEvent) -> int:
        """A session event, as clients see it."""
        return await self.write("event", {"seq": event.seq, "kind": event.kind, "ts": event.ts,
                                          "data": event.data}, agent=event.agent)

    async def llm_request(self, agent: str, model: str, messages: list[dict[str, Any]],
                          tools: Sequence[str]) -> int:
        """A model request: the messages added since the agent's previous request, and the tools.

        ``from`` is how many messages of the conversation the earlier requests
        already journaled (0 after a compaction or a resume: the whole list).
        """
        sent = self._sent.get(agent, [])
        start = len(sent) if len(sent) <= len(messages) and messages[:len(sent)] == sent else 0
        self._sent[agent] = [dict(m) for m in messages]
        return await self.write("llm_request", {"model": model, "tools": list(tools), "from": start,
                                                "count": len(messages), "messages": messages[start:]},
                                agent=agent)

    async def llm_response(self, agent: str, text: str, tool_calls: Sequence[Any], usage: dict[str, int]) -> int:
        """A model response: text, tool calls (with any argument error) and usage."""
        calls = [{"id": c.id, "name": c.name, "input": c.input, "input_error": c.input_error}
                 for c in tool_calls]
        return await self.write("llm_response", {"text": text, "tool_calls": calls, "usage": usage},
                                agent=agent)

    async def tool_call(self, agent: str, call_id: str, name: str, input: dict[str, Any], owner: str) -> int:
        """A tool call about to run on ``owner`` (an executor id, or ``harness``)."""
        return await self.write("tool_exec", {"phase": "call", "id": call_id, "name": name, "input": input,
                                              "owner": owner}, agent=agent)

    async def tool_result(self, agent: str, call_id: str, name: str, content: str, is_error: bool,
                          meta: dict[str, Any], owner: str) -> int:
        """A tool call's result, as the model will see it."""
        return await self.write("tool_exec", {"phase": "result", "id": call_id, "name": name,
                                              "content": content, "is_error": is_error, "meta": meta,
                                              "owner": owner}, agent=agent)

    async def client_input(self, kind: str, client: str, text: str, question_id: str | None = None) -> int:
        """A client's input to the session."""
        return await self.write("client_input", {"kind": kind, "client": client, "text": text,
                                                 "question_id": question_id})

    async def lifecycle(self, what: str, **fields: Any) -> int:
        """started, resumed (by which harness), turn (a queued prompt starts a turn), ended (code)."""
        return await self.write("lifecycle", {"what": what, **fields})


# -- reading back ---------------------------------------------------------------------------


@dataclass(frozen=True)
class JournalEntry:
    """One record read back: joined from its parts, or a network record, or a marker."""

    kind: str
    data: dict[str, Any]
    n: int | None = None
    ts: float | None = None
    agent: str | None = None
    incomplete: bool = False

    def line(self) -> str:
        """The export's JSON line for this entry (no trailing newline)."""
        doc: dict[str, Any] = {"n": self.n, "kind": self.kind, "ts": self.ts, "agent": self.agent,
                               "data": self.data}
        if self.incomplete:
            doc["incomplete"] = True
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True)
class _Raw:
    seq: int
    subject: str
    data: bytes


class JournalReader:
    """Reads a session's journal (and its network records) back from the stream, verified."""

    def __init__(self, bus: Bus, session_id: str, *, network: bool = True) -> None:
        self._bus = bus
        self.session_id = session_id
        self._subjects = [subjects.journal(session_id)]
        if network:
            self._subjects.append(subjects.journal_network(session_id))

    async def _next_raw(self, after: int) -> _Raw | None:
        found: list[_Raw] = []
        for subject in self._subjects:
            try:
                msg = await self._bus.js.get_msg(subjects.JOURNAL_STREAM, seq=after + 1, subject=subject,
                                                 next=True, direct=True)
            except NotFoundError:
                continue
            if msg.seq is None or msg.data is None:
                continue
            found.append(_Raw(int(msg.seq), str(msg.subject or subject), bytes(msg.data)))
        return min(found, key=lambda r: r.seq) if found else None

    def _open(self, raw: _Raw) -> JournalRecord | NetworkRecord | str:
        try:
            env = self._bus.open(raw.data, raw.subject, fresh=False)
        except MessageRejected as exc:
            return f"rejected: {exc}"
        body = env.body
        want = Role.EGRESS if isinstance(body, NetworkRecord) else Role.HARNESS
        if not isinstance(body, (JournalRecord, NetworkRecord)) or env.header.role is not want:
            return f"rejected: {env.header.type} from {env.header.role.value} on {raw.subject}"
        if body.session_id != self.session_id:
            return f"rejected: a record of session {body.session_id} on {raw.subject}"
        if isinstance(body, NetworkRecord):
            return body
        return body

    async def unit(self, after: int) -> tuple[list[JournalEntry], int] | None:
        """The entries that start after stream sequence ``after`` and the sequence they end at.

        Usually one entry; a split record comes with the network records that
        arrived between its parts. None at the end of the stream.
        """
        raw = await self._next_raw(after)
        if raw is None:
            return None
        first = self._open(raw)
        if isinstance(first, str):
            return [JournalEntry("invalid", {"error": first})], raw.seq
        if isinstance(first, NetworkRecord):
            return [_network_entry(first)], raw.seq
        if first.parts == 1 and first.fragment is None:
            return [JournalEntry(first.kind, first.data, first.n, first.ts, first.agent)], raw.seq
        fragments = [first.fragment or ""] if first.part == 0 else []
        between: list[JournalEntry] = []
        end = raw.seq
        complete = first.part == 0 and first.parts == 1
        while not complete and first.part == 0:
            nxt = await self._next_raw(end)
            if nxt is None:
                break
            body = self._open(nxt)
            if isinstance(body, NetworkRecord):
                between.append(_network_entry(body))
                end = nxt.seq
                continue
            if (isinstance(body, str) or body.n != first.n or body.part != len(fragments)
                    or body.fragment is None):
                break  # the writer died mid-record; the next record starts here
            fragments.append(body.fragment)
            end = nxt.seq
            complete = len(fragments) == first.parts
        if complete:
            try:
                data = json.loads("".join(fragments))
            except ValueError:
                data = {"error": "the parts of this record do not join into JSON"}
                complete = False
            entry = JournalEntry(first.kind, data, first.n, first.ts, first.agent, incomplete=not complete)
        else:
            entry = JournalEntry(first.kind, {"parts": first.parts, "parts_found": len(fragments)},
                                 first.n, first.ts, first.agent, incomplete=True)
        return [entry, *between], end

    async def entries(self) -> list[JournalEntry]:
        """Every entry, in order."""
        out: list[JournalEntry] = []
        after = 0
        while (unit := await self.unit(after)) is not None:
            entries, after = unit
            out.extend(entries)
        return out

    async def page(self, after: int, offset: int, max_bytes: int) -> tuple[str, int, int, bool]:
        """Up to ``max_bytes`` (as a JSON string) of the export's JSONL text.

        Starts ``offset`` characters into the unit after stream sequence
        ``after``; returns the text, the cursor to pass back (after, offset)
        and whether the export is done.
        """
        parts: list[str] = []
        used = 2
        while True:
            unit = await self.unit(after)
            if unit is None:
                return "".join(parts), after, 0, True
            entries, end = unit
            text = "".join(e.line() + "\n" for e in entries)[offset:]
            size = _encoded_len(text) - 2
            if used + size <= max_bytes:
                parts.append(text)
                used += size
                after, offset = end, 0
                continue
            room = max_bytes - used
            if room < 64 and parts:
                return "".join(parts), after, offset, False
            piece = split_text(text, max(64, room))[0]
            parts.append(piece)
            return "".join(parts), after, offset + len(piece), False


def _network_entry(rec: NetworkRecord) -> JournalEntry:
    data = rec.model_dump(mode="json")
    data.pop("session_id", None)
    return JournalEntry("network", data)


def script_digest(script: str | None) -> str | None:
    """A mock script's SHA-256 (journaled instead of the script itself)."""
    return hashlib.sha256(script.encode()).hexdigest() if script else None
