"""The gateway's TLS WebSocket: authentication, session requests, event fan-out."""

from __future__ import annotations

import asyncio
import secrets
import ssl
import time
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from nats.aio.msg import Msg
from devsilo.protocol import (
    Ack,
    Envelope,
    AuthError,
    LLMChoice,
    MessageRejected,
    Role,
    SessionEvent,
    SessionGrant,
    SessionInput,
    SessionStarted,
    SiloError,
    ExecutorAnnounce,
    GrantError,
    QuestionAnswer,
    RemoteError,
    WorkspaceReply,
    WorkspaceRequest,
    StartSession,
    seal_grant,
    subjects,
)
from devsilo.protocol.client import (
    CLIENT_REQUEST,
    AnswerQuestion,
    MAX_CLIENT_FRAME,
    Attach,
    Authenticate,
    AuthErrorFrame,
    AuthOk,
    ClientFrame,
    CreateSession,
    ErrorFrame,
    EventFrame,
    Hello,
    Interrupt,
    ListSessions,
    Ping,
    Pong,
    Prompt,
    SessionCreated,
    Sessions,
    ShellInputFrame,
    ShellOpenFrame,
    ShellResizeFrame,
    ShellSignalFrame,
    Shutdown,
    WorkspaceChunk,
    WorkspaceCommand,
    WorkspaceFetchChunk,
    WorkspaceResult,
    WorkspaceTransferDone,
    WorkspaceUpload,
    WorkspaceUploadCommit,
    WorkspaceUploadNeeded,
)
from devsilo.runtime import ServiceContext
from devsilo.runtime._pool import PoolView
from nats.js.api import ConsumerConfig, DeliverPolicy
from prometheus_client import Counter, Gauge
from pydantic import ValidationError

from ._auth import Principal, TokenAuthenticator
from ._sessions import SessionDirectory, SessionRecord
from ._shells import ShellBroker
from ._transfers import WorkspaceTransfers

AUTH_DEADLINE_S = 30.0
GRANT_LIFETIME_S = 24 * 3600.0

LANDING_PAGE = """<!doctype html><meta charset=utf-8><title>devsilo gateway</title>
<h1>devsilo gateway</h1><p>This is a devsilo gateway. Clients connect to <code>/ws</code>
over TLS WebSocket. If your browser asked you to accept this certificate, compare its
SHA-256 fingerprint with the one <code>silo up</code> printed.</p>"""


class GatewayMetrics:
    """The gateway's own metrics."""

    def __init__(self, ctx: ServiceContext) -> None:
        reg = ctx.metrics.registry
        self.connections = Gauge("silo_client_connections", "Open client connections.", registry=reg)
        self.auth_failures = Counter("silo_auth_failures_total", "Failed client authentications.",
                                     ["reason"], registry=reg)
        self.events_sent = Counter("silo_events_delivered_total", "Events delivered to clients.",
                                   registry=reg)
        self.sessions_created = Counter("silo_sessions_created_total", "Sessions created.", registry=reg)


class Gateway:
    """One gateway: its HTTP app and the state of its client connections."""

    def __init__(self, ctx: ServiceContext, auth: TokenAuthenticator) -> None:
        self.ctx = ctx
        self.bus = ctx.bus
        self.auth = auth
        self.sessions = SessionDirectory()
        self.metrics = GatewayMetrics(ctx)
        self.connections: set[ClientConnection] = set()
        self.pool = PoolView()
        self.locks: dict[str, str] = {}
        """Workspaces this gateway locked or saw unlocked: path -> executor (None once unlocked)."""
        self.shells = ShellBroker(ctx, self.pool, self.sessions, self.locks)
        self.transfers = WorkspaceTransfers(self)

    def app(self) -> web.Application:
        """The aiohttp application: landing page and /ws."""
        app = web.Application(client_max_size=MAX_CLIENT_FRAME)
        app.router.add_get("/", self._landing)
        app.router.add_get("/ws", self._websocket)
        return app

    async def _landing(self, _: web.Request) -> web.Response:
        return web.Response(text=LANDING_PAGE, content_type="text/html")

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_CLIENT_FRAME, heartbeat=30.0)
        await ws.prepare(request)
        conn = ClientConnection(self, ws, request.remote or "?")
        self.metrics.connections.inc()
        self.connections.add(conn)
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)
            self.metrics.connections.dec()
            await conn.close()
        return ws


