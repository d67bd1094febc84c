"""`silo workspace lock|unlock|status` for a workspace uploaded to an executor on another machine.

Which machine is which: executors announce the host name they run on and the
CLI sends its own (``socket.gethostname()``). When the executor chosen to lock
a workspace announces another host name, the gateway answers "upload needed"
and the workspace travels through the gateway into the object store; ``--upload``
asks for that even when the names match (two machines with one host name look
like one machine to devsilo, so use ``--upload`` there).

Every step on this machine is recorded in ``<state dir>/transfers/<id>/state.json``
before the next one starts, so an interrupted command (Ctrl-C, a lost
connection, kill -9) finishes when it is run again:

lock
    ``staged``: the workspace's entries are renamed into a hidden directory
    inside it (``.devsilo-outgoing-*``; same filesystem, atomic per entry) and
    the marker is written, so nothing changes them while they travel;
    ``packed``: they are packed into one archive, its size, SHA-256 and chunk
    hashes recorded (the plan); ``uploaded``: every chunk is up (the gateway
    says which it already holds, so a rerun sends only the rest) and the
    executor locked it; ``locked``: the hidden directory is removed and the
    workspace is left with only the marker, read-only.
unlock
    The executor ends the sessions and reports; the report is kept here and
    shown first. ``downloaded``: every chunk of the result was fetched and
    checked (a rerun keeps the chunks that check out), and the whole archive
    matches its SHA-256; ``extracted``: it was unpacked (refusing unsafe
    entries) into a hidden directory inside the workspace; ``restored``: the
    marker is gone and every entry was renamed into place; then the
    directory's mode comes back and the result's chunks are released.
    Until ``restored`` no file of the workspace exists only in memory.

``unlock`` of a workspace whose upload never finished puts its files back.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from devsilo.protocol import SiloError, TransferPlan
from devsilo.protocol._transfer import DEFAULT_CHUNK, MAX_TRANSFER_BYTES
from devsilo.protocol.client import (
    WorkspaceChunk,
    WorkspaceChunkAck,
    WorkspaceCommand,
    WorkspaceFetchChunk,
    WorkspaceResult,
    WorkspaceTransferClosed,
    WorkspaceTransferDone,
    WorkspaceUpload,
    WorkspaceUploadCommit,
    WorkspaceUploadNeeded,
    WorkspaceUploadState,
)
from devsilo.runtime._tree_archive import (
    file_sha256,
    hash_chunks,
    pack_tree,
    read_range,
    unpack_tree,
    write_range,
)

from ._client import GatewayClient, GatewayError

MARKER = ".devsilo-locked"
CRASH_ENV = "DEVSILO_TEST_CRASH_AFTER"
"""TEST ONLY: the CLI SIGKILLs itself right after the step named here (e.g. ``upload.chunk.2``)."""
EXIT_AUTO_EXEC = 3


class TransferStateError(SiloError):
    """This machine's record of an uploaded workspace does not fit what is on disk."""


