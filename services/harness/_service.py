"""The harness service: starts sessions under signed grants and routes their input."""

from __future__ import annotations

import asyncio

from nats.aio.msg import Msg
from prometheus_client import Gauge
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from devsilo.protocol import (
    Envelope,
    GrantError,
    LeaseGranted,
    LeaseRequest,
    Message,
    Role,
    SessionInput,
    SessionStarted,
    StartSession,
    open_grant,
    subjects,
)
from devsilo.runtime import ServiceContext

from ._model import ModelBackend, ModelFailure, ScriptedModel
from ._session import SessionRunner


async def ensure_streams(ctx: ServiceContext) -> None:
    """Create the events and journal streams if they do not exist yet."""
    js = ctx.bus.js
    for name, subj in ((subjects.EVENTS_STREAM, subjects.EVENTS_SUBJECTS),
                       (subjects.JOURNAL_STREAM, subjects.JOURNAL_SUBJECTS)):
        config = StreamConfig(
            name=name, subjects=[subj], retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE, duplicate_window=120.0, allow_direct=True, max_msg_size=ctx.bus.verifier.max_bytes,
        )
        try:
            await js.stream_info(name)
        except Exception:  # not found: create it (a race with another replica is fine)
            try:
                await js.add_stream(config)
            except Exception as exc:
                ctx.log.info("stream_create_raced", stream=name, error=str(exc))
                await js.stream_info(name)


def make_model(start: StartSession) -> ModelBackend:
    """The model backend a session asked for (only the mock is built so far)."""
    if start.llm.backend == "mock":
        if not start.llm.script:
            raise ModelFailure("the mock model needs a script (--script FILE)")
        return ScriptedModel(start.llm.script)
    raise ModelFailure(f"LLM backend {start.llm.backend!r} is not built yet; use --llm mock")


async def serve(ctx: ServiceContext) -> None:
    """Run the harness until stopped."""
    bus = ctx.bus
    runners: dict[str, SessionRunner] = {}
    tasks: set[asyncio.Task[None]] = set()
    sessions_active = Gauge("silo_sessions_active", "Sessions running on this harness.",
                            registry=ctx.metrics.registry)
    await ensure_streams(ctx)

    async def on_start(env: Envelope, msg: Msg) -> Message:
        start = env.expect(StartSession)
        grant = open_grant(bus.verifier, start.grant)
        if grant.session_id in runners:
            raise GrantError(f"session {grant.session_id} is already running")
        model = make_model(start)
        lease = await bus.request(
            subjects.POOL_LEASE, LeaseRequest(grant=start.grant), LeaseGranted,
            from_role=Role.EXECUTOR, sid=grant.session_id, timeout=60.0,
        )
        if lease.session_id != grant.session_id:
            raise GrantError("executor leased a sandbox for another session")
        runner = SessionRunner(bus, grant, lease.executor_id, lease.access, model,
                               headless=start.headless, log=ctx.log)
        runners[grant.session_id] = runner
        sessions_active.inc()

        async def run() -> None:
            try:
                await runner.run(start.prompt)
            finally:
                runners.pop(grant.session_id, None)
                sessions_active.dec()

        task = asyncio.create_task(run())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        ctx.log.info("session_started", session=grant.session_id, user=grant.user,
                     executor=lease.executor_id)
        return SessionStarted(session_id=grant.session_id, executor_id=lease.executor_id)

    async def on_input(env: Envelope, msg: Msg) -> None:
        inp = env.expect(SessionInput)
        sid = msg.subject.split(".")[2]
        if env.header.sid != sid:
            raise GrantError(f"input signed for session {env.header.sid}, sent to {sid}")
        runner = runners.get(sid)
        if runner is None:
            raise GrantError(f"no running session {sid} on this harness")
        if inp.kind == "prompt":
            runner.inputs.put_nowait(inp.text)
        elif inp.kind == "interrupt":
            runner.interrupt()
        elif inp.kind == "stop":
            await runner.stop(f"stopped by {inp.client or 'a client'}")
        return None

    await bus.subscribe(subjects.HARNESS_START, on_start, queue=subjects.HARNESS_QUEUE, concurrent=True)
    await bus.subscribe("silo.session.*.input", on_input)
    ctx.status["sessions"] = 0
    await ctx.stopping.wait()
    for runner in list(runners.values()):
        await runner.stop("harness stopping")
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

