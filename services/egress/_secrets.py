"""Credentials the egress injects, from the egress host's own secret store.

Configured under the egress service's ``credentials`` option, one entry per
name::

    "github": {
        "env": "GITHUB_TOKEN",              # or "file": "/etc/devsilo/github-token"
        "hosts": ["api.github.com"],         # exact hosts only, never wildcards
        "header": "Authorization: Bearer {secret}",
        #  or "placeholder": "DEVSILO_GITHUB_TOKEN" (the sandbox sends this value;
        #  the egress swaps it for the secret in header values)
        "users": ["alice"]                   # who may use it; omitted = nobody
    }

A session may use a credential only when its grant names it *and* the
grant's user is in the entry's ``users``. The secret is read when the
request is made (so rotating the env file or variable needs no restart) and
is never logged, journaled, put in an error or sent on NATS; a credential
that cannot be read refuses the request (fail closed). Errors name the
credential, never the value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devsilo.protocol._names import normalise_host

_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_SECRET = 16 * 1024


class CredentialError(Exception):
    """A credential that is misconfigured or cannot be read now; the message names it only."""


@dataclass(frozen=True)
class Credential:
    """One configured credential (without its value)."""

    name: str
    hosts: frozenset[str]
    users: frozenset[str]
    env: str | None = None
    file: str | None = None
    header: tuple[str, str] | None = None
    """(header name, value template containing ``{secret}``)."""
    placeholder: str | None = None

    def secret(self) -> str:
        """The value, read now; :class:`CredentialError` when it cannot be."""
        if self.env is not None:
            value = os.environ.get(self.env)
            if not value:
                raise CredentialError(f"credential {self.name} is unavailable (environment variable not set)")
        else:
            assert self.file is not None
            try:
                raw = Path(self.file).read_bytes()[: MAX_SECRET + 1]
            except OSError as exc:
                raise CredentialError(f"credential {self.name} is unavailable ({exc.strerror})") from None
            if len(raw) > MAX_SECRET:
                raise CredentialError(f"credential {self.name} is unavailable (file too large)")
            value = raw.decode("utf-8", "replace").strip()
            if not value:
                raise CredentialError(f"credential {self.name} is unavailable (file empty)")
        if any(ch in value for ch in "\r\n\x00"):
            raise CredentialError(f"credential {self.name} is unusable (contains a line break or NUL)")
        return value


class CredentialStore:
    """The egress's configured credentials and who may use them."""

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        self._by_name: dict[str, Credential] = {}
        for name, entry in (config or {}).items():
            self._by_name[name] = _parse(name, entry)

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._by_name))

    def for_host(self, host: str, user: str, granted: tuple[str, ...]) -> list[Credential]:
        """The credentials to inject for one request to ``host`` (exact match) in this session."""
        found = []
        for name in granted:
            cred = self._by_name.get(name)
            if cred is not None and host in cred.hosts and user in cred.users:
                found.append(cred)
        return found

    def usable(self, user: str, granted: tuple[str, ...]) -> tuple[str, ...]:
        """Which of the granted names this user may really use (for the session-open reply)."""
        return tuple(n for n in granted if n in self._by_name and user in self._by_name[n].users)

    def hosts(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """The exact hosts the named credentials are injected into, sorted, once each."""
        return tuple(sorted({h for n in names if n in self._by_name for h in self._by_name[n].hosts}))


def _parse(name: str, entry: Any) -> Credential:
    if not _NAME.match(name):
        raise CredentialError(f"bad credential name {name[:80]!r}")
    if not isinstance(entry, Mapping):
        raise CredentialError(f"credential {name}: expected an object")
    env, file = entry.get("env"), entry.get("file")
    if (env is None) == (file is None):
        raise CredentialError(f"credential {name}: give exactly one of 'env' and 'file'")
    hosts_raw = entry.get("hosts") or []
    if not hosts_raw or any("*" in str(h) for h in hosts_raw):
        raise CredentialError(f"credential {name}: 'hosts' must list exact host names")
    hosts = frozenset(normalise_host(str(h)) for h in hosts_raw)
    header = placeholder = None
    if "header" in entry:
        head, sep, template = str(entry["header"]).partition(":")
        if not sep or not _HEADER_NAME.match(head.strip()) or "{secret}" not in template:
            raise CredentialError(f"credential {name}: 'header' must look like 'Name: ... {{secret}} ...'")
        header = (head.strip(), template.strip())
    if "placeholder" in entry:
        placeholder = str(entry["placeholder"])
        if len(placeholder) < 8 or not re.match(r"^[A-Za-z0-9_.-]+$", placeholder):
            raise CredentialError(f"credential {name}: 'placeholder' must be 8+ letters, digits, '_', '.', '-'")
    if (header is None) == (placeholder is None):
        raise CredentialError(f"credential {name}: give exactly one of 'header' and 'placeholder'")
    users = frozenset(str(u) for u in entry.get("users") or [])
    return Credential(name, hosts, users, env=env, file=file, header=header, placeholder=placeholder)


def inject(headers: list[tuple[bytes, bytes]], creds: list[Credential]) -> tuple[list[tuple[bytes, bytes]], bool]:
    """``headers`` with the credentials applied, and whether any was; raises :class:`CredentialError`."""
    injected = False
    out = list(headers)
    for cred in creds:
        secret = cred.secret()
        try:
            secret.encode("latin-1", "strict")
        except UnicodeEncodeError:
            raise CredentialError(f"credential {cred.name} is unusable (not Latin-1 text)") from None
        if cred.header is not None:
            name = cred.header[0].lower().encode("ascii")
            value = cred.header[1].replace("{secret}", secret).encode("latin-1", "strict")
            out = [(k, v) for k, v in out if k.lower() != name] + [(name, value)]
            injected = True
        else:
            assert cred.placeholder is not None
            token = cred.placeholder.encode("ascii")
            replaced = []
            for k, v in out:
                if token in v:
                    v = v.replace(token, secret.encode("latin-1", "strict"))
                    injected = True
                replaced.append((k, v))
            out = replaced
    return out, injected
