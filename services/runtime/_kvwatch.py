"""Following a JetStream KV bucket across NATS restarts.

A nats-py ``KeyValue.watchall()`` watcher made before the server restarts
hears nothing after it (its consumer is gone and it is not made again), and
says nothing about it. :func:`follow_kv` makes the watch again after every
reconnect of the bus's connection; each new watch delivers the bucket's
current values first, so nothing that changed while NATS was away is missed
(``on_current`` gets the keys that exist at that point: anything else was
deleted meanwhile).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from nats.errors import Error as NatsError
from nats.js.kv import KeyValue

from ._bus import Bus

POLL_S = 1.0
"""How often a quiet watch checks whether the connection was made again."""


async def follow_kv(
    kv: KeyValue,
    bus: Bus,
    on_entry: Callable[[KeyValue.Entry], Awaitable[None]],
    *,
    on_current: Callable[[set[str]], None] | None = None,
    log: Any = None,
    poll_s: float = POLL_S,
) -> None:
    """Call ``on_entry`` for every value and change of ``kv`` until cancelled, across restarts."""
    while True:
        generation = bus.reconnects
        try:
            watcher = await kv.watchall()
        except (NatsError, TimeoutError) as exc:  # NATS still coming back: try again
            if log is not None:
                log.warning("kv_watch_failed", error=str(exc) or type(exc).__name__)
            await asyncio.sleep(poll_s)
            continue
        current: set[str] | None = set()
        try:
            while bus.reconnects == generation:
                # Not ``watcher.updates(timeout)``: its ``asyncio.wait_for`` (Python 3.11) swallows a
                # cancellation that lands as an update arrives, and this loop would then never end
                # (a harness stopping just after a session left the owners bucket hung until killed).
                try:
                    async with asyncio.timeout(poll_s):
                        entry = await anext(watcher)
                except TimeoutError:
                    continue
                except StopAsyncIteration:  # stopped under us: watch again
                    break
                if entry is None:  # the current values are all in
                    if current is not None and on_current is not None:
                        on_current(current)
                    current = None
                    continue
                if current is not None:
                    current.add(entry.key)
                await on_entry(entry)
        finally:
            try:
                await watcher.stop()  # type: ignore[no-untyped-call]
            except (NatsError, TimeoutError):
                pass  # its subscription died with the old connection
