"""What a session's events add up to, on request: its cost so far, its access report, whether it is busy.

A tally reads the session's verified events once, from where it stopped
last time, so asking again costs only the events since.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from devsilo.protocol import SessionEvent
from devsilo.protocol.client import MAX_EVENTS_BATCH

from ._delivery import SessionFeed


def _numbers(data: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


_STATE_AFTER = {"user_prompt": "busy", "turn_complete": "idle", "interrupted": "idle", "awaiting_input": "idle",
                "shutdown": "ended"}


class SessionTally:
    """Running sums of a session's ``cost`` events (by model and agent), its access report and state.

    ``state``: ``new`` before any event, ``busy`` while a turn runs (from its
    prompt or ``busy`` event to ``turn_complete``, ``interrupted``,
    ``awaiting_input`` or ``busy`` false), ``idle`` otherwise, ``ended`` after
    ``shutdown``.
    """

    def __init__(self, feed: SessionFeed) -> None:
        self.feed = feed
        self.next_seq = 0
        self.cost_events = 0
        self.totals: dict[str, float] = defaultdict(float)
        self.by_model: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.by_agent: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.access_report: SessionEvent | None = None
        self.state = "new"
        self._lock = asyncio.Lock()

    async def catch_up(self) -> None:
        """Count every event stored since the last call."""
        async with self._lock:
            while True:
                events, complete = await self.feed.read(self.next_seq, MAX_EVENTS_BATCH)
                for ev in events:
                    self._count(ev.event)
                if events:
                    self.next_seq = events[-1].seq + 1
                if complete or not events:
                    return

    def _count(self, event: SessionEvent) -> None:
        if self.state != "ended":
            self.state = _STATE_AFTER.get(event.kind, self.state)
            if event.kind == "busy":
                self.state = "busy" if event.data.get("busy") else "idle"
            elif self.state == "new":
                self.state = "idle"
        if event.kind == "access_report":
            self.access_report = event  # the newest one stands
        elif event.kind == "cost":
            self.cost_events += 1
            model = str(event.data.get("model", "unknown"))
            for key, value in _numbers(event.data).items():
                self.totals[key] += value
                self.by_model[model][key] += value
                self.by_agent[event.agent][key] += value

    def cost(self) -> dict[str, Any]:
        """The fields of a ``cost`` frame (without the session id)."""
        return {
            "totals": dict(self.totals),
            "by_model": {m: dict(v) for m, v in self.by_model.items()},
            "by_agent": {a: dict(v) for a, v in self.by_agent.items()},
            "cost_events": self.cost_events,
            "through_seq": self.next_seq - 1,
        }
