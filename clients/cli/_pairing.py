"""`silo pair` and `silo clients list|revoke`: paired client keys, through the gateway."""

from __future__ import annotations

import datetime as dt
import json
from typing import TextIO

from devsilo.protocol.client import (
    ClientRevoked,
    Clients,
    ListClients,
    PairingCode,
    PairingCodeRequest,
    RevokeClient,
)

from ._client import GatewayClient
from ._sessions import EXIT_RUNTIME, GatewayTarget


def _when(ts: float | None) -> str:
    if ts is None:
        return "never"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


async def pair_command(target: GatewayTarget, request: PairingCodeRequest, out: TextIO, *,
                       as_json: bool = False) -> int:
    """Ask the gateway for a pairing code and print it with what the new client must pin."""
    async with GatewayClient(target.url, target.fingerprint, client_name="silo-pair") as client:
        await client.connect(target.token)
        await client.send(request)
        async for frame in client.frames():
            if isinstance(frame, PairingCode):
                if as_json:
                    out.write(json.dumps({**frame.model_dump(mode="json"), "gateway": target.url,
                                          "fingerprint": target.fingerprint}) + "\n")
                    return 0
                role = " (operator)" if frame.operator else ""
                out.write(f"pairing code: {frame.code}\n"
                          f"  for:         {frame.client_name} of user {frame.user}{role}\n"
                          f"  valid until: {_when(frame.expires_at)} ({frame.valid_s:.0f} s), once\n"
                          f"  gateway:     {target.url}\n"
                          f"  fingerprint: SHA256 {target.fingerprint}\n")
                return 0
    return EXIT_RUNTIME


async def clients_command(target: GatewayTarget, action: str, key_id: str | None, out: TextIO, *,
                          as_json: bool = False) -> int:
    """List paired client keys, or revoke one."""
    async with GatewayClient(target.url, target.fingerprint, client_name="silo-clients") as client:
        await client.connect(target.token)
        if action == "revoke":
            assert key_id is not None
            await client.send(RevokeClient(key_id=key_id))
        else:
            await client.send(ListClients())
        async for frame in client.frames():
            if isinstance(frame, ClientRevoked):
                out.write(f"revoked client key {frame.key_id}; its connections were closed\n")
                return 0
            if isinstance(frame, Clients):
                if as_json:
                    out.write(json.dumps([c.model_dump(mode="json") for c in frame.clients], indent=2) + "\n")
                    return 0
                if not frame.clients:
                    out.write("no paired clients\n")
                for c in frame.clients:
                    role = "  operator" if c.operator else ""
                    out.write(f"{c.key_id}  {c.user}  {c.client_name}  {c.key_type}  created "
                              f"{_when(c.created_at)}  last seen {_when(c.last_seen)}{role}\n")
                return 0
    return EXIT_RUNTIME
