"""Choosing a session's model backend from its LLMChoice and the harness's options.

Harness options in config.json (every field optional)::

    "models": {
      "anthropic": {"api_key_env": "ANTHROPIC_API_KEY", "base_url": "...", "max_tokens": 8192,
                    "retry": {"attempts": 5, "base_delay_s": 1.0, "max_delay_s": 60.0}},
      "openai": {"api_key_file": "/path/to/key", "base_url": "..."},
      "openai-ws": {"api_key_env": "OPENAI_API_KEY", "base_url": "https://api.openai.com/v1"},
      "local": {"base_url": "http://127.0.0.1:8080/v1", "command": ["llama-server", "..."],
                "health_path": "/health", "start_timeout_s": 120}
    }

``openai-ws`` is the Realtime API over WebSocket (the SDK derives the
``wss://`` address from ``base_url``); ``local`` a local OpenAI-compatible
server, which needs no key unless ``api_key_env`` or ``api_key_file`` names
one, and which the harness starts from ``command`` when given.

A key comes from the harness's own environment (``api_key_env``) or a file
(``api_key_file``); it is never put in a message, event, journal or log.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from devsilo.protocol import ConfigError, LLMChoice
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._localserver import LocalServers
from ._model import ModelBackend, ModelFailure, ScriptedModel, UnavailableModel
from ._retry import RetryPolicy

# The provider backends import the official SDKs (seconds of CPU): only when a session uses them.

DEFAULT_KEY_ENV = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY",
                   "openai-ws": "OPENAI_API_KEY"}
DEFAULT_LOCAL_URL = "http://127.0.0.1:8080/v1"


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


class LocalSettings(ProviderSettings):
    """The local server's settings: a provider's, plus the command that starts it."""

    command: list[str] | None = Field(default=None, min_length=1)
    health_path: str | None = Field(default=None, pattern=r"^/[!-~]*$")
    start_timeout_s: float = Field(default=120.0, gt=0.0, le=3600.0)
    log_file: str | None = None


class ModelSettings(BaseModel):
    """The harness options' ``models`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    anthropic: ProviderSettings = ProviderSettings()
    openai: ProviderSettings = ProviderSettings()
    openai_ws: ProviderSettings = Field(default=ProviderSettings(), alias="openai-ws")
    local: LocalSettings = LocalSettings()

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


def make_model(llm: LLMChoice, options: dict[str, Any], *,
               local_servers: LocalServers | None = None) -> ModelBackend:
    """The backend a session asked for.

    A real backend that cannot be set up (no key) is returned as an
    UnavailableModel, so the session reports it as a model failure.
    ``local_servers`` holds the harness's local model server processes (a
    ``local`` backend with a ``command`` needs it).
    """
    if llm.backend == "mock":
        if not llm.script:
            raise ModelFailure("the mock model needs a script (--script FILE)")
        return ScriptedModel(llm.script)
    settings = ModelSettings.from_options(options)
    if llm.backend == "local":
        return _local_model(llm.model, settings.local, local_servers)
    providers = {"anthropic": settings.anthropic, "openai": settings.openai, "openai-ws": settings.openai_ws}
    if llm.backend not in providers:
        raise ModelFailure(f"LLM backend {llm.backend!r} is not built; use --llm anthropic, openai, "
                           "openai-ws, local or mock")
    provider = providers[llm.backend]
    policy = RetryPolicy(provider.retry.attempts, provider.retry.base_delay_s, provider.retry.max_delay_s)
    try:
        key = read_api_key(llm.backend, provider)
    except ModelFailure as exc:
        return UnavailableModel(f"{llm.backend}:{llm.model}", str(exc))
    if llm.backend == "anthropic":
        from ._anthropic import AnthropicModel

        return AnthropicModel(llm.model, key, base_url=provider.base_url, max_tokens=provider.max_tokens,
                              policy=policy, timeout_s=provider.timeout_s)
    if llm.backend == "openai-ws":
        from ._realtime import OpenAIRealtimeModel

        return OpenAIRealtimeModel(llm.model, key, base_url=provider.base_url,
                                   max_output_tokens=provider.max_tokens, policy=policy,
                                   timeout_s=provider.timeout_s)
    from ._openai import OpenAIResponsesModel

    return OpenAIResponsesModel(llm.model, key, base_url=provider.base_url,
                                max_output_tokens=provider.max_tokens, policy=policy,
                                timeout_s=provider.timeout_s)


def _local_model(model: str, local: LocalSettings, servers: LocalServers | None) -> ModelBackend:
    policy = RetryPolicy(local.retry.attempts, local.retry.base_delay_s, local.retry.max_delay_s)
    base_url = local.base_url or DEFAULT_LOCAL_URL
    key = "none"  # local servers usually want none; the SDK insists on some string
    if local.api_key_env or local.api_key_file:
        try:
            key = read_api_key("local", local)
        except ModelFailure as exc:
            return UnavailableModel(f"local:{model}", str(exc))
    server = None
    if local.command:
        if servers is None:
            return UnavailableModel(f"local:{model}", "this harness cannot start local model servers")
        server = servers.get(local.command, base_url, health_path=local.health_path,
                             start_timeout_s=local.start_timeout_s, log_path=local.log_file)
    from ._local import LocalChatModel

    return LocalChatModel(model, base_url=base_url, api_key=key, server=server,
                          max_tokens=local.max_tokens, policy=policy, timeout_s=local.timeout_s)
