"""Pydantic models for every message body that crosses NATS.

Each model has a ``TYPE`` (the envelope's ``type``) and the subject patterns it
may travel on (``SUBJECTS``; replies travel on inboxes). Models are frozen and
forbid unknown fields, so a body is exactly what its sender signed.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ._errors import UploadError
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
    purpose: Literal["session", "shell"] = Field(
        default="session",
        description="``shell``: a user's `silo shell` sandbox (``session_id`` is the shell's id); "
                    "executors open shells only under shell grants and sessions only under session grants")


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
    kind: Literal["prompt", "answer", "interrupt", "stop", "upload"]
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
    instance: str = Field(default="", max_length=64)
    """The granting executor's instance (its announcements' ``instance``; empty: not said)."""


class ToolCall(Message):
    """A sandbox tool call for a session's executor."""

    TYPE = "tool_call"
    SUBJECTS = ("silo.exec.*.*.tool",)
    call_id: str = Field(max_length=128)
    name: str = Field(max_length=64)
    input: dict[str, Any]
    again: bool = False
    """Asked again after a lost NATS connection: answer with the call's result if it ran or runs
    (never run it twice); run it only if it never arrived."""


class ToolResult(Message):
    """The result of a tool call, as the model will see it."""

    TYPE = "tool_result"
    SUBJECTS = (REPLY,)
    call_id: str
    content: str
    is_error: bool = False
    meta: dict[str, Any] = Field(default_factory=dict)


TOOL_OUTPUT_CHUNK = 16 * 1024
"""Most characters of streamed tool output one ``ToolOutput`` carries (chunks are coalesced up to it)."""


class ToolOutput(Message):
    """Output of a running tool call, streamed from the executor to the session's harness.

    ``seq`` counts from 0 per call; the harness drops chunks that are out of order, from
    another executor, or for a call it is not running.
    """

    TYPE = "tool_output"
    SUBJECTS = ("silo.session.*.output",)
    call_id: str = Field(max_length=128)
    seq: int = Field(ge=0)
    stream: Literal["stdout", "stderr"]
    data: str = Field(max_length=TOOL_OUTPUT_CHUNK)


class ToolCancel(Message):
    """Harness asks the executor to stop a running tool call (its command is killed)."""

    TYPE = "tool_cancel"
    SUBJECTS = ("silo.exec.*.*.cancel",)
    call_id: str = Field(max_length=128)


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


class EgressAnnounce(Message):
    """An egress's heartbeat (every second). ``instance`` changes on every start: an executor
    that sees a new one re-opens its sessions there, since the policies and session CAs of the
    earlier instance died with it (memory only)."""

    TYPE = "egress_announce"
    SUBJECTS = ("silo.egress.*.announce",)
    egress_id: str = Field(pattern=SESSION_ID_PATTERN)
    instance: str = Field(max_length=64)


class EgressSessionReady(Message):
    """Egress reply: the session's policy is in force."""

    TYPE = "egress_session_ready"
    SUBJECTS = (REPLY,)
    session_id: str
    egress_id: str
    allowed_domains: tuple[str, ...]
    proxy_addr: str | None = Field(default=None, max_length=300,
                                   description="host:port where this egress serves the session's relay")
    ca_cert: str | None = Field(default=None, max_length=16 * 1024,
                                description="the session CA's certificate (PEM; never a key) for the sandbox")
    credentials: tuple[str, ...] = Field(default=(), description="granted credentials this user may really use")
    credential_hosts: tuple[str, ...] = Field(
        default=(), description="the exact hosts those credentials are injected into (for the access report)")


class RelayHello(Message):
    """First line of an executor's relay connection to an egress: which session it carries.

    Never published on NATS: sealed for ``silo.egress.<gid>.relay`` and sent at the
    start of the TCP connection, fresh for each one.
    """

    TYPE = "relay_hello"
    SUBJECTS = ("silo.egress.*.relay",)
    session_id: str = Field(pattern=SESSION_ID_PATTERN)