def _crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class UploadRecord:
    """This machine's record of one uploaded workspace, under the CLI's state directory."""

    def __init__(self, transfers: Path, path: Path, host: str) -> None:
        digest = hashlib.sha256(f"{host}\0{path}".encode("utf-8", "surrogateescape")).hexdigest()[:16]
        self.dir = transfers / f"{path.name or 'root'}-{digest}"
        self.path = path
        self.host = host
        self.state: dict[str, Any] = {}
        if (self.dir / "state.json").exists():
            self.state = json.loads((self.dir / "state.json").read_text())

    @property
    def exists(self) -> bool:
        """Whether a lock or unlock of this workspace is recorded here."""
        return bool(self.state)

    @property
    def phase(self) -> str:
        """The last step done."""
        return str(self.state.get("phase", ""))

    def set(self, phase: str, **fields: Any) -> None:
        """Record a finished step (durably) before the next one starts."""
        if not self.dir.exists():
            self.dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.dir.mkdir(mode=0o700)
        self.state.update(fields, phase=phase)
        _write_atomic(self.dir / "state.json", json.dumps(self.state))
        _crash_point(f"client.{phase}")

    def forget(self) -> None:
        """Drop the record and its archives."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.state = {}


def _marker_text(path: Path, executor: str, uploading: bool) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    if uploading:
        return (f"devsilo is uploading this directory to executor {executor} since {stamp}.\n"
                f"Run `silo workspace lock {path} --upload` to finish, or `silo workspace unlock {path}` "
                "to put the files back.\n")
    return (f"This directory is locked by devsilo since {stamp}.\n"
            f"Its contents were uploaded to executor {executor}, on another machine, where only the "
            "sandbox works on them; they are not on this machine.\n"
            f"Run `silo workspace unlock {path}` to get them back with a report of every change.\n")


def _move_all(src: Path, dst: Path, skip: frozenset[str]) -> None:
    """Rename every top-level entry of ``src`` into ``dst`` (same filesystem: atomic each)."""
    for name in sorted(os.listdir(src)):
        if name in skip:
            continue
        if os.path.lexists(dst / name):
            raise TransferStateError(f"both {src / name} and {dst / name} exist; move one aside and run "
                                     "the command again")
        os.rename(src / name, dst / name)


def _replace_marker(ws: Path, text: str) -> None:
    tmp = ws / f"{MARKER}.tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    tmp.write_text(text)
    os.chmod(tmp, 0o444)
    os.replace(tmp, ws / MARKER)


async def _expect(client: GatewayClient, kind: type[Any]) -> Any:
    async for frame in client.frames():
        if isinstance(frame, kind):
            return frame
    raise GatewayError(f"the gateway closed the connection before answering with {kind.__name__}")


class RemoteWorkspace:
    """Lock and unlock one workspace of this machine on an executor elsewhere."""

    def __init__(self, client: GatewayClient, transfers: Path, path: Path, host: str, out: TextIO, *,
                 chunk_size: int = DEFAULT_CHUNK, max_bytes: int = MAX_TRANSFER_BYTES,
                 progress: TextIO | None = None) -> None:
        self.client = client
        self.rec = UploadRecord(transfers, path, host)
        self.ws = path
        self.host = host
        self.out = out
        self.progress = progress or out
        """Where progress lines go (stderr under ``--json``, so stdout stays one JSON document)."""
        self.chunk_size = chunk_size
        self.max_bytes = max_bytes
        self._offered = False

    # ---- lock ---------------------------------------------------------------------------

    async def lock(self, executor: str | None, *, as_json: bool = False) -> int:
        """Stage, pack, upload and lock; finish an interrupted lock."""
        rec, ws = self.rec, self.ws
        if rec.phase in ("locked", "downloading", "downloaded", "extracted", "unmarked", "restored"):
            self.progress.write(f"{ws} is already locked on executor {rec.state['executor']} (uploaded)\n")
            return 0
        if not rec.exists:
            if os.path.lexists(ws / MARKER):
                raise TransferStateError(f"{ws} holds a {MARKER} file but this machine has no record of "
                                         "its upload; it is locked elsewhere, or remove the file if stale")
            rec.set("started", path=str(ws), host=self.host, executor=executor,
                    outgoing=f".devsilo-outgoing-{secrets.token_hex(6)}",
                    root_mode=stat.S_IMODE(os.lstat(ws).st_mode))
        outgoing = ws / rec.state["outgoing"]
        if rec.phase == "started":
            os.chmod(ws, 0o700)
            outgoing.mkdir(mode=0o700, exist_ok=True)
            _move_all(ws, outgoing, frozenset({rec.state["outgoing"], MARKER, f"{MARKER}.tmp"}))
            _replace_marker(ws, _marker_text(ws, executor or "(being chosen)", uploading=True))
            rec.set("staged")
        if rec.phase == "staged":
            archive = rec.dir / "upload.tar"
            packed = pack_tree(outgoing, archive, max_bytes=self.max_bytes)
            size, sha, chunks = hash_chunks(archive, self.chunk_size)
            for skipped in packed.skipped:
                self.progress.write(f"warning: {skipped} is a FIFO, socket or device; it cannot travel and "
                               "stays in the upload's staging directory\n")
            rec.set("packed", plan={"transfer_id": f"ws-{secrets.token_hex(12)}", "size": size,
                                    "sha256": sha, "chunk_size": self.chunk_size, "chunk_sha256": chunks},
                    entries=packed.entries, skipped=list(packed.skipped))
        if rec.phase == "packed":
            await self._upload()
        if rec.phase == "uploaded":
            if not rec.state.get("skipped"):
                shutil.rmtree(outgoing)  # every entry is in the executor's storage now
            _replace_marker(ws, _marker_text(ws, rec.state["executor"], uploading=False))
            os.chmod(ws, 0o555)
            (rec.dir / "upload.tar").unlink(missing_ok=True)
            rec.set("locked")
        if as_json:
            self.out.write(json.dumps(rec.state.get("lock_result", {}), indent=2) + "\n")
        else:
            self.out.write(f"{ws} locked on executor {rec.state['executor']} (uploaded from {self.host}: "
                           f"{rec.state['entries']} entries, a {rec.state['plan']['size']}-byte archive)\n")
        return 0

    async def _upload(self) -> None:
        rec = self.rec
        plan = TransferPlan.model_validate(rec.state["plan"])
        await self.client.send(WorkspaceUpload(path=str(self.ws), workspace_host=self.host,
                                               executor=rec.state.get("executor"), plan=plan))
        st: WorkspaceUploadState = await _expect(self.client, WorkspaceUploadState)
        rec.set("packed", executor=st.executor)
        have = set(st.have)
        if have:
            self.progress.write(f"resuming upload: {len(have)} of {plan.chunks} chunks already uploaded\n")
        self.progress.write(f"uploading {plan.size} bytes in {plan.chunks - len(have)} chunk(s) to executor "
                       f"{st.executor}\n")
        self.progress.flush()
        for i in range(plan.chunks):
            if i in have:
                continue
            data = read_range(rec.dir / "upload.tar", i * plan.chunk_size, plan.chunk_len(i))
            await self.client.send(WorkspaceChunk(transfer_id=plan.transfer_id, index=i,
                                                  sha256=hashlib.sha256(data).hexdigest(),
                                                  data=base64.b64encode(data).decode()))
            ack: WorkspaceChunkAck = await _expect(self.client, WorkspaceChunkAck)
            if ack.index != i:
                raise GatewayError(f"the gateway acknowledged chunk {ack.index}, not {i}")
            _crash_point(f"upload.chunk.{i}")
        await self.client.send(WorkspaceUploadCommit(transfer_id=plan.transfer_id))
        res: WorkspaceResult = await _expect(self.client, WorkspaceResult)
        rec.set("uploaded", lock_result=res.model_dump(mode="json"))

    # ---- unlock -------------------------------------------------------------------------

    async def unlock(self, *, accept: bool, as_json: bool) -> int:
        """Fetch the result with its report, show the report, apply the result here."""
        rec, ws = self.rec, self.ws
        if rec.phase in ("started", "staged", "packed"):
            return self._cancel()
        if rec.phase == "uploaded":
            await self.lock(rec.state["executor"])  # finish the lock's last local step first
        if rec.phase == "locked":
            res = await self._request_unlock(accept)
            rec.set("downloading", result=res.model_dump(mode="json"),
                    incoming=f".devsilo-incoming-{secrets.token_hex(6)}")
        result = WorkspaceResult.model_validate(rec.state["result"])
        assert result.transfer is not None
        plan = result.transfer
        if as_json:
            self.out.write(json.dumps(result.model_dump(mode="json"), indent=2) + "\n")
        else:
            text = result.report_text
            self.out.write(text if text.endswith("\n") else text + "\n")
        self.out.flush()
        if rec.phase == "downloading":
            await self._download(plan, accept)
            rec.set("downloaded")
        incoming = ws / rec.state["incoming"]
        if rec.phase == "downloaded":
            os.chmod(ws, 0o700)
            shutil.rmtree(incoming, ignore_errors=True)
            incoming.mkdir(mode=0o700)
            unpack_tree(rec.dir / "download.tar", incoming, max_bytes=self.max_bytes)
            rec.set("extracted")
        if rec.phase == "extracted":
            for name in (MARKER, f"{MARKER}.tmp"):
                if os.path.lexists(ws / name):
                    os.unlink(ws / name)
            rec.set("unmarked")
        if rec.phase == "unmarked":
            _move_all(incoming, ws, frozenset())
            os.rmdir(incoming)
            outgoing = ws / rec.state["outgoing"]
            if outgoing.exists():  # FIFOs, sockets, devices: they never left this machine
                _move_all(outgoing, ws, frozenset())
                os.rmdir(outgoing)
            rec.set("restored")
        if rec.phase == "restored":
            os.chmod(ws, int(rec.state["root_mode"]))
            try:
                await self.client.send(WorkspaceTransferDone(transfer_id=plan.transfer_id))
                await _expect(self.client, WorkspaceTransferClosed)
            except GatewayError as exc:  # the chunks expire with the bucket's age limit anyway
                self.progress.write(f"warning: could not release the result on the gateway: {exc}\n")
            rec.forget()
        if not as_json:
            self.out.write(f"applied the result to {ws} (downloaded from executor "
                           f"{result.workspaces[0]['executor'] if result.workspaces else '?'})\n")
        if result.auto_exec_changed and not accept:
            if not as_json:
                self.out.write("An auto-exec surface changed: review it before running anything here "
                               "(`--accept` to acknowledge).\n")
            return EXIT_AUTO_EXEC
        return 0

    async def _request_unlock(self, accept: bool) -> WorkspaceResult:
        rec = self.rec
        await self.client.send(WorkspaceCommand(op="unlock", path=str(self.ws), workspace_host=self.host,
                                                executor=rec.state["executor"], accept=accept, uploaded=True))
        res: WorkspaceResult = await _expect(self.client, WorkspaceResult)
        self._offered = True
        if res.transfer is None:
            raise GatewayError(f"executor {rec.state['executor']} unlocked {self.ws} without sending "
                               "its files back")
        return res

    async def _download(self, plan: TransferPlan, accept: bool) -> None:
        rec = self.rec
        archive = rec.dir / "download.tar"
        if not self._offered:
            # The gateway hands out a result only right after unlocking it for us (again).
            res = await self._request_unlock(accept)
            if res.transfer != plan:
                raise TransferStateError(f"executor {rec.state['executor']} now offers another result "
                                         f"for {self.ws} than the one this machine started to apply")
        for i in range(plan.chunks):
            start = i * plan.chunk_size
            if archive.exists() and hashlib.sha256(read_range(archive, start, plan.chunk_len(i))).hexdigest() \
                    == plan.chunk_sha256[i]:
                continue  # fetched before an interruption
            await self.client.send(WorkspaceFetchChunk(transfer_id=plan.transfer_id, index=i))
            chunk: WorkspaceChunk = await _expect(self.client, WorkspaceChunk)
            data = base64.b64decode(chunk.data, validate=True)
            if chunk.index != i or len(data) != plan.chunk_len(i) \
                    or hashlib.sha256(data).hexdigest() != plan.chunk_sha256[i]:
                raise GatewayError(f"chunk {i} of {self.ws}'s result does not match its SHA-256; "
                                   "run unlock again")
            write_range(archive, start, data, size=plan.size)
            _crash_point(f"download.chunk.{i}")
        if file_sha256(archive) != plan.sha256:
            archive.unlink()
            raise GatewayError(f"the result of {self.ws} does not match its SHA-256 as a whole; run "
                               "unlock again")

    def _cancel(self) -> int:
        """Put back the files of an upload that never locked (the executor holds nothing)."""
        rec, ws = self.rec, self.ws
        outgoing = ws / rec.state["outgoing"]
        os.chmod(ws, 0o700)
        if outgoing.exists():
            _move_all(outgoing, ws, frozenset())
            os.rmdir(outgoing)
        for name in (MARKER, f"{MARKER}.tmp"):
            if os.path.lexists(ws / name):
                os.unlink(ws / name)
        os.chmod(ws, int(rec.state["root_mode"]))
        rec.forget()
        self.out.write(f"{ws} was never completely uploaded; its files are back in place, unchanged\n")
        return 0


async def lock_or_upload(client: GatewayClient, cmd: WorkspaceCommand) -> WorkspaceResult | WorkspaceUploadNeeded:
    """Ask for a lock where the path is; the gateway may answer that it must be uploaded."""
    await client.send(cmd)
    async for frame in client.frames():
        if isinstance(frame, WorkspaceResult | WorkspaceUploadNeeded):
            return frame
    raise GatewayError("the gateway closed the connection before answering")


async def workspace_on_gateway(target: Any, transfers: Path, cmd: WorkspaceCommand, out: TextIO, *,
                               as_json: bool, upload: bool, chunk_size: int,
                               state_dirs: list[Path]) -> int:
    """`silo workspace lock|unlock|status PATH` when the workspace is (or may become) uploaded.

    A path this machine uploaded is handled here from its record; ``lock``
    asks the gateway first and uploads when it answers that the executor
    is elsewhere (or at once with ``upload``).
    """
    from devsilo.executor._risk import check_workspace

    from ._sessions import _print_workspace

    assert cmd.path is not None and cmd.workspace_host is not None
    path = Path(cmd.path)
    rec = UploadRecord(transfers, path, cmd.workspace_host)
    async with GatewayClient(target.url, target.fingerprint, client_name="silo-workspace") as client:
        await client.connect(target.token)
        remote = RemoteWorkspace(client, transfers, path, cmd.workspace_host, out, chunk_size=chunk_size,
                                 progress=sys.stderr if as_json else out)
        if cmd.op == "unlock" and rec.exists:
            try:
                return await remote.unlock(accept=cmd.accept, as_json=as_json)
            except SiloError as exc:
                raise TransferStateError(f"{exc}\nunlock of {path} is not finished; no file is lost: run "
                                         f"`silo workspace unlock {path}` again to finish it") from exc
        if cmd.op == "status" and rec.exists:
            if rec.phase in ("started", "staged", "packed"):
                out.write(f"{path}: being uploaded (interrupted at {rec.phase}); run `silo workspace lock "
                          f"{path} --upload` to finish or `unlock` to put the files back\n")
                return 0
            await client.send(cmd.model_copy(update={"uploaded": True, "executor": rec.state["executor"]}))
            res = await _expect(client, WorkspaceResult)
            return _print_workspace(res, cmd, out, as_json=as_json)
        if cmd.op != "lock":
            await client.send(cmd)
            return _print_workspace(await _expect(client, WorkspaceResult), cmd, out, as_json=as_json)
        executor = rec.state.get("executor") if rec.exists else cmd.executor
        if not rec.exists:
            check_workspace(str(path), state_dirs)  # /, home and state directories never travel either
            if not upload:
                answer = await lock_or_upload(client, cmd)
                if isinstance(answer, WorkspaceResult):
                    return _print_workspace(answer, cmd, out, as_json=as_json)
                remote.progress.write(f"{answer.reason}: uploading {path} to executor {answer.executor}\n")
                executor = answer.executor
        try:
            return await remote.lock(executor, as_json=as_json)
        except SiloError as exc:
            if not remote.rec.exists:
                raise
            raise TransferStateError(
                f"{exc}\nthe upload of {path} is not finished; its files are kept in "
                f"{path / remote.rec.state['outgoing']}: run `silo workspace lock {path} --upload` to finish "
                f"it, or `silo workspace unlock {path}` to put them back") from exc
