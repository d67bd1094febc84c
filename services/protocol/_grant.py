"""Session grants: sealed by the gateway, opened and checked by every other service."""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable

from ._envelope import Signer, Verifier
from ._errors import GrantError, MessageRejected
from ._messages import SessionGrant
from ._subjects import GRANT, Role


def seal_grant(signer: Signer, grant: SessionGrant) -> str:
    """Sign a grant as the gateway; return it as base64 text to embed in messages."""
    if signer.identity.role is not Role.GATEWAY:
        raise GrantError(f"only a gateway signs grants, not {signer.identity.role.value}")
    ttl = max(1.0, grant.expires_at - grant.issued_at)
    wire, _ = signer.seal(grant, GRANT, sid=grant.session_id, ttl=ttl, mid=grant.grant_id)
    return base64.b64encode(wire).decode()


def open_grant(
    verifier: Verifier,
    sealed: str,
    *,
    session_id: str | None = None,
    clock: Callable[[], float] = time.time,
) -> SessionGrant:
    """Verify a sealed grant's gateway signature, expiry and session; return it."""
    try:
        wire = base64.b64decode(sealed, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise GrantError(f"grant is not base64: {exc}") from None
    try:
        env = verifier.open(wire, GRANT, fresh=False)
    except MessageRejected as exc:
        raise GrantError(f"grant rejected: {exc}") from None
    if env.header.role is not Role.GATEWAY:
        raise GrantError(f"grant signed by {env.header.sender} ({env.header.role.value}), not a gateway")
    grant = env.expect(SessionGrant)
    if env.header.sid != grant.session_id:
        raise GrantError("grant header and body name different sessions")
    if session_id is not None and grant.session_id != session_id:
        raise GrantError(f"grant is for session {grant.session_id}, not {session_id}")
    if grant.expires_at < clock():
        raise GrantError(f"grant for session {grant.session_id} expired")
    return grant
