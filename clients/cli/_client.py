"""A client of the gateway's TLS WebSocket, pinned to the gateway's certificate."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from devsilo.protocol import AuthError, SiloError
from devsilo.protocol.client import (
    CLIENT_PROTOCOL_VERSION,
    GATEWAY_FRAME,
    Authenticate,
    AuthErrorFrame,
    AuthOk,
    Challenge,
    ClientFrame,
    ErrorFrame,
    Hello,
    KeyType,
    Pair,
    Paired,
    challenge_message,
)


class GatewayError(SiloError):
    """The gateway refused a request or the connection failed."""


@dataclass(frozen=True)
class ClientKeyPair:
    """A client's own key pair for pairing and challenges (Ed25519, or ECDSA P-256 as WebCrypto makes it)."""

    key_type: KeyType
    private_key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls, key_type: KeyType = "ed25519") -> ClientKeyPair:
        """A new random key pair."""
        if key_type == "ed25519":
            return cls(key_type, Ed25519PrivateKey.generate())
        return cls(key_type, ec.generate_private_key(ec.SECP256R1()))

    def public_key(self) -> str:
        """The raw public key, base64 (32 bytes, or the 65-byte uncompressed P-256 point)."""
        pub = self.private_key.public_key()
        if isinstance(pub, ec.EllipticCurvePublicKey):
            raw = pub.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        else:
            raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(raw).decode()

    def sign(self, message: bytes) -> str:
        """A signature over ``message``, base64 (P-256: ``r||s``, as WebCrypto signs)."""
        if isinstance(self.private_key, ec.EllipticCurvePrivateKey):
            r, s = decode_dss_signature(self.private_key.sign(message, ec.ECDSA(hashes.SHA256())))
            return base64.b64encode(r.to_bytes(32, "big") + s.to_bytes(32, "big")).decode()
        return base64.b64encode(self.private_key.sign(message)).decode()


class GatewayClient:
    """One authenticated WebSocket connection to a gateway.

    The server certificate is checked against the pinned SHA-256 fingerprint
    before any credential is sent.
    """

    def __init__(self, url: str, fingerprint: str, *, client_name: str = "cli") -> None:
        self.url = url
        self.fingerprint = fingerprint.replace(":", "").lower()
        self.client_name = client_name
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self.hello: Hello | None = None
        self.challenge: bytes | None = None
        self.auth: AuthOk | None = None

    async def connect(self, token: str) -> str:
        """Connect, authenticate with the local token; return the user name."""
        await self.open()
        return await self._authenticate(Authenticate(method="token", token=token, client_name=self.client_name))

    async def connect_key(self, key_id: str, key: ClientKeyPair) -> str:
        """Connect, authenticate by signing the gateway's challenge with a paired key; return the user."""
        await self.open()
        return await self._authenticate(self._signed(key_id, key))

    async def pair(self, code: str, key: ClientKeyPair) -> Paired:
        """Connect, register ``key`` with a pairing code, then authenticate with it; return the pairing."""
        await self.open()
        await self.send(Pair(code=code, public_key=key.public_key(), key_type=key.key_type,
                             client_name=self.client_name))
        paired = await self.receive()
        if not isinstance(paired, Paired):
            raise AuthError(f"gateway refused pairing: {getattr(paired, 'message', paired.type)}")
        self.challenge = await self._expect_challenge()
        await self._authenticate(self._signed(paired.key_id, key))
        return paired

    def _signed(self, key_id: str, key: ClientKeyPair) -> Authenticate:
        if self.challenge is None:
            raise GatewayError("the gateway sent no challenge to sign")
        signature = key.sign(challenge_message(self.fingerprint, self.challenge))
        return Authenticate(method="key", key_id=key_id, signature=signature, client_name=self.client_name)

    async def _authenticate(self, frame: Authenticate) -> str:
        await self.send(frame)
        reply = await self.receive()
        if not isinstance(reply, AuthOk):
            raise AuthError(f"gateway refused authentication: {getattr(reply, 'message', reply.type)}")
        self.auth = reply
        return reply.user

    async def _expect_challenge(self) -> bytes:
        frame = await self.receive()
        if isinstance(frame, AuthErrorFrame):
            raise AuthError(f"gateway refused the connection: {frame.message}")
        if not isinstance(frame, Challenge):
            raise GatewayError(f"gateway sent {frame.type} where a challenge belongs")
        return base64.b64decode(frame.nonce)

    async def open(self) -> Hello:
        """Connect (checking the pinned certificate) and read ``hello`` and the first ``challenge``."""
        self._session = aiohttp.ClientSession()
        try:
            self._ws = await self._session.ws_connect(
                self.url, ssl=aiohttp.Fingerprint(bytes.fromhex(self.fingerprint)),
                max_msg_size=16 * 1024 * 1024, heartbeat=30.0,
            )
        except aiohttp.ServerFingerprintMismatch:
            await self.close()
            raise GatewayError(
                f"the gateway at {self.url} presented a certificate that does not match the pinned "
                f"fingerprint {self.fingerprint}; refusing to send credentials"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            await self.close()
            raise GatewayError(f"cannot connect to the gateway at {self.url}: {exc}; is `silo up` running?") from None
        hello = await self.receive()
        if not isinstance(hello, Hello):
            raise GatewayError(f"gateway greeted with {hello.type}, not hello")
        if CLIENT_PROTOCOL_VERSION not in hello.versions:
            raise GatewayError(f"the gateway speaks protocol version(s) {list(hello.versions)}; this client "
                               f"speaks {CLIENT_PROTOCOL_VERSION}: update one of them")
        self.hello = hello
        self.challenge = await self._expect_challenge()
        return hello

    async def send(self, frame: ClientFrame) -> None:
        """Send one frame."""
        if self._ws is None:
            raise GatewayError("not connected")
        await self._ws.send_str(frame.model_dump_json())

    async def receive(self) -> Any:
        """The next frame from the gateway; GatewayError when the connection ends."""
        if self._ws is None:
            raise GatewayError("not connected")
        msg = await self._ws.receive()
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise GatewayError(f"gateway connection closed ({msg.type.name})")
        return GATEWAY_FRAME.validate_python(json.loads(msg.data))

    async def frames(self) -> AsyncIterator[Any]:
        """Every frame until the connection closes; error frames raise GatewayError."""
        while True:
            frame = await self.receive()
            if isinstance(frame, ErrorFrame):
                raise GatewayError(f"{frame.code}: {frame.message}")
            yield frame

    async def close(self) -> None:
        """Close the connection."""
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
