"""The gateway's TLS WebSocket: authentication, session requests, event fan-out."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from aiolimiter import AsyncLimiter
from devsilo.protocol import (
    Ack,
    Envelope,
    ExecutorAnnounce,
    GrantError,
    LLMChoice,
    QuestionAnswer,
    RemoteError,
    Role,
    SessionGrant,
    SessionInput,
    SessionStarted,
    SiloError,
    StartSession,
    UploadError,
    WorkspaceReply,
    WorkspaceRequest,
    seal_grant,
    subjects,
)
from devsilo.protocol.client import (
    CLIENT_REQUEST,
    MAX_CLIENT_FRAME,
    AccessReportFrame,
    AccessReportRequest,
    AnswerQuestion,
    Attach,
    Authenticate,
    AuthErrorFrame,
    ClientFrame,
    CostFrame,
    CostRequest,
    CreateSession,
    ErrorFrame,
    EventsFrame,
    Hello,
    Interrupt,
    JournalExport,
    ListClients,
    ListSessions,
    Overloaded,
    Pair,
    PairingCodeRequest,
    Ping,
    Pong,
    Prompt,
    RequestEvents,
    RevokeClient,
    SessionCreated,
    Sessions,
    ShellInputFrame,
    ShellOpenFrame,
    ShellResizeFrame,
    ShellSignalFrame,
    Shutdown,
    UploadChunk,
    UploadFile,
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
from devsilo.runtime._heap import trim_heap_every
from devsilo.runtime._pool import PoolView
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from prometheus_client import Counter, Gauge
from pydantic import ValidationError

from ._auth import (
    AUTH_DEADLINE_S,
    Authenticator,
    AuthMetrics,
    HandshakeFailed,
    Principal,
    TokenAuthenticator,
)
from ._delivery import (
    DEFAULT_OUTBOX,
    DEFAULT_RING,
    DEFAULT_RING_BYTES,
    DeliveryMetrics,
    Feeds,
    Outbox,
    follow,
)
from ._journal import export_page
from ._keys import ClientKeyStore
from ._limits import Limits, check_request
from ._pairing import CODE_VALID_S, PairingCodes, PairingLimiter
from ._sessions import SessionDirectory, SessionRecord, open_sessions_bucket
from ._shells import ShellBroker
from ._tally import SessionTally
from ._tls import gateway_certificate, server_tls
from ._transfers import WorkspaceTransfers
from ._uploads import DEFAULT_UPLOAD_MAX, ConnectionUploads

WEB_ROOT = Path(__file__).parent / "web"
"""The web app's files (served under /app/); the ``web_root`` option names another directory."""
HOST_WORKSPACES_NEED_OPERATOR = (
    "only an operator works on the executors' own files; other users work on workspaces they "
    "uploaded (`silo workspace lock --upload PATH` from their machine)")
DEFAULT_MAX_CLIENTS = 1000
"""Open client connections a gateway serves (option ``max_clients``)."""
DEFAULT_MAX_CLIENTS_PER_USER = 200
"""Open connections of one user (option ``max_clients_per_user``)."""
DEFAULT_CLIENT_RATE = 200.0
"""Frames per second one connection may send, averaged over a second (option ``client_rate``)."""
OVERLOADED_RETRY_MS = 1000
HEAP_TRIM_S = 60.0
"""How often the gateway gives glibc's free heap pages back (option ``heap_trim_s``; 0: never): its
live memory rises and falls with the sessions' event rings, and glibc alone would keep the peak."""
KEEP_TALLIES = 1024
"""Sessions whose running cost sums and state a gateway keeps; others are counted again when asked
(option ``keep_sessions``, which also bounds the idle feeds and the session records kept)."""

APP_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self' wss:; manifest-src 'self'; worker-src 'self'; font-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'; object-src 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
"""Headers on every /app/ response: the web app runs only its own files and talks only to gateways
(``wss:`` anywhere: a user may pair with other gateways by URL)."""

LANDING_PAGE = """<!doctype html><meta charset=utf-8><title>devsilo gateway</title>
<h1>devsilo gateway</h1><p>This is a devsilo gateway. Clients connect to <code>/ws</code>
over TLS WebSocket. If your browser asked you to accept this certificate, compare its
SHA-256 fingerprint with the one <code>silo up</code> printed.</p>
<p><a href="/app/">The web app</a></p>"""


