"""Client authentication: the local token, pairing codes and signed challenges.

``Authenticator.handshake`` runs the first seconds of every connection (see
``devsilo.protocol.client`` for the frames): it sends ``challenge``, then
accepts a token, a key's signature or a pairing, all before the deadline.
Every failure is answered with ``auth_error`` and ends the connection; the
caller closes it. ``Authenticator.request`` answers an authenticated
client's ``pairing_code``, ``list_clients`` and ``revoke_client``.

Who may do what: the local token is the operator; a paired key is its user's,
an operator only when an operator asked for its code. A user lists and
revokes their own keys and asks codes for themselves; an operator does so for
anyone.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from aiohttp import WSMessage, WSMsgType
from devsilo.protocol import AuthError, SiloError
from devsilo.protocol.client import (
    CHALLENGE_BYTES,
    CLIENT_PROTOCOL_VERSIONS,
    CLIENT_REQUEST,
    Authenticate,
    AuthErrorFrame,
    AuthOk,
    Challenge,
    ClientFrame,
    ClientRevoked,
    Clients,
    ListClients,
    Pair,
    Paired,
    PairingCode,
    PairingCodeRequest,
    RevokeClient,
    challenge_message,
)
from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError

from ._keys import ClientKeyStore, check_public_key, verify_signature
from ._pairing import PairingCodes, PairingLimiter, PairingRefused

LOCAL_USER = "local"
AUTH_DEADLINE_S = 30.0


@dataclass(frozen=True)
class Principal:
    """Who an authenticated connection acts for."""

    user: str
    client: str
    operator: bool
    key_id: str | None = None
    """The paired key it authenticated with; None for the local token."""


class TokenAuthenticator:
    """Checks the local token in constant time."""

    def __init__(self, token: str) -> None:
        if len(token) < 32:
            raise AuthError("local token is too short; run `silo init --rotate`")
        self._token = token.encode()

    def authenticate(self, frame: Authenticate) -> Principal:
        """Return the principal for a valid token; AuthError otherwise."""
        given = (frame.token or "").encode()
        if frame.method != "token" or not hmac.compare_digest(given, self._token):
            raise AuthError("invalid token")
        return Principal(user=LOCAL_USER, client=frame.client_name, operator=True)


AUTH_OUTCOMES = (
    ("token", "ok"), ("token", "bad_credentials"), ("key", "ok"), ("key", "unknown_key"),
    ("key", "bad_signature"), ("none", "bad_frame"), ("none", "bad_version"), ("none", "timeout"),
    ("none", "unavailable"),
)
"""The (method, outcome) pairs of ``silo_auth_total`` that exist from the start."""
PAIRING_OUTCOMES = ("ok", "bad_key", "wrong_code", "used_code", "expired_code", "locked_out", "global_limit")


class AuthMetrics:
    """Authentication outcomes (low-cardinality labels only)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.auth = Counter("silo_auth_total", "Client authentication attempts by method and outcome.",
                            ["method", "outcome"], registry=registry)
        self.pairing = Counter("silo_pairing_attempts_total", "Pairing attempts by outcome.",
                               ["outcome"], registry=registry)
        self.lockouts = Counter("silo_pairing_lockouts_total",
                                "Addresses locked out after too many failed pairing attempts.",
                                registry=registry)
        self.codes = Counter("silo_pairing_codes_issued_total", "Pairing codes issued.", registry=registry)
        self.revocations = Counter("silo_client_keys_revoked_total", "Client keys revoked.",
                                   registry=registry)
        # Known outcomes are pre-declared so dashboards and alerts see zeros, not gaps.
        for method, outcome in AUTH_OUTCOMES:
            self.auth.labels(method=method, outcome=outcome)
        for outcome in PAIRING_OUTCOMES:
            self.pairing.labels(outcome=outcome)


class HandshakeFailed(Exception):
    """The handshake ended without a principal; the frame was sent, the connection must close."""


Send = Callable[[ClientFrame], Awaitable[None]]
Receive = Callable[[], Awaitable[WSMessage]]
Closer = Callable[[str], Awaitable[None]]