class ClientConnection:
    """One authenticated (or not yet) WebSocket client."""

    def __init__(self, gw: Gateway, ws: web.WebSocketResponse, peer: str) -> None:
        self.gw = gw
        self.ws = ws
        self.peer = peer
        self.log = gw.ctx.log.bind(peer=peer)
        self.who: Principal | None = None
        self._send_lock = asyncio.Lock()
        self._followers: dict[str, asyncio.Task[None]] = {}

    async def send(self, frame: ClientFrame) -> None:
        """Send one frame (serialised: several tasks send to one socket)."""
        async with self._send_lock:
            if not self.ws.closed:
                await self.ws.send_str(frame.model_dump_json())

    async def serve(self) -> None:
        """Greet, authenticate within the deadline, then answer requests until closed."""
        await self.send(Hello(gateway=self.gw.ctx.service_id, auth_methods=("token",),
                              auth_deadline_s=AUTH_DEADLINE_S))
        try:
            first = await asyncio.wait_for(self.ws.receive(), timeout=AUTH_DEADLINE_S)
        except TimeoutError:
            self.gw.metrics.auth_failures.labels(reason="timeout").inc()
            await self.send(AuthErrorFrame(message=f"no authentication within {AUTH_DEADLINE_S:.0f}s"))
            return
        frame = self._parse(first)
        if not isinstance(frame, Authenticate):
            self.gw.metrics.auth_failures.labels(reason="not_authenticate").inc()
            await self.send(AuthErrorFrame(message="authenticate first"))
            return
        try:
            self.who = self.gw.auth.authenticate(frame)
        except AuthError as exc:
            self.gw.metrics.auth_failures.labels(reason="bad_credentials").inc()
            self.log.info("auth_failed", error=str(exc))
            await self.send(AuthErrorFrame(message=str(exc)))
            return
        self.log = self.log.bind(user=self.who.user, client=self.who.client)
        await self.send(AuthOk(user=self.who.user))
        async for raw in self.ws:
            if raw.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                break
            req = self._parse(raw)
            if req is None:
                continue
            try:
                await self._handle(req)
            except SiloError as exc:
                await self.send(ErrorFrame(code=type(exc).__name__, message=str(exc), request=req.type))
            except Exception:  # one bad request must not drop the client
                self.log.exception("request_failed", request=req.type)
                await self.send(ErrorFrame(code="internal", message="gateway failed this request; see its log",
                                           request=req.type))

    def _parse(self, raw: Any) -> Any:
        if raw.type != WSMsgType.TEXT:
            asyncio.ensure_future(self.send(ErrorFrame(code="bad_request", message="send JSON text frames")))
            return None
        try:
            return CLIENT_REQUEST.validate_json(raw.data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err.get("loc", ()))
            asyncio.ensure_future(self.send(ErrorFrame(
                code="bad_request", message=f"invalid frame at {where or 'top'}: {err.get('msg')}")))
            return None

    async def _handle(self, req: Any) -> None:
        assert self.who is not None
        if isinstance(req, Ping):
            await self.send(Pong())
        elif isinstance(req, Authenticate):
            await self.send(ErrorFrame(code="bad_request", message="already authenticated",
                                       request=req.type))
        elif isinstance(req, CreateSession):
            await self._create(req)
        elif isinstance(req, Attach):
            self._attach(req)
        elif isinstance(req, (Prompt, Interrupt, Shutdown)):
            await self._input(req)
        elif isinstance(req, AnswerQuestion):
            await self._answer(req)
        elif isinstance(req, WorkspaceCommand) and req.uploaded:
            await self._uploaded_workspace(req)
        elif isinstance(req, WorkspaceCommand):
            await self._workspace(req)
        elif isinstance(req, WorkspaceUpload):
            await self.send(await self.gw.transfers.begin(self.who.user, req))
        elif isinstance(req, WorkspaceChunk):
            await self.send(await self.gw.transfers.chunk(self.who.user, req))
        elif isinstance(req, WorkspaceUploadCommit):
            await self.send(await self.gw.transfers.commit(self, self.who.user, req))
        elif isinstance(req, WorkspaceFetchChunk):
            await self.send(await self.gw.transfers.fetch(self.who.user, req))
        elif isinstance(req, WorkspaceTransferDone):
            await self.send(await self.gw.transfers.done(self.who.user, req))
        elif isinstance(req, ListSessions):
            await self.send(Sessions(sessions=tuple(r.summary() for r in self.gw.sessions.list_for(self.who))))
        elif isinstance(req, ShellOpenFrame):
            await self.gw.shells.open(self, req)
        elif isinstance(req, (ShellInputFrame, ShellResizeFrame, ShellSignalFrame)):
            await self.gw.shells.control(self, req)

    async def _create(self, req: CreateSession) -> None:
        assert self.who is not None
        now = time.time()
        sid = secrets.token_hex(8)
        grant = SessionGrant(
            grant_id=secrets.token_hex(12), session_id=sid, user=self.who.user, workspace=req.workspace,
            workspace_host=req.workspace_host,
            sandbox=req.sandbox, allow_read=req.allow_read, allow_domains=req.allow_domains, credentials=req.credentials,
            issued_at=now, expires_at=now + GRANT_LIFETIME_S,
        )
        sealed = seal_grant(self.gw.bus.signer, grant)
        start = StartSession(grant=sealed, llm=LLMChoice(backend=req.llm, model=req.model, script=req.script),
                             headless=req.headless, prompt=req.prompt)
        started = await self.gw.bus.request(subjects.HARNESS_START, start, SessionStarted,
                                            from_role=Role.HARNESS, sid=sid, timeout=90.0)
        self.gw.sessions.add(SessionRecord(sid, self.who.user, req.workspace, started.executor_id, grant=grant))
        self.gw.metrics.sessions_created.inc()
        self.log.info("session_created", session=sid, executor=started.executor_id)
        await self.send(SessionCreated(session_id=sid, executor_id=started.executor_id))

    async def _workspace(self, req: WorkspaceCommand) -> None:
        """Route a workspace command to the executor that holds (or should lock) it."""
        assert self.who is not None
        pool = self.gw.pool
        # Executors announce themselves every second: a gateway that just started waits for them.
        deadline = time.monotonic() + 3.0
        while not pool.on_host(None) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        body = WorkspaceRequest(op=req.op, path=req.path, user=self.who.user, accept=req.accept)
        if req.op == "list":
            targets = pool.on_host(None)
        else:
            if req.path is None:
                raise GrantError(f"workspace {req.op} needs a path")
            # Our own record first: the holder's next announcement may be up to a second away.
            holder = self.gw.locks.get(req.path) or pool.locked_on(req.path)
            if req.op == "lock":
                here = pool.on_host(req.workspace_host)
                chosen = req.executor or holder or (here[0] if here else None)
                if chosen is None and req.workspace_host is not None and pool.on_host(None):
                    await self.send(WorkspaceUploadNeeded(
                        path=req.path, executor=pool.on_host(None)[0],
                        reason=f"no executor runs on {req.workspace_host}, where the workspace is"))
                    return
                if chosen is None:
                    raise GrantError(f"no executor runs on {req.workspace_host or 'any host'} to lock "
                                     f"{req.path}; pool: {pool.describe()}")
                elsewhere = pool.host_of(chosen)
                if (req.workspace_host is not None and elsewhere is not None
                        and elsewhere != req.workspace_host and holder is None):
                    await self.send(WorkspaceUploadNeeded(
                        path=req.path, executor=chosen,
                        reason=f"executor {chosen} runs on {elsewhere}, not on {req.workspace_host}"))
                    return
                targets = [chosen]
            elif holder is None and req.op == "unlock":
                raise GrantError(f"{req.path} is not locked on any executor")
            else:
                targets = [holder] if holder else []
        replies = [await self._ask_executor(eid, body) for eid in targets]
        for eid, r in zip(targets, replies, strict=True):
            for w in r.workspaces:
                if w.phase == "locked":
                    self.gw.locks[w.path] = eid
                elif req.op == "unlock":
                    self.gw.locks.pop(w.path, None)
        infos = tuple(w.model_dump(mode="json") for r in replies for w in r.workspaces)
        if req.op == "status" and not infos:
            infos = ({"path": req.path, "executor": None, "phase": "unlocked"},)
        first = replies[0] if replies and req.op == "unlock" else None
        await self.send(WorkspaceResult(
            op=req.op, workspaces=infos, report_text=first.report_text if first else "",
            report=first.report if first else {}, auto_exec_changed=bool(first and first.auto_exec_changed)))

    async def _uploaded_workspace(self, req: WorkspaceCommand) -> None:
        """unlock or status of a workspace this client's machine uploaded to an executor."""
        assert self.who is not None
        if req.path is None or req.workspace_host is None or req.op not in ("unlock", "status"):
            raise GrantError("an uploaded workspace is unlocked or described by its path and host")
        pool = self.gw.pool
        deadline = time.monotonic() + 3.0
        while not pool.on_host(None) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        holder = pool.remote_holder(req.workspace_host, req.path)
        if holder is not None and holder[1] != self.who.user:
            raise GrantError(f"{req.path} of {req.workspace_host} is locked by another user")
        # After an unlock the holder no longer announces it; the client names it to fetch the result again.
        eid = holder[0] if holder is not None else req.executor
        if eid is None:
            raise GrantError(f"{req.path} of {req.workspace_host} is not locked on any executor")
        body = WorkspaceRequest(op=req.op, path=req.path, user=self.who.user, accept=req.accept,
                                origin_host=req.workspace_host)
        reply = await self._ask_executor(eid, body)
        if reply.transfer is not None:
            self.gw.transfers.offer(self.who.user, reply.transfer)
        await self.send(WorkspaceResult(
            op=req.op, workspaces=tuple(w.model_dump(mode="json") for w in reply.workspaces),
            report_text=reply.report_text, report=reply.report, auto_exec_changed=reply.auto_exec_changed,
            transfer=reply.transfer))

    async def _ask_executor(self, eid: str, body: WorkspaceRequest) -> WorkspaceReply:
        """Ask one executor; give up when it dies or restarts while working on it."""
        pool = self.gw.pool
        instance = pool.instance_of(eid)
        ask = asyncio.create_task(self.gw.bus.request(
            subjects.exec_workspace(eid), body, WorkspaceReply, from_role=Role.EXECUTOR, timeout=3600.0))
        try:
            while not ask.done():
                await asyncio.wait({ask}, timeout=0.5)
                if not ask.done() and (not pool.alive(eid) or pool.instance_of(eid) != instance):
                    raise RemoteError("executor_lost", f"executor {eid} stopped while working on "
                                      f"{body.op} {body.path}; run the command again to finish it")
            return ask.result()
        finally:
            ask.cancel()

    def _visible(self, sid: str) -> SessionRecord:
        assert self.who is not None
        rec = self.gw.sessions.visible(self.who, sid)
        if rec is None:
            raise SiloError(f"no session {sid} visible to you")
        return rec

    def _attach(self, req: Attach) -> None:
        self._visible(req.session_id)
        old = self._followers.pop(req.session_id, None)
        if old is not None:
            old.cancel()
        self._followers[req.session_id] = asyncio.create_task(self._follow(req.session_id, req.from_seq))

    async def _follow(self, sid: str, from_seq: int) -> None:
        """Forward a session's events from ``from_seq``: the stream's backlog, then live."""
        subject = subjects.session_events(sid)
        sub = await self.gw.bus.js.subscribe(
            subject, ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
        )
        expected = from_seq
        try:
            async for msg in sub.messages:
                try:
                    env = self.gw.bus.open(msg.data, msg.subject, fresh=False)
                    event = env.expect(SessionEvent)
                except MessageRejected:
                    continue
                if env.header.role is not Role.HARNESS or event.session_id != sid:
                    self.log.warning("event_rejected", session=sid, sender=env.header.sender)
                    continue
                if event.seq < expected:
                    continue
                if event.seq > expected:
                    self.log.error("event_gap", session=sid, expected=expected, got=event.seq)
                expected = event.seq + 1
                await self.send(EventFrame(session_id=sid, seq=event.seq, kind=event.kind,
                                           agent=event.agent, ts=event.ts, data=event.data))
                self.gw.metrics.events_sent.inc()
        finally:
            await sub.unsubscribe()

    async def _input(self, req: Prompt | Interrupt | Shutdown) -> None:
        assert self.who is not None
        self._visible(req.session_id)
        if isinstance(req, Prompt):
            body = SessionInput(kind="prompt", text=req.text, client=self.who.client)
        elif isinstance(req, Interrupt):
            body = SessionInput(kind="interrupt", client=self.who.client)
        else:
            body = SessionInput(kind="stop", client=self.who.client)
        await self._send_input(req.session_id, body, req.type)

    async def _answer(self, req: AnswerQuestion) -> None:
        assert self.who is not None
        self._visible(req.session_id)
        answer = QuestionAnswer(selected=req.selected, text=req.text)
        await self._send_input(req.session_id, SessionInput(
            kind="answer", question_id=req.question_id, text=answer.model_dump_json(),
            client=self.who.client), req.type)

    async def _send_input(self, sid: str, body: SessionInput, request: str) -> None:
        """Hand input to the session's harness and wait for its verdict; a refusal goes back as ``error``."""
        try:
            await self.gw.bus.request(subjects.session_input(sid), body, Ack, from_role=Role.HARNESS,
                                      sid=sid, timeout=10.0)
        except RemoteError as exc:
            message = exc.message
            if exc.code in ("timeout", "no_responders"):
                message = f"no harness is running session {sid} (has it ended?): {exc.message}"
            await self.send(ErrorFrame(code=exc.code, message=message, request=request))

    async def close(self) -> None:
        """Stop following sessions; end this connection's shells."""
        await self.gw.shells.client_gone(self)
        for task in self._followers.values():
            task.cancel()
        await asyncio.gather(*self._followers.values(), return_exceptions=True)


