"""The tools a model is offered: name, description and JSON schema of the input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from devsilo.protocol import SANDBOX_TOOLS

EXIT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"message": {"type": "string", "description": "A short summary of what was done."}},
    "required": ["message"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class ToolSpec:
    """One tool as the model sees it; each backend renders it in its API's format."""

    name: str
    description: str
    input_schema: dict[str, Any]


def tool_spec(name: str) -> ToolSpec:
    """The spec of the harness tool ``name`` (sandbox tools from their input models)."""
    if name == "Exit":
        return ToolSpec("Exit", "End the session (headless runs) with a short summary.", EXIT_SCHEMA)
    model = SANDBOX_TOOLS.get(name)
    if model is None:
        raise KeyError(f"no spec for tool {name!r}")
    schema = model.model_json_schema()
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
    return ToolSpec(name, (model.__doc__ or name).strip(), schema)


def tool_specs(names: list[str]) -> list[ToolSpec]:
    """Specs of ``names``, in order."""
    return [tool_spec(n) for n in names]
