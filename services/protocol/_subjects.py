"""Every NATS subject devsilo uses, who may publish on it, and what it carries.

Scheme (``<sid>`` session id, ``<eid>`` executor id, ``<gid>`` egress id)::

    silo.harness.start              gateway  -> harness   StartSession (request, queue group)
    silo.session.<sid>.input        gateway  -> harness   SessionInput
    silo.session.<sid>.events       harness  -> stream    SessionEvent (JetStream EVENTS)
    silo.pool.announce.<eid>        executor -> harness   ExecutorAnnounce (every second)
    silo.exec.<eid>.lease           harness  -> executor  LeaseRequest (request)
    silo.exec.<eid>.workspace       gateway  -> executor  WorkspaceRequest (request)
    silo.exec.<eid>.<sid>.tool      harness  -> executor  ToolCall (request)
    silo.exec.<eid>.<sid>.close     harness  -> executor  CloseSession (request)
    silo.exec.<eid>.<sid>.upload    gateway  -> executor  FileUpload (request): a client's file into
                                                          the session's workspace (bytes in the
                                                          workspace object store)
    silo.exec.<eid>.<sid>.cancel    harness  -> executor  ToolCancel (request): stop a running call
    silo.session.<sid>.output       executor -> harness   ToolOutput: a running call's output
    silo.egress.<gid>.session       executor -> egress    EgressSessionOpen / EgressSessionClose
    silo.egress.any.session         executor -> egress    same, any egress (queue group)
    silo.egress.<gid>.announce      egress   -> executor  EgressAnnounce (every second): a new instance
                                                          means its sessions must be opened again
    silo.journal.<sid>              harness  -> stream    JournalRecord (JetStream JOURNAL)
    silo.journal.<sid>.network      egress   -> stream    NetworkRecord (JetStream JOURNAL)
    silo.harness.journal            gateway  -> harness   JournalExportRequest (request, queue group):
                                                          one bounded page of a session's journal
    $KV.silo_sessions.<sid>         harness  -> KV        SessionOwnership: which harness runs a
                                                          session, renewed every second; another
                                                          replica takes over a silent one by
                                                          compare-and-set on the revision
    silo.egress.<gid>.relay         executor -> egress    RelayHello: never on NATS, the signed first
                                                          line of each relay TCP connection
    silo.exec.<eid>.shell           gateway  -> executor  ShellOpen (request)
    silo.shell.<shid>.input         gateway  -> executor  ShellInput (keystrokes, size, signals, output acks)
    silo.shell.<shid>.output        executor -> gateway   ShellOutput, then one ShellExit
    $KV.silo_gateway_sessions.>     gateway               session records (JetStream KV), shared by
                                                          gateway replicas and kept across restarts
    $O.silo_workspaces.>            gateway, executor     workspace archives between machines
                                                          (JetStream object store; chunks checked
                                                          against the TransferPlan in signed messages)
    $KV.silo_client_keys.>          gateway               paired client public keys (JetStream KV)
    $KV.silo_pairing_codes.>        gateway               pending pairing codes (JetStream KV)
    _INBOX.>                        any role              replies, correlated by ``reply_to``

``silo.grant`` is never published: it is the subject a session grant is
signed for, so a grant cannot be passed off as any other message.
Ids used in subjects are restricted to ``[A-Za-z0-9_-]`` so that no id can
inject a wildcard or an extra token.
"""

from __future__ import annotations

import re
from enum import StrEnum

from ._errors import ConfigError

PREFIX = "silo"
HARNESS_START = "silo.harness.start"
POOL_ANNOUNCE_ALL = "silo.pool.announce.*"
GRANT = "silo.grant"
EGRESS_ANY = "any"
INBOX_PREFIX = "_INBOX."

