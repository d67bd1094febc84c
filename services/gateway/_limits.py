"""The operator's limits on what a user's session grant may hold.

The gateway signs every session grant, so it is where a user's request meets
the operator's policy. Gateway option ``limits`` in config.json::

    "limits": {
      "default": {"sandboxes": ["bwrap", "gvisor"], "allow_domains": ["*.pypi.org", "github.com"],
                  "quota_usd": 20, "max_sandboxes": 4},
      "users": {"alice": {"allow_domains": ["*"], "credentials": ["github"], "quota_usd": 100}}
    }

Each field left out of a user's entry comes from ``default``; one left out of
``default`` means no limit at this layer (executor and egress apply their own
operator limits too, so nothing here can widen what they allow). A request
beyond a limit is refused with a message naming the limit, never silently
narrowed — except quotas, where the request gets the smaller of what it asked
for and the ceiling, and a request that names no quota gets the ceiling.
"""

from __future__ import annotations

import posixpath
from typing import Any

from devsilo.protocol import ConfigError, GrantError
from devsilo.protocol._messages import LLMBackend, SandboxBackend
from devsilo.protocol._names import AllowList, BadHost
from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_GRANT_LIFETIME_S = 24 * 3600.0
ANY_DOMAIN = "*"
"""In ``allow_domains`` limits: the user may ask for any domain."""


class LimitError(GrantError):
    """A session request goes beyond the operator's limits for its user."""


class UserLimits(BaseModel):
    """One user's limits; ``None`` means: from ``default``, or unlimited there."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sandboxes: tuple[SandboxBackend, ...] | None = None
    llm: tuple[LLMBackend, ...] | None = None
    allow_domains: tuple[str, ...] | None = None
    """Domains (``name`` or ``*.name``) a grant may allow; ``["*"]`` for any."""
    allow_read: tuple[str, ...] | None = None
    """Absolute directories below which a grant may allow reading."""
    credentials: tuple[str, ...] | None = None
    max_sandboxes: int | None = Field(default=None, ge=0)
    """Sandboxes (sessions and shells) the user may hold at once across the pool."""
    quota_tokens: int | None = Field(default=None, ge=0)
    quota_usd: float | None = Field(default=None, ge=0)
    grant_lifetime_s: float | None = Field(default=None, gt=0, le=30 * 24 * 3600.0)


class Limits(BaseModel):
    """The gateway option ``limits``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    default: UserLimits = UserLimits()
    users: dict[str, UserLimits] = Field(default_factory=dict)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Limits:
        """Read ``options["limits"]``; ConfigError naming what is wrong."""
        try:
            limits = cls.model_validate(options.get("limits") or {})
        except ValidationError as exc:
            raise ConfigError(f"gateway option 'limits' is not valid: {exc}") from None
        for who, lim in [("default", limits.default), *limits.users.items()]:
            for entry in lim.allow_domains or ():
                if entry != ANY_DOMAIN:
                    try:
                        AllowList([entry])
                    except BadHost as exc:
                        raise ConfigError(f"gateway limits for {who}: allow_domains: {exc}") from None
            for path in lim.allow_read or ():
                if not posixpath.isabs(path):
                    raise ConfigError(f"gateway limits for {who}: allow_read entries must be absolute: {path!r}")
        return limits

    def for_user(self, user: str) -> UserLimits:
        """The user's limits with ``default`` filling what the user's entry leaves out."""
        own = self.users.get(user)
        if own is None:
            return self.default
        merged = self.default.model_dump()
        merged.update({k: v for k, v in own.model_dump().items() if v is not None})
        return UserLimits.model_validate(merged)


def _domain_within(requested: str, permitted: AllowList) -> bool:
    """Whether every host the (normalised) entry ``requested`` allows is one ``permitted`` allows."""
    if not requested.startswith("*."):
        return permitted.allows(requested)
    base = requested[2:]
    # *.x reaches every name below x: only a wildcard at x or above covers all of them.
    return any(entry.startswith("*.") and (base == entry[2:] or base.endswith("." + entry[2:]))
               for entry in permitted.entries())


def check_request(limits: UserLimits, *, user: str, sandbox: str, llm: str | None,
                  allow_domains: tuple[str, ...], allow_read: tuple[str, ...], credentials: tuple[str, ...],
                  quota_tokens: int | None, quota_usd: float | None, running: int) -> dict[str, Any]:
    """The grant fields for a request within ``limits``; LimitError naming the first limit it breaks.

    ``running`` is how many sandboxes the user holds now; ``llm`` is None for a shell. Returns ``allow_domains``
    normalised, and the quotas and lifetime to put in the grant.
    """
    if limits.max_sandboxes is not None and running >= limits.max_sandboxes:
        raise LimitError(f"user {user} may hold {limits.max_sandboxes} sandboxes at once and holds {running}")
    if limits.sandboxes is not None and sandbox not in limits.sandboxes:
        raise LimitError(f"user {user} may not use the {sandbox} sandbox (allowed: "
                         f"{', '.join(limits.sandboxes) or 'none'})")
    if limits.llm is not None and llm is not None and llm not in limits.llm:
        raise LimitError(f"user {user} may not use the {llm} model backend (allowed: "
                         f"{', '.join(limits.llm) or 'none'})")
    try:
        normalised = AllowList(allow_domains).entries()
    except BadHost as exc:
        raise GrantError(f"allow_domains: {exc}") from None
    if limits.allow_domains is not None and ANY_DOMAIN not in limits.allow_domains:
        permitted = AllowList(limits.allow_domains)
        for entry in normalised:
            if not _domain_within(entry, permitted):
                raise LimitError(f"user {user} may not allow {entry} (allowed: "
                                 f"{', '.join(permitted.entries()) or 'no domains'})")
    if limits.allow_read is not None:
        for path in allow_read:
            norm = posixpath.normpath(path)
            roots = [posixpath.normpath(root) for root in limits.allow_read]
            if not posixpath.isabs(path) or not any(
                    norm == root or norm.startswith(root.rstrip("/") + "/") for root in roots):
                raise LimitError(f"user {user} may not allow reading {path} (allowed below: "
                                 f"{', '.join(limits.allow_read) or 'nothing'})")
    if limits.credentials is not None:
        for name in credentials:
            if name not in limits.credentials:
                raise LimitError(f"user {user} may not use the credential {name}")
    return {
        "allow_domains": normalised,
        "quota_tokens": _cap(quota_tokens, limits.quota_tokens),
        "quota_usd": _cap(quota_usd, limits.quota_usd),
        "lifetime_s": limits.grant_lifetime_s or DEFAULT_GRANT_LIFETIME_S,
    }


def _cap(asked: Any, ceiling: Any) -> Any:
    if ceiling is None:
        return asked
    return ceiling if asked is None else min(asked, ceiling)
