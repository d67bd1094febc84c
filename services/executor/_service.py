"""The executor service: leases sandboxes to sessions and runs their tool calls."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge, Histogram

from devsilo.protocol import (
    SANDBOX_TOOLS,
    AccessReport,
    Ack,
    CloseSession,
    EgressSessionClose,
    EgressSessionOpen,
    EgressSessionReady,
    Envelope,
    GrantError,
    LeaseGranted,
    LeaseRequest,
    Message,
    Role,
    SandboxError,
    SessionGrant,
    SiloError,
    ToolCall,
    open_grant,
    subjects,
)
from devsilo.runtime import ServiceContext

from ._risk import check_workspace
from ._sandbox import BwrapSandbox, prepare_workspace_ownership
from ._tools import WORKSPACE, run_tool

DEFAULT_SANDBOX_UID = 64123


@dataclass
class ExecSession:
    """A session's sandbox on this executor."""

    grant: SessionGrant
    sandbox: BwrapSandbox
    workspace: Path
    egress_id: str | None


class ExecutorMetrics:
    """The executor's own metrics."""

    def __init__(self, ctx: ServiceContext) -> None:
        reg = ctx.metrics.registry
        self.sandboxes = Gauge("silo_sandboxes_active", "Sandboxes running.", ["backend"], registry=reg)
        self.starts = Counter("silo_sandbox_starts_total", "Sandbox starts by backend and outcome.",
                              ["backend", "outcome"], registry=reg)
        self.start_seconds = Histogram("silo_sandbox_start_seconds", "Sandbox start latency.",
                                       ["backend"], registry=reg)
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


async def serve(ctx: ServiceContext) -> None:
    """Run the executor until stopped; every sandbox is closed on the way out."""
    bus = ctx.bus
    eid = ctx.service_id
    metrics = ExecutorMetrics(ctx)
    sessions: dict[str, ExecSession] = {}
    uid, gid = sandbox_ids()
    scratch_root = Path(os.environ.get("DEVSILO_SCRATCH_DIR", f"/tmp/devsilo-scratch-{eid}"))
    scratch_root.mkdir(mode=0o711, parents=True, exist_ok=True)
    os.chmod(scratch_root, 0o711)
    state_dirs = [ctx.state.root]

    async def open_egress(grant_text: str, grant: SessionGrant) -> tuple[str | None, str | None]:
        try:
            ready = await bus.request(
                subjects.egress_session(subjects.EGRESS_ANY), EgressSessionOpen(grant=grant_text),
                EgressSessionReady, from_role=Role.EGRESS, sid=grant.session_id, timeout=10.0,
            )
        except SiloError as exc:
            return None, f"egress unavailable ({exc}); the sandbox has no network at all"
        return ready.egress_id, None

    async def on_lease(env: Envelope, msg: Msg) -> Message:
        req = env.expect(LeaseRequest)
        grant = open_grant(bus.verifier, req.grant)
        sid = grant.session_id
        if env.header.sid != sid:
            raise GrantError(f"lease request signed for {env.header.sid}, grant is for {sid}")
        if grant.executor not in (None, eid):
            raise GrantError(f"grant names executor {grant.executor}, this is {eid}")
        if sid in sessions:
            raise GrantError(f"session {sid} already has a sandbox here")
        if grant.sandbox != "bwrap":
            raise SandboxError(f"sandbox backend {grant.sandbox!r} is not available on {eid} (bwrap is)")
        workspace = check_workspace(grant.workspace, state_dirs)
        warnings: list[str] = []
        if os.geteuid() == 0:
            skipped = prepare_workspace_ownership(workspace, uid, gid)
            if skipped:
                warnings.append(f"{len(skipped)} hard-linked file(s) stay read-only in the sandbox, "
                                f"e.g. {skipped[0]}")
        started = time.perf_counter()
        sandbox = BwrapSandbox(workspace, sandbox_uid=uid, sandbox_gid=gid, scratch_root=scratch_root)
        try:
            await sandbox.start()
        except SandboxError:
            metrics.starts.labels(backend="bwrap", outcome="error").inc()
            raise
        metrics.starts.labels(backend="bwrap", outcome="ok").inc()
        metrics.start_seconds.labels(backend="bwrap").observe(time.perf_counter() - started)
        metrics.sandboxes.labels(backend="bwrap").inc()
        egress_id, warning = await open_egress(req.grant, grant)
        if warning:
            warnings.append(warning)
        warnings.extend(sandbox.warnings)
        sessions[sid] = ExecSession(grant, sandbox, workspace, egress_id)
        ctx.status["sandboxes"] = len(sessions)
        ctx.log.info("sandbox_started", session=sid, workspace=str(workspace), egress=egress_id)
        access = AccessReport(
            backend="bwrap", workspace=f"{workspace} (at {WORKSPACE} inside)",
            readable_paths=("/usr (read-only system files)",), allowed_domains=grant.allow_domains,
            limits={"sandbox_uid": uid}, warnings=tuple(warnings),
        )
        return LeaseGranted(session_id=sid, executor_id=eid, access=access)

    async def close_session(sid: str, reason: str) -> None:
        s = sessions.pop(sid, None)
        if s is None:
            return
        await s.sandbox.close()
        metrics.sandboxes.labels(backend="bwrap").dec()
        ctx.status["sandboxes"] = len(sessions)
        if s.egress_id is not None:
            try:
                await bus.publish(subjects.egress_session(s.egress_id), EgressSessionClose(session_id=sid),
                                  sid=sid)
            except Exception as exc:  # the egress expires the session with its grant anyway
                ctx.log.warning("egress_close_failed", session=sid, error=str(exc))
        ctx.log.info("sandbox_closed", session=sid, reason=reason)

    async def on_exec(env: Envelope, msg: Msg) -> Message:
        parts = msg.subject.split(".")  # silo.exec.<eid>.<sid>.<op>
        if len(parts) != 5:
            raise GrantError(f"bad executor subject {msg.subject}")
        sid, op = parts[3], parts[4]
        if env.header.sid != sid:
            raise GrantError(f"message signed for session {env.header.sid}, sent to {sid}")
        session = sessions.get(sid)
        if op == "close":
            env.expect(CloseSession)
            await close_session(sid, "closed by harness")
            return Ack()
        if session is None:
            raise SandboxError(f"no sandbox for session {sid} on executor {eid}")
        call = env.expect(ToolCall)
        started = time.perf_counter()
        result = await run_tool(session.sandbox.helper, call)
        tool = call.name if call.name in SANDBOX_TOOLS else "other"  # bounded label values
        metrics.tool_seconds.labels(tool=tool).observe(time.perf_counter() - started)
        metrics.tool_calls.labels(tool=tool, outcome="error" if result.is_error else "ok").inc()
        return result

    await bus.subscribe(subjects.POOL_LEASE, on_lease, queue=subjects.EXECUTOR_QUEUE, concurrent=True)
    await bus.subscribe(subjects.exec_listen(eid), on_exec, concurrent=True)
    ctx.status["sandboxes"] = 0
    try:
        await ctx.stopping.wait()
    finally:
        await asyncio.gather(*(close_session(sid, "executor stopping") for sid in list(sessions)),
                             return_exceptions=True)
