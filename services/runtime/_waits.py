"""Waiting on an event for at most a while."""

from __future__ import annotations

import asyncio


async def set_within(event: asyncio.Event, seconds: float) -> bool:
    """True when ``event`` is set within ``seconds``, False when the time ran out first.

    Under ``asyncio.timeout``, not ``asyncio.wait_for``: in Python 3.11 the latter can swallow a
    cancellation that lands as the event is set, and a loop around it would then never end.
    """
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True
