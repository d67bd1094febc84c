"""`silo journal export` through the gateway: one bounded page at a time, from a harness.

The gateway never reads the journal stream itself: it asks a harness (the
role that holds journals) for the next page on the client's behalf, naming
the authenticated user, and the harness checks that the session is that
user's (an operator may read any). Pages are bounded, so a journal of any
size crosses NATS and the WebSocket in messages of bounded size.
"""

from __future__ import annotations

from devsilo.protocol import JournalExportPage, JournalExportRequest, RemoteError, Role, subjects
from devsilo.protocol.client import JournalExport, JournalPage
from devsilo.runtime import Bus

from ._auth import Principal

PAGE_BYTES = 256 * 1024


async def export_page(bus: Bus, who: Principal, req: JournalExport) -> JournalPage:
    """The next page of ``req.session_id``'s export for ``who`` (RemoteError when refused)."""
    page = await bus.request(
        subjects.HARNESS_JOURNAL_EXPORT,
        JournalExportRequest(session_id=req.session_id, user=who.user, operator=who.operator,
                             after=req.after, offset=req.offset, max_bytes=PAGE_BYTES),
        JournalExportPage, from_role=Role.HARNESS, sid=req.session_id, timeout=30.0,
    )
    if page.session_id != req.session_id:
        raise RemoteError("mismatch", f"a harness answered for session {page.session_id}, "
                                      f"not {req.session_id}")
    return JournalPage(session_id=page.session_id, text=page.text, after=page.after, offset=page.offset,
                       done=page.done)