class NetworkRecord(Message):
    """One request through the egress, for the session's journal: never bodies or header values."""

    TYPE = "network_record"
    SUBJECTS = ("silo.journal.*.network",)
    session_id: str = Field(pattern=SESSION_ID_PATTERN)
    host: str = Field(max_length=255)
    port: int = Field(ge=0, le=65535)
    method: str = Field(max_length=32)
    path: str = Field(max_length=1024)
    status: int = Field(ge=0, le=999)
    bytes_in: int = Field(ge=0)
    bytes_out: int = Field(ge=0)
    duration_ms: float = Field(ge=0)
    allowed: bool
    reason: str = Field(default="", max_length=512)
    credential: bool = False


JournalKind = Literal["meta", "event", "llm_request", "llm_response", "tool_exec", "client_input", "lifecycle"]


class JournalRecord(Message):
    """One record of a session's journal, numbered ``n`` from 0 per session, without gaps.

    A record too large for one message is split: ``parts`` messages with the
    same ``n``, each carrying a ``fragment`` of the JSON text of ``data`` (and
    an empty ``data``), to be joined in ``part`` order. Nothing is dropped.
    """

    TYPE = "journal_record"
    SUBJECTS = ("silo.journal.*",)
    session_id: str = Field(pattern=SESSION_ID_PATTERN)
    n: int = Field(ge=0)
    kind: JournalKind
    ts: float
    agent: str | None = Field(default=None, max_length=128)
    data: dict[str, Any] = Field(default_factory=dict)
    part: int = Field(default=0, ge=0)
    parts: int = Field(default=1, ge=1, le=100_000)
    fragment: str | None = None


class JournalExportRequest(Message):
    """Gateway asks a harness for one page of a session's journal, for a user it authenticated.

    ``after`` is the stream sequence of the last message already sent (0 at
    first); ``operator`` lets the request read any user's session.
    """

    TYPE = "journal_export_request"
    SUBJECTS = ("silo.harness.journal",)
    session_id: str = Field(pattern=SESSION_ID_PATTERN)
    user: str = Field(min_length=1, max_length=128)
    operator: bool = False
    after: int = Field(default=0, ge=0)
    offset: int = Field(default=0, ge=0, description="characters of the next unit already sent")
    max_bytes: int = Field(default=256 * 1024, ge=1024, le=512 * 1024)


class JournalExportPage(Message):
    """Harness reply: the next piece of the export's JSONL text (journal and network records, in order).

    Pieces concatenate into the whole export; a line may span pages.
    """

    TYPE = "journal_export_page"
    SUBJECTS = (REPLY,)
    session_id: str
    text: str = ""
    after: int = Field(ge=0, description="pass back as the next request's ``after``")
    offset: int = Field(ge=0, description="pass back as the next request's ``offset``")
    done: bool


class SessionOwnership(Message):
    """Which harness runs a session: the value of its entry in the ``silo_sessions`` KV bucket.

    The owner renews it every second (``beat`` counts renewals); a replica that
    sees no renewal for a few seconds takes the session over by compare-and-set
    on the entry's revision, and resumes it from the journal.
    """

    TYPE = "session_ownership"
    SUBJECTS = ("$KV.silo_sessions.*",)
    session_id: str = Field(pattern=SESSION_ID_PATTERN)
    owner: str = Field(max_length=64)
    instance: str = Field(max_length=64)
    grant: str = Field(max_length=64 * 1024)
    llm: LLMChoice
    headless: bool = False
    executor_id: str = Field(pattern=SESSION_ID_PATTERN)
    access: AccessReport
    beat: int = Field(default=0, ge=0)


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
    shells: tuple[str, ...] = ()
    """`silo shell` sandboxes open on it."""
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


UPLOAD_PATH_MAX = 4096


def workspace_relative(path: str) -> str:
    """``path`` when it names a file inside a workspace, else UploadError ``upload_bad_path``.

    Relative, no NUL, no empty, ``.`` or ``..`` component, each at most 255
    bytes of valid UTF-8. (Symbolic links are checked where the file lands.)
    """
    why = None
    if not path or len(path) > UPLOAD_PATH_MAX:
        why = f"must be 1 to {UPLOAD_PATH_MAX} characters"
    elif "\0" in path:
        why = "contains NUL"
    elif path.startswith("/"):
        why = "is absolute; give a path relative to the workspace"
    else:
        try:
            parts = path.encode("utf-8").split(b"/")
        except UnicodeEncodeError:
            parts, why = [], "is not valid UTF-8"
        for part in parts:
            if part in (b"", b".", b".."):
                why = "has an empty, '.' or '..' component; it must stay inside the workspace"
                break
            if len(part) > 255:
                why = "has a component longer than 255 bytes"
                break
    if why is not None:
        raise UploadError("upload_bad_path", f"upload path {path[:200]!r} {why}")
    return path