class GatewayMetrics:
    """The gateway's own metrics."""

    def __init__(self, ctx: ServiceContext) -> None:
        reg = ctx.metrics.registry
        self.connections = Gauge("silo_client_connections", "Open client connections.", registry=reg)
        self.connections_total = Counter("silo_client_connections_accepted_total", "Client connections accepted.",
                                         registry=reg)
        self.auth = AuthMetrics(reg)
        self.delivery = DeliveryMetrics(reg)
        self.sessions_created = Counter("silo_sessions_created_total", "Sessions created.", registry=reg)
        self.tables = Gauge("silo_gateway_table_entries", "Entries in the gateway's in-memory tables, by table "
                            "(each is bounded or pruned: under steady load they stay level).", ["table"],
                            registry=reg)

    def watch(self, gw: Gateway) -> None:
        """Report the sizes of ``gw``'s tables when scraped."""
        sizes: dict[str, Callable[[], float]] = {
            "connections": lambda: len(gw.connections),
            "followers": lambda: sum(c.following for c in gw.connections),
            "feeds": lambda: gw.feeds.held,
            "feeds_followed": lambda: gw.feeds.followed,
            "ring_events": lambda: gw.feeds.ring_events,
            "ring_chars": lambda: gw.feeds.ring_chars,
            "tallies": lambda: len(gw.tallies),
            "session_records": lambda: gw.sessions.cached,
            "revocation_watch": lambda: gw.auth.tracked_keys,
            "shells": lambda: gw.shells.open_shells,
            "uploads": lambda: len(gw.transfers.uploads),
            "transfer_results": lambda: len(gw.transfers.results),
            "locks": lambda: len(gw.locks),
        }
        for table, size in sizes.items():
            self.tables.labels(table=table).set_function(size)


class Gateway:
    """One gateway: its HTTP app and the state of its client connections."""

    def __init__(self, ctx: ServiceContext, metrics: GatewayMetrics, auth: Authenticator,
                 sessions: SessionDirectory, web_root: Path = WEB_ROOT) -> None:
        self.ctx = ctx
        self.bus = ctx.bus
        self.auth = auth
        self.web_root = web_root
        self.sessions = sessions
        self.metrics = metrics
        opts = ctx.options
        self.keep_sessions = int(opts.get("keep_sessions") or KEEP_TALLIES)
        self.feeds = Feeds(self.bus, metrics.delivery, ctx.log, ring=int(opts.get("event_ring") or DEFAULT_RING),
                           ring_bytes=int(opts.get("event_ring_bytes") or DEFAULT_RING_BYTES),
                           keep_idle=self.keep_sessions)
        self.outbox_limit = int(opts.get("client_queue") or DEFAULT_OUTBOX)
        self.max_clients = int(opts.get("max_clients") or DEFAULT_MAX_CLIENTS)
        self.max_clients_per_user = int(opts.get("max_clients_per_user") or DEFAULT_MAX_CLIENTS_PER_USER)
        self.client_rate = float(opts.get("client_rate") or DEFAULT_CLIENT_RATE)
        self.upload_max = int(opts.get("upload_max_bytes") or DEFAULT_UPLOAD_MAX)
        self.tallies: OrderedDict[str, SessionTally] = OrderedDict()
        """Session tallies, the most recently asked for last (at most ``keep_sessions``)."""
        self.connections: set[ClientConnection] = set()
        self.pool = PoolView()
        self.locks: dict[str, str] = {}
        """Workspaces this gateway locked or saw unlocked: path -> executor (None once unlocked)."""
        self.shells = ShellBroker(ctx, self.pool, self.sessions, self.locks)
        self.transfers = WorkspaceTransfers(self)
        self.limits = Limits.from_options(ctx.options)
        metrics.watch(self)

    def app(self) -> web.Application:
        """The aiohttp application: landing page, the web app's files under /app/, and /ws."""
        app = web.Application(client_max_size=MAX_CLIENT_FRAME, middlewares=[_app_headers])
        app.router.add_get("/", self._landing)
        app.router.add_get("/ws", self._websocket)
        app.router.add_get("/app", self._to_app)
        app.router.add_get("/app/", self._app_index)
        app.router.add_static("/app/", self.web_root, follow_symlinks=False)
        return app

    async def _landing(self, _: web.Request) -> web.Response:
        return web.Response(text=LANDING_PAGE, content_type="text/html")

    async def _to_app(self, _: web.Request) -> web.Response:
        raise web.HTTPPermanentRedirect("/app/")

    async def _app_index(self, _: web.Request) -> web.FileResponse:
        return web.FileResponse(self.web_root / "index.html")

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_CLIENT_FRAME, heartbeat=30.0)
        await ws.prepare(request)
        conn = ClientConnection(self, ws, request.remote or "?")
        self.metrics.connections.inc()
        self.metrics.connections_total.inc()
        self.connections.add(conn)
        try:
            if len(self.connections) > self.max_clients:
                await conn.overloaded("clients", f"this gateway serves at most {self.max_clients} clients")
                return ws
            await conn.serve()
        finally:
            self.connections.discard(conn)
            self.metrics.connections.dec()
            await conn.close()
        return ws


