"""A replay cache: remembers message ids until their envelopes expire."""

from __future__ import annotations

import heapq


class ReplayCache:
    """Message ids seen and still valid.

    Envelopes carry an expiry no further than the verifier's maximum lifetime
    ahead, so the cache never holds more than that window's worth of ids; a
    hard cap bounds memory under a flood, and when it is hit the oldest ids
    go first (their envelopes are then closest to expiry anyway).
    """

    def __init__(self, max_entries: int = 200_000) -> None:
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._max = max_entries

    def __len__(self) -> int:
        return len(self._expiry)

    def check_and_add(self, mid: str, expires_at: float, now: float) -> bool:
        """Record ``mid``; return False when it was already seen and not yet expired."""
        self._evict(now)
        if mid in self._expiry:
            return False
        self._expiry[mid] = expires_at
        heapq.heappush(self._heap, (expires_at, mid))
        while len(self._expiry) > self._max:
            _, old = heapq.heappop(self._heap)
            self._expiry.pop(old, None)
        return True

    def _evict(self, now: float) -> None:
        while self._heap and self._heap[0][0] < now:
            _, mid = heapq.heappop(self._heap)
            if self._expiry.get(mid, now + 1) < now:
                del self._expiry[mid]
