"""Workspace archives between clients and the object store: uploads to lock, results of unlock.

Clients never reach NATS, so the gateway carries a workspace of another
machine: it checks every uploaded chunk against the plan the client sent
first (size, SHA-256) before storing it, resumes an upload by telling the
client which chunks it already holds, and asks the executor to lock from the
stored chunks. At unlock it streams the executor's result archive chunk by
chunk, each checked against the plan from the executor's signed reply.
Chunks are named per user (a hash of user and the client's transfer id),
so no client can read, resume or overwrite another user's transfer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from devsilo.protocol import GrantError, TransferPlan, WorkspaceRequest
from devsilo.protocol._transfer import MAX_TRANSFER_BYTES
from devsilo.protocol.client import (
    WorkspaceChunk,
    WorkspaceChunkAck,
    WorkspaceFetchChunk,
    WorkspaceResult,
    WorkspaceTransferClosed,
    WorkspaceTransferDone,
    WorkspaceUpload,
    WorkspaceUploadCommit,
    WorkspaceUploadState,
)
from devsilo.runtime._workspace_objects import (
    TransferError,
    chunks_present,
    delete_transfer,
    get_chunk,
    open_bucket,
    put_chunk,
)
from nats.js.object_store import ObjectStore

if TYPE_CHECKING:
    from ._server import ClientConnection, Gateway


@dataclass
class Upload:
    """An upload a user started: where it goes and the plan (client's and stored names)."""

    user: str
    path: str
    host: str
    executor: str
    client_plan: TransferPlan
    stored: TransferPlan
    have: set[int]
    """Chunks known to be stored (listed at begin or stored since through this gateway)."""


class WorkspaceTransfers:
    """The gateway's uploads in progress and the results it may hand out, per user."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.max_bytes = int(gw.ctx.options.get("max_transfer_bytes") or MAX_TRANSFER_BYTES)
        self.uploads: dict[tuple[str, str], Upload] = {}
        self.results: dict[str, tuple[str, TransferPlan]] = {}
        """Result transfer id -> (user it was unlocked for, plan from the executor's signed reply)."""
        self._bucket: ObjectStore | None = None

    async def bucket(self) -> ObjectStore:
        """The workspace object store (created on first use)."""
        if self._bucket is None:
            self._bucket = await open_bucket(self.gw.bus.js)
        return self._bucket

    def _upload(self, user: str, transfer_id: str) -> Upload:
        up = self.uploads.get((user, transfer_id))
        if up is None:
            raise GrantError(f"no upload {transfer_id} is in progress on this gateway; send "
                             "workspace_upload first (rerunning `silo workspace lock` does)")
        return up

    async def begin(self, user: str, req: WorkspaceUpload) -> WorkspaceUploadState:
        """Start or resume an upload: check limits and ownership, say which chunks are stored."""
        plan = req.plan
        if plan.size > self.max_bytes:
            raise GrantError(f"the upload of {req.path} is {plan.size} bytes; this gateway takes "
                             f"workspaces of at most {self.max_bytes} bytes")
        pool = self.gw.pool
        deadline = time.monotonic() + 3.0  # executors announce every second; a new gateway waits
        while not pool.on_host(None) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        holder = pool.remote_holder(req.workspace_host, req.path)
        if holder is not None and holder[1] != user:
            raise GrantError(f"{req.path} of {req.workspace_host} is locked by another user")
        executor = holder[0] if holder is not None else req.executor
        if executor is None:
            fits = pool.candidates("auto")
            if not fits:
                raise GrantError(f"no executor can take an upload; pool: {pool.describe()}")
            executor = fits[0].executor_id
        elif not pool.alive(executor):
            raise GrantError(f"executor {executor} is not running; pool: {pool.describe()}")
        name = hashlib.sha256(f"{user}\0{plan.transfer_id}".encode()).hexdigest()[:40]
        stored = plan.model_copy(update={"transfer_id": f"up-{name}"})
        obs = await self.bucket()
        have = tuple(await chunks_present(obs, stored))
        self.uploads[(user, plan.transfer_id)] = Upload(user, req.path, req.workspace_host, executor,
                                                        plan, stored, set(have))
        return WorkspaceUploadState(transfer_id=plan.transfer_id, executor=executor, have=have)

    async def chunk(self, user: str, req: WorkspaceChunk) -> WorkspaceChunkAck:
        """Check one uploaded chunk against the plan and store it."""
        up = self._upload(user, req.transfer_id)
        if not 0 <= req.index < up.client_plan.chunks:
            raise TransferError(f"chunk {req.index} is outside upload {req.transfer_id} "
                                f"(0..{up.client_plan.chunks - 1})")
        if req.sha256 != up.client_plan.chunk_sha256[req.index]:
            raise TransferError(f"chunk {req.index} of upload {req.transfer_id} claims a SHA-256 that is "
                                "not the one in the plan; refused")
        try:
            data = base64.b64decode(req.data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise TransferError(f"chunk {req.index} of upload {req.transfer_id} is not base64") from e
        await put_chunk(await self.bucket(), up.stored, req.index, data)
        up.have.add(req.index)
        return WorkspaceChunkAck(transfer_id=req.transfer_id, index=req.index)

    async def commit(self, conn: ClientConnection, user: str, req: WorkspaceUploadCommit) -> WorkspaceResult:
        """Every chunk is stored: the executor locks the workspace from them."""
        up = self._upload(user, req.transfer_id)
        obs = await self.bucket()
        missing = [] if len(up.have) == up.stored.chunks else sorted(
            set(range(up.stored.chunks)) - set(await chunks_present(obs, up.stored)))
        if missing:
            raise TransferError(f"{len(missing)} chunk(s) of upload {req.transfer_id} are not stored yet "
                                f"(first: {missing[0]}); resume the upload")
        body = WorkspaceRequest(op="lock", path=up.path, user=user, origin_host=up.host,
                                transfer=up.stored)
        reply = await conn._ask_executor(up.executor, body)
        await delete_transfer(obs, up.stored)
        self.uploads.pop((user, req.transfer_id), None)
        return WorkspaceResult(op="lock", workspaces=tuple(w.model_dump(mode="json") for w in reply.workspaces))

    def offer(self, user: str, plan: TransferPlan) -> None:
        """Let ``user`` fetch the result ``plan`` (from an executor's signed unlock reply)."""
        self.results[plan.transfer_id] = (user, plan)

    def _result(self, user: str, transfer_id: str) -> TransferPlan:
        got = self.results.get(transfer_id)
        if got is None or got[0] != user:
            raise GrantError(f"no unlocked result {transfer_id} is waiting for you on this gateway; "
                             "run `silo workspace unlock` again")
        return got[1]

    async def fetch(self, user: str, req: WorkspaceFetchChunk) -> WorkspaceChunk:
        """One chunk of a result, checked against the executor's plan on the way out."""
        plan = self._result(user, req.transfer_id)
        if not 0 <= req.index < plan.chunks:
            raise TransferError(f"chunk {req.index} is outside result {req.transfer_id} (0..{plan.chunks - 1})")
        data = await get_chunk(await self.bucket(), plan, req.index)
        return WorkspaceChunk(transfer_id=req.transfer_id, index=req.index,
                              sha256=plan.chunk_sha256[req.index], data=base64.b64encode(data).decode())

    async def done(self, user: str, req: WorkspaceTransferDone) -> WorkspaceTransferClosed:
        """The client applied a result: drop its chunks."""
        plan = self._result(user, req.transfer_id)
        await delete_transfer(await self.bucket(), plan)
        self.results.pop(req.transfer_id, None)
        return WorkspaceTransferClosed(transfer_id=req.transfer_id)