class Authenticator:
    """Every way a client proves who it is, and the pairing of new clients."""

    def __init__(self, token: TokenAuthenticator, keys: ClientKeyStore, codes: PairingCodes,
                 limiter: PairingLimiter, *, fingerprint: str, metrics: AuthMetrics, log: Any,
                 deadline_s: float = AUTH_DEADLINE_S) -> None:
        self.token = token
        self.keys = keys
        self.codes = codes
        self.limiter = limiter
        self.fingerprint = fingerprint
        self.metrics = metrics
        self.log = log
        self.deadline_s = deadline_s
        self._open: dict[str, dict[int, Closer]] = {}

    # -- the handshake -------------------------------------------------------------------

    async def handshake(self, receive: Receive, send: Send, peer: str) -> Principal:
        """Authenticate one connection; HandshakeFailed (after sending ``auth_error``) otherwise."""
        try:
            return await self._handshake(receive, send, peer)
        except (HandshakeFailed, asyncio.CancelledError):
            raise
        except Exception:  # the key store (NATS) failed us: the client may try again
            self.log.exception("auth_unavailable", peer=peer)
            await self._fail(send, "none", "unavailable", "the gateway could not check credentials just now; "
                             "try again in a moment", "unavailable")

    async def _handshake(self, receive: Receive, send: Send, peer: str) -> Principal:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline_s
        nonce = await self._challenge(send)
        paired = False
        while True:
            try:
                raw = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - loop.time()))
            except TimeoutError:
                await self._fail(send, "none", "timeout",
                                 f"no authentication within {self.deadline_s:.0f} s of connecting", "timeout")
            frame = await self._first_frame(raw, send)
            if isinstance(frame, Pair):
                if paired:
                    await self._fail(send, "pair", "bad_frame", "pair once per connection, then authenticate")
                await self._pair(frame, send, peer)
                paired = True
                nonce = await self._challenge(send)  # the old one is spent: a new key signs a new one
                continue
            assert isinstance(frame, Authenticate)
            who = await self._authenticate(frame, nonce, send)
            await send(AuthOk(user=who.user, operator=who.operator, key_id=who.key_id))
            return who

    async def _challenge(self, send: Send) -> bytes:
        nonce = secrets.token_bytes(CHALLENGE_BYTES)
        await send(Challenge(nonce=base64.b64encode(nonce).decode()))
        return nonce

    async def _fail(self, send: Send, method: str, outcome: str, message: str,
                    code: str = "auth_failed", versions: tuple[int, ...] = ()) -> NoReturn:
        self.metrics.auth.labels(method=method, outcome=outcome).inc()
        self.log.info("auth_failed", method=method, outcome=outcome, error=message)
        await send(AuthErrorFrame(message=message, code=code, versions=versions))
        raise HandshakeFailed(message)

    async def _first_frame(self, raw: WSMessage, send: Send) -> Authenticate | Pair:
        """Check type, version and shape of a handshake frame."""
        if raw.type != WSMsgType.TEXT:
            if raw.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                raise HandshakeFailed("the client went away before authenticating")
            await self._fail(send, "none", "bad_frame", "send JSON text frames; authenticate first")
        try:
            data = json.loads(raw.data)
        except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
            data = None
        if not isinstance(data, dict):
            await self._fail(send, "none", "bad_frame", "frames are JSON objects; authenticate first")
        v = data.get("v", None)
        if "v" in data and not (type(v) is int and v in CLIENT_PROTOCOL_VERSIONS):
            # Checked before the frame's shape: a newer version may have fields we do not know.
            supported = ", ".join(str(x) for x in CLIENT_PROTOCOL_VERSIONS)
            await self._fail(send, "none", "bad_version",
                             f"protocol version {json.dumps(v)[:32]} is not spoken here; this gateway "
                             f"speaks version(s) {supported}", "unsupported_version", CLIENT_PROTOCOL_VERSIONS)
        try:
            frame = CLIENT_REQUEST.validate_python(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err.get("loc", ()))
            await self._fail(send, "none", "bad_frame",
                             f"invalid frame at {where or 'top'}: {err.get('msg')}; authenticate first")
        if not isinstance(frame, (Authenticate, Pair)):
            await self._fail(send, "none", "bad_frame", "authenticate first")
        return frame

    async def _authenticate(self, frame: Authenticate, nonce: bytes, send: Send) -> Principal:
        if frame.method == "token":
            try:
                who = self.token.authenticate(frame)
            except AuthError as exc:
                await self._fail(send, "token", "bad_credentials", str(exc))
            self.metrics.auth.labels(method="token", outcome="ok").inc()
            return who
        assert frame.key_id is not None and frame.signature is not None
        key = await self.keys.get(frame.key_id)
        if key is None:
            await self._fail(send, "key", "unknown_key",
                             f"no client key {frame.key_id} is registered (revoked, or never paired)")
        try:
            verify_signature(key, challenge_message(self.fingerprint, nonce), frame.signature)
        except AuthError as exc:
            await self._fail(send, "key", "bad_signature", str(exc))
        await self.keys.seen(key.key_id)
        self.metrics.auth.labels(method="key", outcome="ok").inc()
        return Principal(user=key.user, client=key.client_name, operator=key.operator, key_id=key.key_id)

    async def _pair(self, frame: Pair, send: Send, peer: str) -> None:
        try:
            self.limiter.check(peer)
        except PairingRefused as exc:
            self.metrics.pairing.labels(outcome=exc.outcome).inc()
            await self._fail(send, "pair", exc.outcome, str(exc), "rate_limited")
        try:
            check_public_key(frame.key_type, frame.public_key)  # before the code is spent on it
        except AuthError as exc:
            self.metrics.pairing.labels(outcome="bad_key").inc()
            await self._fail(send, "pair", "bad_key", str(exc))
        try:
            grant = await self.codes.consume(frame.code, used_by=frame.client_name)
        except PairingRefused as exc:
            if self.limiter.failed(peer):
                self.metrics.lockouts.inc()
                self.log.warning("pairing_locked_out", peer=peer)
            self.metrics.pairing.labels(outcome=exc.outcome).inc()
            await self._fail(send, "pair", exc.outcome, str(exc))
        key = await self.keys.add(user=grant.user, client_name=grant.client_name, key_type=frame.key_type,
                                  public_key=frame.public_key, operator=grant.operator, paired_by=grant.issued_by)
        self.metrics.pairing.labels(outcome="ok").inc()
        self.log.info("client_paired", key_id=key.key_id, user=key.user, client_name=key.client_name,
                      operator=key.operator)
        await send(Paired(key_id=key.key_id, user=key.user, operator=key.operator))

    # -- requests of authenticated clients ------------------------------------------------

    async def request(self, who: Principal, req: PairingCodeRequest | ListClients | RevokeClient) -> ClientFrame:
        """Answer ``pairing_code``, ``list_clients`` or ``revoke_client``."""
        if isinstance(req, PairingCodeRequest):
            user = req.user or who.user
            if user != who.user and not who.operator:
                raise AuthError("only an operator may ask for a pairing code for another user")
            if req.operator and not who.operator:
                raise AuthError("only an operator may pair an operator client")
            code, grant = await self.codes.issue(user=user, client_name=req.client_name,
                                                 operator=req.operator, issued_by=f"{who.user}/{who.client}")
            self.metrics.codes.inc()
            self.log.info("pairing_code_issued", for_user=user, client_name=req.client_name, operator=req.operator)
            return PairingCode(code=code, user=user, client_name=req.client_name, operator=req.operator,
                               expires_at=grant.expires_at, valid_s=self.codes.valid_s)
        if isinstance(req, ListClients):
            keys = [k for k in await self.keys.list() if who.operator or k.user == who.user]
            return Clients(clients=tuple(k.summary() for k in keys))
        key = await self.keys.get(req.key_id)
        if key is None or not (who.operator or key.user == who.user):
            raise SiloError(f"no client key {req.key_id} visible to you")
        await self.keys.revoke(req.key_id)
        self.metrics.revocations.inc()
        self.log.info("client_key_revoked", key_id=req.key_id, user=key.user)
        await self.revoked(req.key_id)  # this replica at once; the others through their KV watch
        return ClientRevoked(key_id=req.key_id)

    # -- revocation -----------------------------------------------------------------------

    def track(self, who: Principal, closer: Closer) -> Callable[[], None]:
        """Remember an open connection of a key; returns the function that forgets it."""
        if who.key_id is None:
            return lambda: None
        conns = self._open.setdefault(who.key_id, {})
        token = id(closer)
        conns[token] = closer
        key_id = who.key_id

        def forget() -> None:
            left = self._open.get(key_id, {})
            left.pop(token, None)
            if not left:
                self._open.pop(key_id, None)
        return forget

    @property
    def tracked_keys(self) -> int:
        """Client keys with a connection open on this gateway (watched for revocation)."""
        return len(self._open)

    async def still_registered(self, who: Principal) -> bool:
        """Whether the key ``who`` authenticated with is still registered (always, for the token)."""
        return who.key_id is None or await self.keys.get(who.key_id) is not None

    async def revoked(self, key_id: str) -> None:
        """Close every open connection of ``key_id`` on this gateway."""
        closers = list(self._open.pop(key_id, {}).values())
        if closers:
            self.log.info("revoked_key_connections_closed", key_id=key_id, connections=len(closers))
        await asyncio.gather(*(c(f"client key {key_id} was revoked") for c in closers),
                             return_exceptions=True)
