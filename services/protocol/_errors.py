"""The one exception tree of devsilo.

    SiloError                       anything devsilo raises on purpose
    ├── ConfigError                 bad or missing configuration, state directory, key files
    ├── ProtocolError               a message that cannot be trusted or understood
    │   └── MessageRejected         dropped before any handler; ``reason`` is a metric label
    │       ├── Oversized
    │       ├── Malformed
    │       ├── UnknownSender
    │       ├── WrongKey
    │       ├── BadSignature
    │       ├── RoleNotAllowed
    │       ├── WrongSubject
    │       ├── Expired
    │       ├── Replayed
    │       └── InvalidBody
    ├── GrantError                  a session grant that is forged, expired or exceeds limits
    ├── RemoteError                 a service answered a request with an error reply
    ├── InputRefused                the harness refused a client's input (e.g. a closed question)
    ├── PoolError                   no executor could take a session (capacity, limits, backend)
    ├── SandboxError                a sandbox could not be started or died
    │   └── SandboxClosed           a session's sandbox was closed under it
    ├── ToolError                   a tool call that failed in a way the model should see
    ├── UploadError                 a client's file upload refused (size, hash, path); ``code`` says which
    └── AuthError                   a client failed to authenticate

Every error carries a message that says what failed, on what, and what to try.
"""

from __future__ import annotations


class SiloError(Exception):
    """Base of every error devsilo raises on purpose."""


class ConfigError(SiloError):
    """Configuration, state directory or key material is missing or wrong."""


class ProtocolError(SiloError):
    """A message that cannot be trusted or understood."""


class MessageRejected(ProtocolError):
    """A message dropped before any handler ran.

    ``reason`` is a short, low-cardinality label used in the
    ``silo_messages_rejected_total{reason}`` metric and in error replies.
    """

    reason = "rejected"

    def __init__(self, detail: str) -> None:
        super().__init__(f"{self.reason}: {detail}")
        self.detail = detail


class Oversized(MessageRejected):
    """The message is larger than the configured limit."""

    reason = "oversized"


class Malformed(MessageRejected):
    """The bytes are not a signed envelope at all."""

    reason = "malformed"


class UnknownSender(MessageRejected):
    """The key id is not in the trust roster."""

    reason = "unknown_sender"


class WrongKey(MessageRejected):
    """The key belongs to a different sender or role than the envelope claims."""

    reason = "wrong_key"


class BadSignature(MessageRejected):
    """The signature does not verify over the bytes received."""

    reason = "bad_signature"


class RoleNotAllowed(MessageRejected):
    """The sender's role may not publish on this subject or send this type."""

    reason = "role_not_allowed"


class WrongSubject(MessageRejected):
    """The envelope was signed for another subject than the one it arrived on."""

    reason = "wrong_subject"


class Expired(MessageRejected):
    """The envelope is past its expiry, not yet valid, or claims too long a life."""

    reason = "expired"


class Replayed(MessageRejected):
    """The message id was already seen within its validity window."""

    reason = "replayed"


class InvalidBody(MessageRejected):
    """The signed body does not match the schema of its declared type."""

    reason = "invalid_body"


class GrantError(SiloError):
    """A session grant that is forged, expired, for another session or beyond limits."""


class RemoteError(SiloError):
    """A service answered a request with an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class InputRefused(SiloError):
    """The harness refused a client's input; ``code`` says why (e.g. ``question_closed``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class PoolError(SiloError):
    """No executor could take a session; ``code`` says why (capacity, user_limit, backend)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class SandboxError(SiloError):
    """A sandbox could not be started, or died."""


class SandboxClosed(SandboxError):
    """A session's sandbox is gone (closed by its executor, e.g. on unlock); the session ends."""

    code = "sandbox_closed"


class ToolError(SiloError):
    """A tool call failed in a way the model should be told about."""


class UploadError(SiloError):
    """A client's file upload was refused; ``code`` is ``upload_too_large``, ``upload_hash_mismatch``,
    ``upload_bad_path``, ``upload_bad_chunk`` or ``upload_unknown``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class AuthError(SiloError):
    """A client failed to authenticate."""
