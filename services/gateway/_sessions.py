"""The gateway's view of sessions: who owns which, and their event streams."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from devsilo.protocol import SessionGrant
from devsilo.protocol.client import SessionSummary

from ._auth import Principal


@dataclass
class SessionRecord:
    """A session this gateway created."""

    session_id: str
    user: str
    workspace: str
    executor_id: str
    created_at: float = field(default_factory=time.time)
    grant: SessionGrant | None = None
    """The session's policy, which `silo shell` on its workspace inherits."""

    def summary(self) -> SessionSummary:
        """The line shown in session lists."""
        return SessionSummary(session_id=self.session_id, user=self.user, workspace=self.workspace,
                              created_at=self.created_at)


class SessionDirectory:
    """Sessions by id, and which of them a principal may see."""

    def __init__(self) -> None:
        self._sessions: dict[str, SessionRecord] = {}

    def add(self, record: SessionRecord) -> None:
        """Remember a new session."""
        self._sessions[record.session_id] = record

    def visible(self, who: Principal, session_id: str) -> SessionRecord | None:
        """The session when ``who`` may see it; None for absent and foreign alike."""
        rec = self._sessions.get(session_id)
        if rec is None or not (who.operator or rec.user == who.user):
            return None
        return rec

    def list_for(self, who: Principal) -> list[SessionRecord]:
        """Every session ``who`` may see, oldest first."""
        return sorted((r for r in self._sessions.values() if who.operator or r.user == who.user),
                      key=lambda r: r.created_at)
