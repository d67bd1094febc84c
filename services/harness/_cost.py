"""Token and dollar accounting per session: prices, quotas, and the ``cost`` event's figures.

Harness options in config.json (every field optional)::

    "prices": {"claude-opus-5": {"input": 5.0, "output": 25.0, "cached_input": 0.5,
                                 "cache_write": 6.25},
               "local:": {"input": 0, "output": 0}},
    "quotas": {"tokens": 5000000, "usd": 50.0}

``prices`` maps a model name or a prefix of one to USD per million tokens;
the longest matching key wins, tried on the backend-qualified name first
(``anthropic:claude-x``) and then on the bare model name (``claude-x``), and
it is merged over the defaults below. ``quotas`` are the operator's limits
per session, applied on top of a session grant's ``quota_tokens`` and
``quota_usd`` (the lower of the two wins).

A model without a price is counted in tokens and its dollars reported as
unknown (never as 0), with a warning logged and carried in its first cost
event. A dollar quota cannot be enforced for such a model, so a session with
one refuses to send it a request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from devsilo.protocol import ConfigError, SessionGrant
from devsilo.protocol._costs import CostTotals, totals_from_events
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._model import ModelFailure, Usage

log = structlog.get_logger("devsilo.harness.cost")


class Price(BaseModel):
    """USD per million tokens of each kind.

    ``cached_input`` is a prompt-cache read; ``cache_write`` a prompt-cache
    write (Anthropic bills it; when absent it costs as ordinary input).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    input: float = Field(ge=0, le=10_000)
    output: float = Field(ge=0, le=10_000)
    cached_input: float | None = Field(default=None, ge=0, le=10_000)
    cache_write: float | None = Field(default=None, ge=0, le=10_000)

    def usd(self, usage: Usage) -> float:
        """The dollars of one completion's ``usage`` (whose input counts cached parts too)."""
        cached = min(usage.cached_tokens, usage.input_tokens)
        written = min(usage.cache_write_tokens, usage.input_tokens - cached)
        fresh = usage.input_tokens - cached - written
        cached_rate = self.input if self.cached_input is None else self.cached_input
        write_rate = self.input if self.cache_write is None else self.cache_write
        return (fresh * self.input + cached * cached_rate + written * write_rate
                + usage.output_tokens * self.output) / 1_000_000


def _p(i: float, o: float, c: float | None = None, w: float | None = None) -> Price:
    return Price(input=i, output=o, cached_input=c, cache_write=w)


