"""The executor service: announces itself to the pool, leases sandboxes, runs tool calls."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devsilo.protocol import (
    SANDBOX_TOOLS,
    AccessReport,
    Ack,
    CloseSession,
    EgressAnnounce,
    EgressSessionClose,
    EgressSessionOpen,
    EgressSessionReady,
    Envelope,
    ExecutorAnnounce,
    FileUpload,
    GrantError,
    LeaseGranted,
    LeaseRequest,
    Message,
    PoolError,
    RelayHello,
    RemoteLock,
    Role,
    SandboxClosed,
    SandboxError,
    SessionGrant,
    ShellExit,
    ShellInput,
    ShellOpen,
    ShellOpened,
    ShellOutput,
    SiloError,
    ToolCall,
    ToolCancel,
    ToolOutput,
    ToolResult,
    WorkspaceInfo,
    WorkspaceReply,
    WorkspaceRequest,
    open_grant,
    subjects,
)
from devsilo.runtime import ServiceContext
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge, Histogram

from ._backends import STRENGTH_ORDER, get_backend
from ._ext4 import ext4_unavailable
from ._helper_client import ShellHandle
from ._relay import SessionRelay, relay_line
from ._risk import check_workspace
from ._sandbox import Sandbox, prepare_workspace_ownership
from ._shell_stream import ShellStream
from ._spec import WORKSPACE, SandboxSpec
from ._tool_output import ToolOutputStream
from ._tools import ToolOptions, run_tool
from ._trust import SessionTrust
from ._upload import DEFAULT_UPLOAD_MAX, land_upload
from ._warm import WarmPools, warm_sizes
from ._workspace_lock import WorkspaceStore
from ._workspace_remote import UploadedWorkspaces

RELAY_HELLO_TTL = 60.0
"""Lifetime of a relay connection's signed first line (the egress accepts each once)."""
DEFAULT_SANDBOX_UID = 64123
CANCELLED_CALLS_KEPT = 1024
"""Cancelled call ids remembered, so a cancel that overtakes its call still stops it."""
FINISHED_CALLS_KEPT = 256
FINISHED_CALLS_KEEP_S = 120.0
"""Finished calls' results kept this long (and at most this many) for a harness that asks again
after losing its NATS connection (the reply it missed is not stored anywhere else)."""
DEFAULT_CAPACITY = 16
DEFAULT_PER_USER = 8
ANNOUNCE_EVERY_S = 1.0


@dataclass
class ExecSession:
    """A session's sandbox on this executor."""

    grant: SessionGrant
    backend: str
    sandbox: Sandbox
    relay: SessionRelay
    workspace: Path
    egress_id: str | None
    grant_text: str = ""
    """The sealed grant, to open the session again with a restarted egress."""
    trust: SessionTrust | None = None
    """The sandbox's trust directory (the session CA), when the session may reach somewhere."""


class ExecutorMetrics:
    """The executor's own metrics (labels: backend, tool, outcome; never session ids)."""

    def __init__(self, ctx: ServiceContext) -> None:
        reg = ctx.metrics.registry
        self.sandboxes = Gauge("silo_sandboxes", "Sandboxes by backend and state.", ["backend", "state"],
                               registry=reg)
        self.starts = Counter("silo_sandbox_starts_total", "Sandbox starts by backend and outcome.",
                              ["backend", "outcome"], registry=reg)
        self.start_seconds = Histogram("silo_sandbox_start_seconds", "Sandbox start latency.",
                                       ["backend"], registry=reg,
                                       buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.leases = Counter("silo_sandbox_leases_total", "Sandboxes leased, by backend and kind.",
                              ["backend", "kind"], registry=reg)
        self.warm = Gauge("silo_sandboxes_warm", "Warm sandboxes waiting for a lease, by backend.",
                          ["backend"], registry=reg)
        self.capacity = Gauge("silo_executor_capacity", "Sandbox slots on this executor, by state.",
                              ["state"], registry=reg)
        self.lease_refusals = Counter("silo_lease_refusals_total", "Leases refused, by reason.", ["reason"],
                                      registry=reg)
        for reason in ("host", "backend", "capacity", "user_limit"):  # zeros on the dashboard, not gaps
            self.lease_refusals.labels(reason=reason)
        self.trust_swaps = Counter("silo_sandbox_trust_swaps_total",
                                   "Session CAs replaced in running sandboxes after an egress restart, by outcome.",
                                   ["outcome"], registry=reg)
        for outcome in ("ok", "error"):
            self.trust_swaps.labels(outcome=outcome)
        self.tool_calls = Counter("silo_tool_calls_total", "Tool calls by tool and outcome.",
                                  ["tool", "outcome"], registry=reg)
        self.tool_seconds = Histogram("silo_tool_seconds", "Tool call latency by tool.", ["tool"],
                                      registry=reg, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                             0.1, 0.25, 1, 5, 30, 120, 600))


