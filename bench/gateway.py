"""Gateway event delivery: 1 → 200 clients of one session, against NATS itself, in one run.

Starts a whole stack (`silo up` on free ports), registers a session and
publishes its events signed as the harness at a fixed rate (core NATS
publishes into the events stream, as fast as a busy harness could), while
N WebSocket clients (spread over worker processes) follow the session
through the gateway over TLS. For each N it prints:

* p50 and p99 delivery lag (event timestamp → frame received by a client),
  beside the same events read straight from NATS by one subscriber (the
  baseline) and the ratio;
* events per second delivered to all clients together, and the ratio to
  what N subscribers would be owed (N × publish rate);
* the gateway's CPU (user + system seconds per wall second, from /proc);
* whether every client got every event exactly once, in order.

Each level runs twice: clients taking one ``event`` frame per event, then
clients attached with ``batch`` (events waiting at once come as one
``events`` frame).

The goal (issue 7): 100 clients at 1,000 events/s with p99 lag under 50 ms.

    .venv/bin/python bench/gateway.py [--rate 1000] [--seconds 3] [--clients 1,10,50,100,200] [--batch 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path
from typing import Any

WORKERS = 2
"""Client processes (the machine this runs on has two cores; the gateway needs one)."""


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- a client worker process ---------------------------------------------------------------------


def client_worker(url: str, fingerprint: str, token: str, sid: str, from_seq: int, count: int, clients: int,
                  batch: int, ready: Any, go: Any, results: Any) -> None:
    """Follow ``sid`` from ``from_seq`` with ``clients`` connections; report lags and completeness."""
    asyncio.run(_client_worker(url, fingerprint, token, sid, from_seq, count, clients, batch, ready, go, results))


async def _client_worker(url: str, fingerprint: str, token: str, sid: str, from_seq: int, count: int,
                         clients: int, batch: int, ready: Any, go: Any, results: Any) -> None:
    import aiohttp

    last = from_seq + count - 1
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    sockets = []
    ssl = aiohttp.Fingerprint(bytes.fromhex(fingerprint))
    for i in range(clients):
        ws = await session.ws_connect(url, ssl=ssl, max_msg_size=16 << 20)
        await ws.receive()  # hello
        await ws.receive()  # the challenge a paired key would sign
        await ws.send_str(json.dumps({"type": "authenticate", "method": "token", "token": token,
                                      "client_name": f"bench-{os.getpid()}-{i}"}))
        reply = json.loads((await ws.receive()).data)
        assert reply["type"] == "auth_ok", reply
        await ws.send_str(json.dumps({"type": "attach", "session_id": sid, "from_seq": from_seq, "batch": batch}))
        sockets.append(ws)
    ready.put(clients)
    await asyncio.get_running_loop().run_in_executor(None, go.wait)

    async def follow(ws: Any) -> tuple[list[float], bool]:
        lags: list[float] = []
        expected = from_seq
        in_order = True
        while expected <= last:
            msg = await ws.receive()
            if msg.type != aiohttp.WSMsgType.TEXT:
                return lags, False
            now = time.time()
            frame = json.loads(msg.data)
            kind = frame.get("type")
            events = [frame] if kind == "event" else frame["events"] if kind == "events" else []
            for event in events:
                in_order = in_order and event["seq"] == expected
                expected = event["seq"] + 1
                lags.append(now - event["ts"])
        return lags, in_order

    try:
        outcome = await asyncio.wait_for(asyncio.gather(*(follow(ws) for ws in sockets)), 120)
        lags = [x for got, _ in outcome for x in got]
        complete = all(ok and len(got) == count for got, ok in outcome)
    except TimeoutError:
        lags, complete = [], False
    results.put((lags, complete))
    for ws in sockets:
        await ws.close()
    await session.close()


# -- the publisher and the baseline subscriber ------------------------------------------------------


class Publisher:
    """Events of one session, signed as the harness, published at a fixed rate."""

    def __init__(self, scripted: Any, nats_url: str) -> None:
        self.scripted = scripted
        self.nats_url = nats_url
        self.next_seq = 0
        self.bus: Any = None

    async def start(self) -> None:
        from devsilo.testing._events import service_bus

        self.bus = await service_bus(self.scripted.state, "harness", self.nats_url)
        self.next_seq = await self.scripted.emit("session_started", {"bench": True}) + 1

    async def publish(self, count: int, rate: float) -> float:
        """Publish ``count`` events ``1/rate`` apart; the seconds it took."""
        from devsilo.protocol import SessionEvent, subjects

        sid = self.scripted.sid
        subject = subjects.session_events(sid)
        nc = self.bus.nc
        started = time.monotonic()
        for i in range(count):
            due = started + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            seq = self.next_seq
            event = SessionEvent(session_id=sid, seq=seq, kind="tool_output", ts=time.time(),
                                 data={"stream": "stdout", "text": "x" * 120})
            wire, _ = self.bus.signer.seal(event, subject, sid=sid, ttl=3600.0)
            await nc.publish(subject, wire, headers={"Nats-Msg-Id": f"{sid}:{seq}"})
            self.next_seq += 1
        await nc.flush()
        return time.monotonic() - started


async def baseline_subscriber(state: Any, nats_url: str, sid: str, first: int, last: int,
                              lags: list[float], done: asyncio.Event) -> Any:
    """One subscriber reading the events straight from NATS, verifying each as the gateway does."""
    from devsilo.protocol import SessionEvent, subjects
    from devsilo.testing._events import service_bus

    bus = await service_bus(state, "gateway", nats_url)

    async def on_msg(msg: Any) -> None:
        now = time.time()
        event = bus.open(msg.data, msg.subject, fresh=False).expect(SessionEvent)
        if first <= event.seq <= last:
            lags.append(now - event.ts)
            if event.seq == last:
                done.set()

    await bus.nc.subscribe(subjects.session_events(sid), cb=on_msg)
    return bus


# -- the run -----------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    from devsilo.runtime._state import StateDir
    from devsilo.testing import Stack
    from devsilo.testing._events import ScriptedSession

    levels = [int(x) for x in args.clients.split(",")]
    count = int(args.rate * args.seconds)
    with tempfile.TemporaryDirectory(prefix="silo-bench-gw-") as tmp:
        stack = Stack(Path(tmp) / "state", services={"gateway": {"options": {
            "max_clients_per_user": max(levels) + 10, "max_clients": max(levels) + 10}}})
        stack.start()
        try:
            state = StateDir(stack.state_dir)
            nats_url = f"tls://127.0.0.1:{stack.nats_port}"
            url = f"wss://127.0.0.1:{stack.gateway_port}/ws"
            fingerprint = state.gateway_fingerprint().replace(":", "").lower()
            gateway_pid = stack.live_pid("gateway")
            assert gateway_pid is not None
            print(f"gateway pid {gateway_pid}; {count} events per level at {args.rate:.0f}/s "
                  f"({args.seconds:.0f} s); {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}\n")
            header = (f"{'clients':>7} {'p50 ms':>8} {'NATS p50':>9} {'ratio':>6} {'p99 ms':>8} {'NATS p99':>9} "
                      f"{'ratio':>6} {'delivered/s':>12} {'of owed':>8} {'gw CPU':>7} {'complete':>9}")
            print(header)
            async with ScriptedSession(state, nats_url) as scripted:
                pub = Publisher(scripted, nats_url)
                await pub.start()
                ctx = mp.get_context("spawn")
                for batch in (1, args.batch) if args.batch > 1 else (1,):
                    print(f"-- {'one event frame per event' if batch == 1 else f'attach batch={batch}'}")
                    for n in levels:
                        row = await one_level(ctx, stack, state, nats_url, url, fingerprint, scripted.sid, pub,
                                              n, count, args.rate, gateway_pid, batch)
                        print(row, flush=True)
        finally:
            stack.stop()


async def one_level(ctx: Any, stack: Any, state: Any, nats_url: str, url: str, fingerprint: str, sid: str,
                    pub: Publisher, n: int, count: int, rate: float, gateway_pid: int, batch: int) -> str:
    first = pub.next_seq
    last = first + count - 1
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    split = [n // WORKERS + (1 if i < n % WORKERS else 0) for i in range(WORKERS)]
    procs = [ctx.Process(target=client_worker, args=(url, fingerprint, state.client_token(), sid, first, count,
                                                     k, batch, ready, go, results)) for k in split if k]
    for p in procs:
        p.start()
    loop = asyncio.get_running_loop()
    for _ in procs:
        await loop.run_in_executor(None, ready.get, True, 120)
    base_lags: list[float] = []
    base_done = asyncio.Event()
    base_bus = await baseline_subscriber(state, nats_url, sid, first, last, base_lags, base_done)
    go.set()
    await asyncio.sleep(0.3)
    cpu0, wall0 = cpu_seconds(gateway_pid), time.monotonic()
    await pub.publish(count, rate)
    await asyncio.wait_for(base_done.wait(), 60)
    outcomes = [await loop.run_in_executor(None, results.get, True, 180) for _ in procs]
    wall = time.monotonic() - wall0
    cpu = (cpu_seconds(gateway_pid) - cpu0) / wall
    for p in procs:
        p.join(10)
    await base_bus.nc.close()
    lags = [x for got, _ in outcomes for x in got]
    complete = all(ok for _, ok in outcomes)
    p50, p99 = percentile(lags, 0.5) * 1000, percentile(lags, 0.99) * 1000
    b50, b99 = percentile(base_lags, 0.5) * 1000, percentile(base_lags, 0.99) * 1000
    delivered = len(lags) / wall
    owed = n * count / wall
    return (f"{n:>7} {p50:>8.1f} {b50:>9.2f} {p50 / b50:>6.1f} {p99:>8.1f} {b99:>9.2f} {p99 / b99:>6.1f} "
            f"{delivered:>12.0f} {delivered / owed:>8.2f} {cpu:>7.2f} {'yes' if complete else 'NO':>9}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=1000.0, help="events per second (default 1000)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of events per level (default 3)")
    parser.add_argument("--clients", default="1,10,50,100,200", help="client counts (default 1,10,50,100,200)")
    parser.add_argument("--batch", type=int, default=100,
                        help="also run with clients attached with batch=N (events frames; default 100, 1: skip)")
    args = parser.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
