"""The trust roster: service id -> role -> public key, and key lookup by key id."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey, VerifyKey

from ._errors import ConfigError
from ._subjects import Role, check_id


def key_id(verify_key: VerifyKey) -> str:
    """A short, stable id for a public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(bytes(verify_key)).hexdigest()[:16]


@dataclass(frozen=True)
class RosterEntry:
    """One trusted key of one service."""

    service_id: str
    role: Role
    kid: str
    verify_key: VerifyKey


@dataclass(frozen=True)
class ServiceIdentity:
    """A service's own id, role and signing key."""

    service_id: str
    role: Role
    signing_key: SigningKey

    @property
    def kid(self) -> str:
        """Key id of this identity's public key."""
        return key_id(self.signing_key.verify_key)

    def roster_entry(self) -> RosterEntry:
        """The roster entry other services need to trust this identity."""
        return RosterEntry(self.service_id, self.role, self.kid, self.signing_key.verify_key)


class TrustRoster:
    """Which keys belong to which service and role.

    A service may have several keys at once (rotation); a key id maps to
    exactly one service. Subject permissions per role live in the subjects
    module; the roster answers "who signed this".
    """

    def __init__(self, entries: list[RosterEntry] | tuple[RosterEntry, ...] = ()) -> None:
        self._by_kid: dict[str, RosterEntry] = {}
        for e in entries:
            self.add(e)

    def add(self, entry: RosterEntry) -> None:
        """Trust one more key."""
        check_id(entry.service_id, "service id")
        if key_id(entry.verify_key) != entry.kid:
            raise ConfigError(f"roster entry for {entry.service_id}: key id does not match key")
        self._by_kid[entry.kid] = entry

    def lookup(self, kid: str) -> RosterEntry | None:
        """The entry for a key id, or None when it is not trusted."""
        return self._by_kid.get(kid)

    def entries(self) -> list[RosterEntry]:
        """All trusted keys, sorted by service id."""
        return sorted(self._by_kid.values(), key=lambda e: (e.service_id, e.kid))

    def services(self, role: Role) -> list[str]:
        """Ids of the services holding ``role``."""
        return sorted({e.service_id for e in self._by_kid.values() if e.role == role})

    def to_json(self) -> str:
        """The roster file's contents."""
        services: dict[str, Any] = {}
        for e in self.entries():
            s = services.setdefault(e.service_id, {"role": e.role.value, "keys": {}})
            s["keys"][e.kid] = base64.b64encode(bytes(e.verify_key)).decode()
        return json.dumps({"version": 1, "services": services}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "roster") -> TrustRoster:
        """Parse a roster file; raise ConfigError naming the file on any problem."""
        try:
            data = json.loads(text)
            entries = []
            for sid, s in data["services"].items():
                role = Role(s["role"])
                for kid, pub in s["keys"].items():
                    vk = VerifyKey(base64.b64decode(pub, validate=True))
                    entries.append(RosterEntry(sid, role, kid, vk))
            return cls(entries)
        except ConfigError:
            raise
        except Exception as exc:  # any parse failure is a config problem with that file
            raise ConfigError(f"cannot read trust roster {source}: {exc}") from exc

    @classmethod
    def load(cls, path: Path) -> TrustRoster:
        """Read the roster file at ``path``."""
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read trust roster {path}: {exc}; run `silo init`") from exc
        return cls.from_json(text, str(path))
