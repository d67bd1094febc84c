"""The egress's table of session policies, each taken only from a verified grant."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from devsilo.protocol import SessionGrant


@dataclass(frozen=True)
class SessionPolicy:
    """What one session may reach: its allowed domains and credential names, until expiry."""

    session_id: str
    user: str
    allowed_domains: tuple[str, ...]
    credentials: tuple[str, ...]
    expires_at: float


class PolicyTable:
    """Session policies in force on this egress, dropped when closed or expired."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._by_session: dict[str, SessionPolicy] = {}

    def install(self, grant: SessionGrant) -> SessionPolicy:
        """Put a verified grant's policy in force."""
        policy = SessionPolicy(grant.session_id, grant.user, tuple(grant.allow_domains),
                               tuple(grant.credentials), grant.expires_at)
        self._by_session[grant.session_id] = policy
        return policy

    def remove(self, session_id: str) -> None:
        """Drop a session's policy."""
        self._by_session.pop(session_id, None)

    def get(self, session_id: str) -> SessionPolicy | None:
        """A session's policy, or None when absent or expired (fail closed)."""
        policy = self._by_session.get(session_id)
        if policy is None or policy.expires_at < self._clock():
            self._by_session.pop(session_id, None)
            return None
        return policy

    def __len__(self) -> int:
        return len(self._by_session)
