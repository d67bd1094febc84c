"""One harness process driving N concurrent scripted sessions, as N grows, against bare baselines.

    .venv/bin/python bench/harness.py [--n 1,2,4,8,16,32,64] [--calls 20] [--warm W]

Starts a whole stack (`silo up`, bwrap sandboxes, one executor with room for
every session; ``--warm W`` gives it W warm bwrap sandboxes, otherwise the
executor's default). For each N it starts N headless sessions at once, the
way the gateway does (a gateway-signed grant and a ``StartSession`` request to
the harness over NATS; one user per session, since a single user may hold at
most 8 sandboxes), each driven by the mock model through ``--calls`` ``Bash
true`` tool calls and then ``Exit``, and follows every session's event stream
from JetStream until its ``shutdown``. Measured per N:

- **sessions/s**: N divided by the time from sending the first start to the
  last ``SessionStarted`` reply (each start leases a sandbox);
- **tool calls/s**: all tool calls divided by the time from the first
  ``tool_use`` event to the last ``tool_result`` event;
- **p99 tool ms**: the harness's own ``tool_result.ts - tool_use.ts`` (its
  clock, one machine), over every call;
- **harness CPU ms/call**: user + system CPU of the harness process (from
  ``/proc/<pid>/stat``) over the whole run of N sessions, starts and ends
  included, divided by the tool calls.

Baselines, measured in the same run right before each N, with the same
concurrency: N concurrent bare ``bwrap`` starts (``--unshare-all``, ``/usr``
read-only, ``true``) for sessions/s; N concurrent workers each running
``--calls`` bare ``sh -c true`` subprocesses (``asyncio.create_subprocess_exec``)
for tool calls/s, p99 latency and CPU per call (this process's own CPU plus
its children's). Each devsilo figure is printed beside its baseline with the
ratio (for rates, baseline/devsilo: how many times slower devsilo is).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from devsilo.protocol import (
    LLMChoice,
    MessageRejected,
    Role,
    SessionEvent,
    SessionGrant,
    SessionStarted,
    Signer,
    StartSession,
    seal_grant,
    subjects,
)
from devsilo.runtime import Bus, ServiceMetrics, configure_logging
from devsilo.runtime._natsconn import connect_nats
from devsilo.runtime._state import StateDir
from devsilo.testing import Stack
from nats.js.api import ConsumerConfig, DeliverPolicy

TICKS = os.sysconf("SC_CLK_TCK")


def pct(samples: list[float], p: float) -> float:
    """The p-th percentile, linear between nearest ranks."""
    s = sorted(samples)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def proc_cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` in seconds, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def self_cpu_s() -> float:
    """This process's CPU plus that of its waited-for children, in seconds."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


# --- baselines --------------------------------------------------------------------------------

BWRAP = shutil.which("bwrap") or "bwrap"


async def bare_starts(n: int) -> float:
    """N concurrent bare bwrap sandboxes running ``true``: starts per second."""
    args = [BWRAP, "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr",
            "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
            "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "true"]

    async def one() -> None:
        proc = await asyncio.create_subprocess_exec(*args)
        if await proc.wait() != 0:
            raise SystemExit("bare bwrap failed")

    t = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return n / (time.perf_counter() - t)


@dataclass
class ToolFigures:
    rate: float
    p99_ms: float
    cpu_ms: float


async def bare_calls(n: int, calls: int) -> ToolFigures:
    """N concurrent workers each running ``calls`` bare ``sh -c true``."""
    lat: list[float] = []

    async def worker() -> None:
        for _ in range(calls):
            t = time.perf_counter()
            proc = await asyncio.create_subprocess_exec("sh", "-c", "true")
            await proc.wait()
            lat.append((time.perf_counter() - t) * 1000)

    cpu0, t0 = self_cpu_s(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(n)))
    wall, cpu = time.perf_counter() - t0, self_cpu_s() - cpu0
    return ToolFigures(len(lat) / wall, pct(lat, 99), cpu * 1000 / len(lat))


# --- through devsilo --------------------------------------------------------------------------

@dataclass
class Session:
    sid: str
    uses: dict[str, float] = field(default_factory=dict)
    results: dict[str, float] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    exit_code: int | None = None


@dataclass
class RunFigures:
    starts_per_s: float
    tools: ToolFigures
    errors: int


