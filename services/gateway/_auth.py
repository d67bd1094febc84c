"""Client authentication: the local token (pairing and signed challenges come later)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from devsilo.protocol import AuthError
from devsilo.protocol.client import Authenticate

LOCAL_USER = "local"


@dataclass(frozen=True)
class Principal:
    """Who an authenticated connection acts for."""

    user: str
    client: str
    operator: bool


class TokenAuthenticator:
    """Checks the local token in constant time."""

    def __init__(self, token: str) -> None:
        if len(token) < 32:
            raise AuthError("local token is too short; run `silo init --rotate`")
        self._token = token.encode()

    def authenticate(self, frame: Authenticate) -> Principal:
        """Return the principal for a valid token; AuthError otherwise."""
        if frame.method != "token" or not hmac.compare_digest(frame.token.encode(), self._token):
            raise AuthError("invalid token")
        return Principal(user=LOCAL_USER, client=frame.client_name, operator=True)
