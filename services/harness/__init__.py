"""devsilo's harness: drives the models and holds nothing else of value."""

from ._model import ModelBackend, ModelFailure, ModelResponse, ScriptedModel, ToolUse
from ._service import serve
from ._session import SessionEvents, SessionRunner

__all__ = [
           "ModelBackend",
           "ModelFailure",
           "ModelResponse",
           "ScriptedModel",
           "SessionEvents",
           "SessionRunner",
           "ToolUse",
           "serve",
]
