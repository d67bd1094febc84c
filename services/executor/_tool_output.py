"""A running tool call's output, coalesced into a few ``ToolOutput`` messages for the harness."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from devsilo.protocol import TOOL_OUTPUT_CHUNK, ToolOutput

LINGER_S = 0.05
"""How long output gathers before it is sent: at most about 20 messages a second per call, each up
to ``TOOL_OUTPUT_CHUNK`` characters. The helper caps a command's output, so a call's total is bounded."""


class ToolOutputStream:
    """Takes a command's output chunks (``feed``, called synchronously by the helper client) and
    sends them in order, merged per stream up to ``TOOL_OUTPUT_CHUNK`` characters.

    A failed send is logged and the rest still go: streamed output is a live view, and the call's
    result carries the output anyway.
    """

    def __init__(self, send: Callable[[ToolOutput], Awaitable[None]], call_id: str, *, log: Any,
                 linger_s: float = LINGER_S) -> None:
        self._send = send
        self._call_id = call_id
        self._log = log
        self._linger_s = linger_s
        self._pending: list[tuple[str, str]] = []
        self._wake = asyncio.Event()
        self._closing = False
        self.sent = 0
        """Messages sent so far (their ``seq`` ran from 0 to ``sent - 1``)."""
        self._pump = asyncio.create_task(self._run())

    def feed(self, stream: str, text: str) -> None:
        """Queue a chunk of ``stream`` (stdout or stderr)."""
        if not text:
            return
        if self._pending and self._pending[-1][0] == stream:
            self._pending[-1] = (stream, self._pending[-1][1] + text)
        else:
            self._pending.append((stream, text))
        self._wake.set()

    async def close(self) -> int:
        """Send what is still queued, stop; the number of messages sent."""
        self._closing = True
        self._wake.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump
        return self.sent

    def abort(self) -> None:
        """Stop at once, dropping what is queued."""
        self._pump.cancel()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._closing:
                await asyncio.sleep(self._linger_s)
            pending, self._pending = self._pending, []
            for stream, text in pending:
                for start in range(0, len(text), TOOL_OUTPUT_CHUNK):
                    msg = ToolOutput(call_id=self._call_id, seq=self.sent, stream=stream,  # type: ignore[arg-type]
                                     data=text[start:start + TOOL_OUTPUT_CHUNK])
                    try:
                        await self._send(msg)
                        self.sent += 1
                    except Exception as exc:  # noqa: BLE001 -- see the class docstring
                        self._log.warning("tool_output_send_failed", call=self._call_id, error=str(exc))
            if self._closing and not self._pending:
                return
