"""Pydantic models for every message body that crosses NATS.

Each model has a ``TYPE`` (the envelope's ``type``) and the subject patterns it
may travel on (``SUBJECTS``; replies travel on inboxes). Models are frozen and
forbid unknown fields, so a body is exactly what its sender signed.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from ._subjects import EVENTS_SUBJECTS, GRANT, HARNESS_START, INBOX_PREFIX, POOL_ANNOUNCE_ALL
from ._transfer import RemoteLock, TransferPlan

REPLY = INBOX_PREFIX + ">"

SandboxBackend = Literal["bwrap", "gvisor", "docker", "microvm", "mock", "auto"]
"""``auto``: the executor uses the strongest backend it has that works."""
LLMBackend = Literal["anthropic", "openai", "openai-ws", "local", "mock"]
EventKind = Literal[
    "session_started",
    "user_prompt",
    "assistant_text",
    "tool_use",
    "tool_output",
    "tool_result",
    "agent_spawned",
    "agent_completed",
    "question_asked",
    "question_answered",
    "file_shared",
    "cost",
    "turn_complete",
    "interrupted",
    "awaiting_input",
    "busy",
    "access_report",
    "error",
    "shutdown",
]

SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class Message(BaseModel):
    """Base of every message body."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    TYPE: ClassVar[str]
    SUBJECTS: ClassVar[tuple[str, ...]]


class SessionGrant(Message):
    """The capability that starts a session, signed by the gateway.

    Harness, executor and egress each verify it themselves and apply their own
    operator limits on top, so no single service can widen a session's reach.
    """

    TYPE = "session_grant"
    SUBJECTS = (GRANT,)
    grant_id: str = Field(pattern=SESSION_ID_PATTERN)
    session_id: str = Field(pattern=SESSION_ID_PATTERN)
    user: str = Field(min_length=1, max_length=128)
    workspace: str = Field(min_length=1, max_length=4096)
    workspace_host: str | None = Field(default=None, max_length=255,
                                       description="the machine the workspace path is on; executors elsewhere cannot serve it")
    sandbox: SandboxBackend = "bwrap"
    executor: str | None = Field(default=None, pattern=SESSION_ID_PATTERN)
    allow_read: tuple[str, ...] = ()
    allow_domains: tuple[str, ...] = ()
    credentials: tuple[str, ...] = ()
    quota_tokens: int | None = Field(default=None, ge=0)
    quota_usd: float | None = Field(default=None, ge=0)
    egress_addr: str | None = Field(default=None, max_length=300,
                                    description="host:port of the egress proxy this session goes out through")
    issued_at: float
    expires_at: float


class LLMChoice(BaseModel):
    """Which model drives a session. ``script`` is the mock model's script (JSON)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    backend: LLMBackend = "mock"
    model: str = Field(default="mock", max_length=200)
    script: str | None = Field(default=None, max_length=512 * 1024)


class StartSession(Message):
    """Gateway asks a harness to start a session under a signed grant."""

    TYPE = "start_session"
    SUBJECTS = (HARNESS_START,)
    grant: str = Field(max_length=64 * 1024, description="base64 of the signed grant envelope")
    llm: LLMChoice
    headless: bool = False
    prompt: str | None = Field(default=None, max_length=256 * 1024)


class SessionStarted(Message):
    """Harness reply: the session runs."""

    TYPE = "session_started"
    SUBJECTS = (REPLY,)
    session_id: str
    executor_id: str


class SessionInput(Message):
    """A client's input to a session, forwarded by the gateway."""

    TYPE = "session_input"
    SUBJECTS = ("silo.session.*.input",)
    kind: Literal["prompt", "answer", "interrupt", "stop"]
    text: str = Field(default="", max_length=256 * 1024)
    question_id: str | None = None
    client: str = Field(default="", max_length=128)


class SessionEvent(Message):
    """One event of a session: ``seq`` counts from 0 per session, without gaps."""

    TYPE = "session_event"
    SUBJECTS = (EVENTS_SUBJECTS,)
    session_id: str
    seq: int = Field(ge=0)
    kind: EventKind
    agent: str = "main"
    ts: float
    data: dict[str, Any] = Field(default_factory=dict)


