"""The client protocol: JSON messages over the gateway's TLS WebSocket.

Every frame is one JSON object with ``type``; clients send ``v`` (the
protocol version, currently 1) in ``authenticate``. Frames are validated
against these models; anything else is answered with ``error``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

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
MAX_CLIENT_FRAME = 1024 * 1024


class ClientFrame(BaseModel):
    """Base of client protocol frames."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# -- client -> gateway -----------------------------------------------------------------


class Authenticate(ClientFrame):
    """Prove who the client is: the local token (more methods come with pairing)."""

    type: Literal["authenticate"] = "authenticate"
    v: int = CLIENT_PROTOCOL_VERSION
    method: Literal["token"]
    token: str = Field(max_length=256)
    client_name: str = Field(default="cli", max_length=128)


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


class Attach(ClientFrame):
    """Follow a session's events from ``from_seq`` (backlog first, then live)."""

    type: Literal["attach"] = "attach"
    session_id: str = Field(pattern=SESSION_ID_PATTERN)
    from_seq: int = Field(default=0, ge=0)


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


ClientRequest = Annotated[
    Authenticate | CreateSession | Attach | Prompt | AnswerQuestion | Interrupt | Shutdown | WorkspaceCommand
    | ListSessions
    | Ping | ShellOpenFrame | ShellInputFrame | ShellResizeFrame | ShellSignalFrame
    | WorkspaceUpload | WorkspaceChunk | WorkspaceUploadCommit | WorkspaceFetchChunk
    | WorkspaceTransferDone,
    Field(discriminator="type"),
]
CLIENT_REQUEST: TypeAdapter[Any] = TypeAdapter(ClientRequest)


# -- gateway -> client -----------------------------------------------------------------


class Hello(ClientFrame):
    """First frame from the gateway: what it speaks and how long auth may take."""

    type: Literal["hello"] = "hello"
    v: int = CLIENT_PROTOCOL_VERSION
    gateway: str
    auth_methods: tuple[str, ...]
    auth_deadline_s: float


class AuthOk(ClientFrame):
    """Authentication succeeded."""

    type: Literal["auth_ok"] = "auth_ok"
    user: str


class AuthErrorFrame(ClientFrame):
    """Authentication failed; the gateway closes the connection after it."""

    type: Literal["auth_error"] = "auth_error"
    message: str


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
    """A line of ``sessions``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    session_id: str
    user: str
    workspace: str
    created_at: float


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


GatewayFrame = Annotated[
    Hello | AuthOk | AuthErrorFrame | SessionCreated | EventFrame | Sessions | WorkspaceResult | Pong
    | ErrorFrame | ShellOpenedFrame | ShellOutputFrame | ShellExitFrame
    | WorkspaceUploadNeeded | WorkspaceUploadState | WorkspaceChunkAck | WorkspaceChunk
    | WorkspaceTransferClosed,
    Field(discriminator="type"),
]
GATEWAY_FRAME: TypeAdapter[Any] = TypeAdapter(GatewayFrame)
