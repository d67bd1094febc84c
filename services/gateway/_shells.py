"""`silo shell` in the gateway: a shell grant per shell, its stream to and from the executor.

A client asks for a shell on a locked workspace or on a session's workspace.
The gateway works out the policy (the running session's, else the
workspace's defaults; the client's overrides win, and each difference is
reported back as a note), seals a shell grant for the executor that holds
the workspace, and relays the shell's input (``silo.shell.<id>.input``) and
output (``silo.shell.<id>.output``). A shell belongs to the connection that
opened it: no other connection, of any user, can type into it, and it is
closed when that connection goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from devsilo.protocol import (
    SHELL_ACK_EVERY,
    Envelope,
    GrantError,
    Role,
    SessionGrant,
    ShellExit,
    ShellInput,
    ShellOpen,
    ShellOpened,
    ShellOutput,
    SiloError,
    seal_grant,
    subjects,
)
from devsilo.protocol.client import (
    ClientFrame,
    ShellExitFrame,
    ShellInputFrame,
    ShellOpenedFrame,
    ShellOpenFrame,
    ShellOutputFrame,
    ShellResizeFrame,
    ShellSignalFrame,
)
from devsilo.runtime import ServiceContext
from devsilo.runtime._pool import PoolView
from nats.aio.msg import Msg

from ._auth import Principal
from ._limits import Limits, check_request
from ._sessions import SessionDirectory

DEFAULT_SHELL_BACKEND = "bwrap"
"""The backend of a shell on a workspace no session runs on (`silo run`'s default too)."""
DEFAULT_READ_ALLOW_LIST: tuple[str, ...] = ()
"""The operator's default read allow-list for shells without a session (none configurable yet)."""
SHELL_GRANT_LIFETIME_S = 24 * 3600.0
OPEN_TIMEOUT_S = 90.0
WATCH_EVERY_S = 0.5
"""How often open shells are checked against the pool: a dead executor sends no exit."""


class ShellClient(Protocol):
    """The client connection a shell belongs to."""

    who: Principal | None

    async def send(self, frame: ClientFrame) -> None:
        """Send one frame to the client."""


@dataclass(frozen=True)
class ShellPolicy:
    """What a shell's sandbox may reach, and where that policy came from."""

    sandbox: str
    allow_read: tuple[str, ...]
    allow_domains: tuple[str, ...]
    egress_addr: str | None
    source: str
    """``session <id>`` or ``workspace defaults``: named in the notes."""


@dataclass
class ShellRecord:
    """One open shell and the connection it belongs to."""

    shell_id: str
    user: str
    workspace: str
    executor_id: str
    client: ShellClient
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    failed: bool = False
    next_seq: int = 0
    acked: int = 0
    lost: int = 0
    sub: Any = None
    instance: str | None = None
    """The executor's instance when the shell opened; another one means the shell died with it."""


class ShellBroker:
    """Opens shells for clients and relays their streams."""

    def __init__(self, ctx: ServiceContext, pool: PoolView, sessions: SessionDirectory,
                 locks: dict[str, str]) -> None:
        self.ctx = ctx
        self.bus = ctx.bus
        self.pool = pool
        self.sessions = sessions
        self.locks = locks
        self.limits = Limits.from_options(ctx.options)
        self._shells: dict[str, ShellRecord] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._watcher: asyncio.Task[None] | None = None

    @property
    def open_shells(self) -> int:
        """Shells open through this gateway."""
        return len(self._shells)

    # -- opening ----------------------------------------------------------------------

    async def _place(self, who: Principal, req: ShellOpenFrame) -> tuple[str, str, ShellPolicy]:
        """The workspace, the executor and the base policy for a shell request."""
        if (req.workspace is None) == (req.session_id is None):
            raise GrantError("a shell needs exactly one of a workspace path or a session id")
        if req.session_id is not None:
            rec = await self.sessions.visible(who, req.session_id)
            if rec is None or rec.grant is None:
                raise GrantError(f"no session {req.session_id} visible to you")
            # Whether it still runs is the executor's to say: its announcements lag a second.
            return rec.workspace, rec.executor_id, _from_grant(rec.grant, f"session {rec.session_id}")
        workspace = req.workspace
        assert workspace is not None
        if not who.operator:  # a shell on the executors' own files is the operator's
            raise GrantError(f"no workspace {workspace} of yours is locked; only an operator opens shells "
                             "on the executors' own files")
        holder = self.locks.get(workspace) or self.pool.locked_on(workspace)
        if holder is None:
            raise GrantError(f"{workspace} is not locked on any executor: a shell works only in a locked "
                             f"workspace; lock it with `silo workspace lock {workspace}`, or use "
                             "--session ID for a running session's")
        # The newest running session of this user on the workspace lends its policy.
        for rec in reversed(await self.sessions.list_for(who)):
            if (rec.workspace == workspace and rec.executor_id == holder and rec.grant is not None
                    and rec.user == who.user and self.pool.runs(holder, rec.session_id)):
                return workspace, holder, _from_grant(rec.grant, f"session {rec.session_id}")
        return workspace, holder, ShellPolicy(DEFAULT_SHELL_BACKEND, DEFAULT_READ_ALLOW_LIST, (), None,
                                              "workspace defaults")

    async def open(self, client: ShellClient, req: ShellOpenFrame) -> None:
        """Start a shell; the client gets ``shell_opened``, then its output and exit."""
        who = client.who
        assert who is not None
        workspace, eid, base = await self._place(who, req)
        sandbox = req.sandbox or base.sandbox
        allow_read = base.allow_read if req.allow_read is None else req.allow_read
        allow_domains = base.allow_domains if req.allow_domains is None else req.allow_domains
        notes = _differences(base, sandbox, allow_read, allow_domains)
        within = check_request(
            self.limits.for_user(who.user), user=who.user, sandbox=sandbox, llm=None,
            allow_domains=tuple(allow_domains), allow_read=tuple(allow_read), credentials=(),
            quota_tokens=None, quota_usd=None, running=self.pool.user_sandboxes(who.user))
        now = time.time()
        shid = secrets.token_hex(8)
        grant = SessionGrant(
            grant_id=secrets.token_hex(12), session_id=shid, user=who.user, workspace=workspace,
            sandbox=cast(Any, sandbox), executor=eid, allow_read=allow_read,
            allow_domains=within["allow_domains"], credentials=(), egress_addr=base.egress_addr,
            issued_at=now, expires_at=now + min(SHELL_GRANT_LIFETIME_S, within["lifetime_s"]), purpose="shell",
        )
        rec = ShellRecord(shid, who.user, workspace, eid, client, instance=self.pool.instance_of(eid))
        self._shells[shid] = rec
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch_executors())
        try:
            # Subscribed before asking: output may come before the executor's answer does.
            rec.sub = await self.bus.subscribe(subjects.shell_output(shid),
                                               lambda env, msg: self._on_output(rec, env, msg))
            body = ShellOpen(grant=seal_grant(self.bus.signer, grant), command=req.command, tty=req.tty,
                             rows=req.rows, cols=req.cols, term=req.term)
            opened = await self.bus.request(subjects.exec_shell(eid), body, ShellOpened,
                                            from_role=Role.EXECUTOR, sid=shid, timeout=OPEN_TIMEOUT_S)
        except BaseException:
            rec.failed = True
            rec.opened.set()
            self._drop(rec)
            # The executor may have started it all the same (e.g. its answer came too late).
            with contextlib.suppress(Exception):
                await self.bus.publish(subjects.shell_input(shid), ShellInput(kind="close"), sid=shid)
            raise
        self.ctx.log.info("shell_opened", shell=shid, executor=eid, workspace=workspace, policy=base.source)
        await client.send(ShellOpenedFrame(shell_id=shid, executor_id=eid,
                                           access=opened.access.model_dump(mode="json"), notes=notes))
        rec.opened.set()

    async def _on_output(self, rec: ShellRecord, env: Envelope, msg: Msg) -> None:
        """Relay one output chunk or the exit to the shell's client, in the executor's order."""
        if env.header.sender != rec.executor_id or env.header.sid != rec.shell_id:
            self.ctx.log.warning("shell_output_rejected", shell=rec.shell_id, sender=env.header.sender)
            return
        await rec.opened.wait()  # the client hears shell_opened first
        if rec.failed or self._shells.get(rec.shell_id) is not rec:
            return
        body = env.body
        if isinstance(body, ShellOutput):
            if body.seq != rec.next_seq:
                self.ctx.log.error("shell_output_gap", shell=rec.shell_id, expected=rec.next_seq, got=body.seq)
                rec.lost += max(0, body.seq - rec.next_seq)
            rec.next_seq = body.seq + 1
            await rec.client.send(ShellOutputFrame(shell_id=rec.shell_id, stream=body.stream, data=body.data))
            # Delivered (the socket took it): the executor may send further ahead.
            if rec.next_seq - rec.acked >= SHELL_ACK_EVERY:
                rec.acked = rec.next_seq
                await self.bus.publish(subjects.shell_input(rec.shell_id), ShellInput(kind="ack", seq=rec.acked),
                                       sid=rec.shell_id)
        elif isinstance(body, ShellExit):
            message = body.message
            rec.lost += max(0, body.seq - rec.next_seq)
            if rec.lost:
                message = (f"{message}; " if message else "") + f"{rec.lost} chunk(s) of output were lost on the way"
            await rec.client.send(ShellExitFrame(shell_id=rec.shell_id, exit_code=body.exit_code,
                                                 signal=body.signal, message=message))
            self._drop(rec)

    async def _watch_executors(self) -> None:
        """End the shells of executors that stopped or restarted: their exits will never come."""
        while self._shells:
            await asyncio.sleep(WATCH_EVERY_S)
            for rec in list(self._shells.values()):
                eid = rec.executor_id
                if not rec.opened.is_set() or rec.failed:
                    continue
                if rec.instance is None:  # not yet heard from when the shell opened
                    rec.instance = self.pool.instance_of(eid)
                    continue
                if self.pool.alive(eid) and self.pool.instance_of(eid) == rec.instance:
                    continue
                self.ctx.log.warning("shell_executor_lost", shell=rec.shell_id, executor=eid)
                self._drop(rec)
                await rec.client.send(ShellExitFrame(
                    shell_id=rec.shell_id,
                    message=f"executor {eid} stopped or restarted; the shell ended with its sandbox"))

    # -- input ------------------------------------------------------------------------

    def _mine(self, client: ShellClient, shell_id: str) -> ShellRecord:
        rec = self._shells.get(shell_id)
        if rec is None or rec.client is not client or rec.failed:
            raise SiloError(f"no shell {shell_id} is open on this connection")
        return rec

    async def control(self, client: ShellClient,
                      req: ShellInputFrame | ShellResizeFrame | ShellSignalFrame) -> None:
        """Forward a client's input, window size or signal to its own shell."""
        rec = self._mine(client, req.shell_id)
        bodies: list[ShellInput] = []
        if isinstance(req, ShellInputFrame):
            if req.data:
                bodies.append(ShellInput(kind="data", data=req.data))
            if req.eof:
                bodies.append(ShellInput(kind="eof"))
        elif isinstance(req, ShellResizeFrame):
            bodies.append(ShellInput(kind="resize", rows=req.rows, cols=req.cols))
        else:
            bodies.append(ShellInput(kind="signal", signal=req.signal))
        for body in bodies:
            await self.bus.publish(subjects.shell_input(rec.shell_id), body, sid=rec.shell_id)

    async def client_gone(self, client: ShellClient) -> None:
        """A connection closed: its shells end with it."""
        for rec in [r for r in self._shells.values() if r.client is client]:
            if not rec.failed:
                try:
                    await self.bus.publish(subjects.shell_input(rec.shell_id), ShellInput(kind="close"),
                                           sid=rec.shell_id)
                except Exception as exc:  # noqa: BLE001 -- NATS gone: the executor ends the sandbox with its own stop
                    self.ctx.log.warning("shell_close_failed", shell=rec.shell_id, error=str(exc))
            self._drop(rec)

    def _drop(self, rec: ShellRecord) -> None:
        if self._shells.get(rec.shell_id) is rec:
            del self._shells[rec.shell_id]
        if rec.sub is not None:
            sub, rec.sub = rec.sub, None
            # Not awaited: this may run inside that subscription's own callback.
            task = asyncio.ensure_future(sub.unsubscribe())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop watching; wait for pending unsubscriptions."""
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _from_grant(grant: SessionGrant, source: str) -> ShellPolicy:
    return ShellPolicy(grant.sandbox, grant.allow_read, grant.allow_domains, grant.egress_addr, source)


def _differences(base: ShellPolicy, sandbox: str, allow_read: tuple[str, ...],
                 allow_domains: tuple[str, ...]) -> tuple[str, ...]:
    """One note per setting in which the shell's policy differs from its base."""
    notes = []
    of = f"{base.source}'s policy" if base.source.startswith("session") else "the workspace's defaults"
    if sandbox != base.sandbox:
        notes.append(f"--sandbox {sandbox} differs from {of} ({base.sandbox})")
    if set(allow_read) != set(base.allow_read):
        notes.append(f"--allow-read {', '.join(allow_read) or '(none)'} differs from {of} "
                     f"({', '.join(base.allow_read) or 'none'})")
    if set(allow_domains) != set(base.allow_domains):
        notes.append(f"--allow-domain {', '.join(allow_domains) or '(none)'} differs from {of} "
                     f"({', '.join(base.allow_domains) or 'none'})")
    return tuple(notes)
