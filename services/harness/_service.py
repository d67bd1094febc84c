"""The harness service: starts sessions under signed grants, leases sandboxes, routes input."""

from __future__ import annotations

import asyncio
import time

from devsilo.protocol import (
    Ack,
    Envelope,
    ExecutorAnnounce,
    GrantError,
    LeaseGranted,
    LeaseRequest,
    Message,
    PoolError,
    RemoteError,
    Role,
    SessionGrant,
    SessionInput,
    SessionStarted,
    StartSession,
    ToolOutput,
    open_grant,
    subjects,
)
from devsilo.runtime import Bus, ServiceContext
from devsilo.runtime._pool import PoolView
from nats.aio.msg import Msg
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from prometheus_client import Gauge, Histogram

from ._agents import LoopMetrics
from ._backends import make_model
from ._session import SessionRunner

ANNOUNCE_GRACE_S = 2.5
"""Executors announce every second; a session leased this recently may not be listed yet."""
LEASE_WAIT_S = 15.0
"""How long a session start waits for an executor with room."""
PER_USER_SANDBOXES = 8
"""Concurrent sandboxes one user may hold across the pool."""
# Refusals after which the next executor is tried rather than giving up.
RETRYABLE_LEASE_CODES = {"capacity", "user_limit", "backend", "host", "no_responders", "timeout"}


async def ensure_streams(ctx: ServiceContext) -> None:
    """Create the events and journal streams if they do not exist yet."""
    js = ctx.bus.js
    for name, subj in ((subjects.EVENTS_STREAM, subjects.EVENTS_SUBJECTS),
                       (subjects.JOURNAL_STREAM, subjects.JOURNAL_SUBJECTS)):
        config = StreamConfig(
            name=name, subjects=[subj], retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE, duplicate_window=120.0, allow_direct=True,
            max_msg_size=ctx.bus.verifier.max_bytes,
        )
        try:
            await js.stream_info(name)
        except Exception:  # not found: create it (a race with another replica is fine)
            try:
                await js.add_stream(config)
            except Exception as exc:
                ctx.log.info("stream_create_raced", stream=name, error=str(exc))
                await js.stream_info(name)


class PoolMetrics:
    """The harness's view of the pool, as metrics."""

    def __init__(self, ctx: ServiceContext) -> None:
        reg = ctx.metrics.registry
        self.sessions = Gauge("silo_sessions_active", "Sessions running on this harness.", registry=reg)
        self.executors = Gauge("silo_pool_executors", "Executors announcing themselves.", registry=reg)
        self.capacity = Gauge("silo_pool_capacity", "Sandbox slots in the pool, by state.", ["state"],
                              registry=reg)
        self.lease_wait = Histogram("silo_lease_wait_seconds", "Time to lease a sandbox, by outcome.",
                                    ["outcome"], registry=reg,
                                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15))


