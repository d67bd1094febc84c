"""Pairing codes: issued to an authenticated client, used once by a new one, rate limited.

A code is 8 characters from an alphabet without look-alikes (40 bits), valid
for 120 s. It is stored in a JetStream KV bucket under its SHA-256 (so every
gateway replica can take it, and the bucket never shows a usable code), and
consumed by compare-and-set on the entry's revision: of two clients racing
with one code, exactly one pairs.

Guessing is limited on each gateway by ``PairingLimiter``: every failed
attempt counts against the address it came from and against a global budget;
an address with too many failures in the window is refused for the lockout
period, and when the global budget is spent every pairing attempt is refused
until the window moves on (a correct code included: the limiter answers
before the code is looked at).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import nats.js.errors
from devsilo.protocol import AuthError, subjects
from devsilo.protocol.client import PAIRING_ALPHABET, PAIRING_CODE_LENGTH
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, ValidationError

CODE_VALID_S = 120.0
BUCKET_MAX_AGE_S = 3600.0
"""Used and expired codes are dropped from the bucket after this long."""


class PairingGrant(BaseModel):
    """What a pairing code allows: one key for ``user`` named ``client_name``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user: str
    client_name: str
    operator: bool
    issued_by: str
    expires_at: float
    used_by: str | None = None


class PairingRefused(AuthError):
    """A pairing attempt was refused; ``outcome`` says why (a metric label)."""

    def __init__(self, message: str, outcome: str) -> None:
        super().__init__(message)
        self.outcome = outcome


def new_code() -> str:
    """A fresh pairing code."""
    return "".join(secrets.choice(PAIRING_ALPHABET) for _ in range(PAIRING_CODE_LENGTH))


def _kv_key(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


class PairingCodes:
    """The ``silo_pairing_codes`` bucket."""

    def __init__(self, kv: KeyValue, *, valid_s: float = CODE_VALID_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.kv = kv
        self.valid_s = valid_s
        self.clock = clock

    @classmethod
    async def open(cls, js: JetStreamContext, *, valid_s: float = CODE_VALID_S,
                   clock: Callable[[], float] = time.time) -> PairingCodes:
        """The bucket, created on first use."""
        try:
            kv = await js.key_value(subjects.PAIRING_CODES)
        except nats.js.errors.BucketNotFoundError:
            kv = await js.create_key_value(KeyValueConfig(
                bucket=subjects.PAIRING_CODES, description="devsilo pairing codes (by SHA-256)",
                history=1, ttl=BUCKET_MAX_AGE_S))
        return cls(kv, valid_s=valid_s, clock=clock)

    async def issue(self, *, user: str, client_name: str, operator: bool, issued_by: str) -> tuple[str, PairingGrant]:
        """A new code and what it grants."""
        grant = PairingGrant(user=user, client_name=client_name, operator=operator, issued_by=issued_by,
                             expires_at=self.clock() + self.valid_s)
        for _ in range(5):
            code = new_code()
            try:
                await self.kv.create(_kv_key(code), grant.model_dump_json().encode())
                return code, grant
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # that code exists (one in 2^40): draw another
        raise AuthError("could not draw an unused pairing code; try again")

    async def consume(self, code: str, used_by: str) -> PairingGrant:
        """Take ``code`` (once, across every replica) and return its grant; PairingRefused otherwise."""
        key = _kv_key(code)
        try:
            entry = await self.kv.get(key)
            grant = PairingGrant.model_validate_json(entry.value or b"")
        except (nats.js.errors.KeyNotFoundError, ValidationError):
            raise PairingRefused("that pairing code is not valid; ask for a new one (`silo pair`)",
                                 "wrong_code") from None
        if grant.used_by is not None:
            raise PairingRefused("that pairing code was already used; ask for a new one (`silo pair`)",
                                 "used_code")
        if self.clock() > grant.expires_at:
            raise PairingRefused(f"that pairing code expired (codes are valid for {self.valid_s:.0f} s); "
                                 "ask for a new one (`silo pair`)", "expired_code")
        used = grant.model_copy(update={"used_by": used_by})
        try:
            await self.kv.update(key, used.model_dump_json().encode(), last=entry.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise PairingRefused("that pairing code was already used; ask for a new one (`silo pair`)",
                                 "used_code") from None
        return grant


@dataclass
class _Failures:
    times: deque[float] = field(default_factory=deque)
    locked_until: float = 0.0


class PairingLimiter:
    """Failed pairing attempts per address and in total, over a sliding window."""

    def __init__(self, *, per_address: int = 5, global_max: int = 50, window_s: float = 300.0,
                 lockout_s: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_address = per_address
        self.global_max = global_max
        self.window_s = window_s
        self.lockout_s = lockout_s
        self.clock = clock
        self._by_address: dict[str, _Failures] = {}
        self._all: deque[float] = deque()

    def _trim(self, times: deque[float], now: float) -> None:
        while times and times[0] <= now - self.window_s:
            times.popleft()

    def check(self, address: str) -> None:
        """Refuse (PairingRefused) an address that is locked out, or everyone when the budget is spent."""
        now = self.clock()
        f = self._by_address.get(address)
        if f is not None and f.locked_until > now:
            raise PairingRefused(f"too many failed pairing attempts from your address; try again in "
                                 f"{f.locked_until - now:.0f} s", "locked_out")
        self._trim(self._all, now)
        if len(self._all) >= self.global_max:
            wait = self._all[0] + self.window_s - now
            raise PairingRefused(f"too many failed pairing attempts on this gateway; try again in "
                                 f"{wait:.0f} s", "global_limit")

    def failed(self, address: str) -> bool:
        """Count a failure; True when it locked the address out."""
        now = self.clock()
        self._all.append(now)
        f = self._by_address.setdefault(address, _Failures())
        self._trim(f.times, now)
        f.times.append(now)
        if len(f.times) >= self.per_address:
            f.locked_until = now + self.lockout_s
            f.times.clear()
            return True
        # Forget quiet addresses so the table cannot grow without bound.
        for addr in [a for a, v in self._by_address.items() if not v.times and v.locked_until <= now]:
            del self._by_address[addr]
        return False