class FileUpload(Message):
    """Gateway asks a session's executor to write a client's file into the session's workspace.

    The bytes are the object ``object_name`` of the workspace object store;
    the executor checks ``size`` and ``sha256`` against them and ``path``
    (relative to the workspace: no absolute path, ``..``, NUL, or symlink on
    the way) before writing.
    """

    TYPE = "file_upload"
    SUBJECTS = ("silo.exec.*.*.upload",)
    path: str = Field(min_length=1, max_length=UPLOAD_PATH_MAX)
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    object_name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,200}$")


class FileUploaded(Message):
    """Executor reply: the file is in the workspace (``path`` as written, relative to it)."""

    TYPE = "file_uploaded"
    SUBJECTS = (REPLY,)
    path: str
    size: int
    sha256: str


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


SHELL_CHUNK = 16 * 1024
"""Most bytes of shell input or output one message carries (base64 in JSON)."""
SHELL_DATA_MAX = 4 * ((SHELL_CHUNK + 2) // 3)
"""Longest base64 text of one chunk."""
SHELL_WINDOW = 64
"""Output chunks an executor sends ahead of the gateway's ``ack``: a slow client slows the
shell's process (its writes block) instead of filling memory on the way."""
SHELL_ACK_EVERY = 16
"""The gateway acknowledges output every this many chunks delivered."""
SHELL_SIGNALS = ("INT", "TERM", "HUP", "QUIT", "KILL", "TSTP", "CONT", "USR1", "USR2", "WINCH")
"""Signals a user may send to their shell's foreground process group."""
ShellSignalName = Literal["INT", "TERM", "HUP", "QUIT", "KILL", "TSTP", "CONT", "USR1", "USR2", "WINCH"]
TERM_PATTERN = r"^[A-Za-z0-9._+-]{1,64}$"


class ShellOpen(Message):
    """Gateway asks the executor that holds a workspace to open a user's shell on it.

    The grant (``purpose`` shell) carries the policy; ``command`` None means an
    interactive shell. ``tty`` runs it on a pseudo-terminal of ``rows`` x
    ``cols``; otherwise on pipes, stdout and stderr apart.
    """

    TYPE = "shell_open"
    SUBJECTS = ("silo.exec.*.shell",)
    grant: str = Field(max_length=64 * 1024)
    command: str | None = Field(default=None, max_length=256 * 1024)
    tty: bool = True
    rows: int = Field(default=24, ge=1, le=1000)
    cols: int = Field(default=80, ge=1, le=1000)
    term: str = Field(default="xterm-256color", pattern=TERM_PATTERN)


class ShellOpened(Message):
    """Executor reply: the shell runs; its output follows on ``silo.shell.<shid>.output``."""

    TYPE = "shell_opened"
    SUBJECTS = (REPLY,)
    shell_id: str
    executor_id: str
    access: AccessReport


class ShellInput(Message):
    """The user's input to a shell, in order: bytes, end of input, window size, a signal, or close;
    or ``ack``: the gateway delivered output chunks up to (not including) ``seq`` to its client."""

    TYPE = "shell_input"
    SUBJECTS = ("silo.shell.*.input",)
    kind: Literal["data", "eof", "resize", "signal", "close", "ack"]
    data: str = Field(default="", max_length=SHELL_DATA_MAX, description="base64, for data")
    rows: int = Field(default=0, ge=0, le=1000)
    cols: int = Field(default=0, ge=0, le=1000)
    signal: ShellSignalName | None = None
    seq: int = Field(default=0, ge=0)


class ShellOutput(Message):
    """A chunk of a shell's output; ``seq`` counts from 0 without gaps."""

    TYPE = "shell_output"
    SUBJECTS = ("silo.shell.*.output",)
    seq: int = Field(ge=0)
    stream: Literal["pty", "stdout", "stderr"]
    data: str = Field(max_length=SHELL_DATA_MAX, description="base64")


class ShellExit(Message):
    """A shell ended: its exit code (128 + N after signal N), or why it could not finish.

    ``seq`` is the number of output chunks sent before it.
    """

    TYPE = "shell_exit"
    SUBJECTS = ("silo.shell.*.output",)
    seq: int = Field(ge=0)
    exit_code: int | None = None
    signal: int | None = None
    message: str = Field(default="", max_length=4096)


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
        ToolOutput,
        ToolCancel,
        CloseSession,
        EgressSessionOpen,
        EgressSessionClose,
        EgressSessionReady,
        EgressAnnounce,
        NetworkRecord,
        JournalRecord,
        JournalExportRequest,
        JournalExportPage,
        SessionOwnership,
        RelayHello,
        Ack,
        ErrorReply,
        FileUpload,
        FileUploaded,
        ShellOpen,
        ShellOpened,
        ShellInput,
        ShellOutput,
        ShellExit,
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


class WebSearchInput(ToolInput):
    """Search the web from inside the sandbox through the configured search endpoint (which must
    be on the session's allow-list); returns the endpoint's answer."""

    query: str = Field(min_length=1, max_length=2048)


SANDBOX_TOOLS: dict[str, type[ToolInput]] = {
    "Bash": BashInput,
    "Read": ReadInput,
    "Write": WriteInput,
    "Edit": EditInput,
    "Glob": GlobInput,
    "Grep": GrepInput,
    "WebFetch": WebFetchInput,
    "WebSearch": WebSearchInput,
}


# Tools the harness runs itself (Agent, AwaitAgent, Exit) or with the session's clients.
class AgentInput(ToolInput):
    """Start a subagent on ``prompt``; returns its id at once. It works concurrently in the same
    sandbox; collect its final answer with AwaitAgent."""

    prompt: str = Field(min_length=1, max_length=256 * 1024)
    name: str = Field(default="agent", min_length=1, max_length=64)


class AwaitAgentInput(ToolInput):
    """Wait for the subagent ``agent`` (an id from Agent) or, without one, for the first of your
    unfinished subagents to finish; returns its final answer."""

    agent: str | None = Field(default=None, max_length=64)


class QuestionOption(ToolInput):
    """One answer a user may pick."""

    label: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=2000)