def sandbox_ids() -> tuple[int, int]:
    """The host uid/gid sandboxes run as: a dedicated unprivileged uid when we are root."""
    if os.geteuid() == 0:
        uid = int(os.environ.get("DEVSILO_SANDBOX_UID", DEFAULT_SANDBOX_UID))
        return uid, int(os.environ.get("DEVSILO_SANDBOX_GID", uid))
    return os.geteuid(), os.getegid()


def usable_backends(wanted: list[str] | None, config: dict[str, dict[str, Any]],
                    log: Any) -> list[str]:
    """The backends this executor offers: those asked for (or all) that probe as working."""
    names = wanted if wanted else [n for n in STRENGTH_ORDER if n != "microvm"]
    usable = []
    for name in names:
        reason = get_backend(name).probe(**config.get(name, {}))
        if reason is None:
            usable.append(name)
        else:
            log.info("backend_unavailable", backend=name, reason=reason)
    return usable


def default_store(eid: str) -> Path:
    """Where locked workspaces live: executor-owned, outside every state directory."""
    if os.geteuid() == 0:
        return Path("/var/lib/devsilo") / eid / "workspaces"
    return Path(os.path.expanduser("~/.local/share/devsilo")) / eid / "workspaces"


def workspace_store(opts: dict[str, Any], eid: str, log: Any) -> WorkspaceStore:
    """The store, keeping new locks in ext4 images where this executor can (see ``_ext4``).

    ``workspace_storage``: ``auto`` (default: an image when root, in a private
    mount namespace, with mkfs.ext4 and loop devices) or ``directory``.
    """
    root = Path(opts.get("workspace_store") or default_store(eid))
    wanted = str(opts.get("workspace_storage") or "auto")
    reason = (opts.get("private_mounts_error") or ext4_unavailable(bool(opts.get("private_mounts"))))
    if wanted == "directory":
        store = WorkspaceStore(root, "directory", "the operator chose workspace_storage=directory")
    elif reason is None:
        store = WorkspaceStore(root, "ext4")
    else:
        store = WorkspaceStore(root, "directory", f"no ext4 image: {reason}")
    log.info("workspace_storage", storage=store.storage, reason=store.fallback_reason,
             remounted=store.remount())
    return store


def parse_addr(addr: str | None) -> tuple[str, int] | None:
    """``host:port`` (or ``[v6]:port``) as a tuple; GrantError when malformed."""
    if addr is None:
        return None
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise GrantError(f"egress address {addr!r} is not host:port")
    return host.strip("[]"), int(port)