EVENTS_STREAM = "SILO_EVENTS"
EVENTS_SUBJECTS = "silo.session.*.events"
JOURNAL_STREAM = "SILO_JOURNAL"
JOURNAL_SUBJECTS = "silo.journal.>"
HARNESS_JOURNAL = "silo.journal.*"
EGRESS_JOURNAL = "silo.journal.*.network"
HARNESS_JOURNAL_EXPORT = "silo.harness.journal"
SESSION_OWNERS = "silo_sessions"
"""KV bucket: session id -> the harness that runs it (a signed SessionOwnership)."""
SESSION_OWNERS_STREAM = f"KV_{SESSION_OWNERS}"
SESSION_OWNERS_SUBJECTS = f"$KV.{SESSION_OWNERS}.*"
WORKSPACE_OBJECTS = "silo_workspaces"
"""Object store bucket for workspace archives moving between machines (gateway <-> executor)."""
WORKSPACE_OBJECTS_STREAM = f"OBJ_{WORKSPACE_OBJECTS}"
CLIENT_KEYS = "silo_client_keys"
"""KV bucket of paired client keys (gateway only; shared by gateway replicas, watched for revocations)."""
CLIENT_KEYS_STREAM = f"KV_{CLIENT_KEYS}"
PAIRING_CODES = "silo_pairing_codes"
"""KV bucket of pairing codes (gateway only), keyed by the code's SHA-256, consumed once by compare-and-set."""
PAIRING_CODES_STREAM = f"KV_{PAIRING_CODES}"
SESSIONS_BUCKET = "silo_gateway_sessions"
"""KV bucket of session records (id, user, workspace, executor, grant, created), gateway only."""
SESSIONS_STREAM = f"KV_{SESSIONS_BUCKET}"

HARNESS_QUEUE = "harness"
EXECUTOR_QUEUE = "executor"
EGRESS_QUEUE = "egress"

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class Role(StrEnum):
    """The roles a service can hold; each has its own subject permissions."""

    GATEWAY = "gateway"
    HARNESS = "harness"
    EXECUTOR = "executor"
    EGRESS = "egress"


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is safe to embed in a subject, else raise ConfigError."""
    if not _ID.match(value):
        raise ConfigError(f"invalid {what} {value!r}: use 1-64 of A-Z a-z 0-9 _ -")
    return value


def session_input(sid: str) -> str:
    """Subject on which the gateway sends a session's user input to the harness."""
    return f"silo.session.{check_id(sid, 'session id')}.input"


def session_events(sid: str) -> str:
    """Subject of a session's events in the EVENTS stream."""
    return f"silo.session.{check_id(sid, 'session id')}.events"


def exec_tool(eid: str, sid: str) -> str:
    """Subject on which the harness sends a session's tool calls to its executor."""
    return f"silo.exec.{check_id(eid, 'executor id')}.{check_id(sid, 'session id')}.tool"


def exec_cancel(eid: str, sid: str) -> str:
    """Subject on which the harness tells an executor to stop one of a session's running tool calls."""
    return f"silo.exec.{check_id(eid, 'executor id')}.{check_id(sid, 'session id')}.cancel"


SESSION_OUTPUT_ALL = "silo.session.*.output"


def session_output(sid: str) -> str:
    """Subject on which an executor streams a session's running tool output to the harness."""
    return f"silo.session.{check_id(sid, 'session id')}.output"


def pool_announce(eid: str) -> str:
    """Subject on which an executor announces itself and its free capacity."""
    return f"silo.pool.announce.{check_id(eid, 'executor id')}"


def exec_lease(eid: str) -> str:
    """Subject on which the harness asks one executor for a sandbox."""
    return f"silo.exec.{check_id(eid, 'executor id')}.lease"


def exec_workspace(eid: str) -> str:
    """Subject on which the gateway asks an executor to lock, unlock or describe workspaces."""
    return f"silo.exec.{check_id(eid, 'executor id')}.workspace"


def exec_upload(eid: str, sid: str) -> str:
    """Subject on which the gateway asks a session's executor to write a client's uploaded file."""
    return f"silo.exec.{check_id(eid, 'executor id')}.{check_id(sid, 'session id')}.upload"


def exec_close(eid: str, sid: str) -> str:
    """Subject on which the harness ends a session's sandbox."""
    return f"silo.exec.{check_id(eid, 'executor id')}.{check_id(sid, 'session id')}.close"


def exec_listen(eid: str) -> str:
    """Wildcard an executor subscribes to for all of its sessions."""
    return f"silo.exec.{check_id(eid, 'executor id')}.>"


EGRESS_ANNOUNCE_ALL = "silo.egress.*.announce"


def egress_announce(gid: str) -> str:
    """Subject on which an egress announces itself (and its instance) every second."""
    return f"silo.egress.{check_id(gid, 'egress id')}.announce"


def egress_session(gid: str) -> str:
    """Subject on which an executor registers a session with an egress."""
    return f"silo.egress.{check_id(gid, 'egress id')}.session"


def journal(sid: str) -> str:
    """Subject of a session's journal records."""
    return f"silo.journal.{check_id(sid, 'session id')}"


EGRESS_RELAY_ALL = "silo.egress.*.relay"


