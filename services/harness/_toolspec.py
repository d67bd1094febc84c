"""The tools a model is offered: name, description and JSON schema of the input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from devsilo.protocol import HARNESS_TOOLS, SANDBOX_TOOLS


@dataclass(frozen=True)
class ToolSpec:
    """One tool as the model sees it; each backend renders it in its API's format."""

    name: str
    description: str
    input_schema: dict[str, Any]


def tool_spec(name: str) -> ToolSpec:
    """The spec of the tool ``name``, from its input model."""
    model = SANDBOX_TOOLS.get(name) or HARNESS_TOOLS.get(name)
    if model is None:
        raise KeyError(f"no spec for tool {name!r}")
    schema = model.model_json_schema()
    _drop_titles(schema)
    return ToolSpec(name, " ".join((model.__doc__ or name).split()), schema)


def _drop_titles(node: Any) -> None:
    """Pydantic's generated titles only repeat the names; models need not read them."""
    if isinstance(node, dict):
        title = node.get("title")
        if isinstance(title, str):
            del node["title"]
        for value in node.values():
            _drop_titles(value)
    elif isinstance(node, list):
        for value in node:
            _drop_titles(value)


def tool_specs(names: list[str]) -> list[ToolSpec]:
    """Specs of ``names``, in order."""
    return [tool_spec(n) for n in names]