async def follow(bus: Bus, s: Session) -> None:
    sub = await bus.js.subscribe(subjects.session_events(s.sid), ordered_consumer=True,
                                 config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
    try:
        async for msg in sub.messages:
            try:
                event = bus.open(msg.data, msg.subject, fresh=False).expect(SessionEvent)
            except MessageRejected:
                continue
            if event.kind == "tool_use":
                s.uses[event.data["id"]] = event.ts
            elif event.kind == "tool_result":
                s.results[event.data["id"]] = event.ts
            elif event.kind == "shutdown":
                s.exit_code = int(event.data.get("exit_code", 1))
                s.done.set()
                return
    finally:
        await sub.unsubscribe()


async def run_sessions(bus: Bus, signer: Signer, root: Path, harness_pid: int, n: int, calls: int) -> RunFigures:
    script = json.dumps({"responses": [
        *[{"text": "", "tool_calls": [{"name": "Bash", "input": {"command": "true"}}]} for _ in range(calls)],
        {"text": "", "tool_calls": [{"name": "Exit", "input": {"message": "done"}}]}]})
    sessions = [Session(secrets.token_hex(8)) for _ in range(n)]
    followers = [asyncio.create_task(follow(bus, s)) for s in sessions]

    async def start(i: int, s: Session) -> None:
        ws = root / f"ws-{s.sid}"
        ws.mkdir()
        now = time.time()
        grant = SessionGrant(grant_id=secrets.token_hex(12), session_id=s.sid, user=f"bench-{i}",
                             workspace=str(ws), issued_at=now, expires_at=now + 3600)
        req = StartSession(grant=seal_grant(signer, grant), llm=LLMChoice(backend="mock", script=script),
                           headless=True, prompt="run the commands")
        await bus.request(subjects.HARNESS_START, req, SessionStarted, from_role=Role.HARNESS, sid=s.sid,
                          timeout=120.0)

    cpu0 = proc_cpu_s(harness_pid)
    t0 = time.perf_counter()
    await asyncio.gather(*(start(i, s) for i, s in enumerate(sessions)))
    starts = n / (time.perf_counter() - t0)
    await asyncio.wait_for(asyncio.gather(*(s.done.wait() for s in sessions)), 600)
    cpu = proc_cpu_s(harness_pid) - cpu0
    await asyncio.gather(*followers, return_exceptions=True)
    lat = [(s.results[c] - t) * 1000 for s in sessions for c, t in s.uses.items() if c in s.results]
    first = min(t for s in sessions for t in s.uses.values())
    last = max(t for s in sessions for t in s.results.values())
    errors = sum(1 for s in sessions if s.exit_code != 0)
    return RunFigures(starts, ToolFigures(len(lat) / (last - first), pct(lat, 99), cpu * 1000 / max(len(lat), 1)),
                      errors)


async def bench(stack: Stack, root: Path, ns: list[int], calls: int) -> list[tuple[int, float, RunFigures, ToolFigures]]:
    state = StateDir(stack.state_dir)
    nc = await connect_nats(state, "gateway", f"tls://127.0.0.1:{stack.nats_port}")
    bus = Bus(nc, state.identity("gateway"), state.roster(), ServiceMetrics("bench", "gateway"))
    signer = Signer(state.identity("gateway"))
    harness_pid = stack.service_pid("harness")
    rows = []
    try:
        await run_sessions(bus, signer, root, harness_pid, 1, 2)  # warm-up: imports, connections
        for n in ns:
            bare_start = await bare_starts(n)
            bare = await bare_calls(n, calls)
            figures = await run_sessions(bus, signer, root, harness_pid, n, calls)
            rows.append((n, bare_start, figures, bare))
            print(f"  N={n} done (load {os.getloadavg()[0]:.1f})", flush=True)
            await asyncio.sleep(1.0)  # let the executor refill its warm pool
    finally:
        await nc.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="1,2,4,8,16,32,64", help="concurrent sessions, comma-separated")
    ap.add_argument("--calls", type=int, default=20, help="Bash tool calls per session (default 20)")
    ap.add_argument("--warm", type=int, help="warm bwrap sandboxes on the executor (default: its default)")
    args = ap.parse_args()
    ns = [int(x) for x in args.n.split(",")]
    configure_logging("bench", level="warning")
    executor: dict[str, object] = {"capacity": max(ns) + 8, "per_user": 8}
    if args.warm is not None:
        executor["warm"] = {"bwrap": args.warm}
    with tempfile.TemporaryDirectory(prefix="silo-bench-harness-") as tmp:
        stack = Stack(Path(tmp) / "state", services={"executor": {"options": executor},
                                                     "harness": {"options": {"lease_wait_s": 120}}})
        stack.start()
        try:
            load0 = os.getloadavg()[0]
            rows = asyncio.run(bench(stack, Path(tmp), ns, args.calls))
            load1 = os.getloadavg()[0]
        finally:
            stack.stop()
    print(f"\n{args.calls} Bash `true` calls per session, mock model, bwrap; warm={args.warm}; "
          f"load {load0:.1f} -> {load1:.1f}; ratios: devsilo vs bare (rates: bare/devsilo)")
    head = (f"{'N':>3} | {'sess/s':>7} {'bare':>7} {'x':>5} | {'calls/s':>7} {'bare':>7} {'x':>5} | "
            f"{'p99 ms':>7} {'bare':>6} {'x':>5} | {'CPU ms/call':>11} {'bare':>5} {'x':>5} | err")
    print(head)
    print("-" * len(head))
    for n, bare_start, f, b in rows:
        print(f"{n:>3} | {f.starts_per_s:7.1f} {bare_start:7.1f} {bare_start / f.starts_per_s:5.1f} | "
              f"{f.tools.rate:7.1f} {b.rate:7.1f} {b.rate / f.tools.rate:5.1f} | "
              f"{f.tools.p99_ms:7.2f} {b.p99_ms:6.2f} {f.tools.p99_ms / b.p99_ms:5.1f} | "
              f"{f.tools.cpu_ms:11.2f} {b.cpu_ms:5.2f} {f.tools.cpu_ms / b.cpu_ms:5.1f} | {f.errors}")


if __name__ == "__main__":
    main()