class AccessReport(BaseModel):
    """What a session's sandbox can reach; shown to every client."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    backend: str
    workspace: str
    readable_paths: tuple[str, ...] = ()
    allowed_domains: tuple[str, ...] = ()
    credential_domains: tuple[str, ...] = ()
    limits: dict[str, Any] = Field(default_factory=dict)
    warnings: tuple[str, ...] = ()


class ExecutorAnnounce(Message):
    """An executor's heartbeat: what it can run and how much room it has.

    ``instance`` changes on every start, so a restarted executor is told from
    the one whose sandboxes died with it. ``stopping`` is sent once on the
    way out so the pool notices at once.
    """

    TYPE = "executor_announce"
    SUBJECTS = (POOL_ANNOUNCE_ALL,)
    executor_id: str = Field(pattern=SESSION_ID_PATTERN)
    instance: str = Field(max_length=64)
    host: str = Field(max_length=255)
    backends: tuple[str, ...]
    capacity: int = Field(ge=0)
    free: int = Field(ge=0)
    warm: dict[str, int] = Field(default_factory=dict)
    users: dict[str, int] = Field(default_factory=dict)
    sessions: tuple[str, ...] = ()
    locked: tuple[str, ...] = ()
    """Workspace paths locked on this executor (sessions on them must lease here)."""
    remote_locked: tuple[RemoteLock, ...] = ()
    """Workspaces of other machines uploaded and locked here (sessions on them lease here)."""
    stopping: bool = False


class LeaseRequest(Message):
    """Harness asks one executor for a sandbox for a session."""

    TYPE = "lease_request"
    SUBJECTS = ("silo.exec.*.lease",)
    grant: str = Field(max_length=64 * 1024)


class LeaseGranted(Message):
    """Executor reply: the sandbox is up."""

    TYPE = "lease_granted"
    SUBJECTS = (REPLY,)
    session_id: str
    executor_id: str
    access: AccessReport


class ToolCall(Message):
    """A sandbox tool call for a session's executor."""

    TYPE = "tool_call"
    SUBJECTS = ("silo.exec.*.*.tool",)
    call_id: str = Field(max_length=128)
    name: str = Field(max_length=64)
    input: dict[str, Any]


class ToolResult(Message):
    """The result of a tool call, as the model will see it."""

    TYPE = "tool_result"
    SUBJECTS = (REPLY,)
    call_id: str
    content: str
    is_error: bool = False
    meta: dict[str, Any] = Field(default_factory=dict)


class CloseSession(Message):
    """Harness ends a session's sandbox."""

    TYPE = "close_session"
    SUBJECTS = ("silo.exec.*.*.close",)
    reason: str = Field(default="ended", max_length=1024)


class EgressSessionOpen(Message):
    """Executor registers a session's policy with an egress (the egress re-checks the grant)."""

    TYPE = "egress_session_open"
    SUBJECTS = ("silo.egress.*.session",)
    grant: str = Field(max_length=64 * 1024)


class EgressSessionClose(Message):
    """Executor tells an egress a session ended."""

    TYPE = "egress_session_close"
    SUBJECTS = ("silo.egress.*.session",)
    session_id: str


class EgressSessionReady(Message):
    """Egress reply: the session's policy is in force."""

    TYPE = "egress_session_ready"
    SUBJECTS = (REPLY,)
    session_id: str
    egress_id: str
    allowed_domains: tuple[str, ...]


class WorkspaceRequest(Message):
    """Gateway asks an executor to lock, unlock or describe workspaces for a user."""

    TYPE = "workspace_request"
    SUBJECTS = ("silo.exec.*.workspace",)
    op: Literal["lock", "unlock", "status", "list"]
    path: str | None = Field(default=None, max_length=4096)
    user: str = Field(min_length=1, max_length=128)
    accept: bool = False
    origin_host: str | None = Field(default=None, max_length=255)
    """Set for a workspace of another machine (host of the client's path): kept by that key."""
    transfer: TransferPlan | None = None
    """lock only: the uploaded archive to lock (chunks in the workspace object store)."""


