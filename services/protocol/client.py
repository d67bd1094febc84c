"""The client protocol: JSON messages over the gateway's TLS WebSocket.

Every frame is one JSON object with ``type``. The gateway's ``hello`` lists
the protocol ``versions`` it speaks; a client names the one it speaks as
``v`` in its first frame (``authenticate`` or ``pair``), and a version the
gateway does not speak is refused with ``auth_error`` naming those it does.
Frames are validated against these models; anything else is answered with
``error``.

Authentication, within ``hello.auth_deadline_s`` of connecting: right after
``hello`` the gateway sends ``challenge`` (32 random bytes, single use, for
this connection only). A client then sends one of

- ``authenticate {method: "token", token}``: the local token (operator);
- ``authenticate {method: "key", key_id, signature}``: a registered key's
  signature over ``challenge_message(fingerprint, nonce)``, which binds it to
  this gateway's certificate and to devsilo, so it is worth nothing elsewhere;
- ``pair {code, public_key, key_type, client_name}``: register a new key with
  a pairing code; answered with ``paired`` and a fresh ``challenge``, after
  which the client authenticates with the new key.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from ._messages import (
    SESSION_ID_PATTERN,
    SHELL_DATA_MAX,
    TERM_PATTERN,
    LLMBackend,
    SandboxBackend,
    ShellSignalName,
)
from ._transfer import MAX_CHUNK, TRANSFER_ID_PATTERN, TransferPlan

CLIENT_PROTOCOL_VERSION = 1
CLIENT_PROTOCOL_VERSIONS: tuple[int, ...] = (1,)
"""Every protocol version this code speaks (the gateway lists them in ``hello``)."""
MAX_CLIENT_FRAME = 1024 * 1024
MAX_EVENTS_BATCH = 500
"""Most events one ``events`` frame carries."""
UPLOAD_CHUNK = 512 * 1024
"""Most bytes one ``upload_chunk`` carries (base64 makes it about 683 KiB of text)."""

PAIRING_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
PAIRING_CODE_LENGTH = 8
PAIRING_CODE_PATTERN = rf"^[{PAIRING_ALPHABET}]{{{PAIRING_CODE_LENGTH}}}$"
USER_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
KEY_ID_PATTERN = r"^[0-9a-f]{16,64}$"
CHALLENGE_BYTES = 32
CHALLENGE_CONTEXT = b"devsilo-gateway-challenge-v1"
KeyType = Literal["ed25519", "ecdsa-p256"]
"""``ed25519``: 32 raw bytes, 64-byte signature. ``ecdsa-p256``: the 65-byte
uncompressed point (WebCrypto ``exportKey("raw")``), 64-byte ``r||s``
signature over SHA-256 (WebCrypto's format)."""


def challenge_message(fingerprint: str, nonce: bytes) -> bytes:
    """What a client signs: context, the gateway certificate's SHA-256, the challenge.

    ``fingerprint`` is the certificate fingerprint the client pinned (hex,
    colons allowed). A signature made for another gateway, or over another
    connection's challenge, does not verify here.
    """
    fp = bytes.fromhex(fingerprint.replace(":", ""))
    if len(fp) != 32 or len(nonce) != CHALLENGE_BYTES:
        raise ValueError("a challenge binds a 32-byte SHA-256 fingerprint and a 32-byte nonce")
    return CHALLENGE_CONTEXT + b"\0" + fp + nonce


class ClientFrame(BaseModel):
    """Base of client protocol frames."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# -- client -> gateway -----------------------------------------------------------------


class Authenticate(ClientFrame):
    """Prove who the client is: the local token, or a paired key's signature over the challenge."""

    type: Literal["authenticate"] = "authenticate"
    v: int = CLIENT_PROTOCOL_VERSION
    method: Literal["token", "key"]
    token: str | None = Field(default=None, max_length=256)
    key_id: str | None = Field(default=None, pattern=KEY_ID_PATTERN)
    signature: str | None = Field(default=None, max_length=200, description="base64")
    client_name: str = Field(default="cli", min_length=1, max_length=128)

    @model_validator(mode="after")
    def _fields_of_method(self) -> Authenticate:
        if self.method == "token" and (self.token is None or self.key_id or self.signature):
            raise ValueError("method token takes token (and no key_id or signature)")
        if self.method == "key" and (self.key_id is None or self.signature is None or self.token):
            raise ValueError("method key takes key_id and signature (and no token)")
        return self


class Pair(ClientFrame):
    """Register a public key with a pairing code (instead of authenticating, as a first frame)."""

    type: Literal["pair"] = "pair"
    v: int = CLIENT_PROTOCOL_VERSION
    code: str = Field(pattern=PAIRING_CODE_PATTERN)
    public_key: str = Field(min_length=1, max_length=200, description="base64")
    key_type: KeyType = "ed25519"
    client_name: str = Field(min_length=1, max_length=128)


class PairingCodeRequest(ClientFrame):
    """Ask for a pairing code for a new client of ``user`` (default: yourself).

    Only an operator may ask for another user or for ``operator``.
    """

    type: Literal["pairing_code"] = "pairing_code"
    user: str | None = Field(default=None, pattern=USER_PATTERN)
    client_name: str = Field(min_length=1, max_length=128)
    operator: bool = False


class ListClients(ClientFrame):
    """List paired client keys: yours, or everyone's for an operator (answered with ``clients``)."""

    type: Literal["list_clients"] = "list_clients"


class RevokeClient(ClientFrame):
    """Revoke a paired key; its open connections close at once (answered with ``client_revoked``)."""

    type: Literal["revoke_client"] = "revoke_client"
    key_id: str = Field(pattern=KEY_ID_PATTERN)


class CreateSession(ClientFrame):
    """Start a session; the gateway turns it into a signed grant."""

    type: Literal["create_session"] = "create_session"
    workspace: str = Field(min_length=1, max_length=4096)
    workspace_host: str | None = Field(default=None, max_length=255)
    sandbox: SandboxBackend = "bwrap"
    llm: LLMBackend = "mock"
    model: str = Field(default="mock", max_length=200)
    script: str | None = Field(default=None, max_length=512 * 1024)
    headless: bool = False
    prompt: str | None = Field(default=None, max_length=256 * 1024)
    allow_read: tuple[str, ...] = ()
    allow_domains: tuple[str, ...] = ()
    credentials: tuple[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")], ...] = Field(
        default=(), max_length=32,
        description="names of egress credentials the session may use (the egress decides who may)")
    quota_tokens: int | None = Field(default=None, ge=0, description="the session stops once its models "
                                     "used this many tokens (the harness's own limit may be lower)")
    quota_usd: float | None = Field(default=None, ge=0, allow_inf_nan=False,
                                    description="the session stops once its models cost this many USD")


class Attach(ClientFrame):
    """Follow a session's events from ``from_seq`` (backlog first, then live).

    ``batch`` above 1: the client also takes ``events`` frames, and up to
    that many events waiting at once (a backlog, or a burst the client is
    slow to read) come as one frame; single events still come as ``event``.
    """

    type: Literal["attach"] = "attach"
    session_id: str = Field(pattern=SESSION_ID_PATTERN)
    from_seq: int = Field(default=0, ge=0)
    batch: int = Field(default=1, ge=1, le=MAX_EVENTS_BATCH)


class Prompt(ClientFrame):
    """A user prompt for a session."""

    type: Literal["prompt"] = "prompt"
    session_id: str = Field(pattern=SESSION_ID_PATTERN)
    text: str = Field(min_length=1, max_length=256 * 1024)


class Interrupt(ClientFrame):
    """Interrupt a session's current turn."""

    type: Literal["interrupt"] = "interrupt"
    session_id: str = Field(pattern=SESSION_ID_PATTERN)


class AnswerQuestion(ClientFrame):
    """Answer a session's open question: labels of its options and/or free text.

    The first answer wins; a later one gets an ``error`` with code ``question_closed``
    naming the client that answered first.
    """

    type: Literal["answer_question"] = "answer_question"
    session_id: str = Field(pattern=SESSION_ID_PATTERN)
    question_id: str = Field(pattern=SESSION_ID_PATTERN)
    selected: tuple[Annotated[str, Field(max_length=200)], ...] = Field(default=(), max_length=32)
    text: str | None = Field(default=None, max_length=64 * 1024)


class Shutdown(ClientFrame):
    """Stop a session: its agent ends and its sandbox closes."""

    type: Literal["shutdown"] = "shutdown"
    session_id: str = Field(pattern=SESSION_ID_PATTERN)


class WorkspaceCommand(ClientFrame):
    """Lock, unlock, describe one workspace, or list the locked ones."""

    type: Literal["workspace"] = "workspace"
    op: Literal["lock", "unlock", "status", "list"]
    path: str | None = Field(default=None, max_length=4096)
    workspace_host: str | None = Field(default=None, max_length=255)
    executor: str | None = Field(default=None, pattern=SESSION_ID_PATTERN)
    accept: bool = False
    uploaded: bool = False
    """The workspace was uploaded from this machine (``workspace_host``) to ``executor``."""


class WorkspaceUpload(ClientFrame):
    """Start or resume uploading a workspace of this machine to lock it on an executor elsewhere.

    The plan's ``transfer_id`` is the client's name for this upload; sending
    the same plan again resumes it (the answer lists the chunks already stored).
    """

    type: Literal["workspace_upload"] = "workspace_upload"
    path: str = Field(min_length=1, max_length=4096)
    workspace_host: str = Field(min_length=1, max_length=255)
    executor: str | None = Field(default=None, pattern=SESSION_ID_PATTERN)
    plan: TransferPlan


class WorkspaceChunk(ClientFrame):
    """One chunk of a transfer, base64 in ``data``: uploads from the client, downloads to it."""

    type: Literal["workspace_chunk"] = "workspace_chunk"
    transfer_id: str = Field(pattern=TRANSFER_ID_PATTERN)
    index: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    data: str = Field(max_length=4 * (MAX_CHUNK // 3 + 1))


class WorkspaceUploadCommit(ClientFrame):
    """Every chunk is up: lock the workspace from it (answered with ``workspace_result``)."""

    type: Literal["workspace_upload_commit"] = "workspace_upload_commit"
    transfer_id: str = Field(pattern=TRANSFER_ID_PATTERN)


class WorkspaceFetchChunk(ClientFrame):
    """Ask for one chunk of an unlocked workspace's result (answered with ``workspace_chunk``)."""

    type: Literal["workspace_fetch_chunk"] = "workspace_fetch_chunk"
    transfer_id: str = Field(pattern=TRANSFER_ID_PATTERN)
    index: int = Field(ge=0)


class WorkspaceTransferDone(ClientFrame):
    """The client has applied a result: its chunks may go (answered with ``workspace_transfer_closed``)."""

    type: Literal["workspace_transfer_done"] = "workspace_transfer_done"
    transfer_id: str = Field(pattern=TRANSFER_ID_PATTERN)


class RequestEvents(ClientFrame):
    """Ask for a bounded batch of a session's events from ``from_seq`` (answered with ``events``).

    A client that lost its connection, or was dropped for reading too
    slowly, asks from the seq after the last event it has until ``complete``.
    """

    type: Literal["request_events"] = "request_events"
    session_id: str = Field(pattern=SESSION_ID_PATTERN)
    from_seq: int = Field(default=0, ge=0)
    limit: int = Field(default=MAX_EVENTS_BATCH, ge=1, le=MAX_EVENTS_BATCH)


class UploadFile(ClientFrame):
    """Start uploading a file into a session's workspace (answered with ``upload_ready``).

    ``path`` is relative to the workspace; ``size`` and ``sha256`` are the
    whole file's, checked when the last chunk is in. ``upload_id`` is the
    client's name for this upload (unique per connection).
    """

    type: Literal["upload_file"] = "upload_file"
    session_id: str = Field(pattern=SESSION_ID_PATTERN)
    upload_id: str = Field(pattern=SESSION_ID_PATTERN)
    path: str = Field(min_length=1, max_length=4096)
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class UploadChunk(ClientFrame):
    """The next bytes of an upload (base64, at most ``UPLOAD_CHUNK`` decoded), at ``offset``.

    Answered with ``upload_progress``; after the last byte with ``upload_done``.
    """

    type: Literal["upload_chunk"] = "upload_chunk"
    upload_id: str = Field(pattern=SESSION_ID_PATTERN)
    offset: int = Field(ge=0)
    data: str = Field(max_length=4 * (UPLOAD_CHUNK // 3 + 1))


class AccessReportRequest(ClientFrame):
    """Ask what a session's sandbox can reach (answered with ``access_report``)."""

    type: Literal["access_report"] = "access_report"
    session_id: str = Field(pattern=SESSION_ID_PATTERN)


class CostRequest(ClientFrame):
    """Ask for a session's cost so far (answered with ``cost``)."""

    type: Literal["cost"] = "cost"
    session_id: str = Field(pattern=SESSION_ID_PATTERN)


class ListSessions(ClientFrame):
    """List the sessions this client's user may see."""

    type: Literal["list_sessions"] = "list_sessions"


class Ping(ClientFrame):
    """Keep-alive; answered with ``pong``."""

    type: Literal["ping"] = "ping"


class ShellOpenFrame(ClientFrame):
    """Open a shell in a sandbox on a locked workspace (``workspace``) or a session's (``session_id``).

    The policy is the running session's (else the workspace's defaults);
    ``sandbox``, ``allow_read`` and ``allow_domains`` override it when given.
    ``command`` None: an interactive shell. ``tty``: on a pseudo-terminal.
    Answered with ``shell_opened``, then ``shell_output`` frames and one ``shell_exit``.
    """

    type: Literal["shell_open"] = "shell_open"
    workspace: str | None = Field(default=None, min_length=1, max_length=4096)
    session_id: str | None = Field(default=None, pattern=SESSION_ID_PATTERN)
    command: str | None = Field(default=None, min_length=1, max_length=256 * 1024)
    tty: bool = True
    rows: int = Field(default=24, ge=1, le=1000)
    cols: int = Field(default=80, ge=1, le=1000)
    term: str = Field(default="xterm-256color", pattern=TERM_PATTERN)
    sandbox: SandboxBackend | None = None
    allow_read: tuple[str, ...] | None = None
    allow_domains: tuple[str, ...] | None = None


class ShellInputFrame(ClientFrame):
    """Bytes for a shell's stdin (base64, at most 16 KiB decoded); ``eof`` closes its stdin after them."""

    type: Literal["shell_input"] = "shell_input"
    shell_id: str = Field(pattern=SESSION_ID_PATTERN)
    data: str = Field(default="", max_length=SHELL_DATA_MAX)
    eof: bool = False


class ShellResizeFrame(ClientFrame):
    """The user's terminal changed size."""

    type: Literal["shell_resize"] = "shell_resize"
    shell_id: str = Field(pattern=SESSION_ID_PATTERN)
    rows: int = Field(ge=1, le=1000)
    cols: int = Field(ge=1, le=1000)


class ShellSignalFrame(ClientFrame):
    """Send a signal to the shell's foreground process group."""

    type: Literal["shell_signal"] = "shell_signal"
    shell_id: str = Field(pattern=SESSION_ID_PATTERN)
    signal: ShellSignalName


class JournalExport(ClientFrame):
    """Ask for the next page of a session's journal export (JSONL; only its user or an operator).

    Start with ``after`` 0 and ``offset`` 0, then pass back each ``journal_page``'s cursor.
    """

    type: Literal["journal_export"] = "journal_export"
    session_id: str = Field(pattern=SESSION_ID_PATTERN)
    after: int = Field(default=0, ge=0)
    offset: int = Field(default=0, ge=0)


ClientRequest = Annotated[
    Authenticate | CreateSession | Attach | Prompt | AnswerQuestion | Interrupt | Shutdown | WorkspaceCommand
    | ListSessions
    | Ping | ShellOpenFrame | ShellInputFrame | ShellResizeFrame | ShellSignalFrame
    | WorkspaceUpload | WorkspaceChunk | WorkspaceUploadCommit | WorkspaceFetchChunk
    | WorkspaceTransferDone | Pair | PairingCodeRequest | ListClients | RevokeClient | JournalExport
    | RequestEvents | UploadFile | UploadChunk | AccessReportRequest | CostRequest,
    Field(discriminator="type"),
]
CLIENT_REQUEST: TypeAdapter[Any] = TypeAdapter(ClientRequest)


# -- gateway -> client -----------------------------------------------------------------


class Hello(ClientFrame):
    """First frame from the gateway: what it speaks and how long auth may take.

    ``fingerprint`` is the SHA-256 of the certificate the gateway serves; a
    client that pinned one signs challenges with its pinned value, never this.
    """

    type: Literal["hello"] = "hello"
    v: int = CLIENT_PROTOCOL_VERSION
    versions: tuple[int, ...] = CLIENT_PROTOCOL_VERSIONS
    gateway: str
    auth_methods: tuple[str, ...]
    auth_deadline_s: float
    fingerprint: str = ""


class Challenge(ClientFrame):
    """32 random bytes (base64) to sign with a paired key; good for one attempt on this connection."""

    type: Literal["challenge"] = "challenge"
    nonce: str


class Paired(ClientFrame):
    """A pairing code registered the client's key; a ``challenge`` follows to authenticate with it."""

    type: Literal["paired"] = "paired"
    key_id: str
    user: str
    operator: bool


class AuthOk(ClientFrame):
    """Authentication succeeded."""

    type: Literal["auth_ok"] = "auth_ok"
    user: str
    operator: bool = False
    key_id: str | None = None


class AuthErrorFrame(ClientFrame):
    """Authentication failed (or the key was revoked); the gateway closes the connection after it.

    ``code``: ``auth_failed``, ``timeout``, ``unsupported_version`` (``versions``
    lists those the gateway speaks), ``rate_limited``, ``revoked``, ``unavailable``
    (the gateway could not check credentials; try again).
    """

    type: Literal["auth_error"] = "auth_error"
    message: str
    code: str = "auth_failed"
    versions: tuple[int, ...] = ()


class PairingCode(ClientFrame):
    """Answer to ``pairing_code``: give ``code`` to the new client before ``expires_at``."""

    type: Literal["pairing_code"] = "pairing_code"
    code: str
    user: str
    client_name: str
    operator: bool
    expires_at: float
    valid_s: float


class ClientKeySummary(BaseModel):
    """A line of ``clients``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    key_id: str
    user: str
    client_name: str
    key_type: KeyType
    operator: bool
    created_at: float
    last_seen: float | None


class Clients(ClientFrame):
    """Answer to ``list_clients``."""

    type: Literal["clients"] = "clients"
    clients: tuple[ClientKeySummary, ...]


class ClientRevoked(ClientFrame):
    """Answer to ``revoke_client``."""

    type: Literal["client_revoked"] = "client_revoked"
    key_id: str


class SessionCreated(ClientFrame):
    """A session started."""

    type: Literal["session_created"] = "session_created"
    session_id: str
    executor_id: str


class EventFrame(ClientFrame):
    """One session event, as the harness published it."""

    type: Literal["event"] = "event"
    session_id: str
    seq: int
    kind: str
    agent: str
    ts: float
    data: dict[str, Any]


class SessionSummary(BaseModel):
    """A line of ``sessions``: ``state`` is ``busy`` (a turn runs), ``idle``, ``ended`` or ``new``
    (no event yet), from the session's latest event; ``next_seq`` is the seq its next event gets."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    session_id: str
    user: str
    workspace: str
    created_at: float
    executor_id: str = ""
    state: Literal["busy", "idle", "ended", "new"] = "new"
    next_seq: int = 0


class EventsFrame(ClientFrame):
    """Answer to ``request_events``: events ``from_seq`` .. ``next_seq - 1`` in order.

    ``complete``: these reach the newest event stored; ask again from
    ``next_seq`` otherwise.
    """

    type: Literal["events"] = "events"
    session_id: str
    events: tuple[EventFrame, ...]
    next_seq: int
    complete: bool


class AccessReportFrame(ClientFrame):
    """Answer to ``access_report``: the session's report, from its ``access_report`` event."""

    type: Literal["access_report"] = "access_report"
    session_id: str
    seq: int
    report: dict[str, Any]


class CostFrame(ClientFrame):
    """Answer to ``cost``: sums of every numeric field of the session's cost events.

    ``by_model`` and ``by_agent`` split the same sums; ``through_seq`` is the
    last event counted (-1 before any).
    """

    type: Literal["cost"] = "cost"
    session_id: str
    totals: dict[str, float]
    by_model: dict[str, dict[str, float]]
    by_agent: dict[str, dict[str, float]]
    cost_events: int
    through_seq: int


class Overloaded(ClientFrame):
    """The gateway refused work for now: try again after ``retry_after_ms``.

    ``reason``: ``clients`` (too many connections), ``user_clients`` (too
    many of this user's), or ``rate`` (too many frames per second; the
    frame named in ``request`` was dropped).
    """

    type: Literal["overloaded"] = "overloaded"
    reason: Literal["clients", "user_clients", "rate"]
    message: str
    retry_after_ms: int
    request: str | None = None


class UploadReady(ClientFrame):
    """Answer to ``upload_file``: send chunks of at most ``chunk_size`` bytes from ``offset`` 0."""

    type: Literal["upload_ready"] = "upload_ready"
    upload_id: str
    chunk_size: int


class UploadProgress(ClientFrame):
    """A chunk was stored: ``received`` bytes so far."""

    type: Literal["upload_progress"] = "upload_progress"
    upload_id: str
    received: int


class UploadDone(ClientFrame):
    """The file is in the workspace (its hash checked); every client sees a ``file_shared`` event."""

    type: Literal["upload_done"] = "upload_done"
    upload_id: str
    session_id: str
    path: str
    size: int
    sha256: str


class Sessions(ClientFrame):
    """Answer to ``list_sessions``."""

    type: Literal["sessions"] = "sessions"
    sessions: tuple[SessionSummary, ...]


class WorkspaceResult(ClientFrame):
    """Answer to ``workspace``: the workspaces concerned and, after unlock, the change report."""

    type: Literal["workspace_result"] = "workspace_result"
    op: str
    workspaces: tuple[dict[str, Any], ...]
    report_text: str = ""
    report: dict[str, Any] = Field(default_factory=dict)
    auto_exec_changed: bool = False
    transfer: TransferPlan | None = None
    """unlock of an uploaded workspace: the result to fetch chunk by chunk and apply locally."""


class WorkspaceUploadNeeded(ClientFrame):
    """Answer to ``workspace`` lock: the executor cannot see this path; upload it instead."""

    type: Literal["workspace_upload_needed"] = "workspace_upload_needed"
    path: str
    executor: str
    reason: str


class WorkspaceUploadState(ClientFrame):
    """Answer to ``workspace_upload``: which chunks the gateway already holds."""

    type: Literal["workspace_upload_state"] = "workspace_upload_state"
    transfer_id: str
    executor: str
    have: tuple[int, ...]


class WorkspaceChunkAck(ClientFrame):
    """An uploaded chunk was checked and stored."""

    type: Literal["workspace_chunk_ack"] = "workspace_chunk_ack"
    transfer_id: str
    index: int


class WorkspaceTransferClosed(ClientFrame):
    """Answer to ``workspace_transfer_done``."""

    type: Literal["workspace_transfer_closed"] = "workspace_transfer_closed"
    transfer_id: str


class Pong(ClientFrame):
    """Answer to ``ping``."""

    type: Literal["pong"] = "pong"


class ShellOpenedFrame(ClientFrame):
    """The shell runs: where, with what access, and how its policy differs from the workspace's."""

    type: Literal["shell_opened"] = "shell_opened"
    shell_id: str
    executor_id: str
    access: dict[str, Any]
    notes: tuple[str, ...] = ()


class ShellOutputFrame(ClientFrame):
    """Output of a shell (base64): ``pty`` for a terminal, else ``stdout`` or ``stderr``."""

    type: Literal["shell_output"] = "shell_output"
    shell_id: str
    stream: Literal["pty", "stdout", "stderr"]
    data: str


class ShellExitFrame(ClientFrame):
    """The shell ended; ``exit_code`` None when it could not finish (``message`` says why)."""

    type: Literal["shell_exit"] = "shell_exit"
    shell_id: str
    exit_code: int | None = None
    signal: int | None = None
    message: str = ""


class ErrorFrame(ClientFrame):
    """A request failed; ``message`` says what to do."""

    type: Literal["error"] = "error"
    code: str
    message: str
    request: str | None = None


class JournalPage(ClientFrame):
    """A piece of a session's journal export: pieces concatenate into the JSONL file."""

    type: Literal["journal_page"] = "journal_page"
    session_id: str
    text: str
    after: int
    offset: int
    done: bool


GatewayFrame = Annotated[
    Hello | AuthOk | AuthErrorFrame | SessionCreated | EventFrame | Sessions | WorkspaceResult | Pong
    | ErrorFrame | ShellOpenedFrame | ShellOutputFrame | ShellExitFrame
    | WorkspaceUploadNeeded | WorkspaceUploadState | WorkspaceChunkAck | WorkspaceChunk
    | WorkspaceTransferClosed | Challenge | Paired | PairingCode | Clients | ClientRevoked | JournalPage
    | EventsFrame | AccessReportFrame | CostFrame | Overloaded | UploadReady | UploadProgress | UploadDone,
    Field(discriminator="type"),
]
GATEWAY_FRAME: TypeAdapter[Any] = TypeAdapter(GatewayFrame)
