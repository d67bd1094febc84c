"""Client file uploads into a session's workspace.

A client announces a file (path, size, SHA-256), sends it in base64 chunks
in order, and the gateway spools them to a private temporary file, counting
and hashing as they come. When the last byte is in and the hash matches,
the file goes to the workspace object store and the session's executor is
asked to land it (it checks size, hash and path again and writes through
the sandbox's helper); then the session's harness is told (``SessionInput``
kind ``upload``), which shows a ``file_shared`` event to every client.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import tempfile
from dataclasses import dataclass, field
from typing import IO, Any

from devsilo.protocol import (
    Ack,
    FileUpload,
    FileUploaded,
    RemoteError,
    Role,
    SessionInput,
    UploadError,
    subjects,
    workspace_relative,
)
from devsilo.protocol.client import (
    UPLOAD_CHUNK,
    UploadChunk,
    UploadDone,
    UploadFile,
    UploadProgress,
    UploadReady,
)
from devsilo.runtime import Bus
from devsilo.runtime._workspace_objects import open_bucket
from nats.errors import Error as NatsError

from ._sessions import SessionRecord

DEFAULT_UPLOAD_MAX = 64 * 1024 * 1024
"""Largest file a client may upload (gateway option ``upload_max_bytes``)."""
MAX_OPEN_UPLOADS = 4
"""Uploads one connection may have in progress at once."""
EXECUTOR_TIMEOUT_S = 120.0
HARNESS_TIMEOUT_S = 10.0


@dataclass
class PendingUpload:
    """An upload a connection started: where it goes and what has arrived."""

    record: SessionRecord
    path: str
    size: int
    sha256: str
    spool: IO[bytes]
    received: int = 0
    hasher: Any = field(default_factory=hashlib.sha256)


class ConnectionUploads:
    """One client connection's uploads (they end with it)."""

    def __init__(self, bus: Bus, client: str, log: Any, *, max_bytes: int = DEFAULT_UPLOAD_MAX) -> None:
        self.bus = bus
        self.log = log
        self.client = client
        self.max_bytes = max_bytes
        self._open: dict[str, PendingUpload] = {}

    def begin(self, req: UploadFile, record: SessionRecord) -> UploadReady:
        """Check an announced upload and make room for it."""
        path = workspace_relative(req.path)
        if req.size > self.max_bytes:
            raise UploadError("upload_too_large", f"{req.path} is {req.size} bytes; this gateway takes "
                              f"files up to {self.max_bytes} bytes")
        if req.upload_id in self._open:
            raise UploadError("upload_bad_chunk", f"upload {req.upload_id} is already in progress")
        if len(self._open) >= MAX_OPEN_UPLOADS:
            raise UploadError("upload_bad_chunk", f"{MAX_OPEN_UPLOADS} uploads are in progress on this "
                              "connection; finish one first")
        # Closed when the upload ends (landed, refused, or its connection closed).
        spool = tempfile.TemporaryFile(prefix="silo-upload-")  # noqa: SIM115
        self._open[req.upload_id] = PendingUpload(record, path, req.size, req.sha256, spool)
        return UploadReady(upload_id=req.upload_id, chunk_size=UPLOAD_CHUNK)

    async def chunk(self, req: UploadChunk) -> UploadProgress | UploadDone:
        """Store one chunk; after the last one, check the hash and land the file."""
        up = self._open.get(req.upload_id)
        if up is None:
            raise UploadError("upload_unknown", f"no upload {req.upload_id} in progress on this connection; "
                              "start it with upload_file")
        try:
            data = base64.b64decode(req.data, validate=True)
        except (binascii.Error, ValueError):
            self._abort(req.upload_id)
            raise UploadError("upload_bad_chunk", f"chunk at {req.offset} of {req.upload_id} is not base64; "
                              "the upload was abandoned") from None
        if req.offset != up.received or up.received + len(data) > up.size or len(data) > UPLOAD_CHUNK:
            self._abort(req.upload_id)
            raise UploadError("upload_bad_chunk", f"chunk of {len(data)} bytes at {req.offset} does not fit "
                              f"upload {req.upload_id} ({up.received} of {up.size} bytes received, chunks "
                              f"of at most {UPLOAD_CHUNK}); the upload was abandoned")
        up.spool.write(data)
        up.hasher.update(data)
        up.received += len(data)
        if up.received < up.size:
            return UploadProgress(upload_id=req.upload_id, received=up.received)
        self._open.pop(req.upload_id)
        try:
            return await self._land(req.upload_id, up)
        finally:
            up.spool.close()

    async def _land(self, upload_id: str, up: PendingUpload) -> UploadDone:
        got = up.hasher.hexdigest()
        if got != up.sha256:
            raise UploadError("upload_hash_mismatch", f"{up.path}: the bytes received hash to {got}, not the "
                              f"announced {up.sha256}; nothing was written")
        rec = up.record
        sid = rec.session_id
        name = f"upload-{secrets.token_hex(16)}"
        obs = await open_bucket(self.bus.js)
        up.spool.seek(0)
        await obs.put(name, up.spool)
        try:
            landed = await self.bus.request(
                subjects.exec_upload(rec.executor_id, sid),
                FileUpload(path=up.path, size=up.size, sha256=up.sha256, object_name=name),
                FileUploaded, from_role=Role.EXECUTOR, sid=sid, timeout=EXECUTOR_TIMEOUT_S)
        except RemoteError as exc:
            if exc.code.startswith("upload_"):
                raise UploadError(exc.code, exc.message) from None
            raise
        finally:
            try:
                await obs.delete(name)
            except (NatsError, TimeoutError) as exc:  # the bucket's TTL drops it
                self.log.info("upload_object_left", object=name, error=str(exc))
        notice = json.dumps({"path": landed.path, "size": landed.size, "sha256": landed.sha256})
        await self.bus.request(subjects.session_input(sid),
                               SessionInput(kind="upload", text=notice, client=self.client),
                               Ack, from_role=Role.HARNESS, sid=sid, timeout=HARNESS_TIMEOUT_S)
        return UploadDone(upload_id=upload_id, session_id=sid, path=landed.path, size=landed.size,
                          sha256=landed.sha256)

    def _abort(self, upload_id: str) -> None:
        up = self._open.pop(upload_id, None)
        if up is not None:
            up.spool.close()

    def close(self) -> None:
        """Drop every unfinished upload."""
        for upload_id in list(self._open):
            self._abort(upload_id)