async def serve(ctx: ServiceContext) -> None:
    """Run the executor until stopped; every sandbox is closed on the way out."""
    bus = ctx.bus
    eid = ctx.service_id
    opts = ctx.options
    metrics = ExecutorMetrics(ctx)
    sessions: dict[str, ExecSession] = {}
    starting: set[str] = set()
    uid, gid = sandbox_ids()
    capacity = int(opts.get("capacity") or DEFAULT_CAPACITY)
    per_user = int(opts.get("per_user") or DEFAULT_PER_USER)
    backend_config: dict[str, dict[str, Any]] = opts.get("backend_config") or {}
    backends = usable_backends(opts.get("backends"), backend_config, ctx.log)
    instance = secrets.token_hex(8)
    scratch_root = Path(os.environ.get("DEVSILO_SCRATCH_DIR", f"/tmp/devsilo-scratch-{eid}"))
    scratch_root.mkdir(mode=0o711, parents=True, exist_ok=True)
    os.chmod(scratch_root, 0o711)
    relay_dir = scratch_root / ".relay"
    relay_dir.mkdir(mode=0o711, exist_ok=True)
    trust_root = scratch_root / ".trust"
    state_dirs = [ctx.state.root]
    store = workspace_store(opts, eid, ctx.log)
    unlocking: set[str] = set()
    uploaded = UploadedWorkspaces(ctx, store, eid)
    tool_options = ToolOptions.from_options(opts, bus.verifier.max_bytes)
    running_calls: dict[tuple[str, str], asyncio.Task[ToolResult]] = {}
    cancelled_calls: dict[tuple[str, str], None] = {}
    call_outcomes: dict[tuple[str, str], asyncio.Future[ToolResult]] = {}
    """Each running call's final result, for a harness that asks for it again."""
    finished_calls: OrderedDict[tuple[str, str], tuple[float, ToolResult]] = OrderedDict()

    def store_records(phases: tuple[str, ...]) -> dict[str, Path]:
        """Workspace path -> where its files are, for the store's records in ``phases``."""
        out: dict[str, Path] = {}
        for state_file in store.root.glob("*/state.json"):
            try:
                st = json.loads(state_file.read_text())
            except (OSError, ValueError):
                continue
            if st.get("phase") in phases and st.get("origin") is None:  # uploaded ones: below
                out[str(st["path"])] = state_file.parent / "files"
        return out

    def locked_paths() -> dict[str, Path]:
        """Workspaces locked here and ready for sessions."""
        return store_records(("locked",))

    def held_paths() -> dict[str, Path]:
        """Workspaces this executor holds in any way: locked, or a lock/unlock not finished
        (a crash mid-way: running the command again here completes it)."""
        return store_records(("locked", "locking", "unlocking"))

    ctx.status.update(backends=backends, capacity=capacity)
    ctx.log.info("executor_backends", backends=backends)

    def docker_blind(files: Path) -> tuple[str, ...]:
        """("docker",) for a workspace in an ext4 image: mounted in our namespace only, the daemon sees none."""
        return ("docker",) if os.path.ismount(files) and files.is_relative_to(store.root) else ()

    # Warm sandboxes (option `warm`: a number, or {backend: number}): bwrap and docker-runc take any
    # workspace; gvisor and docker-runsc start on a workspace locked here, so they follow the locks.
    def warm_template(workspace: Path | None) -> SandboxSpec:
        return SandboxSpec(session_id="warm", workspace=workspace or scratch_root, sandbox_uid=uid,
                           sandbox_gid=gid, scratch_root=scratch_root)

    warm = WarmPools(warm_template, warm_sizes(opts.get("warm")), backend_config, backends)
    await warm.start()
    for locked_files in locked_paths().values():
        await warm.track(locked_files, exclude=docker_blind(locked_files))
    for warm_backend, problem in warm.problems.items():
        ctx.log.warning("warm_pool_unavailable", backend=warm_backend, error=problem)

    def in_use() -> int:
        return len(sessions) + len(starting)

    def announcement(stopping: bool = False) -> ExecutorAnnounce:
        users: dict[str, int] = {}
        for s in sessions.values():
            users[s.grant.user] = users.get(s.grant.user, 0) + 1
        return ExecutorAnnounce(
            executor_id=eid, instance=instance, host=socket.gethostname(), backends=tuple(backends),
            capacity=capacity, free=max(0, capacity - in_use()), users=users,
            warm=warm.ready(),
            sessions=tuple(sorted(sid for sid, s in sessions.items() if s.grant.purpose == "session")),
            locked=tuple(sorted(held_paths())),
            remote_locked=tuple(RemoteLock(host=h, path=p, user=u)
                                for (h, p), (u, _) in sorted(uploaded.held().items())),
            stopping=stopping,
        )

    async def announce_now() -> None:
        try:
            await bus.publish(subjects.pool_announce(eid), announcement())
        except Exception as exc:  # NATS down: keep trying; the pool notices our silence
            ctx.log.warning("announce_failed", error=str(exc))

    async def announce_loop() -> None:
        while True:
            await announce_now()
            metrics.capacity.labels(state="free").set(max(0, capacity - in_use()))
            for warm_backend, ready in warm.ready().items():
                metrics.warm.labels(backend=warm_backend).set(ready)
            metrics.capacity.labels(state="total").set(capacity)
            await asyncio.sleep(ANNOUNCE_EVERY_S)

    async def open_egress(grant_text: str, grant: SessionGrant) -> tuple[EgressSessionReady | None, str | None]:
        """Register the session with an egress: its proxy address and the session CA, or why not."""
        try:
            ready = await bus.request(
                subjects.egress_session(subjects.EGRESS_ANY), EgressSessionOpen(grant=grant_text),
                EgressSessionReady, from_role=Role.EGRESS, sid=grant.session_id, timeout=10.0,
            )
        except SiloError as exc:
            return None, f"egress unavailable ({exc}); the sandbox has no network at all"
        if ready.session_id != grant.session_id:
            return None, "egress answered for another session; the sandbox has no network at all"
        return ready, None

    def relay_hello(egress_id: str, sid: str) -> Callable[[], bytes]:
        """A fresh signed first line for each of the session's relay connections to ``egress_id``."""
        subject = subjects.egress_relay(egress_id)

        def hello() -> bytes:
            sealed, _ = bus.signer.seal(RelayHello(session_id=sid), subject, sid=sid, ttl=RELAY_HELLO_TTL)
            return relay_line(sealed)

        return hello

    async def close_egress(egress_id: str | None, sid: str) -> None:
        if egress_id is None:
            return
        try:
            await bus.publish(subjects.egress_session(egress_id), EgressSessionClose(session_id=sid), sid=sid)
        except Exception as exc:  # noqa: BLE001 — the egress expires the session with its grant anyway
            ctx.log.warning("egress_close_failed", error=str(exc))

    def refuse(code: str, message: str) -> PoolError:
        metrics.lease_refusals.labels(reason=code).inc()
        return PoolError(code, message)

    async def on_lease(env: Envelope, req: LeaseRequest) -> Message:
        return await admit(env, req.grant, "session")

    async def admit(env: Envelope, sealed: str, purpose: str) -> LeaseGranted:
        """Check a grant against this executor's limits and start its sandbox (a session's or a shell's)."""
        grant = open_grant(bus.verifier, sealed)
        sid = grant.session_id
        if grant.purpose != purpose:
            raise GrantError(f"a {grant.purpose} grant cannot start a {purpose} (grant {grant.grant_id})")
        if env.header.sid != sid:
            raise GrantError(f"lease request signed for {env.header.sid}, grant is for {sid}")
        if grant.executor not in (None, eid):
            raise GrantError(f"grant names executor {grant.executor}, this is {eid}")
        if sid in sessions or sid in starting:
            raise GrantError(f"session {sid} already has a sandbox here")
        upload = uploaded.for_grant(grant)  # uploaded from the client's machine and locked here
        if upload is None and grant.workspace_host is not None and grant.workspace_host != socket.gethostname():
            raise refuse("host", f"the workspace is on {grant.workspace_host}; executor {eid} runs on "
                         f"{socket.gethostname()} and cannot mount it")
        if grant.sandbox == "auto" and backends:
            pass  # start_session picks our strongest
        elif grant.sandbox not in backends:
            raise refuse("backend", f"sandbox backend {grant.sandbox!r} is not available on {eid} "
                         f"(it offers {', '.join(backends) or 'none'})")
        if in_use() >= capacity:
            raise refuse("capacity", f"executor {eid} is full ({capacity} sandboxes)")
        if sum(1 for s in sessions.values() if s.grant.user == grant.user) >= per_user:
            raise refuse("user_limit", f"user {grant.user} already has {per_user} sandboxes on {eid}")
        if upload is not None:
            workspace = upload
        else:
            workspace = check_workspace(grant.workspace, state_dirs)
            if str(workspace) in unlocking:
                raise GrantError(f"workspace {workspace} is being unlocked; no new sessions on it")
            if str(workspace) in held_paths() and str(workspace) not in locked_paths():
                raise GrantError(f"workspace {workspace} is half locked or unlocked; run `silo workspace "
                                 "lock` or `unlock` again to finish that first")
            if purpose == "shell":
                workspace = shell_workspace(grant, workspace)
            workspace = locked_paths().get(str(workspace), workspace)  # a locked one: its stored files
            if workspace.is_relative_to(store.root):
                store.check_mounted(workspace)
        allow_read = tuple(check_workspace(p, state_dirs, kind="read allow-list path")
                           for p in grant.allow_read)
        starting.add(sid)
        try:
            return await start_session(LeaseRequest(grant=sealed), grant, workspace, allow_read)
        finally:
            starting.discard(sid)

    def shell_workspace(grant: SessionGrant, workspace: Path) -> Path:
        """Where a shell may work: a workspace locked here, or the live one of the user's session here."""
        if str(workspace) in locked_paths():
            return workspace
        for s in sessions.values():
            if (s.grant.purpose == "session" and s.grant.user == grant.user
                    and Path(s.grant.workspace).resolve() == workspace):
                return s.workspace
        raise GrantError(f"workspace {workspace} is not locked on executor {eid} and no session of "
                         f"{grant.user} runs on it here; lock it first (`silo workspace lock {workspace}`)")

    async def start_session(req: LeaseRequest, grant: SessionGrant, workspace: Path,
                            allow_read: tuple[Path, ...]) -> LeaseGranted:
        sid = grant.session_id
        warnings: list[str] = []
        if os.geteuid() == 0:
            skipped = prepare_workspace_ownership(workspace, uid, gid)
            if skipped:
                warnings.append(f"{len(skipped)} hard-linked file(s) stay read-only in the sandbox, "
                                f"e.g. {skipped[0]}")
        # The sandbox's one way out: a socket only its uid can use, relayed to the egress that
        # took the session's policy, each connection opened with a fresh signed first line.
        ready, warning = await open_egress(req.grant, grant)
        if warning:
            warnings.append(warning)
        egress_id = ready.egress_id if ready is not None else None
        egress_addr = parse_addr(ready.proxy_addr) if ready is not None and ready.proxy_addr else None
        if ready is not None and egress_addr is None:
            warnings.append(f"egress {egress_id} has no proxy address: every network request is refused")
        relay = SessionRelay(sid, relay_dir / f"{sid}.sock", egress_addr, uid=uid,
                             hello=relay_hello(egress_id, sid) if egress_id is not None else None)
        await relay.start()
        # Only a session that may reach somewhere needs the session CA in its trust store
        # (one that may not stays fit for a warm sandbox, which has none).
        trust: SessionTrust | None = None

        async def undo() -> None:
            """A start that fails gives back what it had set up."""
            await relay.close()
            await close_egress(egress_id, sid)
            if trust is not None:
                trust.remove()

        if ready is not None and ready.ca_cert and grant.allow_domains:
            try:
                trust = SessionTrust.create(trust_root, ready.ca_cert.encode())
            except SandboxError:
                await undo()
                raise
        spec = SandboxSpec(session_id=sid, workspace=workspace, sandbox_uid=uid, sandbox_gid=gid,
                           scratch_root=scratch_root, allow_read=allow_read, relay_socket=relay.socket_path,
                           trust_dir=trust.path if trust is not None else None)
        backend = grant.sandbox
        if backend == "auto":
            backend = next(b for b in STRENGTH_ORDER if b in backends)
        if backend == "docker" and os.path.ismount(workspace) and workspace.is_relative_to(store.root):
            await undo()
            raise GrantError(f"workspace {grant.workspace} is kept in an ext4 image mounted only in executor "
                             f"{eid}'s mount namespace, which the Docker daemon cannot see; use the bwrap "
                             "or gvisor sandbox (or run the executor with workspace_storage=directory)")
        started = time.perf_counter()
        sandbox: Sandbox | None = None
        try:
            try:
                sandbox = await warm.try_take(backend, spec, relay)
            except SandboxError as exc:  # no warm one used up, or that one closed: go cold
                ctx.log.warning("warm_lease_failed", backend=backend, error=str(exc))
            kind = "warm" if sandbox is not None else "cold"
            if sandbox is None:
                sandbox = get_backend(backend).create(spec, **backend_config.get(backend, {}))
                await sandbox.start()
        except BaseException:
            metrics.starts.labels(backend=backend, outcome="error").inc()
            await undo()
            raise
        metrics.starts.labels(backend=backend, outcome="ok").inc()
        metrics.leases.labels(backend=backend, kind=kind).inc()
        metrics.start_seconds.labels(backend=backend).observe(time.perf_counter() - started)
        metrics.sandboxes.labels(backend=backend, state="running").inc()
        warnings.extend(getattr(sandbox, "warnings", []))
        sessions[sid] = ExecSession(grant, backend, sandbox, relay, workspace, egress_id, req.grant, trust)
        ctx.status["sandboxes"] = len(sessions)
        ctx.log.info("sandbox_started", backend=backend, kind=kind, workspace=str(workspace), egress=egress_id)
        lim = spec.limits
        access = AccessReport(
            backend=backend, workspace=f"{workspace} (at {WORKSPACE} inside)",
            readable_paths=("/usr (read-only system files)", *(f"{p} (read-only)" for p in allow_read)),
            allowed_domains=grant.allow_domains,
            credential_domains=ready.credential_hosts if ready is not None else (),
            limits={"sandbox_uid": uid, "memory_bytes": lim.memory_bytes, "cpus": lim.cpus, "pids": lim.pids},
            warnings=tuple(warnings),
        )
        return LeaseGranted(session_id=sid, executor_id=eid, access=access, instance=instance)

    async def close_session(sid: str, reason: str) -> None:
        s = sessions.pop(sid, None)
        if s is None:
            return
        for key in [k for k in finished_calls if k[0] == sid]:
            del finished_calls[key]
        if s.grant.purpose == "shell":
            shell_closed_why[sid] = reason
        await s.sandbox.close()
        await s.relay.close()
        if s.trust is not None:
            s.trust.remove()
        metrics.sandboxes.labels(backend=s.backend, state="running").dec()
        ctx.status["sandboxes"] = len(sessions)
        await close_egress(s.egress_id, sid)
        ctx.log.info("sandbox_closed", reason=reason)

    def info(path: str, files: Path | None) -> WorkspaceInfo:
        st = store.state(Path(path)) or {}
        attached = tuple(sorted(sid for sid, s in sessions.items()
                                if s.workspace == files and s.grant.purpose == "session"))
        shells = tuple(sorted(sid for sid, s in sessions.items()
                              if s.workspace == files and s.grant.purpose == "shell"))
        size = entries = 0
        if files is not None and files.is_dir():
            for f in files.rglob("*"):
                entries += 1
                if f.is_file() and not f.is_symlink():
                    size += f.lstat().st_size
        return WorkspaceInfo(path=path, executor=eid, phase=str(st.get("phase", "unlocked")),
                             locked_at=st.get("locked_at"), entries=entries, size_bytes=size,
                             sessions=attached, shells=shells,
                             warnings=store.warnings_for(st) if files else (),
                             storage=str(st.get("storage", "directory")) if files else None)

    def sessions_on(files: Path) -> list[str]:
        return [sid for sid, s in sessions.items() if s.workspace == files]

    async def on_workspace(req: WorkspaceRequest) -> Message:
        if req.transfer is not None or req.origin_host is not None:  # uploaded from another machine
            return await uploaded.handle(req, sessions_on=sessions_on, close_session=close_session,
                                         announce_now=announce_now)
        if req.op == "list":
            return WorkspaceReply(workspaces=tuple(info(p, f) for p, f in sorted(held_paths().items()))
                                  + uploaded.infos(req.user, sessions_on=sessions_on))
        if req.path is None:
            raise GrantError(f"workspace {req.op} needs a path")
        if req.op == "status":
            path = str(Path(req.path).resolve())
            return WorkspaceReply(workspaces=(info(path, held_paths().get(path)),))
        if req.op == "lock":
            locked = await asyncio.to_thread(store.lock, Path(req.path), state_dirs=state_dirs)
            ctx.log.info("workspace_locked", path=str(locked.path), entries=locked.entries)
            await warm.track(locked.files_dir, exclude=docker_blind(locked.files_dir))
            await announce_now()  # sessions on it must lease here: tell the pool before replying
            return WorkspaceReply(workspaces=(info(str(locked.path), locked.files_dir),))
        path = check_workspace(req.path, state_dirs)
        files = held_paths().get(str(path))
        unlocking.add(str(path))
        try:
            # No new attachments, then every sandbox on it ends (TERM, 5 s, KILL inside close()).
            on_it = [sid for sid, s in sessions.items() if files is not None and s.workspace == files]
            await asyncio.gather(*(close_session(sid, "workspace unlocked") for sid in on_it))
            if files is not None:
                await warm.forget(files)  # its warm sandboxes have it mounted
            report = await asyncio.to_thread(store.unlock, path)
            text = await asyncio.to_thread(report.render, store.originals_dir(path), path)
        finally:
            unlocking.discard(str(path))
        await announce_now()
        ctx.log.info("workspace_unlocked", path=str(path), changes=len(report.changed_paths),
                     auto_exec=report.auto_exec_changed, sessions_ended=len(on_it))
        return WorkspaceReply(workspaces=(info(str(path), None),), report_text=text,
                              report=json.loads(report.to_json()), auto_exec_changed=report.auto_exec_changed)

    shell_tasks: set[asyncio.Task[None]] = set()
    shell_closed_why: dict[str, str] = {}
    """Why a shell's sandbox was closed from outside the shell (unlock, the user, executor stop)."""

    def own(coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        shell_tasks.add(task)
        task.add_done_callback(shell_tasks.discard)

    async def on_shell_open(env: Envelope, req: ShellOpen) -> Message:
        """Start a sandbox for a user's shell under a shell grant, then the shell in it."""
        lease = await admit(env, req.grant, "shell")
        shid = lease.session_id
        session = sessions[shid]

        async def publish(body: ShellOutput) -> None:
            await bus.publish(subjects.shell_output(shid), body, sid=shid)

        output = ShellStream(publish)
        try:
            if not hasattr(session.sandbox.helper, "start_shell"):
                raise SandboxError(f"the {session.backend} sandbox runs no shells (it executes nothing); "
                                   "pick a real backend with --sandbox")
            handle = await session.sandbox.helper.start_shell(
                req.command, tty=req.tty, rows=req.rows, cols=req.cols, env={"TERM": req.term},
                on_output=output.put)
            opener = env.header.sender
            sub = await bus.subscribe(subjects.shell_input(shid),
                                      lambda e, m: on_shell_input(e, shid, opener, handle, output))
        except BaseException:
            await close_session(shid, "shell failed to start")
            raise
        own(run_shell(shid, session, handle, output, sub))
        ctx.log.info("shell_opened", shell=shid, user=session.grant.user, tty=req.tty,
                     command=req.command is not None)
        return ShellOpened(shell_id=shid, executor_id=eid, access=lease.access)

    async def on_shell_input(env: Envelope, shid: str, opener: str, handle: ShellHandle,
                             output: ShellStream) -> None:
        inp = env.expect(ShellInput)
        if env.header.sid != shid or env.header.sender != opener:
            raise GrantError(f"input for shell {shid} from {env.header.sender}, which did not open it")
        if inp.kind == "data":
            try:
                data = base64.b64decode(inp.data, validate=True)
            except ValueError:
                raise GrantError(f"input for shell {shid} is not base64") from None
            await handle.send_input(data)
        elif inp.kind == "eof":
            await handle.send_input(b"", eof=True)
        elif inp.kind == "resize" and inp.rows > 0 and inp.cols > 0:
            await handle.resize(inp.rows, inp.cols)
        elif inp.kind == "signal" and inp.signal is not None:
            await handle.signal(inp.signal)
        elif inp.kind == "ack":
            output.ack(inp.seq)
        elif inp.kind == "close":
            # Not awaited here: ending the shell unsubscribes this very handler.
            own(close_session(shid, "closed by the user"))

    async def run_shell(shid: str, session: ExecSession, handle: ShellHandle, output: ShellStream,
                        sub: Any) -> None:
        """Forward a shell's output in order, then its exit; its sandbox closes after it."""
        pumping = asyncio.create_task(output.run())
        ended = asyncio.ensure_future(handle.result())
        code: int | None = None
        signum: int | None = None
        message = ""
        try:
            await asyncio.wait({pumping, ended}, return_when=asyncio.FIRST_COMPLETED)
            if pumping.done() and not ended.done():  # stalled: nobody reads this shell any more
                await close_session(shid, str(pumping.exception()))
            try:
                result = await ended
                code, signum = result.exit_code, result.signal
            except SiloError as exc:
                why = shell_closed_why.get(shid)
                if why is not None:
                    message = f"the shell's sandbox was closed on executor {eid}: {why}"
                else:
                    message = f"the shell failed: {exc}"
            if shell_closed_why.get(shid) is None:  # its output is all queued: send the rest
                finishing = asyncio.ensure_future(output.finish())  # waits while the queue is full
                try:
                    await pumping
                except SiloError as exc:
                    message = message or f"the shell's output could not be delivered: {exc}"
                finally:
                    finishing.cancel()
            await bus.publish(subjects.shell_output(shid),
                              ShellExit(seq=output.seq, exit_code=code, signal=signum, message=message),
                              sid=shid)
        finally:
            ended.cancel()
            pumping.cancel()
            await sub.unsubscribe()
            await close_session(shid, "shell ended")
            shell_closed_why.pop(shid, None)
            ctx.log.info("shell_ended", shell=shid, exit_code=code, message=message)

    def cancel_call(sid: str, call_id: str) -> Ack:
        """Stop a running call (its command is killed); a call not started yet will not start."""
        task = running_calls.get((sid, call_id))
        if task is not None:
            task.cancel()
        else:
            cancelled_calls[(sid, call_id)] = None
            while len(cancelled_calls) > CANCELLED_CALLS_KEPT:
                del cancelled_calls[next(iter(cancelled_calls))]
        return Ack()

    def keep_outcome(key: tuple[str, str], result: ToolResult) -> None:
        """Remember a finished call's result for a while, for a harness that asks again."""
        now = time.monotonic()
        finished_calls[key] = (now, result)
        finished_calls.move_to_end(key)
        while finished_calls and (len(finished_calls) > FINISHED_CALLS_KEPT
                                  or now - next(iter(finished_calls.values()))[0] > FINISHED_CALLS_KEEP_S):
            finished_calls.popitem(last=False)

    async def answer_again(sid: str, session: ExecSession, call: ToolCall) -> tuple[ToolResult, bool]:
        """A call asked again after the harness lost NATS: the result of the run we have; run it
        only when it never arrived. (result, whether it ran now)."""
        key = (sid, call.call_id)
        outcome = call_outcomes.get(key)
        if outcome is not None:  # still running: its result, when it comes
            return await asyncio.shield(outcome), False
        if key in finished_calls:
            return finished_calls[key][1], False
        return await run_call(sid, session, call), True

    async def run_call(sid: str, session: ExecSession, call: ToolCall) -> ToolResult:
        """Run a call, streaming a command's output to the harness; a cancelled call's result says so."""
        key = (sid, call.call_id)
        if key in running_calls or key in call_outcomes:
            raise GrantError(f"call {call.call_id} of session {sid} is already running")
        outcome: asyncio.Future[ToolResult] = asyncio.get_running_loop().create_future()
        call_outcomes[key] = outcome
        try:
            result = await run_call_now(sid, session, call)
        except BaseException as exc:
            outcome.set_exception(SandboxClosed(f"call {call.call_id} of session {sid} did not finish: "
                                                f"{exc or type(exc).__name__}"))
            outcome.exception()  # a joiner may never come; nothing is left unretrieved
            raise
        finally:
            call_outcomes.pop(key, None)
        outcome.set_result(result)
        keep_outcome(key, result)
        return result

    async def run_call_now(sid: str, session: ExecSession, call: ToolCall) -> ToolResult:
        key = (sid, call.call_id)
        if key in cancelled_calls:
            del cancelled_calls[key]
            return ToolResult(call_id=call.call_id, is_error=True, content="cancelled before it started",
                              meta={"cancelled": True})

        async def send(out: ToolOutput) -> None:
            await bus.publish(subjects.session_output(sid), out, sid=sid)

        stream = ToolOutputStream(send, call.call_id, log=ctx.log) if call.name == "Bash" else None
        task = asyncio.create_task(run_tool(session.sandbox.helper, call, tool_options,
                                            on_output=stream.feed if stream else None))
        running_calls[key] = task
        try:
            result = await task
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                if stream is not None:
                    stream.abort()
                raise  # the executor is stopping
            result = ToolResult(call_id=call.call_id, is_error=True, content="cancelled",
                                meta={"cancelled": True})
        except BaseException:
            if stream is not None:
                stream.abort()
            raise
        finally:
            running_calls.pop(key, None)
        if stream is not None:
            chunks = await stream.close()
            result = result.model_copy(update={"meta": {**result.meta, "output_chunks": chunks}})
        return result

    async def on_exec(env: Envelope, msg: Msg) -> Message:
        parts = msg.subject.split(".")  # silo.exec.<eid>.lease | silo.exec.<eid>.<sid>.<op>
        if len(parts) == 4 and parts[3] == "lease":
            return await on_lease(env, env.expect(LeaseRequest))
        if len(parts) == 4 and parts[3] == "workspace":
            return await on_workspace(env.expect(WorkspaceRequest))
        if len(parts) == 4 and parts[3] == "shell":
            return await on_shell_open(env, env.expect(ShellOpen))
        if len(parts) != 5:
            raise GrantError(f"bad executor subject {msg.subject}")
        sid, op = parts[3], parts[4]
        if env.header.sid != sid:
            raise GrantError(f"message signed for session {env.header.sid}, sent to {sid}")
        if sid in sessions and sessions[sid].grant.purpose != "session":
            raise GrantError(f"{sid} is a user's shell on executor {eid}, not a session")
        if op == "close":
            env.expect(CloseSession)
            await close_session(sid, "closed by harness")
            return Ack()
        if op == "cancel":
            return cancel_call(sid, env.expect(ToolCancel).call_id)
        session = sessions.get(sid)
        if session is None:
            why = "the executor is stopping" if ctx.stopping.is_set() else "closed or never leased"
            raise SandboxClosed(f"no sandbox for session {sid} on executor {eid} ({why})")
        if op == "upload":
            return await land_upload(bus.js, session.sandbox.helper, session.workspace, env.expect(FileUpload),
                                     max_bytes=int(opts.get("upload_max_bytes") or DEFAULT_UPLOAD_MAX))
        call = env.expect(ToolCall)
        started = time.perf_counter()
        if call.again:
            result, ran = await answer_again(sid, session, call)
        else:
            result, ran = await run_call(sid, session, call), True
        if sessions.get(sid) is not session:
            why = "the executor is stopping" if ctx.stopping.is_set() else "was its workspace unlocked?"
            raise SandboxClosed(f"the sandbox of session {sid} was closed on executor {eid} while "
                                f"{call.name} ran ({why})")
        if not ran:
            return result
        tool = call.name if call.name in SANDBOX_TOOLS else "other"  # bounded label values
        metrics.tool_seconds.labels(tool=tool).observe(time.perf_counter() - started)
        metrics.tool_calls.labels(tool=tool, outcome="error" if result.is_error else "ok").inc()
        return result

    egress_instances: dict[str, str] = {}
    reopening: set[asyncio.Task[None]] = set()

    async def reopen_egress(sid: str, gone: str) -> None:
        """Open a session again with an egress after ``gone`` restarted; its relay goes there.

        The old session CA's key died with the old egress: the sandbox's trust directory gets
        the new egress's CA in its place before the relay turns to it, so new TLS connections
        from inside verify against the new CA and no longer the old one. A CA that cannot be
        installed leaves the sandbox trusting nothing (HTTPS fails closed, never unchecked).
        """
        s = sessions.get(sid)
        if s is None or s.egress_id != gone:
            return
        ready, warning = await open_egress(s.grant_text, s.grant)
        if ready is None or not ready.proxy_addr:
            ctx.log.warning("egress_reopen_failed", session=sid, egress=gone, error=warning)
            return
        if sessions.get(sid) is not s:
            await close_egress(ready.egress_id, sid)  # closed while we asked
            return
        if s.trust is not None:
            try:
                s.trust.install((ready.ca_cert or "").encode())
                metrics.trust_swaps.labels(outcome="ok").inc()
            except SandboxError as exc:
                metrics.trust_swaps.labels(outcome="error").inc()
                ctx.log.warning("egress_reopen_ca_refused", session=sid, egress=ready.egress_id, error=str(exc))
                with contextlib.suppress(SandboxError):
                    s.trust.distrust()
        s.relay.egress_addr = parse_addr(ready.proxy_addr)
        s.relay.hello = relay_hello(ready.egress_id, sid)
        s.egress_id = ready.egress_id
        ctx.log.info("egress_session_reopened", session=sid, previous=gone, egress=ready.egress_id)

    async def on_egress_announce(env: Envelope, msg: Msg) -> None:
        ann = env.expect(EgressAnnounce)
        if ann.egress_id != env.header.sender or msg.subject != subjects.egress_announce(ann.egress_id):
            raise GrantError(f"{env.header.sender} announced itself as egress {ann.egress_id}")
        before = egress_instances.get(ann.egress_id)
        egress_instances[ann.egress_id] = ann.instance
        if before is None or before == ann.instance:
            return
        ctx.log.warning("egress_restarted", egress=ann.egress_id)
        for sid, s in list(sessions.items()):
            if s.egress_id == ann.egress_id:
                task = asyncio.create_task(reopen_egress(sid, ann.egress_id))
                reopening.add(task)
                task.add_done_callback(reopening.discard)

    await bus.subscribe(subjects.EGRESS_ANNOUNCE_ALL, on_egress_announce)
    await bus.subscribe(subjects.exec_listen(eid), on_exec, concurrent=True)
    announcer = asyncio.create_task(announce_loop())
    ctx.status["sandboxes"] = 0
    try:
        await ctx.stopping.wait()
    finally:
        announcer.cancel()
        for task in list(reopening):
            task.cancel()
        await asyncio.gather(announcer, *reopening, return_exceptions=True)
        await asyncio.gather(*(close_session(sid, "executor stopping") for sid in list(sessions)),
                             return_exceptions=True)
        if shell_tasks:  # each tells its gateway why its shell ended
            await asyncio.wait(set(shell_tasks), timeout=5.0)
        for task in list(shell_tasks):
            task.cancel()
        await asyncio.gather(*shell_tasks, return_exceptions=True)
        await warm.close()
        try:
            await bus.publish(subjects.pool_announce(eid), announcement(stopping=True))
            await bus.nc.flush(timeout=2)
        except Exception as exc:  # the pool notices our silence within seconds anyway
            ctx.log.warning("final_announce_failed", error=str(exc))