async def lease_sandbox(bus: Bus, pool: PoolView, grant: SessionGrant, sealed: str, *,
                        wait_s: float = LEASE_WAIT_S) -> LeaseGranted:
    """Lease a sandbox from an executor that fits the grant, waiting for room up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    last = ""
    if pool.user_sandboxes(grant.user) >= PER_USER_SANDBOXES:
        raise PoolError("user_limit", f"user {grant.user} already holds {PER_USER_SANDBOXES} sandboxes")
    while True:
        candidates = pool.candidates(grant.sandbox, grant.executor, grant.workspace_host, grant.workspace)
        if not candidates:
            last = pool.why_none(grant.sandbox, grant.executor, grant.workspace_host)
        for ann in candidates:
            try:
                lease = await bus.request(
                    subjects.exec_lease(ann.executor_id), LeaseRequest(grant=sealed), LeaseGranted,
                    from_role=Role.EXECUTOR, sid=grant.session_id, timeout=60.0,
                )
            except RemoteError as exc:
                if exc.code not in RETRYABLE_LEASE_CODES:
                    raise
                last = f"{ann.executor_id}: {exc.message}"
                continue
            if lease.session_id != grant.session_id or lease.executor_id != ann.executor_id:
                raise GrantError("an executor answered a lease for another session or executor")
            return lease
        if time.monotonic() >= deadline:
            raise PoolError("capacity", f"no executor could run a {grant.sandbox} sandbox within "
                            f"{wait_s:.0f}s ({last}); pool: {pool.describe()}")
        await asyncio.sleep(0.1)


async def serve(ctx: ServiceContext) -> None:
    """Run the harness until stopped."""
    bus = ctx.bus
    runners: dict[str, SessionRunner] = {}
    tasks: set[asyncio.Task[None]] = set()
    pool = PoolView()
    metrics = PoolMetrics(ctx)
    loop_metrics = LoopMetrics(ctx.metrics.registry)
    await ensure_streams(ctx)

    def executor_gone(eid: str, why: str) -> None:
        for runner in list(runners.values()):
            if runner.executor_id == eid:
                spawn(runner.executor_lost(f"executor {eid} {why}; the session cannot continue"))

    def spawn(coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def on_announce(env: Envelope, msg: Msg) -> None:
        ann = env.expect(ExecutorAnnounce)
        if ann.executor_id != env.header.sender or msg.subject != subjects.pool_announce(ann.executor_id):
            raise GrantError(f"{env.header.sender} announced itself as {ann.executor_id}")
        if pool.update(ann):
            executor_gone(ann.executor_id, "stopped" if ann.stopping else "restarted")
            return
        # A sandbox the executor no longer lists was closed there (e.g. its workspace was
        # unlocked). Sessions leased in the last moments may not be listed yet.
        listed = set(ann.sessions)
        for runner in list(runners.values()):
            if (runner.executor_id == ann.executor_id and runner.sid not in listed
                    and time.monotonic() - runner.leased_at > ANNOUNCE_GRACE_S):
                spawn(runner.executor_lost(
                    f"executor {ann.executor_id} closed this session's sandbox "
                    "(was its workspace unlocked?); the session cannot continue"))

    async def watch_pool() -> None:
        while True:
            await asyncio.sleep(0.5)
            for eid in pool.expire():
                ctx.log.warning("executor_silent", executor=eid)
                executor_gone(eid, "stopped responding")
            free, total = pool.capacity()
            metrics.executors.set(len(pool))
            metrics.capacity.labels(state="free").set(free)
            metrics.capacity.labels(state="total").set(total)

    async def on_start(env: Envelope, msg: Msg) -> Message:
        start = env.expect(StartSession)
        grant = open_grant(bus.verifier, start.grant)
        if env.header.sid != grant.session_id:
            raise GrantError(f"start signed for {env.header.sid}, grant is for {grant.session_id}")
        if grant.session_id in runners:
            raise GrantError(f"session {grant.session_id} is already running")
        model = make_model(start.llm, ctx.options)
        started = time.monotonic()
        try:
            lease = await lease_sandbox(bus, pool, grant, start.grant,
                                        wait_s=float(ctx.options.get("lease_wait_s", LEASE_WAIT_S)))
        except Exception:
            metrics.lease_wait.labels(outcome="error").observe(time.monotonic() - started)
            raise
        metrics.lease_wait.labels(outcome="ok").observe(time.monotonic() - started)
        runner = SessionRunner(bus, grant, lease.executor_id, lease.access, model,
                               headless=start.headless, log=ctx.log, metrics=loop_metrics)
        runners[grant.session_id] = runner
        metrics.sessions.inc()

        async def run() -> None:
            try:
                await runner.run(start.prompt)
            finally:
                runners.pop(grant.session_id, None)
                metrics.sessions.dec()

        spawn(run())
        ctx.log.info("session_started", user=grant.user, executor=lease.executor_id)
        return SessionStarted(session_id=grant.session_id, executor_id=lease.executor_id)

    async def on_input(env: Envelope, msg: Msg) -> Message | None:
        """A client's input (request/reply): Ack or an error, from the harness running the session only."""
        inp = env.expect(SessionInput)
        sid = msg.subject.split(".")[2]
        runner = runners.get(sid)
        if runner is None:
            return None  # another replica runs it (or nobody does): it answers, not us
        if env.header.sid != sid:
            raise GrantError(f"input signed for session {env.header.sid}, sent to {sid}")
        if inp.kind == "prompt":
            await runner.prompt(inp.text, inp.client)
        elif inp.kind == "answer":
            runner.answer(inp.question_id, inp.client, inp.text)
        elif inp.kind == "interrupt":
            runner.interrupt()
        elif inp.kind == "stop":  # not awaited: inputs of other sessions must not wait for it
            runner.request_stop(f"stopped by {inp.client or 'a client'}")
        return Ack()

    async def on_tool_output(env: Envelope, msg: Msg) -> None:
        out = env.expect(ToolOutput)
        sid = msg.subject.split(".")[2]
        runner = runners.get(sid)
        if env.header.sid != sid or runner is None:
            return
        await runner.tool_output(env.header.sender, out)

    await bus.subscribe(subjects.POOL_ANNOUNCE_ALL, on_announce)
    await bus.subscribe(subjects.HARNESS_START, on_start, queue=subjects.HARNESS_QUEUE, concurrent=True)
    await bus.subscribe("silo.session.*.input", on_input)
    await bus.subscribe(subjects.SESSION_OUTPUT_ALL, on_tool_output)
    spawn(watch_pool())
    await ctx.stopping.wait()
    for runner in list(runners.values()):
        await runner.stop("harness stopping")
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
