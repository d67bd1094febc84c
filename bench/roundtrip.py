"""Round trip of a `Bash true` tool call from the harness's side, against a bare subprocess.

Starts a whole stack (`silo up`) in a throw-away state directory, leases a warm
bwrap sandbox the way the harness does (a gateway-signed grant, a signed lease
request), then times N `Bash true` tool calls: harness -> NATS -> executor ->
helper in the sandbox -> `sh -c true` -> back, with every envelope signed and
verified. The baseline, in the same run, is `asyncio.create_subprocess_exec("true")`.

    .venv/bin/python bench/roundtrip.py [-n 500]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
from pathlib import Path

from devsilo.protocol import (
    Ack,
    CloseSession,
    LeaseGranted,
    LeaseRequest,
    Role,
    SessionGrant,
    Signer,
    ToolCall,
    ToolResult,
    seal_grant,
    subjects,
)
from devsilo.runtime import Bus, ServiceMetrics, configure_logging
from devsilo.runtime._natsconn import connect_nats
from devsilo.runtime._state import StateDir
from devsilo.testing import Stack


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


async def bare(n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        proc = await asyncio.create_subprocess_exec("true")
        await proc.wait()
        out.append((time.perf_counter() - t) * 1000)
    return out


async def through_devsilo(stack: Stack, workspace: Path, n: int) -> list[float]:
    state = StateDir(stack.state_dir)
    nc = await connect_nats(state, "harness", f"tls://127.0.0.1:{stack.nats_port}")
    bus = Bus(nc, state.identity("harness"), state.roster(), ServiceMetrics("bench", "harness"))
    now = time.time()
    sid = secrets.token_hex(8)
    grant = SessionGrant(grant_id=secrets.token_hex(12), session_id=sid, user="bench", workspace=str(workspace),
                         issued_at=now, expires_at=now + 3600)
    sealed = seal_grant(Signer(state.identity("gateway")), grant)
    lease = await bus.request(subjects.exec_lease("executor"), LeaseRequest(grant=sealed), LeaseGranted,
                              from_role=Role.EXECUTOR, sid=sid, timeout=60)
    subject = subjects.exec_tool(lease.executor_id, sid)
    out = []
    try:
        for i in range(n + 20):
            t = time.perf_counter()
            res = await bus.request(subject, ToolCall(call_id=f"c{i}", name="Bash", input={"command": "true"}),
                                    ToolResult, from_role=Role.EXECUTOR, sid=sid)
            dt = (time.perf_counter() - t) * 1000
            if res.is_error:
                raise SystemExit(f"tool call failed: {res.content}")
            if i >= 20:  # the first calls warm caches and connections
                out.append(dt)
    finally:
        await bus.request(subjects.exec_close(lease.executor_id, sid), CloseSession(), Ack,
                          from_role=Role.EXECUTOR, sid=sid)
        await nc.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=500, help="tool calls to time (default 500)")
    args = ap.parse_args()
    configure_logging("bench", level="warning")
    with tempfile.TemporaryDirectory(prefix="silo-bench-") as tmp:
        stack = Stack(Path(tmp) / "state")
        stack.start()
        try:
            ws = Path(tmp) / "ws"
            ws.mkdir()
            base = asyncio.run(bare(args.n))
            silo = asyncio.run(through_devsilo(stack, ws, args.n))
        finally:
            stack.stop()
    b50, b99 = pct(base, 50), pct(base, 99)
    s50, s99 = pct(silo, 50), pct(silo, 99)
    print(f"{'':38} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    print(f"{'bare create_subprocess_exec(true)':38} {b50:8.2f} {b99:8.2f} {statistics.mean(base):8.2f}")
    print(f"{'devsilo Bash true (NATS+sign+sandbox)':38} {s50:8.2f} {s99:8.2f} {statistics.mean(silo):8.2f}")
    print(f"{'ratio devsilo/bare':38} {s50 / b50:8.2f} {s99 / b99:8.2f}")
    print(f"{'overhead devsilo-bare':38} {s50 - b50:8.2f} {s99 - b99:8.2f}")
    print(f"(n={args.n} each, same run)")


if __name__ == "__main__":
    main()
