"""Cost totals of a session from its ``cost`` events: the shape every client sees.

Pure data, shared by the harness (which writes the totals into each cost
event) and by anyone who rebuilds them from a session's events (a gateway
answering "cost" on request, a client, the journal's reader).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

TOKEN_FIELDS = ("input_tokens", "output_tokens", "cached_tokens", "cache_write_tokens")


@dataclass
class Tally:
    """Tokens and dollars of some completions; dollars are unknown once any had no price.

    ``input_tokens`` counts whole prompts, cached parts included; ``cached_tokens``
    and ``cache_write_tokens`` are the parts read from and written to a prompt cache.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    completions: int = 0
    usd_known: float = 0.0
    usd_unknown: bool = False

    def add(self, tokens: Mapping[str, int], usd: float | None) -> None:
        """Count one completion: its token counts (``TOKEN_FIELDS``) and dollars (None: unknown)."""
        self.input_tokens += tokens.get("input_tokens", 0)
        self.output_tokens += tokens.get("output_tokens", 0)
        self.cached_tokens += tokens.get("cached_tokens", 0)
        self.cache_write_tokens += tokens.get("cache_write_tokens", 0)
        self.completions += 1
        if usd is None:
            self.usd_unknown = True
        else:
            self.usd_known += usd

    @property
    def tokens(self) -> int:
        """Input plus output tokens: what a token quota counts."""
        return self.input_tokens + self.output_tokens

    def as_dict(self) -> dict[str, Any]:
        """Counts, ``usd`` (None when any part is unknown) and ``usd_known`` (the priced part)."""
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "cached_tokens": self.cached_tokens, "cache_write_tokens": self.cache_write_tokens,
                "completions": self.completions,
                "usd": None if self.usd_unknown else round(self.usd_known, 9),
                "usd_known": round(self.usd_known, 9)}


@dataclass
class CostTotals:
    """Running totals of a session: all, per model, per agent."""

    total: Tally = field(default_factory=Tally)
    by_model: dict[str, Tally] = field(default_factory=dict)
    by_agent: dict[str, Tally] = field(default_factory=dict)

    def add(self, model: str, agent: str, tokens: Mapping[str, int], usd: float | None) -> None:
        """Count one completion of ``model`` for ``agent``."""
        self.total.add(tokens, usd)
        self.by_model.setdefault(model, Tally()).add(tokens, usd)
        self.by_agent.setdefault(agent, Tally()).add(tokens, usd)

    def as_dict(self) -> dict[str, Any]:
        """The totals as plain data (a cost event's ``totals``)."""
        return {"total": self.total.as_dict(),
                "by_model": {k: v.as_dict() for k, v in sorted(self.by_model.items())},
                "by_agent": {k: v.as_dict() for k, v in sorted(self.by_agent.items())}}


def totals_from_events(events: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """A session's cost totals rebuilt from its events, in the shape of a cost event's ``totals``.

    ``events`` are event dicts (``kind``, ``agent``, ``data``), e.g. the
    ``model_dump()`` of ``SessionEvent``s or a client's event frames; only
    ``cost`` events count, and malformed counts are taken as 0 (a malformed
    or missing ``usd`` makes the dollars unknown).
    """
    totals = CostTotals()
    for event in events:
        if event.get("kind") != "cost":
            continue
        data = event.get("data") or {}
        usd = data.get("usd")
        usd_value = (float(usd) if isinstance(usd, (int, float)) and not isinstance(usd, bool)
                     and math.isfinite(usd) and usd >= 0 else None)
        totals.add(str(data.get("model", "?")), str(event.get("agent", "main")),
                   {k: _count(data.get(k)) for k in TOKEN_FIELDS}, usd_value)
    return totals.as_dict()


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