@web.middleware
async def _app_headers(request: web.Request, handler: Any) -> web.StreamResponse:
    """Give the web app's files (under /app/) a strict Content-Security-Policy."""
    response: web.StreamResponse = await handler(request)
    if request.path.startswith("/app/"):
        response.headers.update(APP_HEADERS)
    return response


class ClientConnection:
    """One authenticated (or not yet) WebSocket client."""

    def __init__(self, gw: Gateway, ws: web.WebSocketResponse, peer: str) -> None:
        self.gw = gw
        self.ws = ws
        self.peer = peer
        self.log = gw.ctx.log.bind(peer=peer)
        self.who: Principal | None = None
        self.outbox = Outbox(ws, gw.metrics.delivery, limit=gw.outbox_limit)
        self.outbox.start()
        self._followers: dict[str, asyncio.Task[None]] = {}
        self._limiter = AsyncLimiter(gw.client_rate, 1.0)
        self._uploads: ConnectionUploads | None = None

    @property
    def following(self) -> int:
        """Sessions this client is attached to now."""
        return len(self._followers)

    async def send(self, frame: ClientFrame) -> None:
        """Queue one frame for this client, in order with its events (waits while its queue is full)."""
        await self.outbox.put(frame.model_dump_json())

    async def overloaded(self, reason: str, message: str, request: str | None = None) -> None:
        """Tell the client to come back later, and count it."""
        self.gw.metrics.delivery.overloaded.labels(reason=reason).inc()
        self.log.info("client_overloaded", reason=reason, request=request)
        await self.send(Overloaded(reason=reason, message=message,  # type: ignore[arg-type]
                                   retry_after_ms=OVERLOADED_RETRY_MS, request=request))

    async def admit_user(self) -> bool:
        """Whether this authenticated client fits its user's connection limit (else told overloaded)."""
        assert self.who is not None
        mine = sum(1 for c in self.gw.connections if c.who is not None and c.who.user == self.who.user)
        if mine <= self.gw.max_clients_per_user:
            return True
        await self.overloaded("user_clients", f"user {self.who.user} has {self.gw.max_clients_per_user} "
                              "clients connected already; close one")
        return False

    async def serve(self) -> None:
        """Greet, authenticate within the deadline, then answer requests until closed."""
        auth = self.gw.auth
        await self.send(Hello(gateway=self.gw.ctx.service_id, auth_methods=("token", "key", "pair"),
                              auth_deadline_s=auth.deadline_s, fingerprint=auth.fingerprint))
        try:
            self.who = await auth.handshake(self.ws.receive, self.send, self.peer)
        except HandshakeFailed:
            return
        forget = auth.track(self.who, self._revoked)
        if not await auth.still_registered(self.who):  # revoked between authentication and tracking
            forget()
            await self._revoked(f"client key {self.who.key_id} was revoked")
            return
        self.log = self.log.bind(user=self.who.user, client=self.who.client)
        if not await self.admit_user():
            forget()
            return
        try:
            await self._requests()
        finally:
            forget()

    async def _revoked(self, message: str) -> None:
        """This connection's key was revoked: tell the client and close at once."""
        await self.send(AuthErrorFrame(message=message, code="revoked"))
        await self.outbox.flush(timeout=2.0)  # frames are written by the outbox's task: let it write this one
        await self.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"client key revoked")

    async def _requests(self) -> None:
        try:
            async for raw in self.ws:
                if raw.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    break
                req = self._parse(raw)
                if req is not None:
                    await self._respond(req)
        except ConnectionError:  # the socket went while aiohttp answered a ping inside receive()
            self.log.info("client_connection_lost")

    async def _respond(self, req: Any) -> None:
        """Handle one request; a failure goes back to the client as ``error``."""
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
        if not self._limiter.has_capacity():
            await self.overloaded("rate", f"more than {self.gw.client_rate:.0f} frames a second; this one "
                                  "was dropped", request=req.type)
            return
        await self._limiter.acquire()
        if await self._handle_delivery(req):
            return
        if isinstance(req, Ping):
            await self.send(Pong())
        elif isinstance(req, Authenticate):
            await self.send(ErrorFrame(code="bad_request", message="already authenticated",
                                       request=req.type))
        elif isinstance(req, CreateSession):
            await self._create(req)
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
        elif isinstance(req, ShellOpenFrame):
            await self.gw.shells.open(self, req)
        elif isinstance(req, (ShellInputFrame, ShellResizeFrame, ShellSignalFrame)):
            await self.gw.shells.control(self, req)
        elif isinstance(req, (PairingCodeRequest, ListClients, RevokeClient)):
            await self.send(await self.gw.auth.request(self.who, req))
        elif isinstance(req, Pair):
            await self.send(ErrorFrame(code="bad_request", message="already authenticated; pair a new "
                                       "client from its own connection", request=req.type))
        elif isinstance(req, JournalExport):
            await self.send(await export_page(self.gw.bus, self.who, req))

    async def _create(self, req: CreateSession) -> None:
        assert self.who is not None
        if not self.who.operator:
            holder = self.gw.pool.remote_holder(req.workspace_host, req.workspace)
            # Executors announce what they hold every second: a gateway that has heard none yet
            # (just restarted) waits for them rather than refuse an uploaded workspace.
            deadline = time.monotonic() + 3.0
            while holder is None and not len(self.gw.pool) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                holder = self.gw.pool.remote_holder(req.workspace_host, req.workspace)
            if holder is None or holder[1] != self.who.user:
                raise GrantError(HOST_WORKSPACES_NEED_OPERATOR)
        now = time.time()
        sid = secrets.token_hex(8)
        user = self.who.user
        within = check_request(
            self.gw.limits.for_user(user), user=user, sandbox=req.sandbox, llm=req.llm,
            allow_domains=req.allow_domains, allow_read=req.allow_read, credentials=req.credentials,
            quota_tokens=req.quota_tokens, quota_usd=req.quota_usd, running=self.gw.pool.user_sandboxes(user))
        grant = SessionGrant(
            grant_id=secrets.token_hex(12), session_id=sid, user=user, workspace=req.workspace,
            workspace_host=req.workspace_host, sandbox=req.sandbox, allow_read=req.allow_read,
            allow_domains=within["allow_domains"], credentials=req.credentials,
            quota_tokens=within["quota_tokens"], quota_usd=within["quota_usd"],
            issued_at=now, expires_at=now + within["lifetime_s"],
        )
        sealed = seal_grant(self.gw.bus.signer, grant)
        start = StartSession(grant=sealed, llm=LLMChoice(backend=req.llm, model=req.model, script=req.script),
                             headless=req.headless, prompt=req.prompt)
        started = await self.gw.bus.request(subjects.HARNESS_START, start, SessionStarted,
                                            from_role=Role.HARNESS, sid=sid, timeout=90.0)
        await self.gw.sessions.add(SessionRecord(session_id=sid, user=self.who.user, workspace=req.workspace,
                                                 executor_id=started.executor_id, grant=grant))
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
        if not self.who.operator and req.op == "lock" and req.path is not None and pool.on_host(None):
            await self.send(WorkspaceUploadNeeded(path=req.path, executor=pool.on_host(None)[0],
                                                  reason=HOST_WORKSPACES_NEED_OPERATOR))
            return
        if not self.who.operator and req.op != "list":
            raise GrantError(HOST_WORKSPACES_NEED_OPERATOR)
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
        infos = tuple(w.model_dump(mode="json") for r in replies for w in r.workspaces
                      if self.who.operator or w.origin_host is not None)  # a user sees their uploads only
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

    async def _visible(self, sid: str) -> SessionRecord:
        assert self.who is not None
        rec = await self.gw.sessions.visible(self.who, sid)
        if rec is None:
            raise SiloError(f"no session {sid} visible to you")
        return rec

    async def _handle_delivery(self, req: Any) -> bool:
        """Session lists, events, uploads, access reports and cost; False for other requests."""
        assert self.who is not None
        if isinstance(req, ListSessions):
            lines = []
            for rec in await self.gw.sessions.list_for(self.who):
                tally = await self._tally(rec.session_id)
                lines.append(rec.summary(state=tally.state, next_seq=tally.next_seq))
            await self.send(Sessions(sessions=tuple(lines)))
        elif isinstance(req, Attach):
            await self._visible(req.session_id)
            old = self._followers.pop(req.session_id, None)
            if old is not None:
                old.cancel()
            task = self._followers[req.session_id] = asyncio.create_task(
                self._follow(req.session_id, req.from_seq, req.batch))
            task.add_done_callback(lambda t, sid=req.session_id: self._follower_done(sid, t))
        elif isinstance(req, RequestEvents):
            await self._visible(req.session_id)
            events, complete = await self.gw.feeds.get(req.session_id).read(req.from_seq, req.limit)
            await self.send(EventsFrame(session_id=req.session_id, events=tuple(e.frame for e in events),
                                        next_seq=events[-1].seq + 1 if events else req.from_seq,
                                        complete=complete))
        elif isinstance(req, (AccessReportRequest, CostRequest)):
            await self._visible(req.session_id)
            tally = await self._tally(req.session_id)
            if isinstance(req, CostRequest):
                await self.send(CostFrame(session_id=req.session_id, **tally.cost()))
            elif tally.access_report is None:
                raise SiloError(f"session {req.session_id} has not reported its access yet")
            else:
                await self.send(AccessReportFrame(session_id=req.session_id, seq=tally.access_report.seq,
                                                  report=tally.access_report.data))
        elif isinstance(req, (UploadFile, UploadChunk)):
            await self._upload(req)
        else:
            return False
        return True

    def _follower_done(self, sid: str, task: asyncio.Task[None]) -> None:
        """Forget a follower that ended (its session ended, or delivery failed) unless replaced."""
        if self._followers.get(sid) is task:
            del self._followers[sid]

    async def _follow(self, sid: str, from_seq: int, per_frame: int) -> None:
        """Deliver a session's events to this client until the session ends or the client goes (or
        attaches again); tell it if that fails."""
        try:
            await follow(self.gw.feeds.get(sid), self.outbox, from_seq, self.log, per_frame=per_frame)
        except (SiloError, NatsError, TimeoutError) as exc:
            self.log.warning("delivery_failed", session=sid, error=str(exc))
            await self.send(ErrorFrame(code="delivery_failed", request="attach", message=(
                f"delivering the events of session {sid} stopped ({exc}); attach again from the seq "
                "after your last event")))

    async def _tally(self, sid: str) -> SessionTally:
        """The session's tally, brought up to its newest stored event."""
        tallies = self.gw.tallies
        tally = tallies.get(sid)
        if tally is None:
            tally = tallies[sid] = SessionTally(self.gw.feeds.get(sid))
            while len(tallies) > self.gw.keep_sessions:
                tallies.popitem(last=False)
        tallies.move_to_end(sid)
        await tally.catch_up()
        return tally

    async def _upload(self, req: UploadFile | UploadChunk) -> None:
        assert self.who is not None
        if self._uploads is None:
            self._uploads = ConnectionUploads(self.gw.bus, self.who.client, self.log,
                                              max_bytes=self.gw.upload_max)
        try:
            if isinstance(req, UploadFile):
                await self.send(self._uploads.begin(req, await self._visible(req.session_id)))
            else:
                await self.send(await self._uploads.chunk(req))
        except UploadError as exc:
            self.log.info("upload_refused", code=exc.code, error=str(exc))
            await self.send(ErrorFrame(code=exc.code, message=str(exc), request=req.type))

    async def _input(self, req: Prompt | Interrupt | Shutdown) -> None:
        assert self.who is not None
        await self._visible(req.session_id)
        if isinstance(req, Prompt):
            body = SessionInput(kind="prompt", text=req.text, client=self.who.client)
        elif isinstance(req, Interrupt):
            body = SessionInput(kind="interrupt", client=self.who.client)
        else:
            body = SessionInput(kind="stop", client=self.who.client)
        await self._send_input(req.session_id, body, req.type)

    async def _answer(self, req: AnswerQuestion) -> None:
        assert self.who is not None
        await self._visible(req.session_id)
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
        """Stop following sessions; end this connection's shells and uploads; send what is queued."""
        await self.gw.shells.client_gone(self)
        followers = list(self._followers.values())
        # Forgotten before they are cancelled: a cancelled task keeps its traceback, whose frames hold this
        # connection; kept here too, the pair would be a cycle only the garbage collector frees.
        self._followers.clear()
        for task in followers:
            task.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
        if self._uploads is not None:
            self._uploads.close()
        await self.outbox.flush(timeout=2.0)
        await self.outbox.close()


