"""Load: users, concurrent sessions and clients for minutes, every event checked, beside bare baselines.

    .venv/bin/python bench/load.py [--duration 600] [--sessions 20] [--users 5] [--clients 3]
                                   [--rounds 30] [--think 0] [--chaos ROUNDS [--chaos-pause 20]]

Starts a whole stack (`silo up`, bwrap sandboxes, executor room for the
sessions) and runs the load driver (``devsilo.testing._load.LoadRun``): the
users pair client keys through the gateway; each session slot uploads a
workspace as its user and keeps an interactive mock-model session going in
which every turn runs ``Bash`` (append to a log, hash it), ``Write`` and
``Edit`` through the executor; after ``--rounds`` turns the slot stops the
session and starts another on the same workspace. Every session has
``--clients`` clients, each its own authenticated WebSocket, recording
every event. At the end every client's record is checked: no gap, no
duplicate, identical to its session's other clients, every tool call
answered, no stall, the workspace log one line longer each turn.

Printed, each beside a baseline measured in the same run (before the load,
on the same machine) and the ratio:

- **tool calls/s** beside the same work done bare by as many concurrent
  workers: the turn's shell command by ``asyncio.create_subprocess_exec("sh",
  "-c", ...)`` in a plain directory, the write and the edit by Python file
  calls (rates: bare/devsilo, how many times slower devsilo is);
- **p50/p99 tool latency** (the harness's ``tool_use`` → ``tool_result``
  event timestamps) beside the bare workers' per-call latency, and beside one
  sequential bare ``subprocess.run(["true"])`` and bare ``bwrap … true``;
- **CPU per tool call**: every service's CPU seconds (and the sandboxes') over
  the run divided by the tool calls, beside the bare workers' CPU per call
  (this process and its children);
- **per-service CPU and RSS**: RSS when the stack was idle (right after
  start, the baseline), at the end of warm-up (every slot completed a turn)
  and at the end of the load, with the growth after warm-up in MiB and %,
  and after every session was stopped; and RSS at seven points from the end
  of warm-up to the end of the load, to tell a plateau from a climb.

With ``--chaos ROUNDS`` the gateway, the harness, the executor, the egress
and the NATS server are each killed with SIGKILL in turn, ROUNDS times over,
``--chaos-pause`` seconds of load before each kill
(``devsilo.testing._chaos.LoadChaos``); every check above still holds,
except that sessions on the killed executor must end with an error and a
call in flight on a killed harness may end "result unknown". Each kill is
printed with the time until its replacement was healthy.

And the machine: cores, RAM, kernel, load average before and after.
Exits 1 when any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from devsilo.runtime import configure_logging
from devsilo.testing import Stack
from devsilo.testing._chaos import TARGETS, LoadChaos
from devsilo.testing._load import LoadReport, LoadRun, percentile, round_script, stack_services

BWRAP = shutil.which("bwrap") or "bwrap"
BWRAP_TRUE = [BWRAP, "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr",
              "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
              "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "true"]


def self_cpu_s() -> float:
    """CPU seconds of this process and its reaped children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def sequential_ms(argv: list[str], n: int) -> list[float]:
    """Latency of ``n`` sequential runs of ``argv`` (ms)."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(argv, check=True)
        out.append((time.perf_counter() - t) * 1000)
    return out


@dataclass
class BareWork:
    """The load's tool calls done bare by concurrent workers."""

    calls_per_s: float
    latencies_ms: list[float]
    cpu_ms_per_call: float


