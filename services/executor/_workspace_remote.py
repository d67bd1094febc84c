"""The executor's side of workspaces from other machines: lock an upload, send the result back.

The gateway names the uploaded archive (a TransferPlan in the signed
WorkspaceRequest); the executor reads its chunks from the object store,
checks each one and the whole against the plan, extracts it safely into its
own storage and locks it there with the same snapshot as a local lock. At
unlock it ends the sessions, reports every change exactly as for a local
workspace, and puts the resulting tree as an archive into the object store
for the gateway to stream to the client.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from devsilo.protocol import (
    GrantError,
    SessionGrant,
    WorkspaceInfo,
    WorkspaceReply,
    WorkspaceRequest,
)
from devsilo.protocol._transfer import DEFAULT_CHUNK, MAX_TRANSFER_BYTES
from devsilo.runtime import ServiceContext
from devsilo.runtime._workspace_objects import fetch_archive, open_bucket, publish_archive
from nats.js.object_store import ObjectStore

from ._workspace_lock import (
    INCOMING,
    RemoteWorkspaces,
    WorkspaceLockError,
    WorkspaceStore,
)

_HELD = ("locked", "locking", "unlocking")
Key = tuple[str, str]


class UploadedWorkspaces:
    """Uploaded workspaces on one executor, keyed by (client host, client path)."""

    def __init__(self, ctx: ServiceContext, store: WorkspaceStore, executor_id: str) -> None:
        self.ctx = ctx
        self.eid = executor_id
        limit = int(ctx.options.get("max_transfer_bytes") or MAX_TRANSFER_BYTES)
        self.remote = RemoteWorkspaces(store, max_bytes=limit)
        self.unlocking: set[Key] = set()
        self._bucket: ObjectStore | None = None
        self._busy: dict[Key, asyncio.Lock] = {}

    async def bucket(self) -> ObjectStore:
        """The workspace object store (bound on first use)."""
        if self._bucket is None:
            self._bucket = await open_bucket(self.ctx.bus.js)
        return self._bucket

    def held(self) -> dict[Key, tuple[str, Path]]:
        """(host, path) -> (user, files dir) of every upload held here in any phase."""
        return self.remote.records(_HELD)

    def for_grant(self, grant: SessionGrant) -> Path | None:
        """The stored files a session's grant names, when it names an upload held here."""
        if grant.workspace_host is None:
            return None
        key = (grant.workspace_host, grant.workspace)
        rec = self.held().get(key)
        if rec is None:
            return None
        user, files = rec
        if user != grant.user:
            raise GrantError(f"workspace {grant.workspace} of {grant.workspace_host} is held by another "
                             "user on this executor")
        state = self.remote.state(*key) or {}
        if key in self.unlocking or state.get("phase") != "locked":
            raise GrantError(f"workspace {grant.workspace} of {grant.workspace_host} is being locked or "
                             "unlocked; no new sessions on it")
        return self.remote.store.check_mounted(files)

    def info(self, host: str, path: str, sessions: list[str]) -> WorkspaceInfo:
        """Status of one upload held (or once held) here."""
        st = self.remote.state(host, path) or {}
        files = self.remote.store_dir(host, path) / "files"
        phase = str(st.get("phase", "unlocked"))
        size = entries = 0
        if phase == "locked" and files.is_dir():
            for f in files.rglob("*"):
                entries += 1
                if f.is_file() and not f.is_symlink():
                    size += f.lstat().st_size
        return WorkspaceInfo(path=path, executor=self.eid, phase=phase, locked_at=st.get("locked_at"),
                             entries=entries, size_bytes=size, sessions=tuple(sorted(sessions)),
                             warnings=self.remote.store.warnings_for(st) if phase == "locked" else (),
                             origin_host=host,
                             storage=str(st.get("storage", "directory")) if phase == "locked" else None)

    def infos(self, user: str, *, sessions_on: Callable[[Path], list[str]]) -> tuple[WorkspaceInfo, ...]:
        """The uploads ``user`` holds here (others' stay private)."""
        return tuple(self.info(h, p, sessions_on(files))
                     for (h, p), (u, files) in sorted(self.held().items()) if u == user)

    async def handle(self, req: WorkspaceRequest, *, sessions_on: Callable[[Path], list[str]],
                     close_session: Callable[[str, str], Awaitable[None]],
                     announce_now: Callable[[], Awaitable[None]]) -> WorkspaceReply:
        """lock (from an upload), unlock (into a result archive) or status of an upload."""
        host, path = req.origin_host, req.path
        if host is None or path is None:
            raise GrantError("a workspace of another machine is named by its host and path")
        key = (host, path)
        async with self._busy.setdefault(key, asyncio.Lock()):
            if req.op == "lock":
                return await self._lock(req, key, announce_now)
            if req.op == "unlock":
                return await self._unlock(req, key, sessions_on, close_session, announce_now)
            if req.op == "status":
                rec = self.held().get(key)
                if rec is not None and rec[0] != req.user:
                    raise GrantError(f"{path} of {host} is held by another user on this executor")
                return WorkspaceReply(workspaces=(self.info(host, path, sessions_on(rec[1]) if rec else []),))
            raise GrantError(f"workspace {req.op} does not apply to one workspace of another machine")

    async def _lock(self, req: WorkspaceRequest, key: Key,
                    announce_now: Callable[[], Awaitable[None]]) -> WorkspaceReply:
        plan = req.transfer
        if plan is None:
            raise GrantError("locking a workspace of another machine needs its uploaded archive")
        if plan.size > self.remote.max_bytes + plan.chunk_size:
            raise WorkspaceLockError(f"the upload of {key[1]} is {plan.size} bytes; executor {self.eid} "
                                     f"takes at most {self.remote.max_bytes}")
        sdir, state = await asyncio.to_thread(self.remote.begin_lock, *key, req.user, plan.sha256)
        if state["phase"] == "locking" and state["step"] == "started":
            state["sha256"] = plan.sha256  # an upload restarted before it was fetched
            await fetch_archive(await self.bucket(), plan, sdir / INCOMING)
            await asyncio.to_thread(self.remote.fetched, sdir, state)
        locked = await asyncio.to_thread(self.remote.finish_lock, *key)
        self.ctx.log.info("workspace_locked_from_upload", host=key[0], path=key[1], entries=locked.entries)
        await announce_now()
        return WorkspaceReply(workspaces=(self.info(*key, []),))

    async def _unlock(self, req: WorkspaceRequest, key: Key, sessions_on: Callable[[Path], list[str]],
                      close_session: Callable[[str, str], Awaitable[None]],
                      announce_now: Callable[[], Awaitable[None]]) -> WorkspaceReply:
        rec = self.held().get(key)
        self.unlocking.add(key)
        try:
            on_it = sessions_on(rec[1]) if rec is not None else []
            await asyncio.gather(*(close_session(sid, "workspace unlocked") for sid in on_it))
            result = await asyncio.to_thread(self.remote.unlock, *key, req.user)
        finally:
            self.unlocking.discard(key)
        plan = await publish_archive(await self.bucket(), result.archive, result.transfer_id, DEFAULT_CHUNK)
        await announce_now()
        self.ctx.log.info("workspace_unlocked_to_upload", host=key[0], path=key[1],
                          changes=len(result.report.changed_paths), sessions_ended=len(on_it))
        report: dict[str, Any] = json.loads(result.report.to_json())
        return WorkspaceReply(workspaces=(self.info(*key, []),), report_text=result.report_text,
                              report=report, auto_exec_changed=result.report.auto_exec_changed,
                              transfer=plan)
