"""What runs around every model request of a session: compaction, the quota check, the cost event.

The agent loop calls ``ModelGate.complete`` where it would call the backend;
every agent of the session (the main one and subagents) goes through the same
gate, so quotas and totals cover them all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog
from devsilo.protocol import SessionGrant
from prometheus_client import CollectorRegistry, Counter

from ._compact import Compacted, Compactor, ContextSettings
from ._cost import CostMeter, PriceTable, Quota, QuotaExceeded, QuotaSettings
from ._model import ModelBackend, ModelResponse, TextSink, Usage

Emit = Callable[..., Awaitable[int]]
"""``SessionEvents.emit(kind, data, agent=...)``."""


class ModelMetrics:
    """Model use across the harness's sessions; labels are the backend kind, never a session."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.tokens = Counter("silo_model_tokens_total", "Tokens of model completions, by backend and kind.",
                              ["backend", "kind"], registry=registry)
        self.usd = Counter("silo_model_cost_usd_total", "Dollars of priced model completions, by backend.",
                           ["backend"], registry=registry)
        self.unpriced = Counter("silo_model_unpriced_completions_total",
                                "Completions of models without a price, by backend.", ["backend"],
                                registry=registry)
        self.quota_stops = Counter("silo_quota_stops_total", "Sessions a quota stopped, by quota.",
                                   ["quota"], registry=registry)
        for quota in ("tokens", "usd"):  # zeros on the dashboard, not gaps
            self.quota_stops.labels(quota=quota)
        self.compactions = Counter("silo_context_compactions_total", "Conversations compacted, by backend.",
                                   ["backend"], registry=registry)

    def completion(self, backend: str, usage: Usage, usd: float | None) -> None:
        """Count one completion."""
        for kind, n in usage.as_dict().items():
            if n:
                self.tokens.labels(backend=backend, kind=kind.removesuffix("_tokens")).inc(n)
        unpriced = self.unpriced.labels(backend=backend)  # a backend's zero shows once it has run
        if usd is None:
            unpriced.inc()
        else:
            self.usd.labels(backend=backend).inc(usd)


class ModelPolicy:
    """The harness's model policies, read once from its options (a bad option fails the start):
    prices, operator quotas, context windows, and the metrics they feed."""

    def __init__(self, prices: PriceTable, quotas: QuotaSettings, context: ContextSettings,
                 metrics: ModelMetrics | None = None) -> None:
        self.prices = prices
        self.quotas = quotas
        self.context = context
        self.metrics = metrics

    @classmethod
    def from_options(cls, options: Mapping[str, Any], registry: CollectorRegistry | None = None) -> ModelPolicy:
        """The policy of harness ``options``; ConfigError naming a bad option."""
        return cls(PriceTable.from_options(options), QuotaSettings.from_options(options),
                   ContextSettings.from_options(options), ModelMetrics(registry) if registry else None)

    def gate(self, model: ModelBackend, grant: SessionGrant, emit: Emit, *, logger: Any = None) -> ModelGate:
        """The gate of one session under ``grant``."""
        meter = CostMeter(self.prices, Quota.for_session(grant, self.quotas),
                          logger=logger or structlog.get_logger())
        return ModelGate(model, meter, Compactor(self.context), emit, metrics=self.metrics)


class ModelGate:
    """A session's model behind its policies.

    Before each request: compaction when the agent's conversation nears the
    model's window (its summarising request is checked and billed too), then
    the quota check (QuotaExceeded stops the session). After each completion:
    a ``cost`` event with its usage, dollars and the running totals.
    """

    def __init__(self, model: ModelBackend, meter: CostMeter, compactor: Compactor, emit: Emit, *,
                 on_compacted: Compacted | None = None, metrics: ModelMetrics | None = None) -> None:
        self.model = model
        self.meter = meter
        self.compactor = compactor
        self._emit = emit
        self._metrics = metrics
        self._backend = model.name.split(":", 1)[0]
        self.on_compacted = on_compacted
        """Set by the loop to journal the original messages of each compaction."""

    @property
    def name(self) -> str:
        """The backend's name (e.g. ``anthropic:claude-x``)."""
        return self.model.name

    async def complete(self, messages: list[dict[str, Any]], tools: list[str], *, agent: str = "main",
                       on_text: TextSink | None = None) -> ModelResponse:
        """The model's next response to ``messages`` (which compaction may shorten in place)."""
        if self.compactor.needed(self.model.name, agent, messages):
            self._check()
            done = await self.compactor.compact(self.model, agent, messages, tools, self.on_compacted)
            if done is not None:
                if self._metrics is not None and done.replaced:
                    self._metrics.compactions.labels(backend=self._backend).inc()
                await self._emit("cost", {
                    **self._record(agent, done.response.usage), "purpose": "compaction",
                    "compaction": {"messages_replaced": done.replaced, "tokens_before": done.tokens_before,
                                   "tokens_after": done.tokens_after}}, agent=agent)
        self._check()
        sent = len(messages)
        response = await self.model.complete(messages, tools, on_text=on_text)
        self.compactor.observe(agent, sent, response.usage.input_tokens, response.usage.output_tokens)
        await self._emit("cost", self._record(agent, response.usage), agent=agent)
        return response

    def _check(self) -> None:
        try:
            self.meter.check(self.model.name)
        except QuotaExceeded as exc:
            if self._metrics is not None:
                self._metrics.quota_stops.labels(quota=exc.quota).inc()
            raise

    def _record(self, agent: str, usage: Usage) -> dict[str, Any]:
        data = self.meter.record(self.model.name, agent, usage)
        if self._metrics is not None:
            self._metrics.completion(self._backend, usage, data["usd"])
        return data

    async def aclose(self) -> None:
        """Close the backend."""
        await self.model.aclose()