async def bare_work(workers: int, seconds: float, root: Path) -> BareWork:
    """``workers`` concurrent loops of the load's turn (shell command, write, edit) for ``seconds``."""
    script = round_script(1)["responses"][0]["tool_calls"]
    command, write, edit = (c["input"] for c in script)
    lat: list[float] = []
    stop_at = time.monotonic() + seconds

    async def worker(i: int) -> None:
        ws = root / f"w{i}"
        (ws / "notes").mkdir(parents=True)
        (ws / "log.txt").write_text("")
        while time.monotonic() < stop_at:
            t = time.perf_counter()
            proc = await asyncio.create_subprocess_exec("sh", "-c", command["command"], cwd=ws,
                                                        stdout=asyncio.subprocess.PIPE)
            await proc.communicate()
            lat.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            path = ws / write["path"]
            path.write_text(write["content"])
            lat.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            path.write_text(path.read_text().replace(edit["old_string"], edit["new_string"], 1))
            lat.append((time.perf_counter() - t) * 1000)

    cpu0, t0 = self_cpu_s(), time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(workers)))
    wall, cpu = time.perf_counter() - t0, self_cpu_s() - cpu0
    return BareWork(len(lat) / wall, lat, cpu * 1000 / max(1, len(lat)))


def machine() -> str:
    mem = psutil.virtual_memory().total / 2**30
    return (f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), {mem:.1f} GiB RAM, "
            f"Linux {platform.release()}, Python {platform.python_version()}")


def print_figures(report: LoadReport, bare: BareWork, true_ms: list[float], bwrap_ms: list[float],
                  idle_rss: dict[str, int]) -> None:
    services_cpu = sum(u.cpu_s for n, u in report.services.items() if n != "driver")
    cpu_per_call = services_cpu * 1000 / max(1, report.tool_calls)
    p50, p99 = report.latency_p50 * 1000, report.latency_p99 * 1000
    b50, b99 = percentile(bare.latencies_ms, 0.5), percentile(bare.latencies_ms, 0.99)
    print(f"\n{'figure':<34} {'devsilo':>10} {'baseline':>10} {'ratio':>7}  baseline")
    rows = [
        ("tool calls/s", report.tool_calls_per_s, bare.calls_per_s, bare.calls_per_s / max(report.tool_calls_per_s, 1e-9),
         f"the same calls bare, {report.slots} concurrent workers (bare/devsilo)"),
        ("tool latency p50 ms", p50, b50, p50 / b50, "the same calls bare"),
        ("tool latency p99 ms", p99, b99, p99 / b99, "the same calls bare"),
        ("tool latency p50 ms", p50, percentile(true_ms, 0.5), p50 / percentile(true_ms, 0.5),
         "subprocess.run(['true']), sequential"),
        ("tool latency p50 ms", p50, percentile(bwrap_ms, 0.5), p50 / percentile(bwrap_ms, 0.5),
         "bare bwrap ... true, sequential"),
        ("CPU ms per tool call (all services)", cpu_per_call, bare.cpu_ms_per_call,
         cpu_per_call / max(bare.cpu_ms_per_call, 1e-9), "the same calls bare"),
    ]
    for name, ours, base, ratio, what in rows:
        print(f"{name:<34} {ours:>10.2f} {base:>10.2f} {ratio:>6.1f}x  {what}")
    print(f"\n{'service':<10} {'CPU s':>8} {'CPU %':>6} | {'RSS idle':>9} {'warm':>8} {'end':>8} {'max':>8} | "
          f"{'growth after warm-up':>20} | {'stopped':>8} | restarts")
    for u in report.services.values():
        idle = idle_rss.get(u.name)
        print(f"{u.name:<10} {u.cpu_s:>8.1f} {100 * u.cpu_s / report.duration_s:>5.0f}% | "
              f"{(f'{idle / 2**20:.1f}Mi' if idle else '-'):>9} {u.rss_warm / 2**20:>6.1f}Mi "
              f"{u.rss_end / 2**20:>6.1f}Mi {u.rss_max / 2**20:>6.1f}Mi | "
              f"{u.growth_mib:>+8.1f} MiB {u.growth_pct:>+6.1f}% | {u.rss_after / 2**20:>6.1f}Mi | {u.restarts}")
    marks = [report.warm_s + (report.duration_s - report.warm_s) * i / 6 for i in range(7)]
    print(f"\nRSS over the load (MiB), from the end of warm-up to the end: "
          f"{', '.join(f'{m:.0f}' for m in marks)} s")
    for u in report.services.values():
        at = [min(u.samples, key=lambda s, m=m: abs(s[0] - m))[1] / 2**20 for m in marks] if u.samples else []
        print(f"{u.name:<10} " + " ".join(f"{x:>7.1f}" for x in at))
    print("(CPU % of one core over the load; RSS end: when the load's time was up, sessions still running; "
          "stopped: after every session was stopped; sandboxes: every process below the executor, their RSS summed; "
          "driver: this process, which shares the machine)")