def egress_relay(gid: str) -> str:
    """The subject a relay's signed first line is sealed for (never published on NATS)."""
    return f"silo.egress.{check_id(gid, 'egress id')}.relay"


def session_owner(sid: str) -> str:
    """Subject of a session's entry in the session ownership KV bucket."""
    return f"$KV.{SESSION_OWNERS}.{check_id(sid, 'session id')}"


def journal_network(sid: str) -> str:
    """Subject of a session's network records (from the egress), kept in the journal stream."""
    return f"silo.journal.{check_id(sid, 'session id')}.network"


def exec_shell(eid: str) -> str:
    """Subject on which the gateway asks one executor to open a user's shell."""
    return f"silo.exec.{check_id(eid, 'executor id')}.shell"


def shell_input(shid: str) -> str:
    """Subject on which the gateway sends a shell's input, window size and signals to its executor."""
    return f"silo.shell.{check_id(shid, 'shell id')}.input"


def shell_output(shid: str) -> str:
    """Subject on which an executor sends a shell's output and, last, its exit to the gateway."""
    return f"silo.shell.{check_id(shid, 'shell id')}.output"


SHELL_INPUT_ALL = "silo.shell.*.input"
SHELL_OUTPUT_ALL = "silo.shell.*.output"


# Which role may publish on which subject pattern. Replies on _INBOX.> are open to
# every role; requesters check that the reply answers their message id and comes
# from the role they asked.
PUBLISH: dict[Role, tuple[str, ...]] = {
    Role.GATEWAY: (GRANT, HARNESS_START, "silo.session.*.input", "silo.exec.*.workspace",
                   "silo.exec.*.shell", SHELL_INPUT_ALL, HARNESS_JOURNAL_EXPORT, "silo.exec.*.*.upload"),
    Role.HARNESS: (
        EVENTS_SUBJECTS,
        "silo.exec.*.lease",
        "silo.exec.*.*.tool",
        "silo.exec.*.*.close",
        "silo.exec.*.*.cancel",
        HARNESS_JOURNAL,
        SESSION_OWNERS_SUBJECTS,
    ),
    Role.EXECUTOR: ("silo.egress.*.session", POOL_ANNOUNCE_ALL, SHELL_OUTPUT_ALL, EGRESS_RELAY_ALL,
                    SESSION_OUTPUT_ALL),
    Role.EGRESS: (EGRESS_JOURNAL, EGRESS_ANNOUNCE_ALL),
}

# What each role subscribes to: used for the NATS server's permissions (defence
# in depth; the signature checks above are the application-level guarantee).
SUBSCRIBE: dict[Role, tuple[str, ...]] = {
    Role.GATEWAY: (EVENTS_SUBJECTS, POOL_ANNOUNCE_ALL, SHELL_OUTPUT_ALL),
    Role.HARNESS: (HARNESS_START, "silo.session.*.input", POOL_ANNOUNCE_ALL, HARNESS_JOURNAL_EXPORT,
                   SESSION_OUTPUT_ALL),
    Role.EXECUTOR: ("silo.exec.>", SHELL_INPUT_ALL, EGRESS_ANNOUNCE_ALL),
    Role.EGRESS: ("silo.egress.*.session",),
}

# Streams each role may use through the JetStream API.
STREAMS: dict[Role, tuple[str, ...]] = {
    Role.GATEWAY: (EVENTS_STREAM, WORKSPACE_OBJECTS_STREAM, CLIENT_KEYS_STREAM, PAIRING_CODES_STREAM,
                   SESSIONS_STREAM),
    Role.HARNESS: (EVENTS_STREAM, JOURNAL_STREAM, SESSION_OWNERS_STREAM),
    Role.EXECUTOR: (WORKSPACE_OBJECTS_STREAM,),
    Role.EGRESS: (),  # publishes network records into the journal; never reads it
}


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard match: ``*`` is one token, a final ``>`` one or more."""
    ptoks = pattern.split(".")
    stoks = subject.split(".")
    for i, p in enumerate(ptoks):
        if p == ">":
            return i == len(ptoks) - 1 and len(stoks) > i
        if i >= len(stoks):
            return False
        if p != "*" and p != stoks[i]:
            return False
    return len(stoks) == len(ptoks)


def may_publish(role: Role, subject: str) -> bool:
    """Whether ``role`` may publish on ``subject`` (replies to inboxes always)."""
    if subject.startswith(INBOX_PREFIX):
        return True
    return any(subject_matches(p, subject) for p in PUBLISH.get(role, ()))
