"""Finding memory growth in a running service: periodic ``tracemalloc`` reports (a debugging aid).

Set ``SILO_MEMTRACE_DIR`` in the environment of ``silo up`` (services inherit
it) and every service named in ``SILO_MEMTRACE_SERVICES`` (comma-separated
service ids; all when unset) starts ``tracemalloc`` and writes a report every
``SILO_MEMTRACE_EVERY_S`` seconds (60) to ``<dir>/<service id>-<n>.txt``:
its RSS; what glibc's allocator holds, uses and has free (``mallinfo2``) and
what Python's own allocator holds in its arenas and in live blocks (to tell
live objects from fragmentation); object counts by type; and, unless
``SILO_MEMTRACE_FRAMES`` is 0 (heap figures only, no tracing cost), what
``tracemalloc`` traces and the allocations grown since the first report, by
line and by traceback. With ``SILO_MEMTRACE_TRIM=1`` each report ends with
``malloc_trim(0)`` and the RSS it gave back: free heap that only held pages
(each snapshot is also dumped to
``<dir>/<service id>-<n>.snapshot``: ``tracemalloc.Snapshot.load`` compares any
two). Tracing costs CPU and memory of its own; leave it off
otherwise.
"""

from __future__ import annotations

import asyncio
import gc
import linecache
import os
import time
import tracemalloc
from collections import Counter
from pathlib import Path

from ._heap import malloc_info, trim_heap
from ._waits import set_within

MEMTRACE_DIR_ENV = "SILO_MEMTRACE_DIR"
MEMTRACE_SERVICES_ENV = "SILO_MEMTRACE_SERVICES"
MEMTRACE_EVERY_ENV = "SILO_MEMTRACE_EVERY_S"
MEMTRACE_FRAMES_ENV = "SILO_MEMTRACE_FRAMES"
MEMTRACE_TRIM_ENV = "SILO_MEMTRACE_TRIM"
FRAMES = 12
TOP = 25
ARENA = 1 << 20
"""Bytes in one of pymalloc's arenas (CPython 3.10 and later on 64-bit)."""


def pymalloc_info() -> dict[str, int]:
    """Python's small-object allocator: bytes in its arenas, in live blocks, and free in its pools."""
    import sys
    import tempfile

    with tempfile.TemporaryFile("w+") as out:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read()
    wanted_keys = {"# arenas allocated current": "arenas", "# bytes in allocated blocks": "in_blocks",
                   "# bytes in available blocks": "free_blocks", "# bytes lost to pool headers": "headers",
                   "# bytes lost to quantization": "quantization"}
    info: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        name = "unused_pools" if "unused pools" in key else wanted_keys.get(key.strip())
        if name is not None:
            info[name] = int(value.strip().replace(",", ""))
    return info


def rss_bytes() -> int:
    """This process's resident set size (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def wanted(service_id: str) -> Path | None:
    """The report directory when the environment asks this service to trace its memory."""
    directory = os.environ.get(MEMTRACE_DIR_ENV)
    if not directory:
        return None
    only = {s.strip() for s in os.environ.get(MEMTRACE_SERVICES_ENV, "").split(",") if s.strip()}
    return Path(directory) if not only or service_id in only else None


def _object_counts() -> Counter[str]:
    """Live objects the collector tracks, by type name."""
    by_type: Counter[type] = Counter(map(type, gc.get_objects()))
    counts: Counter[str] = Counter()
    for kind, count in by_type.items():
        counts[kind.__name__] += count
    return counts


def _report(service_id: str, n: int, started: float, pymalloc: dict[str, int], counts: Counter[str],
            snap: tracemalloc.Snapshot | None, first: tracemalloc.Snapshot | None) -> str:
    lines = [f"{service_id} report {n} at {time.time() - started:.0f} s", f"rss {rss_bytes() / 2**20:.2f} MiB"]
    if tracemalloc.is_tracing():
        traced, peak = tracemalloc.get_traced_memory()
        lines.append(f"traced {traced / 2**20:.2f} MiB (peak {peak / 2**20:.2f}); "
                     f"tracemalloc's own {tracemalloc.get_tracemalloc_memory() / 2**20:.2f} MiB")
    heap = malloc_info()
    if heap is not None:
        lines.append("malloc " + "; ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in heap.items()))
    py = pymalloc.copy()
    arenas = py.pop("arenas", 0)
    lines.append(f"pymalloc arenas {arenas} ({arenas * ARENA / 2**20:.2f} MiB); "
                 + "; ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in py.items()))
    lines.append("objects by type: " + ", ".join(f"{k} {v}" for k, v in counts.most_common(TOP)))
    if snap is not None and first is not None:
        for key in ("lineno", "traceback"):
            lines.append(f"\n-- growth since report 0, by {key} --")
            for stat in snap.compare_to(first, key)[:TOP]:
                lines.append(f"{stat.size_diff / 1024:+.1f} KiB ({stat.count_diff:+d} blocks), now "
                             f"{stat.size / 1024:.1f} KiB")
                frames = stat.traceback.format() if key == "traceback" else stat.traceback.format()[:1]
                lines.extend("    " + f for f in frames)
    return "\n".join(lines) + "\n"


async def trace_memory(service_id: str, directory: Path, stopping: asyncio.Event) -> None:
    """Write a report every ``SILO_MEMTRACE_EVERY_S`` seconds until ``stopping`` is set."""
    every = float(os.environ.get(MEMTRACE_EVERY_ENV) or 60.0)
    frames = int(os.environ.get(MEMTRACE_FRAMES_ENV) or FRAMES)
    directory.mkdir(parents=True, exist_ok=True)
    if frames:
        tracemalloc.start(frames)
    started = time.time()
    first: tracemalloc.Snapshot | None = None
    skip = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, linecache.__file__),
            tracemalloc.Filter(False, __file__)]
    n = 0
    try:
        while not await set_within(stopping, every):
            # In this thread: another one would get a malloc arena of its own and change what is measured.
            before = _object_counts()
            freed = gc.collect()
            after = _object_counts()
            snap = tracemalloc.take_snapshot().filter_traces(skip) if frames else None
            text = _report(service_id, n, started, pymalloc_info(), after, snap, first)
            if os.environ.get(MEMTRACE_TRIM_ENV) == "1":
                rss_before = rss_bytes()
                trim_heap()
                text += f"\nmalloc_trim(0): rss {rss_before / 2**20:.2f} -> {rss_bytes() / 2**20:.2f} MiB\n"
            text += (f"\ngc.collect() found {freed} unreachable objects (cyclic garbage the collector had not "
                     "reached yet); by type: "
                     + ", ".join(f"{k} {v}" for k, v in (before - after).most_common(TOP)) + "\n")
            (directory / f"{service_id}-{n:04d}.txt").write_text(text)
            if snap is not None:
                snap.dump(str(directory / f"{service_id}-{n:04d}.snapshot"))  # compare any two offline
                first = first or snap
            n += 1
    finally:
        if frames:
            tracemalloc.stop()
