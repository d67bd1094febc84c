"""Choosing a session's model backend from its LLMChoice and the harness's options.

Harness options in config.json (every field optional)::

    "models": {
      "anthropic": {"api_key_env": "ANTHROPIC_API_KEY", "base_url": "...", "max_tokens": 8192,
                    "retry": {"attempts": 5, "base_delay_s": 1.0, "max_delay_s": 60.0}},
      "openai": {"api_key_file": "/path/to/key", "base_url": "..."}
    }

A key comes from the harness's own environment (``api_key_env``) or a file
(``api_key_file``); it is never put in a message, event, journal or log.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from devsilo.protocol import ConfigError, LLMChoice
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._anthropic import AnthropicModel
from ._model import ModelBackend, ModelFailure, ScriptedModel, UnavailableModel
from ._openai import OpenAIResponsesModel
from ._retry import RetryPolicy

DEFAULT_KEY_ENV = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY"}


class RetrySettings(BaseModel):
    """How model requests are retried."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    attempts: int = Field(default=5, ge=1, le=20)
    base_delay_s: float = Field(default=1.0, ge=0.0, le=60.0)
    max_delay_s: float = Field(default=60.0, ge=0.0, le=600.0)


class ProviderSettings(BaseModel):
    """One provider's settings in the harness options' ``models``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    api_key_env: str | None = None
    api_key_file: str | None = None
    base_url: str | None = None
    max_tokens: int = Field(default=8192, ge=1, le=1_000_000)
    timeout_s: float = Field(default=600.0, gt=0.0)
    retry: RetrySettings = RetrySettings()


class ModelSettings(BaseModel):
    """The harness options' ``models`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    anthropic: ProviderSettings = ProviderSettings()
    openai: ProviderSettings = ProviderSettings()

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> ModelSettings:
        """Read ``options["models"]``; ConfigError naming the bad field."""
        try:
            return cls.model_validate(options.get("models") or {})
        except ValidationError as exc:
            raise ConfigError(f"harness option 'models' is not valid: {exc}") from None


def read_api_key(provider: str, settings: ProviderSettings) -> str:
    """The provider's key from the configured file or environment variable.

    Raises ModelFailure saying where the key was looked for (never its value).
    """
    if settings.api_key_file:
        path = Path(settings.api_key_file).expanduser()
        try:
            key = path.read_text().strip()
        except OSError as exc:
            raise ModelFailure(f"no {provider} API key: cannot read api_key_file {path}: "
                               f"{exc.strerror}") from None
        if not key:
            raise ModelFailure(f"no {provider} API key: api_key_file {path} is empty")
        return key
    env = settings.api_key_env or DEFAULT_KEY_ENV[provider]
    key = os.environ.get(env, "").strip()
    if not key:
        raise ModelFailure(f"no {provider} API key: the harness's environment variable {env} is not "
                           f"set; set it or name an api_key_file in the harness options' "
                           f"models.{provider}")
    return key


def make_model(llm: LLMChoice, options: dict[str, Any]) -> ModelBackend:
    """The backend a session asked for.

    A real backend that cannot be set up (no key) is returned as an
    UnavailableModel, so the session reports it as a model failure.
    """
    if llm.backend == "mock":
        if not llm.script:
            raise ModelFailure("the mock model needs a script (--script FILE)")
        return ScriptedModel(llm.script)
    if llm.backend not in ("anthropic", "openai"):
        raise ModelFailure(f"LLM backend {llm.backend!r} is not built yet; "
                           "use --llm anthropic, openai or mock")
    settings = ModelSettings.from_options(options)
    provider = settings.anthropic if llm.backend == "anthropic" else settings.openai
    policy = RetryPolicy(provider.retry.attempts, provider.retry.base_delay_s, provider.retry.max_delay_s)
    try:
        key = read_api_key(llm.backend, provider)
    except ModelFailure as exc:
        return UnavailableModel(f"{llm.backend}:{llm.model}", str(exc))
    if llm.backend == "anthropic":
        return AnthropicModel(llm.model, key, base_url=provider.base_url, max_tokens=provider.max_tokens,
                              policy=policy, timeout_s=provider.timeout_s)
    return OpenAIResponsesModel(llm.model, key, base_url=provider.base_url,
                                max_output_tokens=provider.max_tokens, policy=policy,
                                timeout_s=provider.timeout_s)
