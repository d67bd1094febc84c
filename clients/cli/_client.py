"""A client of the gateway's TLS WebSocket, pinned to the gateway's certificate."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import aiohttp
from devsilo.protocol import AuthError, SiloError
from devsilo.protocol.client import (
    GATEWAY_FRAME,
    Authenticate,
    AuthOk,
    ClientFrame,
    ErrorFrame,
    Hello,
)


class GatewayError(SiloError):
    """The gateway refused a request or the connection failed."""


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

    async def connect(self, token: str) -> str:
        """Connect, authenticate with the local token; return the user name."""
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
        await self.send(Authenticate(method="token", token=token, client_name=self.client_name))
        reply = await self.receive()
        if not isinstance(reply, AuthOk):
            raise AuthError(f"gateway refused authentication: {getattr(reply, 'message', reply.type)}")
        return reply.user

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
