"""A user's shell output on its way from the helper to the gateway: in order, chunked, paced.

The helper client hands every output chunk to :meth:`ShellStream.put`, which
waits while the queue is full; meanwhile the helper reads nothing more from
the shell's terminal, so a process that writes faster than the user reads
simply blocks in the sandbox. The stream sends at most ``window`` chunks
ahead of the gateway's last ``ack`` and gives up when no ack comes for
``ack_timeout`` seconds (the gateway or its client is gone).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from typing import Any, cast

from devsilo.protocol import SHELL_CHUNK, SHELL_WINDOW, ShellOutput, SiloError

ACK_TIMEOUT_S = 120.0
QUEUE_CHUNKS = 16
"""Helper output chunks held here while the gateway catches up."""


class ShellStalled(SiloError):
    """The gateway stopped acknowledging a shell's output."""


class ShellStream:
    """Sequence-numbered, flow-controlled output of one shell."""

    def __init__(self, publish: Callable[[ShellOutput], Awaitable[None]], *, window: int = SHELL_WINDOW,
                 ack_timeout: float = ACK_TIMEOUT_S) -> None:
        self._publish = publish
        self._window = window
        self._ack_timeout = ack_timeout
        self._queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue(QUEUE_CHUNKS)
        self._acked = 0
        self._credit = asyncio.Event()
        self.seq = 0
        """Chunks sent so far (the next chunk's number)."""

    async def put(self, stream: str, data: bytes) -> None:
        """Queue output from the helper; waits while the queue is full."""
        await self._queue.put((stream, data))

    async def finish(self) -> None:
        """No more output: :meth:`run` returns once everything queued is sent."""
        await self._queue.put(None)

    def ack(self, seq: int) -> None:
        """The gateway delivered chunks below ``seq`` (acks for chunks never sent are ignored)."""
        if self._acked < seq <= self.seq:
            self._acked = seq
            self._credit.set()

    async def run(self) -> None:
        """Send queued output until :meth:`finish`; ShellStalled when the gateway stops acking."""
        while (item := await self._queue.get()) is not None:
            stream, data = item
            for i in range(0, len(data), SHELL_CHUNK):
                await self._room()
                chunk = base64.b64encode(data[i:i + SHELL_CHUNK]).decode("ascii")
                await self._publish(ShellOutput(seq=self.seq, stream=cast(Any, stream), data=chunk))
                self.seq += 1

    async def _room(self) -> None:
        while self.seq - self._acked >= self._window:
            self._credit.clear()
            try:
                await asyncio.wait_for(self._credit.wait(), self._ack_timeout)
            except TimeoutError:
                raise ShellStalled(f"no acknowledgement of shell output for {self._ack_timeout:.0f}s: "
                                   "its gateway or client stopped reading") from None