class AskUserQuestionInput(ToolInput):
    """Ask the user a question and wait for the answer: one of ``options`` (several with
    ``multi_select``) and, with ``allow_free_text``, text of their own."""

    question: str = Field(min_length=1, max_length=8192)
    options: tuple[QuestionOption, ...] = Field(default=(), max_length=32)
    multi_select: bool = False
    allow_free_text: bool = False

    @model_validator(mode="after")
    def _answerable(self) -> AskUserQuestionInput:
        labels = [o.label for o in self.options]
        if len(set(labels)) != len(labels):
            raise ValueError("option labels must differ from each other")
        if not labels and not self.allow_free_text:
            raise ValueError("give options, or allow_free_text, or both")
        return self


class SendUserFileInput(ToolInput):
    """Send a file of the workspace to the user (any bytes; size limited)."""

    path: str = Field(min_length=1, max_length=4096)
    caption: str = Field(default="", max_length=2000)


class ExitInput(ToolInput):
    """End the session (headless runs) with a short summary."""

    # Models are asked for a message; an Exit without one still ends the session.
    model_config = ConfigDict(json_schema_extra={"required": ["message"]})
    message: str = Field(default="", max_length=64 * 1024, description="A short summary of what was done.")


HARNESS_TOOLS: dict[str, type[ToolInput]] = {
    "Agent": AgentInput,
    "AwaitAgent": AwaitAgentInput,
    "AskUserQuestion": AskUserQuestionInput,
    "SendUserFile": SendUserFileInput,
    "Exit": ExitInput,
}
"""Tools the harness handles (SendUserFile reads its file through the executor)."""


class QuestionAnswer(BaseModel):
    """A client's answer to a question: the picked labels and/or free text (JSON in ``SessionInput.text``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    selected: tuple[str, ...] = Field(default=(), max_length=32)
    text: str | None = Field(default=None, max_length=64 * 1024)