# List prices in USD per million tokens, standard tier, short context, looked up on 2026-11-29
# from the stored copies of Anthropic's pricing page (platform.claude.com/docs/en/about-claude/
# pricing; 5-minute cache writes) and of OpenAI's (developers.openai.com/api/docs/pricing, as
# read on 2026-11-05, and the GPT-6 / GPT-5.6 model pages). Long-context, batch and priority
# tiers are not modelled. Operators override or extend them with the ``prices`` option.
DEFAULT_PRICES: dict[str, Price] = {
    # Anthropic
    "claude-fable-5-1": _p(10, 50, 0.25, 12.5),
    "claude-mythos-5-1": _p(10, 50, 0.25, 12.5),
    "claude-fable-5": _p(10, 50, 1.0, 12.5),
    "claude-mythos-5": _p(10, 50, 1.0, 12.5),
    "claude-opus-5-5": _p(4, 20, 0.2, 5.0),
    "claude-opus-5": _p(5, 25, 0.5, 6.25),
    "claude-opus-4-8": _p(5, 25, 0.5, 6.25),
    "claude-opus-4-7": _p(5, 25, 0.5, 6.25),
    "claude-opus-4-6": _p(5, 25, 0.5, 6.25),
    "claude-opus-4-5": _p(5, 25, 0.5, 6.25),
    "claude-opus-4-1": _p(15, 75, 1.5, 18.75),
    "claude-opus-4": _p(15, 75, 1.5, 18.75),
    "claude-sonnet-5-5": _p(2, 10, 0.1, 2.5),
    "claude-sonnet-5": _p(2, 10, 0.2, 2.5),
    "claude-sonnet-4": _p(3, 15, 0.3, 3.75),  # 4, 4.5, 4.6
    "claude-3-7-sonnet": _p(3, 15, 0.3, 3.75),
    "claude-haiku-5-5": _p(0.1, 0.5, 0.01, 0.125),  # prompts up to 100k tokens
    "claude-haiku-4-5": _p(1, 5, 0.1, 1.25),
    "claude-3-5-haiku": _p(0.8, 4, 0.08, 1.0),
    "claude-3-haiku": _p(0.25, 1.25, 0.03, 0.30),
    # OpenAI
    "gpt-6-astra": _p(10, 50, 1.0, 12.5),
    "gpt-6.1-sol": _p(2, 10, 0.1, 2.5),
    "gpt-6-sol": _p(2, 10, 0.2, 2.5),
    "gpt-6-luna": _p(0.1, 0.5, 0.01, 0.125),
    "gpt-5.6-sol": _p(4, 20, 0.4),
    "gpt-5.6-terra": _p(2, 12, 0.2),
    "gpt-5.6-luna": _p(0.2, 1.2, 0.02),
    "gpt-5.5-pro": _p(30, 180),
    "gpt-5.5": _p(5, 30, 0.5),
    "gpt-5.4-pro": _p(30, 180),
    "gpt-5.4-mini": _p(0.75, 4.5, 0.075),
    "gpt-5.4-nano": _p(0.2, 1.25, 0.02),
    "gpt-5.4": _p(2.5, 15, 0.25),
    "gpt-5-mini": _p(0.25, 2, 0.025),
    "gpt-5-nano": _p(0.05, 0.4, 0.005),
    "gpt-5": _p(1.25, 10, 0.125),
    "gpt-4.1-mini": _p(0.4, 1.6, 0.1),
    "gpt-4.1-nano": _p(0.1, 0.4, 0.025),
    "gpt-4.1": _p(2, 8, 0.5),
    "gpt-4o-mini": _p(0.15, 0.6, 0.075),
    "gpt-4o": _p(2.5, 10, 1.25),
    "gpt-realtime-mini": _p(0.6, 2.4, 0.06),  # text tokens
    "gpt-realtime": _p(4, 16, 0.4),  # text tokens
    # The scripted mock and a local server cost nothing per token.
    "mock": _p(0, 0),
    "local:": _p(0, 0),
}


class PriceTable:
    """Prices by model name or prefix; the longest matching key wins."""

    def __init__(self, prices: Mapping[str, Price]) -> None:
        self._keys = sorted(prices, key=len, reverse=True)
        self._prices = dict(prices)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> PriceTable:
        """The defaults with the harness option ``prices`` merged over them."""
        raw = options.get("prices") or {}
        if not isinstance(raw, dict):
            raise ConfigError("harness option 'prices' must be an object of model name -> price")
        merged = dict(DEFAULT_PRICES)
        for name, value in raw.items():
            try:
                merged[str(name)] = Price.model_validate(value)
            except ValidationError as exc:
                raise ConfigError(f"harness option prices[{name!r}] is not valid: "
                                  f"{str(exc).splitlines()[0]}; give USD per million tokens as "
                                  "{input, output, cached_input, cache_write}") from None
        return cls(merged)

    def lookup(self, model: str) -> Price | None:
        """The price of ``model`` (``backend:name`` or ``name``), or None when none is known."""
        candidates = [model]
        if ":" in model:
            candidates.append(model.split(":", 1)[1])
        for name in candidates:
            for key in self._keys:
                if name.startswith(key):
                    return self._prices[key]
        return None


