"""Model backends' common shape, and the scripted mock model."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

from devsilo.protocol import SiloError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

ASKING_AGENT: ContextVar[str] = ContextVar("asking_agent", default="main")
"""The agent whose request is being made (``main``, ``a1``, ...): the agent loop sets it in each
agent's task. Only the mock model reads it, to pick that agent's scripted responses."""

TextSink = Callable[[str], Awaitable[None]]
"""Receives a completion's text deltas as they arrive (a retried attempt streams again)."""


async def stream_words(text: str, on_text: TextSink) -> None:
    """Give ``text`` to ``on_text`` word by word (with the space after each), as the mock streams."""
    for delta in re.findall(r"\S*\s*", text):
        if delta:
            await on_text(delta)


class ModelFailure(SiloError):
    """The model could not produce a response; the session ends with exit code 3."""


@dataclass(frozen=True)
class ToolUse:
    """One tool call the model asked for."""

    id: str
    name: str
    input: dict[str, Any]
    input_error: str | None = None
    """Set when the model's arguments were not a JSON object: the call gets an error result
    saying so (and ``input`` is empty), so the model can try again."""


def tool_use_from_json(call_id: str, name: str, raw: str) -> ToolUse:
    """A tool call from a model's argument text: its input, or ``input_error`` when the text
    is not a JSON object (the model then gets an error result and may try again)."""
    try:
        data = json.loads(raw or "{}")
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return ToolUse(id=call_id, name=name, input={},
                       input_error=f"the arguments were not a JSON object: {raw[:200]!r}")
    return ToolUse(id=call_id, name=name, input=data)


@dataclass(frozen=True)
class Usage:
    """Tokens one completion used, the same way for every backend.

    ``input_tokens`` counts the whole prompt, cached parts included;
    ``cached_tokens`` is the part read from the provider's prompt cache and
    ``cache_write_tokens`` the part written to it (Anthropic reports writes;
    OpenAI does not).
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counts as a plain dict, for events."""
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "cached_tokens": self.cached_tokens, "cache_write_tokens": self.cache_write_tokens}


@dataclass(frozen=True)
class ModelResponse:
    """One completion: text, tool calls, and token usage."""

    text: str
    tool_calls: tuple[ToolUse, ...]
    usage: Usage = field(default_factory=Usage)


class ModelBackend(Protocol):
    """What the agent loop needs of a model.

    ``messages`` is the harness's own conversation format, which each backend
    converts to its API's: ``{"role": "system"|"user", "content": str}``,
    ``{"role": "assistant", "content": str, "tool_calls": [{"id", "name", "input"}]}``
    and ``{"role": "tool", "tool_call_id": str, "content": str, "is_error": bool}``.
    """

    name: str

    async def complete(self, messages: list[dict[str, Any]], tools: list[str], *,
                       on_text: TextSink | None = None) -> ModelResponse:
        """Return the model's next response to ``messages`` with ``tools`` available.

        ``on_text`` gets the response's text as deltas while it streams.
        """
        ...

    async def aclose(self) -> None:
        """Release connections; the backend is not used afterwards."""
        ...


class UnavailableModel:
    """A backend that could not be set up (e.g. no API key): every request fails with why.

    The session still starts, so a headless run ends the way model failures
    do (an error event, exit code 3) rather than as a refused start.
    """

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self._reason = reason

    async def complete(self, messages: list[dict[str, Any]], tools: list[str], *,
                       on_text: TextSink | None = None) -> ModelResponse:
        """Raise ModelFailure with the reason the backend is unavailable."""
        raise ModelFailure(self._reason)

    async def aclose(self) -> None:
        """Nothing to release."""


class _ScriptCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    input: dict[str, Any] = Field(default_factory=dict)
    arguments: str | None = Field(default=None, max_length=256 * 1024)
    """Raw argument text, as a model sends it (instead of ``input``): text that is not a JSON
    object becomes the call's ``input_error``, as with the real backends."""

    def to_use(self, call_id: str) -> ToolUse:
        if self.arguments is None:
            return ToolUse(id=call_id, name=self.name, input=dict(self.input))
        return tool_use_from_json(call_id, self.name, self.arguments)


class _ScriptResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")
    agent: str | None = Field(default=None, max_length=64)
    text: str = ""
    tool_calls: list[_ScriptCall] = Field(default_factory=list)


class _Script(BaseModel):
    model_config = ConfigDict(extra="forbid")
    responses: list[_ScriptResponse] = Field(min_length=1, max_length=10_000)


class ScriptedModel:
    """The mock model: answers each request with the script's next response.

    Script (JSON)::

        {"responses": [{"text": "...", "tool_calls": [{"name": "Bash",
                        "input": {"command": "ls"}}]}, ...]}

    With subagents, several agents ask at once. A response may name the agent it is for
    (``"agent": "main"``, ``"a1"``, ...; subagent ids count up in the order they are
    started); a request (from the agent in :data:`ASKING_AGENT`) gets the first response
    not yet used that names that agent or names none. Unnamed responses therefore go in
    the order requests arrive, which is only predictable with one agent at a time.
    """

    name = "mock"

    def __init__(self, script_text: str) -> None:
        try:
            self._script = _Script.model_validate(json.loads(script_text))
        except (ValueError, ValidationError) as exc:
            raise ModelFailure(f"mock script is not valid: {str(exc).splitlines()[0]}") from None
        self._used = [False] * len(self._script.responses)

    def _take(self) -> int:
        agent = ASKING_AGENT.get()
        for n, step in enumerate(self._script.responses):
            if not self._used[n] and step.agent in (None, agent):
                self._used[n] = True
                return n
        left = self._used.count(False)
        who = "" if agent == "main" else f" for agent {agent}"
        raise ModelFailure(f"mock script exhausted{who} after {len(self._script.responses)} responses"
                           + (f" ({left} left for other agents)" if left else ""))

    def resume_after(self, agents: Sequence[str]) -> None:
        """Go on after the responses a session's journal records, one per entry of ``agents`` (the
        agent each went to, in order): each is taken as that agent's request took it, so every
        agent goes on with its own next response (exact for responses that name their agent)."""
        for agent in agents:
            token = ASKING_AGENT.set(agent)
            try:
                self._take()
            except ModelFailure:
                pass  # a journal longer than the script: the next request says it is used up
            finally:
                ASKING_AGENT.reset(token)

    async def complete(self, messages: list[dict[str, Any]], tools: list[str], *,
                       on_text: TextSink | None = None) -> ModelResponse:
        """Return the next scripted response (its text streamed word by word to ``on_text``);
        ModelFailure when the script is used up."""
        n = self._take()
        step = self._script.responses[n]
        calls = tuple(c.to_use(f"call_{n}_{i}") for i, c in enumerate(step.tool_calls))
        if on_text is not None:
            await stream_words(step.text, on_text)
        prompt_tokens = sum(len(json.dumps(m)) // 4 for m in messages)
        out_tokens = (len(step.text) + len(json.dumps([c.input for c in step.tool_calls]))) // 4
        return ModelResponse(step.text, calls, Usage(input_tokens=prompt_tokens, output_tokens=out_tokens))

    async def aclose(self) -> None:
        """Nothing to release."""
