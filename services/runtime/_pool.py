"""A view of the executor pool, built from executors' signed announcements.

The harness uses it to lease sandboxes, the gateway to find the executor
that holds (or should lock) a workspace.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from devsilo.protocol import ExecutorAnnounce

SILENCE_S = 3.0
"""An executor not heard from for this long is gone (it announces every second)."""


@dataclass
class ExecutorEntry:
    """The latest announcement of one executor and when it arrived."""

    announce: ExecutorAnnounce
    seen_at: float


class PoolView:
    """Executors we have heard from recently, and which of them fit a session."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, silence_s: float = SILENCE_S) -> None:
        self._clock = clock
        self._silence = silence_s
        self._entries: dict[str, ExecutorEntry] = {}
        self._gone: set[str] = set()  # instances that stopped, restarted or fell silent (one per loss)

    def update(self, ann: ExecutorAnnounce) -> bool:
        """Record an announcement; True when it means the executor's earlier instance is gone.

        A new instance id (a restart) or ``stopping`` both mean every sandbox
        of the earlier instance died with it.
        """
        old = self._entries.get(ann.executor_id)
        lost = old is not None and old.announce.instance != ann.instance
        if old is not None and lost:
            self._gone.add(old.announce.instance)
        if ann.stopping:
            self._entries.pop(ann.executor_id, None)
            self._gone.add(ann.instance)
            return True
        self._gone.discard(ann.instance)  # heard again after it was counted silent
        self._entries[ann.executor_id] = ExecutorEntry(ann, self._clock())
        return lost

    def grace(self, seconds: float) -> None:
        """Count every executor as heard from ``seconds`` from now: our own NATS connection was
        away, so their silence meanwhile says nothing about them."""
        until = self._clock() + seconds
        for e in self._entries.values():
            e.seen_at = max(e.seen_at, until)

    def expire(self) -> list[str]:
        """Drop executors that fell silent; return their ids."""
        now = self._clock()
        gone = [eid for eid, e in self._entries.items() if now - e.seen_at > self._silence]
        for eid in gone:
            self._gone.add(self._entries.pop(eid).announce.instance)
        return gone

    def instance_gone(self, instance: str) -> bool:
        """Whether the executor instance ``instance`` stopped, restarted or fell silent (and was not
        heard again): a lease it granted is worth nothing any more."""
        return instance in self._gone

    def alive(self, executor_id: str) -> bool:
        """Whether ``executor_id`` announced itself recently."""
        e = self._entries.get(executor_id)
        return e is not None and self._clock() - e.seen_at <= self._silence

    def instance_of(self, executor_id: str) -> str | None:
        """The instance id of ``executor_id``'s latest announcement (it changes on restart)."""
        e = self._entries.get(executor_id)
        return e.announce.instance if e is not None else None

    def user_sandboxes(self, user: str) -> int:
        """How many sandboxes ``user`` holds across the pool."""
        return sum(e.announce.users.get(user, 0) for e in self._entries.values())

    def _offers(self, e: ExecutorEntry, backend: str, pinned: str | None, host: str | None) -> bool:
        a = e.announce
        return (self._clock() - e.seen_at <= self._silence
                and (backend in a.backends if backend != "auto" else bool(a.backends))
                and (pinned is None or a.executor_id == pinned)
                and (host is None or a.host == host))

    def locked_on(self, workspace: str) -> str | None:
        """The live executor that holds ``workspace`` locked, if one does."""
        now = self._clock()
        for e in self._entries.values():
            if now - e.seen_at <= self._silence and workspace in e.announce.locked:
                return e.announce.executor_id
        return None

    def runs(self, executor_id: str, session_id: str) -> bool:
        """Whether the live executor ``executor_id`` last announced ``session_id`` as running."""
        e = self._entries.get(executor_id)
        return (e is not None and self._clock() - e.seen_at <= self._silence
                and session_id in e.announce.sessions)

    def remote_holder(self, host: str | None, workspace: str) -> tuple[str, str] | None:
        """(executor, user) holding ``workspace`` of machine ``host`` uploaded and locked, if any."""
        if host is None:
            return None
        now = self._clock()
        for e in self._entries.values():
            if now - e.seen_at <= self._silence:
                for r in e.announce.remote_locked:
                    if r.host == host and r.path == workspace:
                        return e.announce.executor_id, r.user
        return None

    def host_of(self, executor_id: str) -> str | None:
        """The host a live executor announced, or None when it is not live."""
        e = self._entries.get(executor_id)
        return e.announce.host if e is not None and self.alive(executor_id) else None

    def on_host(self, host: str | None) -> list[str]:
        """Live executors on ``host`` (all when None), by id."""
        now = self._clock()
        return sorted(e.announce.executor_id for e in self._entries.values()
                      if now - e.seen_at <= self._silence and (host is None or e.announce.host == host))

    def candidates(self, backend: str, pinned: str | None = None,
                   host: str | None = None, workspace: str | None = None) -> list[ExecutorAnnounce]:
        """Executors on ``host`` (if named) that offer ``backend`` and have room; warm and roomy first.

        A workspace locked on an executor can only be served there.
        """
        holder = self.locked_on(workspace) if workspace is not None else None
        if workspace is not None and (remote := self.remote_holder(host, workspace)) is not None:
            holder = remote[0]  # uploaded from the client's machine: only its holder has the files
        if holder is not None:
            if pinned not in (None, holder):
                return []
            pinned, host = holder, None
        fits = [e.announce for e in self._entries.values()
                if self._offers(e, backend, pinned, host) and e.announce.free > 0]
        return sorted(fits, key=lambda a: (-a.warm.get(backend, 0), -a.free, a.executor_id))

    def why_none(self, backend: str, pinned: str | None = None, host: str | None = None) -> str:
        """Why :meth:`candidates` is empty, in a few words."""
        offering = [e for e in self._entries.values() if self._offers(e, backend, pinned, host)]
        if not offering:
            where = f" on {host}, where the workspace is," if host else ""
            return f"no executor{' ' + pinned if pinned else ''}{where} offers it"
        return f"every executor offering it is full ({len(offering)})"

    def describe(self) -> str:
        """One line on what the pool holds, for error messages."""
        if not self._entries:
            return "no executor has announced itself"
        return "; ".join(
            f"{e.announce.executor_id}: {','.join(e.announce.backends) or 'no backends'}, "
            f"{e.announce.free}/{e.announce.capacity} free"
            for e in sorted(self._entries.values(), key=lambda e: e.announce.executor_id)
        )

    def capacity(self) -> tuple[int, int]:
        """(free, total) sandbox slots across live executors."""
        live = [e.announce for e in self._entries.values() if self._clock() - e.seen_at <= self._silence]
        return sum(a.free for a in live), sum(a.capacity for a in live)

    def __len__(self) -> int:
        return len(self._entries)