def print_chaos(chaos: LoadChaos, run: LoadRun) -> None:
    """Each kill, how long until its replacement was healthy, and what the sessions lived through."""
    print(f"chaos: {len(chaos.kills)} kills (SIGKILL), each restarted by the supervisor")
    for k in chaos.kills:
        print(f"  {k.target:<9} pid {k.pid:>7} -> {k.new_pid:>7}, healthy again after {k.down_s:5.1f} s, "
              f"{len(chaos.live_at.get(k.target, ()))} sessions live")
    ended = [s for s in run.sessions if s.expect_error and s.track.errors]
    other_errors = [e for s in run.sessions if not s.expect_error for e in s.track.tool_errors]
    print(f"  sessions ended with an error because their executor was killed: {len(ended)}; "
          f"tool errors elsewhere (calls in flight on a killed harness): {len(other_errors)}\n")


async def main_async(args: argparse.Namespace, root: Path) -> int:
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}")
    true_ms = sequential_ms(["true"], 200)
    bwrap_ms = sequential_ms(BWRAP_TRUE, 50)
    bare = await bare_work(args.sessions, args.bare_seconds, root / "bare")
    stack = Stack(root / "state", services=stack_services(args.sessions, args.users))
    stack.start()
    try:
        run = LoadRun(stack, workdir=root / "load", users=args.users, sessions=args.sessions,
                      clients_per_session=args.clients, duration=args.duration, rounds=args.rounds,
                      think_s=args.think, allow_tool_errors=args.chaos > 0)
        chaos = LoadChaos(stack, targets=TARGETS * args.chaos, pause_s=args.chaos_pause) if args.chaos else None
        run.sampler.sample()
        idle_rss = {n: u.rss_now for n, u in run.sampler.usage.items()}
        print(f"stack up; {args.users} users, {args.sessions} sessions, {args.clients} clients each, "
              f"{args.duration:.0f} s of load ({args.rounds} turns per session) ...", flush=True)
        report = await run.run(during=chaos)
    finally:
        stack.stop()
    print(f"load average after: {os.getloadavg()[0]:.1f}\n")
    print(report.format())
    if chaos is not None:
        print_chaos(chaos, run)
    print_figures(report, bare, true_ms, bwrap_ms, idle_rss)
    return 0 if report.ok else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    ap.add_argument("--sessions", type=int, default=20, help="concurrent sessions (default 20)")
    ap.add_argument("--users", type=int, default=5, help="users, each with its own paired key (default 5)")
    ap.add_argument("--clients", type=int, default=3, help="clients per session (default 3)")
    ap.add_argument("--rounds", type=int, default=30, help="turns per session before its slot starts another")
    ap.add_argument("--think", type=float, default=0.0, help="seconds between a turn's end and the next prompt")
    ap.add_argument("--chaos", type=int, default=0, metavar="ROUNDS",
                    help="during the load, kill -9 the gateway, harness, executor, egress and NATS in turn, "
                         "ROUNDS times over (default 0: no chaos)")
    ap.add_argument("--chaos-pause", type=float, default=20.0, help="seconds of load before each kill")
    ap.add_argument("--bare-seconds", type=float, default=10.0, help="seconds of the bare baseline work")
    args = ap.parse_args()
    configure_logging("bench", level="warning")
    with tempfile.TemporaryDirectory(prefix="silo-bench-load-") as tmp:
        code = asyncio.run(main_async(args, Path(tmp)))
    sys.exit(code)


if __name__ == "__main__":
    main()