class WorkspaceInfo(BaseModel):
    """One locked (or once-locked) workspace on an executor."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    executor: str
    phase: str
    locked_at: float | None = None
    entries: int = 0
    size_bytes: int = 0
    sessions: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    origin_host: str | None = None
    """For a workspace uploaded from another machine: that machine's host."""
    storage: str | None = None
    """How the executor keeps it while locked: ``ext4`` (an image) or ``directory``."""


class WorkspaceReply(Message):
    """An executor's answer: the workspaces concerned and, for unlock, the change report."""

    TYPE = "workspace_reply"
    SUBJECTS = (REPLY,)
    workspaces: tuple[WorkspaceInfo, ...] = ()
    report_text: str = ""
    report: dict[str, Any] = Field(default_factory=dict)
    auto_exec_changed: bool = False
    transfer: TransferPlan | None = None
    """unlock of an uploaded workspace: the result archive (chunks in the object store)."""


class Ack(Message):
    """A reply that says only: done."""

    TYPE = "ack"
    SUBJECTS = (REPLY,)


class ErrorReply(Message):
    """A reply that says the request was refused or failed, and why."""

    TYPE = "error"
    SUBJECTS = (REPLY,)
    code: str
    message: str


MESSAGE_TYPES: dict[str, type[Message]] = {
    m.TYPE: m
    for m in (
        SessionGrant,
        StartSession,
        SessionStarted,
        SessionInput,
        SessionEvent,
        ExecutorAnnounce,
        WorkspaceRequest,
        WorkspaceReply,
        LeaseRequest,
        LeaseGranted,
        ToolCall,
        ToolResult,
        CloseSession,
        EgressSessionOpen,
        EgressSessionClose,
        EgressSessionReady,
        Ack,
        ErrorReply,
    )
}


# Sandbox tool inputs: the executor validates a ToolCall's input against these.
class ToolInput(BaseModel):
    """Base of sandbox tool inputs."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BashInput(ToolInput):
    """Run a command with ``sh -c`` in the workspace."""

    command: str = Field(min_length=1, max_length=256 * 1024)
    timeout_ms: int = Field(default=120_000, ge=1, le=600_000)


class ReadInput(ToolInput):
    """Read a file from the workspace."""

    path: str = Field(min_length=1, max_length=4096)
    offset: int = Field(default=0, ge=0)
    limit: int = Field(default=5 * 1024 * 1024, ge=0, le=5 * 1024 * 1024)


class WriteInput(ToolInput):
    """Write (or append to) a file in the workspace, creating parents."""

    path: str = Field(min_length=1, max_length=4096)
    content: str = Field(max_length=5 * 1024 * 1024)
    append: bool = False


class EditInput(ToolInput):
    """Replace ``old_string`` by ``new_string``; it must occur once unless ``replace_all``."""

    path: str = Field(min_length=1, max_length=4096)
    old_string: str = Field(min_length=1, max_length=1024 * 1024)
    new_string: str = Field(max_length=1024 * 1024)
    replace_all: bool = False


class GlobInput(ToolInput):
    """Paths matching a pattern (``*``, ``?``, ``**``, ``{a,b}``) below ``path``."""

    pattern: str = Field(min_length=1, max_length=4096)
    path: str | None = Field(default=None, max_length=4096)


class GrepInput(ToolInput):
    """Lines matching a regular expression below ``path``, optionally in files matching ``glob``."""

    pattern: str = Field(min_length=1, max_length=4096)
    path: str | None = Field(default=None, max_length=4096)
    glob: str | None = Field(default=None, max_length=4096)
    case_insensitive: bool = False
    max_results: int = Field(default=200, ge=1, le=5000)


class WebFetchInput(ToolInput):
    """GET a URL from inside the sandbox, through its proxy and the egress."""

    url: str = Field(min_length=1, max_length=8192)
    max_bytes: int = Field(default=1024 * 1024, ge=1, le=5 * 1024 * 1024)


SANDBOX_TOOLS: dict[str, type[ToolInput]] = {
    "Bash": BashInput,
    "Read": ReadInput,
    "Write": WriteInput,
    "Edit": EditInput,
    "Glob": GlobInput,
    "Grep": GrepInput,
    "WebFetch": WebFetchInput,
}
