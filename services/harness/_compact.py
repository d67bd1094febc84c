"""Context compaction: when a conversation nears the model's window, summarise its older part.

Harness options in config.json (every field optional)::

    "context": {"windows": {"claude-": 200000, "local:qwen": 32768},
                "default_window": 128000, "threshold": 0.8, "min_messages": 4}

``windows`` maps a model name or prefix (longest wins, tried on
``backend:name`` and then ``name``) to its context window in tokens, merged
over the defaults below. A conversation is compacted before a request when
its estimated size reaches ``threshold`` of the window.

What is kept: the leading system messages, and the most recent exchange (the
last assistant message with its tool results, and the user message right
before it). Everything between is replaced by the model's own summary of it.
The cut always falls before a user or assistant message, so a tool call is
never separated from its result. The messages replaced are handed to a
callback (the journal keeps them).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from devsilo.protocol import ConfigError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._model import ModelBackend, ModelResponse

DEFAULT_WINDOWS: dict[str, int] = {
    "claude-": 200_000,
    "gpt-6": 1_050_000,
    "gpt-5.6": 1_050_000,
    "gpt-5.5": 1_050_000,
    "gpt-5.4": 1_050_000,
    "gpt-5": 400_000,
    "gpt-4.1": 1_047_576,
    "gpt-4o": 128_000,
    "gpt-realtime": 32_000,
}
SUMMARY_INSTRUCTION = (
    "The conversation so far is about to be replaced by a summary, because it is getting too long "
    "for your context window. Write that summary now, as plain text and without calling any tool: "
    "the user's task and every instruction they gave, what has been done (files changed, commands "
    "run and what they showed), what was decided and why, what failed, and what remains to do. "
    "Keep exact file paths, names and error messages. You will continue the task from it."
)
SUMMARY_PREFIX = "[Summary of the earlier conversation, which was compacted to fit the context window]\n"
CONTINUE_ACK = "Understood; continuing from that summary."

Compacted = Callable[[list[dict[str, Any]], list[dict[str, Any]], str], Awaitable[None]]
"""Receives (original messages, the messages replacing them, the summary) after a compaction."""


class ContextSettings(BaseModel):
    """The harness options' ``context`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    windows: dict[str, int] = Field(default_factory=dict)
    default_window: int = Field(default=128_000, ge=256)
    threshold: float = Field(default=0.8, gt=0.0, le=1.0)
    min_messages: int = Field(default=2, ge=1, description="fewest messages worth summarising")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> ContextSettings:
        """Read ``options["context"]``; ConfigError naming the bad field."""
        try:
            return cls.model_validate(options.get("context") or {})
        except ValidationError as exc:
            raise ConfigError(f"harness option 'context' is not valid: {exc}") from None

    def window(self, model: str) -> int:
        """The context window of ``model`` in tokens."""
        table = {**DEFAULT_WINDOWS, **self.windows}
        keys = sorted(table, key=len, reverse=True)
        names = [model] + ([model.split(":", 1)[1]] if ":" in model else [])
        for name in names:
            for key in keys:
                if name.startswith(key):
                    return table[key]
        return self.default_window


def estimate_tokens(messages: list[dict[str, Any]]) -> int:
    """A rough token count of ``messages`` (about four characters a token)."""
    return sum(len(json.dumps(m, ensure_ascii=False)) for m in messages) // 4 + 1


@dataclass
class _LastRequest:
    sent: int
    """How many messages that request carried."""
    tokens: int
    """Its input plus output tokens, as the provider counted them."""


@dataclass(frozen=True)
class Compaction:
    """What one compaction did."""

    replaced: int
    """How many messages the summary replaced."""
    tokens_before: int
    tokens_after: int
    response: ModelResponse
    """The summarising completion (its usage is billed like any other)."""


def split_for_compaction(messages: list[dict[str, Any]]) -> tuple[int, int]:
    """(start, end) of the part to summarise: after the leading system messages, before the
    most recent exchange. ``start == end`` when there is nothing to summarise."""
    start = 0
    while start < len(messages) and messages[start]["role"] == "system":
        start += 1
    end = len(messages)
    last_assistant = max((i for i in range(start, len(messages)) if messages[i]["role"] == "assistant"),
                         default=None)
    if last_assistant is not None:
        end = last_assistant
        if end - 1 >= start and messages[end - 1]["role"] == "user":
            end -= 1
    else:
        last_user = max((i for i in range(start, len(messages)) if messages[i]["role"] == "user"),
                        default=start)
        end = last_user
    # The kept part must start with a user or assistant message, never a tool result.
    while start < end < len(messages) and messages[end]["role"] == "tool":
        end -= 1
    return start, max(end, start)


class Compactor:
    """Decides when a conversation is compacted, and compacts it (one per session)."""

    def __init__(self, settings: ContextSettings) -> None:
        self.settings = settings
        self._last: dict[str, _LastRequest] = {}

    def observe(self, agent: str, sent: int, input_tokens: int, output_tokens: int) -> None:
        """Note what the provider counted for a request of ``agent`` that carried ``sent`` messages."""
        self._last[agent] = _LastRequest(sent, input_tokens + output_tokens)

    def estimate(self, agent: str, messages: list[dict[str, Any]]) -> int:
        """Tokens the next request of ``agent`` would carry: the last usage plus what came after it
        (an estimate of the whole conversation when there is no usage to go on)."""
        last = self._last.get(agent)
        if last is None or last.tokens <= 0 or last.sent > len(messages):
            return estimate_tokens(messages)
        return last.tokens + (estimate_tokens(messages[last.sent + 1:]) if len(messages) > last.sent + 1 else 0)

    def needed(self, model: str, agent: str, messages: list[dict[str, Any]]) -> bool:
        """Whether the conversation should be compacted before its next request to ``model``."""
        return self.estimate(agent, messages) >= self.settings.threshold * self.settings.window(model)

    async def compact(self, model: ModelBackend, agent: str, messages: list[dict[str, Any]],
                      tools: list[str], on_compacted: Compacted | None = None) -> Compaction | None:
        """Replace the older part of ``messages`` (in place) by the model's summary of it.

        None (and ``messages`` unchanged) when there is too little to summarise or the model
        wrote no summary. The summarising request carries the same tools (some APIs refuse
        tool calls in a conversation without them) and is told not to call any.
        """
        start, end = split_for_compaction(messages)
        # A previous summary (and its acknowledgement) alone is not worth summarising again.
        if sum(1 for m in messages[start:end] if not _from_compaction(m)) < self.settings.min_messages:
            return None
        before = self.estimate(agent, messages)
        request = [*messages[:end], {"role": "user", "content": SUMMARY_INSTRUCTION}]
        response = await model.complete(request, tools)
        summary = response.text.strip()
        if not summary:
            return Compaction(0, before, before, response)
        kept = messages[end:]
        replacement: list[dict[str, Any]] = [{"role": "user", "content": SUMMARY_PREFIX + summary}]
        if kept and kept[0]["role"] == "user":
            replacement.append({"role": "assistant", "content": CONTINUE_ACK, "tool_calls": []})
        original = list(messages)
        messages[start:end] = replacement
        self._last.pop(agent, None)
        if on_compacted is not None:
            await on_compacted(original, list(messages), summary)
        return Compaction(end - start, before, estimate_tokens(messages), response)


def _from_compaction(message: dict[str, Any]) -> bool:
    content = message.get("content")
    return isinstance(content, str) and (
        (message["role"] == "user" and content.startswith(SUMMARY_PREFIX))
        or (message["role"] == "assistant" and content == CONTINUE_ACK and not message.get("tool_calls")))
