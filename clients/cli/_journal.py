"""`silo journal export`: a session's journal as JSONL, page by page through the gateway."""

from __future__ import annotations

from typing import TextIO

from devsilo.protocol.client import JournalExport, JournalPage

from ._client import GatewayClient, GatewayError
from ._sessions import GatewayTarget


async def export_journal(target: GatewayTarget, session_id: str, out: TextIO) -> int:
    """Write the session's journal (records and network records, in order) to ``out``; return bytes."""
    written = 0
    after = offset = 0
    async with GatewayClient(target.url, target.fingerprint, client_name="silo-journal") as client:
        await client.connect(target.token)
        while True:
            await client.send(JournalExport(session_id=session_id, after=after, offset=offset))
            async for frame in client.frames():
                if isinstance(frame, JournalPage) and frame.session_id == session_id:
                    break
            else:
                raise GatewayError("the gateway closed the connection during the export")
            if frame.text:
                out.write(frame.text)
                written += len(frame.text)
            if frame.done:
                return written
            if (frame.after, frame.offset) == (after, offset):
                raise GatewayError(f"the export of {session_id} made no progress at {after}:{offset}")
            after, offset = frame.after, frame.offset
