"""The harness service: starts sessions under signed grants, leases sandboxes, routes input."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from typing import Any

from devsilo.protocol import (
    Ack,
    CloseSession,
    Envelope,
    ExecutorAnnounce,
    GrantError,
    JournalExportPage,
    JournalExportRequest,
    LeaseGranted,
    LeaseRequest,
    Message,
    PoolError,
    RemoteError,
    Role,
    SessionEvent,
    SessionGrant,
    SessionInput,
    SessionOwnership,
    SessionStarted,
    SiloError,
    StartSession,
    ToolOutput,
    open_grant,
    subjects,
)
from devsilo.protocol._costs import TOKEN_FIELDS
from devsilo.runtime import Bus, ServiceContext
from devsilo.runtime._pool import PoolView
from nats.aio.msg import Msg
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError
from prometheus_client import Counter, Gauge, Histogram

from ._agents import LoopMetrics
from ._backends import DEFAULT_KEY_ENV, ModelSettings, ProviderSettings, make_model, read_api_key
from ._failover import (
    BEAT_S,
    TAKEOVER_AFTER_S,
    UNKNOWN_RESULT,
    SessionOwners,
    rebuild,
    shown_uses,
    unshown_results,
)
from ._gate import ModelPolicy
from ._journal import JournalEntry, JournalReader, SessionJournal, StreamSink, script_digest
from ._localserver import LocalServers
from ._model import ModelFailure, ScriptedModel, Usage
from ._session import HEADLESS_INSTRUCTION, SessionRunner

ANNOUNCE_GRACE_S = 2.5
"""Executors announce every second; a session leased this recently may not be listed yet."""
RECONNECT_GRACE_S = 3.0
"""After the harness's NATS connection comes back (or the harness wakes from a pause, see
``SilenceWatch``), how long executors get to be heard again (they reconnect too, each on its own
backoff) before silence counts against them."""
WATCH_EVERY_S = 0.5
"""How often the harness looks for executors that fell silent."""
LATE_WAKE_S = 1.0
"""A silence check this much later than due means the harness itself was paused. Below the pool's
silence (3 s) less an announcement interval and a check interval, so a pause too short to be
noticed cannot cost an executor either."""
LEASE_WAIT_S = 15.0
"""How long a session start waits for an executor with room."""
PER_USER_SANDBOXES = 8
"""Concurrent sandboxes one user may hold across the pool."""
# Refusals after which the next executor is tried rather than giving up.
RETRYABLE_LEASE_CODES = {"capacity", "user_limit", "backend", "host", "no_responders", "timeout"}


class SilenceWatch:
    """Judges executors' silence, every ``WATCH_EVERY_S``, never for the harness's own deafness.

    While our NATS connection is down, and for a grace after it is back (announcements were
    lost with it), nobody is blamed. Nor after this process was itself paused (SIGSTOP, a long
    GC, CPU starvation): a check that comes ``LATE_WAKE_S`` later than due means announcements
    may sit unread in our socket, so every executor gets a fresh grace (they announce every
    second) instead of being counted gone.
    """

    def __init__(self, bus: Bus, pool: PoolView, clock: Callable[[], float] = time.monotonic) -> None:
        self._bus = bus
        self._pool = pool
        self._clock = clock
        self._reconnects = bus.reconnects
        self._checked = clock()

    def check(self) -> list[str]:
        """Executors silent for too long, now dropped from the pool; called every ``WATCH_EVERY_S``."""
        now = self._clock()
        late = now - self._checked > WATCH_EVERY_S + LATE_WAKE_S
        self._checked = now
        if not self._bus.nc.is_connected:
            return []  # we hear nobody now; that is no executor's fault
        if late or self._bus.reconnects != self._reconnects:  # we were paused, or lost announcements
            self._reconnects = self._bus.reconnects
            self._pool.grace(RECONNECT_GRACE_S)
        return self._pool.expire()


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
        self.takeovers = Counter("silo_session_takeovers_total",
                                 "Sessions this harness resumed after their owner went silent.",
                                 registry=reg)
        self.journal = Counter("silo_journal_messages_total",
                               "Journal messages written, by record kind (a split record once per part).",
                               ["kind"], registry=reg)
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


def harness_secrets(options: dict[str, Any]) -> list[str]:
    """The API keys this harness can read: scrubbed from every journal record."""
    settings = ModelSettings.from_options(options)
    found = []
    for provider in DEFAULT_KEY_ENV:
        provider_settings = getattr(settings, provider.replace("-", "_"), None)
        if not isinstance(provider_settings, ProviderSettings):
            continue
        try:
            found.append(read_api_key(provider, provider_settings))
        except ModelFailure:
            continue
    return found


async def last_event(bus: Bus, sid: str) -> SessionEvent | None:
    """The last event of ``sid`` in the events stream (None when it has none)."""
    subject = subjects.session_events(sid)
    try:
        msg = await bus.js.get_last_msg(subjects.EVENTS_STREAM, subject, direct=True)
    except NotFoundError:
        return None
    env = bus.open(bytes(msg.data or b""), subject, fresh=False)
    if env.header.role is not Role.HARNESS:
        raise GrantError(f"the last event of {sid} was not written by a harness")
    return env.expect(SessionEvent)


async def serve(ctx: ServiceContext) -> None:
    """Run the harness until stopped."""
    bus = ctx.bus
    runners: dict[str, SessionRunner] = {}
    run_tasks: dict[str, asyncio.Task[None]] = {}
    tasks: set[asyncio.Task[None]] = set()
    pool = PoolView()
    metrics = PoolMetrics(ctx)
    local_servers = LocalServers()
    policy = ModelPolicy.from_options(ctx.options, ctx.metrics.registry)
    loop_metrics = LoopMetrics(ctx.metrics.registry)
    await ensure_streams(ctx)
    scrub = harness_secrets(ctx.options)
    owners = SessionOwners(bus, ctx.service_id, secrets.token_hex(8), ctx.log,
                           takeover_after_s=float(ctx.options.get("takeover_after_s", TAKEOVER_AFTER_S)))
    await owners.open()

    def journal_for(sid: str, next_n: int = 0) -> SessionJournal:
        return SessionJournal(StreamSink(bus, sid, metrics.journal), sid, max_bytes=bus.verifier.max_bytes,
                              secrets=scrub, next_n=next_n)

    def executor_gone(eid: str, why: str) -> None:
        for runner in list(runners.values()):
            if runner.executor_id == eid:
                spawn(runner.executor_lost(f"executor {eid} {why}; the session cannot continue"))

    def spawn(coro: object) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    def launch(runner: SessionRunner, body: Any) -> None:
        """Run a session's coroutine; when it ends, the session leaves this harness and the bucket."""
        sid = runner.sid
        runners[sid] = runner
        metrics.sessions.inc()

        async def run() -> None:
            try:
                await body
            finally:
                runners.pop(sid, None)
                run_tasks.pop(sid, None)
                metrics.sessions.dec()
                if runner.exit_code is not None:
                    await owners.release(sid)

        run_tasks[sid] = spawn(run())

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
        watch = SilenceWatch(bus, pool)
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            for eid in watch.check():
                ctx.log.warning("executor_silent", executor=eid)
                executor_gone(eid, "stopped responding")
            free, total = pool.capacity()
            metrics.executors.set(len(pool))
            metrics.capacity.labels(state="free").set(free)
            metrics.capacity.labels(state="total").set(total)

    async def session_lost(sid: str) -> None:
        """Another harness took the session: stop driving it here, without a word to anyone."""
        runner = runners.get(sid)
        task = run_tasks.get(sid)
        if runner is not None:
            runner.abandon()
        if task is not None:
            task.cancel()

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(BEAT_S)
            try:
                await owners.renew(session_lost)
            except Exception as exc:  # noqa: BLE001 — a NATS hiccup: the next beat tries again
                ctx.log.warning("ownership_renew_failed", error=str(exc))

    async def on_start(env: Envelope, msg: Msg) -> Message:
        start = env.expect(StartSession)
        grant = open_grant(bus.verifier, start.grant)
        if env.header.sid != grant.session_id:
            raise GrantError(f"start signed for {env.header.sid}, grant is for {grant.session_id}")
        if grant.session_id in runners:
            raise GrantError(f"session {grant.session_id} is already running")
        model = make_model(start.llm, ctx.options, local_servers=local_servers)
        started = time.monotonic()
        try:
            lease = await lease_sandbox(bus, pool, grant, start.grant,
                                        wait_s=float(ctx.options.get("lease_wait_s", LEASE_WAIT_S)))
        except Exception:
            metrics.lease_wait.labels(outcome="error").observe(time.monotonic() - started)
            raise
        metrics.lease_wait.labels(outcome="ok").observe(time.monotonic() - started)
        sid = grant.session_id
        await owners.claim(SessionOwnership(
            session_id=sid, owner=ctx.service_id, instance=owners.instance, grant=start.grant,
            llm=start.llm, headless=start.headless, executor_id=lease.executor_id, access=lease.access))
        journal = journal_for(sid)
        runner = SessionRunner(bus, grant, lease.executor_id, lease.access, model,
                               headless=start.headless, log=ctx.log, policy=policy, journal=journal,
                               metrics=loop_metrics)

        async def begin() -> None:
            await journal.meta(
                grant=grant.model_dump(mode="json"),
                llm={"backend": start.llm.backend, "model": start.llm.model,
                     "script_sha256": script_digest(start.llm.script)},
                headless=start.headless, executor=lease.executor_id,
                access=lease.access.model_dump(mode="json"), harness=ctx.service_id, tools=runner.tools)
            await journal.lifecycle("started", harness=ctx.service_id)
            if start.prompt:
                await journal.client_input("prompt", "start", start.prompt)
            await runner.run(start.prompt)

        launch(runner, begin())
        if lease.instance and pool.instance_gone(lease.instance):
            # it died (or restarted) while we claimed the session, before executor_gone could see it
            spawn(runner.executor_lost(f"executor {lease.executor_id} stopped as the session started; "
                                       "the session cannot continue"))
        ctx.log.info("session_started", user=grant.user, executor=lease.executor_id)
        return SessionStarted(session_id=sid, executor_id=lease.executor_id)

    async def take_over(own: SessionOwnership, revision: int) -> None:
        """Resume a session whose harness went silent, from its journal."""
        sid = own.session_id
        grant = open_grant(bus.verifier, own.grant)
        entries = await JournalReader(bus, sid, network=False).entries()
        last = await last_event(bus, sid)
        journaled = max((int(e.data.get("seq", -1)) for e in entries if e.kind == "event"), default=-1)
        # Events are journaled right after they are stored: a harness killed in between leaves one out.
        unjournaled = last if last is not None and last.seq > journaled else None
        if unjournaled is not None:
            entries.append(JournalEntry("event", {"seq": unjournaled.seq, "kind": unjournaled.kind,
                                                  "ts": unjournaled.ts, "data": unjournaled.data},
                                        agent=unjournaled.agent))
        state = rebuild(entries)
        model = make_model(own.llm, ctx.options, local_servers=local_servers)
        if isinstance(model, ScriptedModel):
            model.resume_at(state.responses)
        journal = journal_for(sid, state.next_n)
        if unjournaled is not None:
            await journal.event(unjournaled)
        if state.ended:  # it ended as its harness died: finish what that harness could not
            if not any(e.kind == "lifecycle" and e.data.get("what") == "ended" for e in entries):
                await journal.lifecycle("ended", exit_code=None, reason="ended as its harness died")
            try:
                await bus.request(subjects.exec_close(own.executor_id, sid), CloseSession(reason="session ended"),
                                  Ack, from_role=Role.EXECUTOR, sid=sid, timeout=15.0)
            except SiloError as exc:
                ctx.log.info("sandbox_close_after_takeover", session=sid, error=str(exc))
            await owners.release(sid)
            return
        runner = SessionRunner(bus, grant, own.executor_id, own.access, model, headless=own.headless,
                               log=ctx.log, policy=policy, journal=journal, next_seq=last.seq + 1 if last else 0,
                               metrics=loop_metrics)
        for e in entries:  # what the session spent before counts against its quotas here too
            if e.kind == "event" and e.data.get("kind") == "cost":
                cost = e.data.get("data") or {}
                runner.llm.meter.record(str(cost.get("model", model.name)), e.agent or "main",
                                        Usage(**{k: int(cost.get(k) or 0) for k in TOKEN_FIELDS}))
        await journal.lifecycle("resumed", harness=ctx.service_id, responses=state.responses,
                                pending_calls=len(state.pending), unknown_results=len(state.unknown))
        for e in unshown_results(entries):  # journaled just before its harness died, never shown
            d = e.data
            await runner.events.emit("tool_result", {
                "id": d.get("id"), "name": d.get("name"), "content": d.get("content", ""),
                "is_error": bool(d.get("is_error")), "meta": d.get("meta") or {}}, agent=e.agent or "main")
        used = shown_uses(entries)
        for call in state.unknown:
            if call.id not in used:  # journaled as called, killed before its tool_use event
                await runner.events.emit("tool_use", {"id": call.id, "name": call.name, "input": call.input})
            await journal.tool_result("main", call.id, call.name, UNKNOWN_RESULT, True, {}, "harness")
            await runner.events.emit("tool_result", {"id": call.id, "name": call.name,
                                                     "content": UNKNOWN_RESULT, "is_error": True, "meta": {}})
        messages = state.messages
        if own.headless and not any(m.get("role") == "system" for m in messages[:1]):
            messages.insert(0, {"role": "system", "content": HEADLESS_INSTRUCTION})
        metrics.takeovers.inc()
        ctx.log.info("session_resumed", session=sid, responses=state.responses, in_turn=state.in_turn)
        launch(runner, runner.resume(messages, state.pending if state.in_turn else [], state.in_turn,
                                     state.queued))

    async def on_input(env: Envelope, msg: Msg) -> Message | None:
        """A client's input (request/reply): Ack or an error, from the harness running the session only."""
        inp = env.expect(SessionInput)
        sid = msg.subject.split(".")[2]
        runner = runners.get(sid)
        if runner is None or not owners.owns(sid):
            return None  # another harness runs it (or nobody): stay silent
        if env.header.sid != sid:
            raise GrantError(f"input signed for session {env.header.sid}, sent to {sid}")
        if runner.journal is not None:
            await runner.journal.client_input(inp.kind, inp.client, inp.text, inp.question_id)
        if inp.kind == "prompt":
            await runner.prompt(inp.text, inp.client)
        elif inp.kind == "answer":
            runner.answer(inp.question_id, inp.client, inp.text)
        elif inp.kind == "interrupt":
            runner.interrupt()
        elif inp.kind == "stop":  # not awaited: inputs of other sessions must not wait for it
            runner.request_stop(f"stopped by {inp.client or 'a client'}")
        elif inp.kind == "upload":
            await runner.file_uploaded(inp.text, inp.client)
        return Ack()

    async def on_export(env: Envelope, msg: Msg) -> Message:
        req = env.expect(JournalExportRequest)
        reader = JournalReader(bus, req.session_id)
        first = await reader.unit(0)
        meta = first[0][0] if first else None
        if meta is None or meta.kind != "meta":
            raise GrantError(f"no journal for session {req.session_id}")
        owner = str((meta.data.get("grant") or {}).get("user", ""))
        if not req.operator and owner != req.user:
            raise GrantError(f"session {req.session_id} is not {req.user}'s")
        budget = min(req.max_bytes, bus.verifier.max_bytes // 2)
        text, after, offset, done = await reader.page(req.after, req.offset, budget)
        return JournalExportPage(session_id=req.session_id, text=text, after=after, offset=offset, done=done)

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
    await bus.subscribe(subjects.HARNESS_JOURNAL_EXPORT, on_export, queue=subjects.HARNESS_QUEUE,
                        concurrent=True)
    await bus.subscribe(subjects.SESSION_OUTPUT_ALL, on_tool_output)
    spawn(watch_pool())
    spawn(heartbeat())
    spawn(owners.watch(take_over))
    await ctx.stopping.wait()
    for runner in list(runners.values()):
        await runner.stop("harness stopping")
    if run_tasks:  # each closes its sandbox and leaves the bucket
        await asyncio.wait(set(run_tasks.values()), timeout=15.0)
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await local_servers.aclose()
