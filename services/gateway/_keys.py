"""Paired client keys: stored in a JetStream KV bucket, shared by every gateway replica.

A key record is written once at pairing, its ``last_seen`` updated by
compare-and-set (so a revocation that lands in between is never undone), and
revoked by deleting it. Every gateway watches the bucket and closes the open
connections of a key the moment its record goes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats.js.errors
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from devsilo.protocol import AuthError, subjects
from devsilo.protocol.client import ClientKeySummary, KeyType
from devsilo.runtime import Bus
from devsilo.runtime._kvwatch import follow_kv
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import BaseModel, ConfigDict, Field, ValidationError

KV_WRONG_LAST_SEQUENCE = (10071, 10164)


class ClientKey(BaseModel):
    """One paired client: its public key and whose it is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_id: str
    user: str
    client_name: str
    key_type: KeyType
    public_key: str = Field(description="base64 of the raw public key")
    operator: bool = False
    created_at: float
    last_seen: float | None = None
    paired_by: str = Field(description="user/client that asked for the pairing code")

    def summary(self) -> ClientKeySummary:
        """The line `silo clients list` shows."""
        return ClientKeySummary(key_id=self.key_id, user=self.user, client_name=self.client_name,
                                key_type=self.key_type, operator=self.operator,
                                created_at=self.created_at, last_seen=self.last_seen)


def _b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise AuthError(f"{what} is not base64") from None


def check_public_key(key_type: KeyType, public_key: str) -> bytes:
    """The raw public key, refused unless it is a valid key of ``key_type``."""
    raw = _b64(public_key, "public_key")
    try:
        if key_type == "ed25519":
            if len(raw) != 32:
                raise ValueError("an Ed25519 public key is 32 bytes")
            Ed25519PublicKey.from_public_bytes(raw)
        else:
            if len(raw) != 65 or raw[0] != 4:
                raise ValueError("an ECDSA P-256 public key is the 65-byte uncompressed point")
            ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
    except ValueError as exc:
        raise AuthError(f"public_key is not a valid {key_type} key: {exc}") from None
    return raw


def verify_signature(key: ClientKey, message: bytes, signature: str) -> None:
    """Raise AuthError unless ``signature`` (base64) is ``key``'s over ``message``."""
    sig = _b64(signature, "signature")
    raw = base64.b64decode(key.public_key)
    try:
        if len(sig) != 64:
            raise InvalidSignature
        if key.key_type == "ed25519":
            Ed25519PublicKey.from_public_bytes(raw).verify(sig, message)
        else:
            pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
            der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
            pub.verify(der, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise AuthError("the signature does not verify with that key over this connection's "
                        "challenge and this gateway's certificate") from None


class ClientKeyStore:
    """The ``silo_client_keys`` bucket."""

    def __init__(self, kv: KeyValue, clock: Callable[[], float] = time.time) -> None:
        self.kv = kv
        self.clock = clock

    @classmethod
    async def open(cls, js: JetStreamContext, clock: Callable[[], float] = time.time) -> ClientKeyStore:
        """The bucket, created on first use (by whichever replica comes first)."""
        try:
            kv = await js.key_value(subjects.CLIENT_KEYS)
        except nats.js.errors.BucketNotFoundError:
            kv = await js.create_key_value(KeyValueConfig(
                bucket=subjects.CLIENT_KEYS, description="devsilo paired client keys", history=1))
        return cls(kv, clock)

    async def add(self, *, user: str, client_name: str, key_type: KeyType, public_key: str,
                  operator: bool, paired_by: str) -> ClientKey:
        """Register a new key; its id is random."""
        check_public_key(key_type, public_key)
        key = ClientKey(key_id=secrets.token_hex(8), user=user, client_name=client_name, key_type=key_type,
                        public_key=public_key, operator=operator, created_at=self.clock(), paired_by=paired_by)
        await self.kv.create(key.key_id, key.model_dump_json().encode())
        return key

    async def _entry(self, key_id: str) -> tuple[ClientKey, int] | None:
        try:
            entry = await self.kv.get(key_id)
        except nats.js.errors.KeyNotFoundError:
            return None
        try:
            return ClientKey.model_validate_json(entry.value or b""), entry.revision or 0
        except ValidationError:
            return None

    async def get(self, key_id: str) -> ClientKey | None:
        """The key, read from the bucket now (not a cache: a revocation counts at once)."""
        got = await self._entry(key_id)
        return got[0] if got else None

    async def seen(self, key_id: str) -> None:
        """Record a successful authentication, unless the key was revoked meanwhile."""
        for _ in range(3):
            got = await self._entry(key_id)
            if got is None:
                return
            key, rev = got
            updated = key.model_copy(update={"last_seen": self.clock()})
            try:
                await self.kv.update(key_id, updated.model_dump_json().encode(), last=rev)
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # another replica wrote it (or revoked it): read again

    async def list(self) -> list[ClientKey]:
        """Every registered key, oldest first."""
        try:
            ids = await self.kv.keys()
        except nats.js.errors.NoKeysError:
            return []
        keys = [k for k in [await self.get(i) for i in ids] if k is not None]
        return sorted(keys, key=lambda k: k.created_at)

    async def revoke(self, key_id: str) -> bool:
        """Delete the key; False when there was none."""
        if await self.get(key_id) is None:
            return False
        await self.kv.delete(key_id)
        return True

    async def watch_revocations(self, on_revoked: Callable[[str], Awaitable[None]], log: Any,
                                bus: Bus | None = None) -> None:
        """Call ``on_revoked(key_id)`` for every key deleted, until cancelled; a broken watch is restarted.

        With ``bus``, the watch is also made again after every NATS reconnect (a watch made
        before a server restart hears nothing after it); deletions are delivered again then.
        """
        if bus is not None:
            async def on_entry(entry: KeyValue.Entry) -> None:
                if entry.operation in (KV_DEL, KV_PURGE):
                    await on_revoked(entry.key)

            await follow_kv(self.kv, bus, on_entry, log=log)
            return
        while True:
            try:
                watcher = await self.kv.watchall()
            except Exception as exc:  # noqa: BLE001 -- NATS away: revocations still count at authentication
                log.warning("client_key_watch_failed", error=str(exc))
                await asyncio.sleep(1.0)
                continue
            try:
                async for entry in watcher:
                    if entry is not None and entry.operation in (KV_DEL, KV_PURGE):
                        await on_revoked(entry.key)
            except Exception as exc:  # noqa: BLE001 -- watch again; keys are read afresh at every login
                log.warning("client_key_watch_failed", error=str(exc))
                await asyncio.sleep(1.0)
            finally:
                await asyncio.shield(watcher.stop())  # type: ignore[no-untyped-call]