async def serve(ctx: ServiceContext) -> None:
    """Run the gateway until stopped.

    Options (config.json ``services.<id>.options``): ``host``, ``port``;
    ``tls_cert``/``tls_key`` (the operator's own certificate); ``auth_deadline_s``
    (30); ``pairing_code_valid_s`` (120); ``pairing_max_failures`` per address
    (5), ``pairing_global_max_failures`` (50) within ``pairing_window_s`` (300),
    then ``pairing_lockout_s`` (300); ``web_root`` (the web app's directory); ``keep_sessions``
    (1024: the sessions nobody follows whose records, feeds and tallies stay in memory);
    ``event_ring`` (2048) and ``event_ring_bytes`` (64 KiB) per followed session;
    ``heap_trim_s`` (60: how often free heap pages go back to the kernel; 0 never).
    """
    ctx.status["ready"] = False  # healthy only once clients can connect (`silo up` waits for that)
    state = ctx.state
    cfg = state.config()
    opts = ctx.options
    token = TokenAuthenticator(state.client_token())  # refuses a token file others can read
    cert = gateway_certificate(state, opts)
    tls = server_tls(cert)
    metrics = GatewayMetrics(ctx)
    keys = await ClientKeyStore.open(ctx.bus.js)
    codes = await PairingCodes.open(ctx.bus.js, valid_s=float(opts.get("pairing_code_valid_s") or CODE_VALID_S))
    limiter = PairingLimiter(per_address=int(opts.get("pairing_max_failures") or 5),
                             global_max=int(opts.get("pairing_global_max_failures") or 50),
                             window_s=float(opts.get("pairing_window_s") or 300.0),
                             lockout_s=float(opts.get("pairing_lockout_s") or 300.0))
    auth = Authenticator(token, keys, codes, limiter, fingerprint=cert.fingerprint, metrics=metrics.auth,
                         log=ctx.log, deadline_s=float(opts.get("auth_deadline_s") or AUTH_DEADLINE_S))
    web_root = Path(opts["web_root"]) if opts.get("web_root") else WEB_ROOT
    sessions = SessionDirectory(ctx.bus.js, await open_sessions_bucket(ctx.bus.js), ctx.log,
                                keep=int(opts.get("keep_sessions") or KEEP_TALLIES))
    gw = Gateway(ctx, metrics, auth, sessions, web_root)
    # Revocations on any replica close this replica's connections of that key.
    revocations = asyncio.create_task(keys.watch_revocations(auth.revoked, ctx.log, ctx.bus))
    trim_s = float(opts.get("heap_trim_s", HEAP_TRIM_S) or 0)
    trimmer = asyncio.create_task(trim_heap_every(trim_s, ctx.stopping)) if trim_s > 0 else None

    async def on_announce(env: Envelope, msg: Msg) -> None:
        ann = env.expect(ExecutorAnnounce)
        if ann.executor_id == env.header.sender:
            gw.pool.update(ann)

    await ctx.bus.subscribe(subjects.POOL_ANNOUNCE_ALL, on_announce)
    runner = web.AppRunner(gw.app(), access_log=None)
    await runner.setup()
    host = ctx.options.get("host") or cfg.gateway.host
    port = int(ctx.options.get("port") or cfg.gateway.port)
    site = web.TCPSite(runner, host, port, ssl_context=tls)
    await site.start()
    ctx.status["ready"] = True
    ctx.status["url"] = f"wss://{host}:{port}/ws"
    ctx.status["fingerprint"] = cert.fingerprint
    ctx.log.info("gateway_listening", url=ctx.status["url"], fingerprint=cert.fingerprint,
                 certificate="operator" if cert.operator else "self-signed")
    try:
        await ctx.stopping.wait()
    finally:
        revocations.cancel()
        await asyncio.gather(revocations, return_exceptions=True)
        if trimmer is not None:
            trimmer.cancel()
            await asyncio.gather(trimmer, return_exceptions=True)
        # Open WebSockets would hold the server's shutdown; tell clients we are going away.
        await asyncio.gather(*(c.ws.close(code=WSCloseCode.GOING_AWAY, message=b"gateway stopping")
                               for c in list(gw.connections)), return_exceptions=True)
        await runner.cleanup()
        await gw.shells.close()