def server_tls(cert: str, key: str) -> ssl.SSLContext:
    """A TLS server context for the gateway's certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


async def serve(ctx: ServiceContext) -> None:
    """Run the gateway until stopped."""
    state = ctx.state
    cfg = state.config()
    gw = Gateway(ctx, TokenAuthenticator(state.client_token()))

    async def on_announce(env: Envelope, msg: Msg) -> None:
        ann = env.expect(ExecutorAnnounce)
        if ann.executor_id == env.header.sender:
            gw.pool.update(ann)
        return None

    await ctx.bus.subscribe(subjects.POOL_ANNOUNCE_ALL, on_announce)
    runner = web.AppRunner(gw.app(), access_log=None)
    await runner.setup()
    tls = server_tls(str(state.root / "tls" / "gateway.crt"), str(state.root / "tls" / "gateway.key"))
    host = ctx.options.get("host") or cfg.gateway.host
    port = int(ctx.options.get("port") or cfg.gateway.port)
    site = web.TCPSite(runner, host, port, ssl_context=tls)
    await site.start()
    ctx.status["url"] = f"wss://{host}:{port}/ws"
    ctx.log.info("gateway_listening", url=ctx.status["url"], fingerprint=state.gateway_fingerprint())
    try:
        await ctx.stopping.wait()
    finally:
        # Open WebSockets would hold the server's shutdown; tell clients we are going away.
        await asyncio.gather(*(c.ws.close(code=WSCloseCode.GOING_AWAY, message=b"gateway stopping")
                               for c in list(gw.connections)), return_exceptions=True)
        await runner.cleanup()
        await gw.shells.close()


