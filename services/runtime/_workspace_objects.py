"""Workspace archives in the JetStream object store, one object per chunk of a TransferPlan.

One object per chunk makes an upload resumable (a chunk is there or not)
and keeps every read small. The object store's own digest only guards
against storage faults; what counts is the plan's hash, which arrived in a
signed message: every chunk read back is checked against it, and so is the
whole archive.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from devsilo.protocol import SiloError, TransferPlan, subjects
from devsilo.runtime._tree_archive import file_sha256, hash_chunks, read_range, write_range
from nats.js.api import ObjectMeta, ObjectMetaOptions, ObjectStoreConfig
from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError, NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

BUCKET_TTL_S = 14 * 24 * 3600.0
"""Chunks of a transfer nobody finished are dropped after this long."""


PARALLEL = 8
"""Object store requests in flight at once for one transfer (each is a round trip to NATS)."""

T = TypeVar("T")


class TransferError(SiloError):
    """A chunk or an archive did not match its plan, or the object store failed."""


async def for_each_chunk(plan: TransferPlan, fn: Callable[[int], Awaitable[T]],
                         limit: int = PARALLEL) -> list[T]:
    """``fn(i)`` for every chunk index, ``limit`` at a time; results in index order."""
    gate = asyncio.Semaphore(limit)

    async def one(i: int) -> T:
        async with gate:
            return await fn(i)

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(one(i)) for i in range(plan.chunks)]
    return [t.result() for t in tasks]


async def chunks_present(obs: ObjectStore, plan: TransferPlan) -> list[int]:
    """The indexes of the chunks stored with exactly the planned content."""
    present = await for_each_chunk(plan, lambda i: chunk_present(obs, plan, i))
    return [i for i, ok in enumerate(present) if ok]


async def open_bucket(js: JetStreamContext) -> ObjectStore:
    """The workspace-transfer bucket, created on first use."""
    try:
        return await js.object_store(subjects.WORKSPACE_OBJECTS)
    except (BucketNotFoundError, NotFoundError):
        return await js.create_object_store(subjects.WORKSPACE_OBJECTS, ObjectStoreConfig(
            description="devsilo workspace archives between machines", ttl=BUCKET_TTL_S))


def _digest(data: bytes) -> str:
    return "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()


async def chunk_present(obs: ObjectStore, plan: TransferPlan, index: int) -> bool:
    """Whether chunk ``index`` is stored with exactly the planned content."""
    try:
        info = await obs.get_info(plan.object_name(index))
    except (ObjectNotFoundError, NotFoundError):
        return False
    want = base64.urlsafe_b64encode(bytes.fromhex(plan.chunk_sha256[index])).decode()
    return info.size == plan.chunk_len(index) and (info.digest or "").endswith(want)


def check_chunk(plan: TransferPlan, index: int, data: bytes) -> None:
    """Raise TransferError unless ``data`` is exactly chunk ``index`` of ``plan``."""
    if not 0 <= index < plan.chunks:
        raise TransferError(f"chunk {index} is outside transfer {plan.transfer_id} "
                            f"(0..{plan.chunks - 1})")
    if len(data) != plan.chunk_len(index):
        raise TransferError(f"chunk {index} of transfer {plan.transfer_id} has {len(data)} bytes, "
                            f"the plan says {plan.chunk_len(index)}")
    if hashlib.sha256(data).hexdigest() != plan.chunk_sha256[index]:
        raise TransferError(f"chunk {index} of transfer {plan.transfer_id} does not match its "
                            "SHA-256 in the plan; it was corrupted or forged and is refused")


async def put_chunk(obs: ObjectStore, plan: TransferPlan, index: int, data: bytes) -> None:
    """Store chunk ``index`` after checking it against the plan."""
    check_chunk(plan, index, data)
    # One NATS message per chunk (at most 512 KiB, under the 1 MiB payload limit), not four.
    meta = ObjectMeta(name=plan.object_name(index), options=ObjectMetaOptions(max_chunk_size=len(data)))
    await obs.put(plan.object_name(index), data, meta=meta)


async def get_chunk(obs: ObjectStore, plan: TransferPlan, index: int) -> bytes:
    """Read chunk ``index`` back, checked against the plan."""
    try:
        res = await obs.get(plan.object_name(index))
    except (ObjectNotFoundError, NotFoundError) as e:
        raise TransferError(f"chunk {index} of transfer {plan.transfer_id} is not in the object "
                            "store (expired or never uploaded); start the transfer again") from e
    data = bytes(res.data or b"")
    check_chunk(plan, index, data)
    return data


async def fetch_archive(obs: ObjectStore, plan: TransferPlan, dest: Path) -> None:
    """Write the whole archive of ``plan`` to ``dest``, every chunk and the whole checked."""
    tmp = dest.with_name(dest.name + ".partial")
    tmp.unlink(missing_ok=True)

    async def fetch(i: int) -> None:
        data = await get_chunk(obs, plan, i)
        await asyncio.to_thread(write_range, tmp, i * plan.chunk_size, data, size=plan.size)

    await for_each_chunk(plan, fetch)
    if await asyncio.to_thread(file_sha256, tmp) != plan.sha256:
        tmp.unlink()
        raise TransferError(f"transfer {plan.transfer_id} does not match its SHA-256 as a whole; "
                            "it is refused")
    tmp.replace(dest)


async def publish_archive(obs: ObjectStore, archive: Path, transfer_id: str,
                          chunk_size: int) -> TransferPlan:
    """Put ``archive`` into the store as ``transfer_id``'s chunks (those already there are kept)."""
    size, sha, chunks = await asyncio.to_thread(hash_chunks, archive, chunk_size)
    plan = TransferPlan(transfer_id=transfer_id, size=size, sha256=sha, chunk_size=chunk_size,
                        chunk_sha256=chunks)
    async def publish(i: int) -> None:
        if not await chunk_present(obs, plan, i):
            data = await asyncio.to_thread(read_range, archive, i * chunk_size, plan.chunk_len(i))
            await put_chunk(obs, plan, i, data)

    await for_each_chunk(plan, publish)
    return plan


async def delete_transfer(obs: ObjectStore, plan: TransferPlan) -> None:
    """Remove every chunk of ``plan`` (missing ones are fine)."""
    async def delete(i: int) -> None:
        try:
            await obs.delete(plan.object_name(i))
        except (ObjectNotFoundError, NotFoundError):
            return

    await for_each_chunk(plan, delete)
