"""Model backends' common shape, and the scripted mock model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from devsilo.protocol import SiloError
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ModelFailure(SiloError):
    """The model could not produce a response; the session ends with exit code 3."""


@dataclass(frozen=True)
class ToolUse:
    """One tool call the model asked for."""

    id: str
    name: str
    input: dict[str, Any]


@dataclass(frozen=True)
class ModelResponse:
    """One completion: text, tool calls, and token usage."""

    text: str
    tool_calls: tuple[ToolUse, ...]
    usage: dict[str, int] = field(default_factory=dict)


class ModelBackend(Protocol):
    """What the agent loop needs of a model."""

    name: str

    async def complete(self, messages: list[dict[str, Any]], tools: list[str]) -> ModelResponse:
        """Return the model's next response to ``messages`` with ``tools`` available."""
        ...


class _ScriptCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    input: dict[str, Any] = Field(default_factory=dict)


class _ScriptResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")
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
    """

    name = "mock"

    def __init__(self, script_text: str) -> None:
        try:
            self._script = _Script.model_validate(json.loads(script_text))
        except (ValueError, ValidationError) as exc:
            raise ModelFailure(f"mock script is not valid: {str(exc).splitlines()[0]}") from None
        self._next = 0

    async def complete(self, messages: list[dict[str, Any]], tools: list[str]) -> ModelResponse:
        """Return the next scripted response; ModelFailure when the script is used up."""
        if self._next >= len(self._script.responses):
            raise ModelFailure(
                f"mock script exhausted after {len(self._script.responses)} responses"
            )
        step = self._script.responses[self._next]
        n = self._next
        self._next += 1
        calls = tuple(
            ToolUse(id=f"call_{n}_{i}", name=c.name, input=dict(c.input))
            for i, c in enumerate(step.tool_calls)
        )
        prompt_tokens = sum(len(json.dumps(m)) // 4 for m in messages)
        out_tokens = (len(step.text) + len(json.dumps([c.input for c in step.tool_calls]))) // 4
        return ModelResponse(step.text, calls, {"input_tokens": prompt_tokens, "output_tokens": out_tokens})
