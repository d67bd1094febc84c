"""The signed envelope around every message between services.

Wire format: the 64-byte Ed25519 signature, then the exact JSON bytes it
signs (PyNaCl's "signed message" layout). The JSON holds the header fields
and the body::

    {"v":1,"type":...,"sender":...,"role":...,"kid":...,"mid":...,"sid":...,
     "subject":...,"iat":...,"exp":...,"reply_to":...,"body":{...}}

The subject is signed too, so a message cannot be moved to another subject;
a reply names the message id it answers.

``Verifier.open`` checks, in order and before any body is parsed: size,
shape, key id in the roster, key belongs to the claimed sender and role,
signature, subject, role may publish there, type allowed there, freshness,
replay; then parses the body against its type's schema.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from nacl.exceptions import BadSignatureError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._errors import (
    BadSignature,
    Expired,
    InvalidBody,
    Malformed,
    Oversized,
    Replayed,
    RoleNotAllowed,
    UnknownSender,
    WrongKey,
    WrongSubject,
)
from ._messages import MESSAGE_TYPES, Message
from ._replay import ReplayCache
from ._roster import ServiceIdentity, TrustRoster
from ._subjects import Role, may_publish, subject_matches

SIGNATURE_BYTES = 64
DEFAULT_MAX_BYTES = 1024 * 1024
DEFAULT_TTL = 60.0
MAX_TTL = 600.0
CLOCK_SKEW = 30.0

M = TypeVar("M", bound=Message)


class EnvelopeHeader(BaseModel):
    """The signed fields around a body."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    v: int = Field(ge=1, le=1)
    type: str = Field(max_length=64)
    sender: str = Field(max_length=64)
    role: Role
    kid: str = Field(max_length=64)
    mid: str = Field(min_length=8, max_length=64)
    sid: str | None = Field(default=None, max_length=64)
    subject: str = Field(max_length=512)
    iat: float
    exp: float
    reply_to: str | None = Field(default=None, max_length=64)
    body: dict[str, Any]


@dataclass(frozen=True)
class Envelope:
    """A verified message: its header and its parsed body."""

    header: EnvelopeHeader
    body: Message
    size: int

    def expect(self, kind: type[M]) -> M:
        """The body as ``kind``; raise InvalidBody when it is another type."""
        if not isinstance(self.body, kind):
            raise InvalidBody(f"expected {kind.TYPE}, got {self.header.type}")
        return self.body


class Signer:
    """Seals message bodies into signed envelopes for one service identity."""

    def __init__(
        self,
        identity: ServiceIdentity,
        clock: Callable[[], float] = time.time,
        ttl: float = DEFAULT_TTL,
    ) -> None:
        self.identity = identity
        self._clock = clock
        self._ttl = ttl

    def seal(
        self,
        body: Message,
        subject: str,
        *,
        sid: str | None = None,
        reply_to: str | None = None,
        ttl: float | None = None,
        mid: str | None = None,
    ) -> tuple[bytes, str]:
        """Sign ``body`` for ``subject``; return the wire bytes and the message id."""
        now = self._clock()
        mid = mid or secrets.token_hex(12)
        doc = {
            "v": 1,
            "type": body.TYPE,
            "sender": self.identity.service_id,
            "role": self.identity.role.value,
            "kid": self.identity.kid,
            "mid": mid,
            "sid": sid,
            "subject": subject,
            "iat": now,
            "exp": now + (self._ttl if ttl is None else ttl),
            "reply_to": reply_to,
            "body": body.model_dump(mode="json"),
        }
        payload = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
        signed = self.identity.signing_key.sign(payload)
        return bytes(signed), mid


class Verifier:
    """Opens signed envelopes against a trust roster; raises MessageRejected subclasses."""

    def __init__(
        self,
        roster: TrustRoster,
        *,
        clock: Callable[[], float] = time.time,
        max_bytes: int = DEFAULT_MAX_BYTES,
        replay: ReplayCache | None = None,
    ) -> None:
        self.roster = roster
        self._clock = clock
        self.max_bytes = max_bytes
        self._replay = replay if replay is not None else ReplayCache()

    def open(
        self,
        data: bytes,
        subject: str,
        *,
        fresh: bool = True,
        max_ttl: float = MAX_TTL,
    ) -> Envelope:
        """Verify ``data`` received on ``subject`` and return the envelope.

        ``fresh=False`` skips expiry and replay checks: for messages read back
        from a JetStream stream, where the stream itself deduplicates and age
        is expected.
        """
        if len(data) > self.max_bytes:
            raise Oversized(f"{len(data)} bytes on {subject}, limit {self.max_bytes}")
        if len(data) <= SIGNATURE_BYTES:
            raise Malformed(f"{len(data)} bytes on {subject}: no signature and body")
        payload = data[SIGNATURE_BYTES:]
        try:
            raw = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise Malformed(f"envelope on {subject} is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise Malformed(f"envelope on {subject} is not a JSON object")
        try:
            header = EnvelopeHeader.model_validate(raw)
        except ValidationError as exc:
            raise Malformed(f"envelope header on {subject}: {_first_error(exc)}") from None
        entry = self.roster.lookup(header.kid)
        if entry is None:
            raise UnknownSender(f"key {header.kid} (claimed sender {header.sender!r}) not in roster")
        if entry.service_id != header.sender or entry.role != header.role:
            raise WrongKey(
                f"key {header.kid} belongs to {entry.service_id} ({entry.role.value}), "
                f"not {header.sender} ({header.role.value})"
            )
        try:
            entry.verify_key.verify(data)
        except BadSignatureError:
            raise BadSignature(f"signature of {header.sender} on {subject} does not verify") from None
        if header.subject != subject:
            raise WrongSubject(f"signed for {header.subject!r}, received on {subject!r}")
        if not may_publish(header.role, subject):
            raise RoleNotAllowed(f"role {header.role.value} may not publish on {subject}")
        kind = MESSAGE_TYPES.get(header.type)
        if kind is None:
            raise InvalidBody(f"unknown message type {header.type!r}")
        if not any(subject_matches(p, subject) for p in kind.SUBJECTS):
            raise RoleNotAllowed(f"type {header.type} not allowed on {subject}")
        if fresh:
            now = self._clock()
            if header.exp < now:
                raise Expired(f"message {header.mid} expired {now - header.exp:.1f}s ago")
            if header.iat > now + CLOCK_SKEW:
                raise Expired(f"message {header.mid} issued {header.iat - now:.1f}s in the future")
            if header.exp - header.iat > max_ttl:
                raise Expired(f"message {header.mid} claims a lifetime over {max_ttl:.0f}s")
            if not self._replay.check_and_add(
                f"{header.sender}:{header.mid}", header.exp + CLOCK_SKEW, now
            ):
                raise Replayed(f"message {header.mid} from {header.sender} already seen")
        try:
            body = kind.model_validate(header.body)
        except ValidationError as exc:
            raise InvalidBody(f"{header.type}: {_first_error(exc)}") from None
        return Envelope(header=header, body=body, size=len(data))


def peek_header(data: bytes) -> dict[str, Any] | None:
    """Best-effort, unverified header fields for logging a rejected message."""
    try:
        raw = json.loads(data[SIGNATURE_BYTES:])
    except Exception:
        return None
    if not isinstance(raw, dict):
        return None
    return {k: raw.get(k) for k in ("type", "sender", "role", "mid", "sid") if isinstance(raw.get(k), (str, type(None)))}


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    return f"{loc}: {err.get('msg', 'invalid')}"[:300]
