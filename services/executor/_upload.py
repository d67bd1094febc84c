"""A client's uploaded file, landed in a session's workspace through its sandbox's helper.

The gateway already checked the bytes; the executor checks again what it is
about to write (size, SHA-256, limit) and where: the path must be relative
with no ``..`` or NUL (``workspace_relative``), and no component on the way,
nor the file itself, may be a symbolic link or anything but a directory
(then a regular file) in the workspace as the executor sees it. The write
itself goes through the helper, as the sandbox's user, inside the sandbox:
even a link swapped in meanwhile by the agent cannot lead it anywhere the
sandbox could not already write.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

from devsilo.protocol import FileUpload, FileUploaded, UploadError, workspace_relative
from devsilo.runtime._workspace_objects import open_bucket
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError, ObjectNotFoundError

from ._helper_client import HelperClient

DEFAULT_UPLOAD_MAX = 64 * 1024 * 1024
"""Largest upload an executor writes (executor option ``upload_max_bytes``)."""
WRITE_PIECE = 4 * 1024 * 1024
"""Bytes per helper write (its request line holds base64 of up to 8 MiB)."""


def check_landing(workspace: Path, rel: str) -> None:
    """UploadError ``upload_bad_path`` when ``rel`` leads through or onto a link, or onto a non-file."""
    parts = rel.split("/")
    here = workspace
    for i, part in enumerate(parts):
        here = here / part
        shown = "/".join(parts[: i + 1])
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            return  # the rest does not exist yet: the write creates it
        except OSError as exc:
            raise UploadError("upload_bad_path", f"cannot check {shown} in the workspace: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            raise UploadError("upload_bad_path", f"{shown} is a symbolic link in the workspace; uploads never "
                              "follow links")
        last = i == len(parts) - 1
        if not last and not stat.S_ISDIR(st.st_mode):
            raise UploadError("upload_bad_path", f"{shown} is not a directory")
        if last and not stat.S_ISREG(st.st_mode):
            raise UploadError("upload_bad_path", f"{shown} exists and is not a regular file")


async def land_upload(js: JetStreamContext, helper: HelperClient, workspace: Path, req: FileUpload, *,
                      max_bytes: int = DEFAULT_UPLOAD_MAX) -> FileUploaded:
    """Fetch the upload's bytes, check them and where they go, and write them into the workspace."""
    rel = workspace_relative(req.path)
    if req.size > max_bytes:
        raise UploadError("upload_too_large", f"{rel} is {req.size} bytes; executor limit {max_bytes}")
    check_landing(workspace, rel)
    obs = await open_bucket(js)
    with tempfile.TemporaryFile(prefix="silo-upload-") as spool:
        try:
            info = await obs.get_info(req.object_name)
            if info.size != req.size:
                raise UploadError("upload_hash_mismatch", f"stored upload is {info.size} bytes, not {req.size}")
            await obs.get(req.object_name, writeinto=spool)
        except (ObjectNotFoundError, NotFoundError):
            raise UploadError("upload_unknown", f"upload object {req.object_name} is not stored") from None
        spool.seek(0)
        digest = hashlib.sha256()
        for piece in iter(lambda: spool.read(1024 * 1024), b""):
            digest.update(piece)
        if spool.tell() != req.size or digest.hexdigest() != req.sha256:
            raise UploadError("upload_hash_mismatch", f"stored upload of {rel} does not match its size and "
                              "sha256; nothing was written")
        spool.seek(0)
        first = True
        while first or spool.tell() < req.size:
            await helper.write(rel, spool.read(WRITE_PIECE), append=not first)
            first = False
    return FileUploaded(path=rel, size=req.size, sha256=req.sha256)
