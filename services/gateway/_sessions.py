"""The gateway's view of sessions: who owns which, kept in a JetStream KV bucket.

Records live in the ``silo_gateway_sessions`` bucket, not in the gateway's memory,
so a restarted gateway (or another replica) lists, attaches to and stops the
sessions an earlier one created. Only gateways may use the bucket (NATS
permissions), and a record is read back as the model it was written as:
anything else in the bucket is skipped and logged.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from devsilo.protocol import SessionGrant, subjects
from devsilo.protocol.client import SessionSummary
from nats.js.api import KeyValueConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._auth import Principal

_KEY_PREFIX = f"$KV.{subjects.SESSIONS_BUCKET}."
KEEP_RECORDS = 1024
"""Session records a gateway keeps in memory, the most recently used; others are read from the bucket."""


class SessionRecord(BaseModel):
    """A session a gateway created."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    session_id: str
    user: str
    workspace: str
    executor_id: str
    created_at: float = Field(default_factory=time.time)
    grant: SessionGrant | None = None
    """The session's policy, which `silo shell` on its workspace inherits."""

    def summary(self, *, state: str = "new", next_seq: int = 0) -> SessionSummary:
        """The line shown in session lists."""
        return SessionSummary(session_id=self.session_id, user=self.user, workspace=self.workspace,
                              created_at=self.created_at, executor_id=self.executor_id,
                              state=state, next_seq=next_seq)


async def open_sessions_bucket(js: JetStreamContext) -> KeyValue:
    """The session-record bucket, created on first use (a race with another replica is fine)."""
    try:
        return await js.key_value(subjects.SESSIONS_BUCKET)
    except (BucketNotFoundError, NotFoundError):
        return await js.create_key_value(KeyValueConfig(
            bucket=subjects.SESSIONS_BUCKET, description="devsilo session records (gateway)",
            history=1, storage=StorageType.FILE))


class SessionDirectory:
    """Sessions by id, and which of them a principal may see.

    Reads go to the bucket (another replica may have created the session);
    the ``keep`` records this gateway wrote or read last are kept in
    ``_cache``, as records never change once written.
    """

    def __init__(self, js: JetStreamContext, kv: KeyValue, log: Any, *, keep: int = KEEP_RECORDS) -> None:
        self._js = js
        self._kv = kv
        self._log = log
        self._keep = keep
        self._cache: OrderedDict[str, SessionRecord] = OrderedDict()

    @property
    def cached(self) -> int:
        """Records held in memory (at most ``keep``)."""
        return len(self._cache)

    def _remember(self, record: SessionRecord) -> None:
        self._cache[record.session_id] = record
        self._cache.move_to_end(record.session_id)
        while len(self._cache) > self._keep:
            self._cache.popitem(last=False)

    async def add(self, record: SessionRecord) -> None:
        """Store a new session's record."""
        await self._kv.put(subjects.check_id(record.session_id, "session id"),
                           record.model_dump_json().encode())
        self._remember(record)

    async def get(self, session_id: str) -> SessionRecord | None:
        """A session's record, or None when there is none (or it is unreadable)."""
        rec = self._cache.get(session_id)
        if rec is not None:
            self._cache.move_to_end(session_id)
            return rec
        try:
            entry = await self._kv.get(subjects.check_id(session_id, "session id"))
        except (KeyNotFoundError, NotFoundError):
            return None
        return self._parse(session_id, entry.value)

    async def visible(self, who: Principal, session_id: str) -> SessionRecord | None:
        """The session when ``who`` may see it; None for absent and foreign alike."""
        rec = await self.get(session_id)
        if rec is None or not (who.operator or rec.user == who.user):
            return None
        return rec

    async def list_for(self, who: Principal) -> list[SessionRecord]:
        """Every session ``who`` may see, oldest first."""
        # The stream's subject list, not KeyValue.keys(): its watcher can end before the first key arrives.
        info = await self._js.stream_info(subjects.SESSIONS_STREAM, subjects_filter=f"{_KEY_PREFIX}>")
        keys = [s[len(_KEY_PREFIX):] for s in (info.state.subjects or {})]
        records = [r for r in [await self.get(k) for k in keys] if r is not None]
        return sorted((r for r in records if who.operator or r.user == who.user), key=lambda r: r.created_at)

    def _parse(self, key: str, value: bytes | None) -> SessionRecord | None:
        if not value:
            return None
        try:
            rec = SessionRecord.model_validate_json(value)
        except ValidationError as exc:
            self._log.warning("session_record_unreadable", key=key, error=str(exc).splitlines()[0])
            return None
        if rec.session_id != key:
            self._log.warning("session_record_misfiled", key=key, session=rec.session_id)
            return None
        self._remember(rec)
        return rec
