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

from ._compact import Compacted, Compactor, ContextSettings
from ._cost import CostMeter
from ._model import ModelBackend, ModelResponse, TextSink

Emit = Callable[..., Awaitable[int]]
"""``SessionEvents.emit(kind, data, agent=...)``."""


class ModelGate:
    """A session's model behind its policies.

    Before each request: compaction when the agent's conversation nears the
    model's window (its summarising request is checked and billed too), then
    the quota check (QuotaExceeded stops the session). After each completion:
    a ``cost`` event with its usage, dollars and the running totals.
    """

    def __init__(self, model: ModelBackend, meter: CostMeter, compactor: Compactor, emit: Emit, *,
                 on_compacted: Compacted | None = None) -> None:
        self.model = model
        self.meter = meter
        self.compactor = compactor
        self._emit = emit
        self.on_compacted = on_compacted
        """Set by the loop to journal the original messages of each compaction."""

    @classmethod
    def for_session(cls, model: ModelBackend, grant: SessionGrant, options: Mapping[str, Any],
                    emit: Emit, *, logger: Any = None) -> ModelGate:
        """The gate for a session under ``grant`` with the harness's ``options``."""
        return cls(model, CostMeter.for_session(grant, options, logger=logger or structlog.get_logger()),
                   Compactor(ContextSettings.from_options(options)), emit)

    @property
    def name(self) -> str:
        """The backend's name (e.g. ``anthropic:claude-x``)."""
        return self.model.name

    async def complete(self, messages: list[dict[str, Any]], tools: list[str], *, agent: str = "main",
                       on_text: TextSink | None = None) -> ModelResponse:
        """The model's next response to ``messages`` (which compaction may shorten in place)."""
        if self.compactor.needed(self.model.name, agent, messages):
            self.meter.check(self.model.name)
            done = await self.compactor.compact(self.model, agent, messages, tools, self.on_compacted)
            if done is not None:
                await self._emit("cost", {
                    **self.meter.record(self.model.name, agent, done.response.usage),
                    "purpose": "compaction",
                    "compaction": {"messages_replaced": done.replaced, "tokens_before": done.tokens_before,
                                   "tokens_after": done.tokens_after}}, agent=agent)
        self.meter.check(self.model.name)
        sent = len(messages)
        response = await self.model.complete(messages, tools, on_text=on_text)
        self.compactor.observe(agent, sent, response.usage.input_tokens, response.usage.output_tokens)
        await self._emit("cost", self.meter.record(self.model.name, agent, response.usage), agent=agent)
        return response

    async def aclose(self) -> None:
        """Close the backend."""
        await self.model.aclose()
