"""devsilo's protocol: message models, subjects, signed envelope, roster, errors.

Pure data and checks; no I/O. Every service imports this package; it imports
nothing else of devsilo's.
"""

from ._envelope import (
    DEFAULT_MAX_BYTES,
    Envelope,
    EnvelopeHeader,
    Signer,
    Verifier,
    peek_header,
)
from ._errors import (
    AuthError,
    BadSignature,
    ConfigError,
    Expired,
    GrantError,
    InvalidBody,
    Malformed,
    MessageRejected,
    Oversized,
    PoolError,
    ProtocolError,
    RemoteError,
    Replayed,
    RoleNotAllowed,
    SandboxError,
    SiloError,
    ToolError,
    UnknownSender,
    WrongKey,
    WrongSubject,
)
from ._grant import open_grant, seal_grant
from ._messages import (
    SANDBOX_TOOLS,
    AccessReport,
    Ack,
    BashInput,
    EditInput,
    GlobInput,
    GrepInput,
    WebFetchInput,
    CloseSession,
    EgressSessionClose,
    EgressSessionOpen,
    EgressSessionReady,
    ErrorReply,
    EventKind,
    ExecutorAnnounce,
    LeaseGranted,
    LeaseRequest,
    LLMChoice,
    Message,
    MESSAGE_TYPES,
    ReadInput,
    SessionEvent,
    SessionGrant,
    SessionInput,
    SessionStarted,
    StartSession,
    ToolCall,
    ToolInput,
    ToolResult,
    WriteInput,
)
from ._replay import ReplayCache
from ._roster import RosterEntry, ServiceIdentity, TrustRoster, key_id
from . import _subjects as subjects
from ._subjects import Role

__all__ = [
    "DEFAULT_MAX_BYTES", "Envelope", "EnvelopeHeader", "Signer", "Verifier", "peek_header",
    "AuthError", "BadSignature", "ConfigError", "Expired", "GrantError", "InvalidBody",
    "Malformed", "MessageRejected", "Oversized", "PoolError", "ProtocolError", "RemoteError", "Replayed",
    "RoleNotAllowed", "SandboxError", "SiloError", "ToolError", "UnknownSender", "WrongKey",
    "WrongSubject", "open_grant", "seal_grant", "SANDBOX_TOOLS", "AccessReport", "Ack",
    "BashInput", "EditInput", "GlobInput", "GrepInput", "WebFetchInput", "CloseSession", "EgressSessionClose", "EgressSessionOpen", "EgressSessionReady",
    "ErrorReply", "EventKind", "ExecutorAnnounce", "LeaseGranted", "LeaseRequest", "LLMChoice", "Message",
    "MESSAGE_TYPES", "ReadInput", "SessionEvent", "SessionGrant", "SessionInput",
    "SessionStarted", "StartSession", "ToolCall", "ToolInput", "ToolResult", "WriteInput",
    "ReplayCache", "RosterEntry", "ServiceIdentity", "TrustRoster", "key_id", "subjects", "Role",
]

from . import client  # noqa: E402  (the client protocol, as a namespace)

__all__ += ["client"]
