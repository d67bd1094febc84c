"""Workspaces moved between machines: the plan of a chunked, hash-checked transfer.

A workspace locked on an executor that cannot see the client's path travels
as one archive (an uncompressed tar) split into fixed-size chunks. The plan
names the archive's size, its SHA-256 and every chunk's SHA-256; it travels
in signed messages (client frame, WorkspaceRequest, WorkspaceReply), so the
chunks themselves can ride on a carrier that signs nothing (the JetStream
object store, the client's WebSocket) and still be checked by every receiver.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

MIN_CHUNK = 4 * 1024
MAX_CHUNK = 512 * 1024
"""A chunk, base64-encoded in one JSON frame, stays under the 1 MiB client frame limit."""
DEFAULT_CHUNK = MAX_CHUNK
MAX_TRANSFER_BYTES = 2 * 1024 * 1024 * 1024
"""The largest archive the protocol admits; gateways and executors may set less."""
MAX_CHUNKS = MAX_TRANSFER_BYTES // MIN_CHUNK
_SHA256 = r"^[0-9a-f]{64}$"
TRANSFER_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class TransferPlan(BaseModel):
    """One archive in chunks: ``chunk_sha256[i]`` covers bytes ``[i*chunk_size, ...)``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    transfer_id: str = Field(pattern=TRANSFER_ID_PATTERN)
    size: int = Field(gt=0, le=MAX_TRANSFER_BYTES)
    sha256: str = Field(pattern=_SHA256)
    chunk_size: int = Field(ge=MIN_CHUNK, le=MAX_CHUNK)
    chunk_sha256: tuple[str, ...] = Field(max_length=MAX_CHUNKS)

    @model_validator(mode="after")
    def _chunks_cover_size(self) -> TransferPlan:
        want = -(-self.size // self.chunk_size)
        if len(self.chunk_sha256) != want:
            raise ValueError(f"{self.size} bytes in chunks of {self.chunk_size} are {want} chunks, "
                             f"the plan lists {len(self.chunk_sha256)}")
        for h in self.chunk_sha256:
            if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
                raise ValueError("every chunk hash is 64 lowercase hex digits")
        return self

    @property
    def chunks(self) -> int:
        """How many chunks the archive has."""
        return len(self.chunk_sha256)

    def chunk_len(self, index: int) -> int:
        """The exact length of chunk ``index`` (the last one may be short)."""
        if not 0 <= index < self.chunks:
            raise IndexError(f"chunk {index} is outside 0..{self.chunks - 1}")
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def object_name(self, index: int) -> str:
        """The object store name of chunk ``index``."""
        return f"{self.transfer_id}.{index}"


class RemoteLock(BaseModel):
    """A workspace of another machine locked on an executor: that machine's host and path."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    host: str = Field(max_length=255)
    path: str = Field(max_length=4096)
    user: str = Field(max_length=128)
