"""Gateway clients for tests: connect as the stack's local user, follow a session through cuts."""

from __future__ import annotations

import asyncio
import time

from devsilo.cli._client import GatewayClient, GatewayError
from devsilo.protocol.client import Attach, EventFrame
from devsilo.runtime._state import StateDir

from ._stack import Stack


def gateway_url(stack: Stack) -> str:
    """The stack's gateway WebSocket address."""
    return f"wss://127.0.0.1:{stack.gateway_port}/ws"


async def connect(stack: Stack, name: str) -> GatewayClient:
    """A client connected and authenticated with the stack's local client token."""
    state = StateDir(stack.state_dir)
    client = GatewayClient(gateway_url(stack), state.gateway_fingerprint(), client_name=name)
    try:
        await client.connect(state.client_token())
    except BaseException:
        await client.close()
        raise
    return client


async def follow(stack: Stack, name: str, sid: str, events: list[EventFrame], cuts: list[str],
                 timeout: float = 120.0) -> None:
    """Follow ``sid`` into ``events`` until its shutdown, through gateway restarts.

    A client cut off (its ``name`` appended to ``cuts``) connects again and
    attaches from the next seq it lacks, as the CLI does.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            client = await connect(stack, name)
        except (GatewayError, OSError):
            await asyncio.sleep(0.2)
            continue
        try:
            await client.send(Attach(session_id=sid, from_seq=len(events)))
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                while True:
                    frame = await client.receive()
                    if isinstance(frame, EventFrame) and frame.session_id == sid:
                        events.append(frame)
                        if frame.kind == "shutdown":
                            return
        except GatewayError:
            cuts.append(name)
        finally:
            await client.close()
    raise AssertionError(f"{name} never saw session {sid} end; it got {[e.kind for e in events]}")
