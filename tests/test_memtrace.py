"""The memory-growth reports (``SILO_MEMTRACE_DIR``) and the heap trim, run in this process."""

from __future__ import annotations

import asyncio
import tracemalloc
from pathlib import Path

import pytest
from devsilo.runtime._heap import malloc_info, trim_heap
from devsilo.runtime._memtrace import pymalloc_info, trace_memory, wanted


def test_only_the_named_services_trace(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SILO_MEMTRACE_DIR", raising=False)
    assert wanted("gateway") is None
    monkeypatch.setenv("SILO_MEMTRACE_DIR", str(tmp_path))
    assert wanted("gateway") == tmp_path
    monkeypatch.setenv("SILO_MEMTRACE_SERVICES", "harness, gateway")
    assert wanted("gateway") == tmp_path and wanted("executor") is None


def test_heap_figures_follow_what_is_allocated() -> None:
    before = pymalloc_info()
    small = [object() for _ in range(200_000)]  # small objects: Python's own allocator
    assert pymalloc_info()["in_blocks"] > before["in_blocks"] + 200_000 * 16
    heap = malloc_info()
    assert heap is not None  # glibc, as on every machine devsilo runs on
    big = [bytearray(4000) for _ in range(2000)]  # above 512 bytes: glibc's malloc
    assert malloc_info()["in_use"] >= heap["in_use"] + 2000 * 4000  # type: ignore[index]
    del small, big
    assert trim_heap()


@pytest.mark.asyncio
async def test_reports_show_what_grew_and_where(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SILO_MEMTRACE_EVERY_S", "0.05")
    monkeypatch.setenv("SILO_MEMTRACE_FRAMES", "4")
    monkeypatch.setenv("SILO_MEMTRACE_TRIM", "1")
    stopping = asyncio.Event()
    task = asyncio.create_task(trace_memory("svc", tmp_path, stopping))
    hoard: list[bytes] = []
    try:
        while not (tmp_path / "svc-0001.txt").exists():
            hoard.append(b"grown here %d" % len(hoard) * 50)  # this line's growth must show in report 1
            await asyncio.sleep(0.005)
    finally:
        stopping.set()
        await task
    assert not tracemalloc.is_tracing()
    first, second = (tmp_path / "svc-0000.txt").read_text(), (tmp_path / "svc-0001.txt").read_text()
    for text in (first, second):
        assert "rss " in text and "malloc arena" in text and "pymalloc arenas" in text
        assert "gc.collect() found" in text and "malloc_trim(0): rss" in text
    assert "growth since report 0" not in first
    assert "growth since report 0, by traceback" in second and "test_memtrace.py" in second
    assert tracemalloc.Snapshot.load(str(tmp_path / "svc-0001.snapshot")).traces


async def test_the_periodic_trim_runs_until_stopped_and_a_cancel_ends_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from devsilo.runtime import _heap

    trims: list[int] = []
    monkeypatch.setattr(_heap, "trim_heap", lambda: trims.append(1) or True)
    stopping = asyncio.Event()
    task = asyncio.create_task(_heap.trim_heap_every(0.01, stopping))
    while len(trims) < 3:
        await asyncio.sleep(0.01)
    stopping.set()
    await asyncio.wait_for(task, 2.0)  # stopped: it returns
    cancelled = asyncio.create_task(_heap.trim_heap_every(0.01, asyncio.Event()))
    await asyncio.sleep(0.05)
    cancelled.cancel()
    done, _ = await asyncio.wait({cancelled}, timeout=2.0)
    assert done == {cancelled} and cancelled.cancelled()