class QuotaSettings(BaseModel):
    """The operator's per-session limits (harness option ``quotas``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    tokens: int | None = Field(default=None, ge=0)
    usd: float | None = Field(default=None, ge=0)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> QuotaSettings:
        """Read ``options["quotas"]``; ConfigError naming the bad field."""
        try:
            return cls.model_validate(options.get("quotas") or {})
        except ValidationError as exc:
            raise ConfigError(f"harness option 'quotas' is not valid: {exc}") from None


@dataclass(frozen=True)
class Quota:
    """A session's effective limits and where each came from (for the error that names it)."""

    tokens: int | None = None
    usd: float | None = None
    tokens_source: str = ""
    usd_source: str = ""

    @classmethod
    def for_session(cls, grant: SessionGrant, operator: QuotaSettings) -> Quota:
        """The lower of the grant's and the operator's limit, for tokens and for dollars."""
        tokens, tokens_src = _lower(grant.quota_tokens, "the session grant's quota_tokens",
                                    operator.tokens, "the harness's quotas.tokens")
        usd, usd_src = _lower(grant.quota_usd, "the session grant's quota_usd",
                              operator.usd, "the harness's quotas.usd")
        return cls(None if tokens is None else int(tokens), usd, tokens_src, usd_src)


def _lower(a: float | None, a_src: str, b: float | None, b_src: str) -> tuple[float | None, str]:
    if a is None:
        return b, b_src if b is not None else ""
    if b is None or a <= b:
        return a, a_src
    return b, b_src


class QuotaExceeded(ModelFailure):
    """A quota stops the session before its next model request (exit code 3, as model failures).

    ``quota`` is ``"tokens"`` or ``"usd"``.
    """

    def __init__(self, quota: str, message: str) -> None:
        super().__init__(message)
        self.quota = quota


__all__ = ["DEFAULT_PRICES", "CostMeter", "CostTotals", "Price", "PriceTable", "Quota", "QuotaExceeded",
           "QuotaSettings", "totals_from_events"]


class CostMeter:
    """One session's accounting: checks quotas before requests, prices completions after them.

    ``totals.as_dict()`` is the session's cost on request; a gateway without
    the meter rebuilds the same from the events (``totals_from_events``).
    """

    def __init__(self, prices: PriceTable, quota: Quota, *, logger: Any = None) -> None:
        self.prices = prices
        self.quota = quota
        self.totals = CostTotals()
        self._warned: set[str] = set()
        self._log = logger or log

    def check(self, model: str) -> None:
        """Raise QuotaExceeded when the next request to ``model`` must not be sent."""
        q, used = self.quota, self.totals.total
        if q.tokens is not None and used.tokens >= q.tokens:
            raise QuotaExceeded("tokens", f"token quota reached: {used.tokens} tokens used of "
                                f"{q.tokens} allowed by {q.tokens_source}; the session stops")
        if q.usd is None:
            return
        if used.usd_known >= q.usd:
            raise QuotaExceeded("usd", f"dollar quota reached: ${used.usd_known:.4f} spent of "
                                f"${q.usd:.4f} allowed by {q.usd_source}; the session stops")
        if self.prices.lookup(model) is None:
            raise QuotaExceeded("usd", f"dollar quota cannot be enforced: no price is known for "
                                f"model {model} ({q.usd_source} is ${q.usd:.4f}); add it to the "
                                "harness option 'prices'")

    def record(self, model: str, agent: str, usage: Usage) -> dict[str, Any]:
        """Count one completion; return the data of its ``cost`` event."""
        price = self.prices.lookup(model)
        usd = None if price is None else price.usd(usage)
        self.totals.add(model, agent, usage.as_dict(), usd)
        data: dict[str, Any] = {"model": model, **usage.as_dict(),
                                "usd": None if usd is None else round(usd, 9),
                                "totals": self.totals.as_dict()}
        if price is None:
            data["price_unknown"] = True
            if model not in self._warned:
                self._warned.add(model)
                data["warning"] = (f"no price is known for model {model}: its dollars are unknown "
                                   "and not counted; add it to the harness option 'prices'")
                self._log.warning("price_unknown", model=model)
        return data

    def remaining(self) -> dict[str, Any]:
        """What the quotas still allow (None where there is no quota)."""
        used = self.totals.total
        return {"tokens": None if self.quota.tokens is None else max(self.quota.tokens - used.tokens, 0),
                "usd": None if self.quota.usd is None else max(self.quota.usd - used.usd_known, 0.0)}
