"""A load driver for a running stack: many users, sessions and clients, every event checked.

``LoadRun`` drives a started :class:`~devsilo.testing.Stack` (``silo up``)
only through its gateway, as real clients do:

* **users**: for each of ``users`` users (``load0``, ``load1``, ...) the
  local operator token asks for a pairing code, and a new Ed25519 client key
  pairs with it; every later connection of that user signs the gateway's
  challenge with that key.
* **sessions**: ``sessions`` slots, spread over the users round-robin. A slot
  keeps one session running for the whole run: it uploads a fresh workspace
  as its user (non-operators work on uploaded workspaces), creates an
  interactive session on it (mock model with a script, ``sandbox`` bwrap by
  default) and drives it turn by turn: each ``prompt`` makes the model call
  ``Bash`` (append to a log, hash files), ``Write`` and ``Edit`` through the
  executor, then answer in text. After ``rounds`` turns the slot stops the
  session and starts the next one on the same workspace, so sessions also
  begin and end under load (memory must not grow with them). When the run's
  ``duration`` is over, every slot finishes its turn and stops its session.
* **clients**: ``clients_per_session`` followers per session, each its own
  authenticated WebSocket of the session's user, attached from seq 0 and
  recording every event until ``shutdown``. A follower whose connection
  ends (a gateway killed, a slow client dropped) reconnects and attaches
  again from the seq after the last one it holds.
* **resources**: every ``sample_s`` the CPU seconds and RSS of each service's
  live process (re-found after a restart), of nats-server, of the sandboxes
  (every process below the executor) and of this driver. RSS is reported at
  the end of warm-up, at the end of the load (sessions still running) and
  after every session was stopped.

At the end each client's record is checked (:func:`verify_session`): seqs
0..n-1 with no gap and no duplicate, the same events (by digest) as the
session's other clients, every ``tool_use`` answered by a ``tool_result``, no
stall (no event for more than ``stall_s`` seconds while the session was busy,
including a session still busy when the run gave up on it), and the session
ended with ``shutdown`` and no ``error`` unless it was marked as expected to
fail. Across the sessions that ran one after another on a workspace, each turn's ``Bash``
must have seen the workspace log one line longer (:func:`verify_workspace`): no command ran
twice or was lost, and no write was lost between sessions. ``allow_tool_errors=True`` lifts
the failed-tool and workspace checks (a harness killed mid-call reports a call's result as
unknown, and a resumed session may run a command again).

API, for benchmarks and chaos schedules::

    stack = Stack(state_dir, services=stack_services(20, 5))  # executor room for 20 sessions of 5 users
    stack.start()
    run = LoadRun(stack, users=5, sessions=20, clients_per_session=3, duration=60.0,
                  workdir=tmp_path / "load")
    async def chaos(run: LoadRun) -> None:
        await run.warmed_up.wait()              # every slot has finished a turn
        async with run.expecting_errors(executor_id="executor"):
            kill_the_executor_and_wait_for_its_restart()
        ...
    report = await run.run(during=chaos)       # `during` runs beside the load; the run ends when
    assert report.ok, report.problems()        # both the duration and `during` are over
    print(report.format())

* ``run.run(during=f)``: ``await f(run)`` concurrently with the load; load
  keeps going until ``duration`` has passed *and* ``f`` returned.
* ``run.live_sessions()``: the :class:`LoadSession` of each slot now
  (``session_id``, ``user``, ``executor_id``, ``workspace``, ``slot``).
* ``run.expect_error(session_id, why)``: that session may end with an
  ``error`` event / non-zero exit code without counting as a failure (its
  event streams are still checked). ``async with run.expecting_errors(
  executor_id=...)``: marks every session on that executor live on entry or
  started before exit. A slot whose session ended with an error moves to a
  fresh workspace, so the failed one stays as it was for inspection
  (``report.sessions[i].workspace``; the files are on the executor).
* ``run.warmed_up``: set once every slot has completed one turn (start a
  chaos schedule after it). ``run.steady``: set once every slot has been
  through one whole session (stopped it and started the next): event rings,
  caches and allocator arenas have filled once, so the RSS sampled then is
  the baseline of the memory figures ("warm" in the report); when the run
  ends before that, the baseline is taken at ``warmed_up`` instead.
* ``LoadReport``: ``ok``, ``problems()``, ``format()``, ``sessions``
  (:class:`SessionResult` per session), ``tool_calls``, ``tool_calls_per_s``,
  ``latency_p50``/``latency_p99`` (seconds, tool_use event → tool_result
  event, both harness timestamps), ``services`` (:class:`ServiceUsage` per
  service: CPU seconds, RSS at warm-up, at the end and after, growth),
  ``reconnects`` (clients' reconnects), ``retries`` (a slot's upload or
  session start that failed and was tried again, and every frame the gateway
  refused on a slot's control link, with why: expected while services are
  being killed, not counted by ``ok``; assert on it otherwise).
* Knobs: ``rounds`` (turns per session), ``think_s`` (pause between turns),
  ``stall_s`` (30; raise it for faults that pause events longer, e.g. a NATS
  restart), ``settle_s`` (how long sessions may take to end after the
  duration), ``allow_tool_errors``, ``batches`` (client ``i`` of a session
  attaches with ``batches[i % len(batches)]``: by default the first as the
  CLI does, one ``event`` frame per event, the others as the TUI and the web
  app do, ``batch`` 100, so both frame kinds are checked).
* The stack needs executor room for the sessions: ``stack_services(sessions,
  users)`` gives the ``Stack(services=...)`` entries.

The driver runs in the caller's event loop (one process); it decodes frames
with ``json`` only and keeps a seq and an 8-byte digest per received event, not
the events (its own CPU and RSS are reported as ``driver``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import math
import random
import re
import time
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from devsilo.cli._client import ClientKeyPair, GatewayClient, GatewayError
from devsilo.cli._workspace_transfer import RemoteWorkspace
from devsilo.protocol import SiloError
from devsilo.protocol.client import (
    Attach,
    Authenticate,
    ClientFrame,
    CreateSession,
    PairingCode,
    PairingCodeRequest,
    Prompt,
    Shutdown,
    challenge_message,
)
from devsilo.runtime._state import StateDir

from ._stack import Stack

DIGEST_BYTES = 8
"""Bytes of each event's digest a client keeps (BLAKE2b): enough to tell two event lists apart."""
LINES = re.compile(r"^lines=(\d+)$", re.MULTILINE)
RECONNECT_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0)
"""Seconds between reconnect attempts (the last repeats)."""


class LoadError(SiloError):
    """The load run could not be set up or driven (not a finding about the stack)."""


def stack_services(sessions: int, users: int = 5) -> dict[str, dict[str, Any]]:
    """What a Stack needs for ``sessions`` concurrent load sessions of ``users`` users
    (``Stack(dir, services=...)``): executor capacity, in all and per user, with room for
    sandboxes still closing as slots turn over."""
    per_user = math.ceil(sessions / users)
    return {"executor": {"options": {"capacity": sessions + max(8, sessions // 2),
                                     "per_user": per_user + max(4, per_user // 2)}}}


# -- the model's script ------------------------------------------------------------------------------------


def round_script(rounds: int, payload: int = 2048) -> dict[str, Any]:
    """The mock model's script for ``rounds`` turns; each turn: Bash, Write, Edit, then a text answer.

    Every command and edit is real work in the sandboxed workspace: the log grows by a line a
    turn and is hashed (the command prints ``lines=N``, N its lines now), a ``payload``-byte
    file is written, then edited in place.
    """
    responses: list[dict[str, Any]] = []
    filler = ("0123456789abcdef" * (payload // 16 + 1))[:payload]
    for i in range(rounds):
        responses.append({"text": f"round {i}: working", "tool_calls": [
            {"name": "Bash", "input": {"command": f"printf 'round {i}\\n' >> log.txt && sha256sum log.txt "
                                                   f"&& echo lines=$(wc -l < log.txt) && ls notes | wc -l"}},
            {"name": "Write", "input": {"path": f"notes/n{i % 8}.txt",
                                        "content": f"round {i}\nvalue=old\n{filler}\n"}},
            {"name": "Edit", "input": {"path": f"notes/n{i % 8}.txt", "old_string": "value=old",
                                       "new_string": f"value=new-{i}"}},
        ]})
        responses.append({"text": f"round {i} done"})
    return {"responses": responses}


# -- what each client records and how it is checked ---------------------------------------------------------


def event_digest(event: dict[str, Any]) -> bytes:
    """A short digest of one event as a client received it (canonical JSON)."""
    text = json.dumps(event, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=DIGEST_BYTES).digest()


class ClientLog:
    """Every event one client received for one session, in arrival order: seqs and digests."""

    def __init__(self, name: str, batch: int = 1) -> None:
        self.name = name
        self.batch = batch
        """The ``batch`` it attaches with (1: one ``event`` frame per event)."""
        self.seqs = array("q")
        self.digests = bytearray()
        self.reconnects = 0
        self.errors: list[str] = []
        """Error frames and connection failures this client met (reconnected after each)."""
        self.ended = False
        """It received the session's ``shutdown`` event."""

    def add(self, seq: int, digest: bytes) -> None:
        """Record one received event."""
        self.seqs.append(seq)
        self.digests += digest

    @property
    def next_seq(self) -> int:
        """The seq after the highest one received (where to attach from after a reconnect)."""
        return max(self.seqs) + 1 if self.seqs else 0

    def digest_at(self, i: int) -> bytes:
        """The digest of the ``i``-th event received."""
        return bytes(self.digests[i * DIGEST_BYTES:(i + 1) * DIGEST_BYTES])


@dataclass
class SessionTrack:
    """What the events of one session show, from each seq's first arrival at any of its clients.

    Fed in seq order (an event ahead of the next expected seq waits for a client that has it);
    keeps only what the checks and the figures need.
    """

    next_seq: int = 0
    busy: bool = False
    busy_since_event: float | None = None
    """Harness timestamp of the latest event while busy (for stall gaps)."""
    last_seen: float = field(default_factory=time.monotonic)
    """When this driver last received any new event of the session (for a live stall)."""
    turns: int = 0
    prompts: list[str] = field(default_factory=list)
    open_tools: dict[tuple[str, str], float] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    unmatched_results: int = 0
    tool_errors: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    longest_busy_gap: float = 0.0
    exit_code: int | None = None
    ended: bool = False
    log_lines: list[int] = field(default_factory=list)
    """The workspace log's line count each turn's Bash printed (``lines=N``)."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, event: dict[str, Any]) -> None:
        """Take ``event`` if it is the next seq; ignore it otherwise."""
        if event.get("seq") != self.next_seq:
            return
        self.next_seq += 1
        self.last_seen = time.monotonic()
        kind, ts, data = event.get("kind"), float(event.get("ts") or 0.0), event.get("data") or {}
        if self.busy and self.busy_since_event is not None:
            self.longest_busy_gap = max(self.longest_busy_gap, ts - self.busy_since_event)
        self.busy_since_event = ts
        key = (str(event.get("agent")), str(data.get("id")))
        if kind == "busy":
            self.busy = bool(data.get("busy"))
        elif kind == "user_prompt":
            self.prompts.append(str(data.get("text")))
        elif kind == "turn_complete":
            self.turns += 1
        elif kind == "tool_use":
            self.open_tools[key] = ts
        elif kind == "tool_result":
            started = self.open_tools.pop(key, None)
            if started is None:
                self.unmatched_results += 1
            else:
                self.latencies.append(ts - started)
            if data.get("is_error"):
                self.tool_errors.append(f"{data.get('name')}: {str(data.get('content'))[:200]}")
            elif data.get("name") == "Bash":
                self.log_lines += [int(n) for n in LINES.findall(str(data.get("content")))]
        elif kind == "error":
            self.errors.append(str(data.get("message")))
        elif kind == "shutdown":
            self.ended = True
            self.busy = False
            self.exit_code = int(data.get("exit_code") or 0)
        self.changed.set()


def verify_session(logs: Sequence[ClientLog], track: SessionTrack, *, stall_s: float,
                   expect_error: bool = False, allow_tool_errors: bool = False) -> list[str]:
    """What is wrong with one session's event streams (nothing: an empty list).

    Per client: seqs exactly 0..n-1 in order (no gap, no duplicate) ending with ``shutdown``,
    and the same digests as the session's first client. Per session: every tool_use answered
    by a tool_result and no result without its use, no gap longer than ``stall_s`` between
    events while busy, and (unless ``expect_error``) no ``error`` event and exit code 0.
    """
    problems: list[str] = []
    total = track.next_seq
    for log in logs:
        seqs = log.seqs
        dups = len(seqs) - len(set(seqs))
        if dups:
            problems.append(f"{log.name}: {dups} duplicate event(s)")
        missing = sorted(set(range(total)) - set(seqs))
        if missing:
            problems.append(f"{log.name}: {len(missing)} event(s) missing, first seq {missing[0]}")
        if not dups and not missing and list(seqs) != list(range(total)):
            problems.append(f"{log.name}: events out of order")
        if not log.ended:
            problems.append(f"{log.name}: never received the session's shutdown event")
    first = logs[0] if logs else None
    for log in logs[1:]:
        assert first is not None
        if log.seqs != first.seqs or log.digests != first.digests:
            where = next((i for i in range(min(len(log.seqs), len(first.seqs)))
                          if log.seqs[i] != first.seqs[i] or log.digest_at(i) != first.digest_at(i)),
                         min(len(log.seqs), len(first.seqs)))
            problems.append(f"{log.name}: event list differs from {first.name}'s from position {where}")
    if track.open_tools:
        problems.append(f"{len(track.open_tools)} tool call(s) never answered: "
                        f"{sorted(k[1] for k in track.open_tools)[:5]}")
    if track.unmatched_results:
        problems.append(f"{track.unmatched_results} tool_result(s) without a tool_use")
    if track.tool_errors and not allow_tool_errors:
        problems.append(f"{len(track.tool_errors)} tool call(s) failed, first: {track.tool_errors[0]}")
    if track.longest_busy_gap > stall_s:
        problems.append(f"stalled: {track.longest_busy_gap:.1f} s without an event while busy")
    if track.busy and not track.ended:
        problems.append("stalled: still busy when the run ended")
    if not expect_error:
        if track.errors:
            problems.append(f"error event: {track.errors[0]}")
        if track.exit_code not in (None, 0):
            problems.append(f"ended with exit code {track.exit_code}")
    return problems


def verify_workspace(counts: Sequence[Sequence[int]]) -> list[str | None]:
    """Whether the sessions that ran one after another on one workspace saw its log grow by one
    line a turn (``counts``: each session's ``lines=N`` in order); per session, what is wrong.

    A count out of step means a command ran twice or not at all, or the workspace lost a write
    between sessions.
    """
    out: list[str | None] = []
    expected = 1
    for values in counts:
        want = list(range(expected, expected + len(values)))
        out.append(None if list(values) == want else
                   f"workspace log had {list(values)[:8]} lines where {want[:8]} were expected")
        expected = values[-1] + 1 if values else expected
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by nearest rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# -- resources ---------------------------------------------------------------------------------------------


@dataclass
class ServiceUsage:
    """One service's CPU and memory over a run (summed over its processes when it was restarted)."""

    name: str
    cpu_s: float = 0.0
    rss_warm: int = 0
    """RSS (bytes) at the end of warm-up."""
    rss_end: int = 0
    """RSS (bytes) when the load's duration was over, sessions still running."""
    rss_after: int = 0
    """RSS (bytes) after every session had been stopped."""
    rss_now: int = 0
    rss_max: int = 0
    restarts: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)
    """(seconds since start, RSS bytes) every sample."""

    @property
    def growth_mib(self) -> float:
        """RSS growth after warm-up, MiB."""
        return (self.rss_end - self.rss_warm) / 2**20

    @property
    def growth_pct(self) -> float:
        """RSS growth after warm-up, percent of the warm-up RSS."""
        return 100.0 * (self.rss_end - self.rss_warm) / self.rss_warm if self.rss_warm else float("nan")


class ResourceSampler:
    """Samples CPU seconds and RSS of every service of a stack, its nats-server, the sandboxes and
    this driver.

    ``sandboxes`` is every process below the executor: RSS of those alive, CPU of those alive plus
    what the executor's reaped children used. ``driver`` is this process (it shares the machine).
    """

    def __init__(self, stack: Stack, every_s: float) -> None:
        self.stack = stack
        self.every_s = every_s
        names = [*stack.metrics_ports, "nats", "sandboxes", "driver"]
        self.usage: dict[str, ServiceUsage] = {n: ServiceUsage(n) for n in names}
        self._procs: dict[str, psutil.Process] = {"driver": psutil.Process()}
        self._cpu_done: dict[str, float] = {n: 0.0 for n in self.usage}
        """CPU seconds of processes of each service that are gone."""
        self._cpu_last: dict[str, float] = {n: 0.0 for n in self.usage}
        self.started = time.monotonic()

    def _process(self, name: str) -> psutil.Process | None:
        proc = self._procs.get(name)
        if proc is not None and proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
        if proc is not None:  # it died: keep what it used, find its successor
            self._cpu_done[name] += self._cpu_last[name]
            self._cpu_last[name] = 0.0
            self.usage[name].restarts += 1
            del self._procs[name]
        pid: int | None
        if name == "nats":
            up = psutil.Process(int(self.stack.stack["pid"]))
            pid = next((c.pid for c in up.children() if c.name().startswith("nats-server")), None)
        else:
            pid = self.stack.live_pid(name)
        if pid is None:
            return None
        try:
            self._procs[name] = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return None
        return self._procs[name]

    @staticmethod
    def _below(proc: psutil.Process) -> tuple[float, int]:
        """CPU seconds and RSS of everything below ``proc`` (its reaped children's CPU included)."""
        own = proc.cpu_times()
        cpu, rss = own.children_user + own.children_system, 0
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied), \
                    child.oneshot():
                t = child.cpu_times()
                cpu += t.user + t.system
                rss += child.memory_info().rss
        return cpu, rss

    def sample(self) -> None:
        """Read every service's CPU and RSS now."""
        now = time.monotonic() - self.started
        for name in self.usage:
            if name == "sandboxes":
                continue
            try:
                proc = self._process(name)
                if proc is None:
                    continue
                with proc.oneshot():
                    cpu = proc.cpu_times()
                    rss = proc.memory_info().rss
                self._cpu_last[name] = cpu.user + cpu.system
                if name == "executor":
                    self._record("sandboxes", now, *self._below(proc))
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            self._record(name, now, self._cpu_last[name], rss)

    def _record(self, name: str, now: float, cpu: float, rss: int) -> None:
        use = self.usage[name]
        if name == "sandboxes":  # one executor's children: a restart starts the count again
            if cpu + 1e-9 < self._cpu_last[name]:
                self._cpu_done[name] += self._cpu_last[name]
            self._cpu_last[name] = cpu
        use.cpu_s = self._cpu_done[name] + self._cpu_last[name]
        use.rss_now = rss
        use.rss_max = max(use.rss_max, rss)
        use.samples.append((now, rss))

    def mark_warm(self) -> None:
        """The RSS now is each service's warm-up baseline."""
        for use in self.usage.values():
            use.rss_warm = use.rss_now

    def mark_end(self) -> None:
        """The RSS now is each service's RSS at the end of the load."""
        for use in self.usage.values():
            use.rss_end = use.rss_now

    async def run(self, stop: asyncio.Event) -> None:
        """Sample every ``every_s`` until ``stop``."""
        while not stop.is_set():
            await asyncio.to_thread(self.sample)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.every_s)
        await asyncio.to_thread(self.sample)
        for use in self.usage.values():
            use.rss_after = use.rss_now


# -- connections -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadUser:
    """A user of the run: its name and the client key paired for it."""

    name: str
    key_id: str
    key: ClientKeyPair


class Link:
    """One authenticated WebSocket of a load user, read as plain JSON (frames are not validated here).

    Raises GatewayError when the connection fails or ends.
    """

    def __init__(self, url: str, fingerprint: str, user: LoadUser, client_name: str) -> None:
        self.url = url
        self.fingerprint = fingerprint
        self.user = user
        self.client_name = client_name
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._drain: asyncio.Task[None] | None = None

    async def open(self, timeout: float = 30.0) -> None:
        """Connect and sign the gateway's challenge with the user's key."""
        self._http = aiohttp.ClientSession()
        try:
            async with asyncio.timeout(timeout):
                self._ws = await self._http.ws_connect(
                    self.url, ssl=aiohttp.Fingerprint(bytes.fromhex(self.fingerprint)),
                    max_msg_size=16 * 1024 * 1024, heartbeat=30.0)
                hello = await self.receive()
                challenge = await self.receive()
                if hello.get("type") != "hello" or challenge.get("type") != "challenge":
                    raise GatewayError(f"gateway greeted with {hello.get('type')}, {challenge.get('type')}")
                nonce = base64.b64decode(challenge["nonce"])
                signature = self.user.key.sign(challenge_message(self.fingerprint, nonce))
                await self.send(Authenticate(method="key", key_id=self.user.key_id, signature=signature,
                                             client_name=self.client_name))
                reply = await self.receive()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            await self.close()
            raise GatewayError(f"cannot connect to {self.url}: {exc!r}") from None
        except BaseException:
            await self.close()
            raise
        if reply.get("type") != "auth_ok":
            await self.close()
            raise GatewayError(f"authentication refused: {reply}")

    async def send(self, frame: ClientFrame) -> None:
        """Send one frame."""
        if self._ws is None:
            raise GatewayError("not connected")
        try:
            await self._ws.send_str(frame.model_dump_json())
        except (aiohttp.ClientError, OSError, ConnectionError) as exc:
            raise GatewayError(f"send failed: {exc!r}") from None

    async def receive(self) -> dict[str, Any]:
        """The next frame, as a dict."""
        if self._ws is None:
            raise GatewayError("not connected")
        msg = await self._ws.receive()
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise GatewayError(f"connection closed ({msg.type.name})")
        frame = json.loads(msg.data)
        if not isinstance(frame, dict):
            raise GatewayError("the gateway sent a frame that is not a JSON object")
        return frame

    def drain(self, refused: Callable[[dict[str, Any]], None]) -> None:
        """Read every frame from now on in the background (a link that only sends must still read,
        or its heartbeat fails); ``error`` and ``overloaded`` frames go to ``refused``."""
        async def read() -> None:
            with contextlib.suppress(GatewayError):
                while True:
                    frame = await self.receive()
                    if frame.get("type") in ("error", "overloaded"):
                        refused(frame)
        self._drain = asyncio.create_task(read())

    async def close(self) -> None:
        """Close the connection."""
        if self._drain is not None:
            self._drain.cancel()
            await asyncio.gather(self._drain, return_exceptions=True)
            self._drain = None
        try:
            if self._ws is not None:
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    await self._ws.close()  # waits for the gateway's close frame
        finally:  # even when cancelled while waiting for it
            self._ws = None
            if self._http is not None:
                http, self._http = self._http, None
                await http.close()


# -- sessions ----------------------------------------------------------------------------------------------


@dataclass
class LoadSession:
    """One session the run started, its clients' records and what its events showed."""

    slot: int
    user: str
    workspace: Path
    session_id: str = ""
    executor_id: str = ""
    started_at: float = 0.0
    rounds_sent: int = 0
    expect_error: str | None = None
    """Why this session may end with an error (None: it must not)."""
    logs: list[ClientLog] = field(default_factory=list)
    track: SessionTrack = field(default_factory=SessionTrack)
    stalled_live: str | None = None
    """Set when the run saw it busy with no new event for longer than ``stall_s``."""
    abandoned: bool = False
    """The driver stopped waiting for its turn (no event for ``stall_s + settle_s``)."""


@dataclass
class SessionResult:
    """The verdict on one session."""

    session_id: str
    slot: int
    user: str
    workspace: Path
    executor_id: str
    events: int
    turns: int
    tool_calls: int
    reconnects: int
    expected_error: str | None
    exit_code: int | None
    problems: list[str]


@dataclass
class LoadReport:
    """What a load run did and found."""

    users: int
    slots: int
    clients_per_session: int
    duration_s: float
    warm_s: float
    sessions: list[SessionResult]
    latencies: list[float]
    services: dict[str, ServiceUsage]
    setup_problems: list[str]
    retries: list[str]
    """Slots that had to try again to upload a workspace or start a session, and frames the gateway
    refused on a slot's control link (and why): expected while a chaos schedule kills services, a
    finding otherwise."""
    batches: tuple[int, ...] = (1,)
    """The attach batch sizes of each session's clients, in order."""

    @property
    def tool_calls(self) -> int:
        """Tool calls answered over the run."""
        return len(self.latencies)

    @property
    def tool_calls_per_s(self) -> float:
        """Tool calls answered per second of load."""
        return self.tool_calls / self.duration_s if self.duration_s else 0.0

    @property
    def latency_p50(self) -> float:
        """Median seconds from a tool_use event to its tool_result event."""
        return percentile(self.latencies, 0.50)

    @property
    def latency_p99(self) -> float:
        """99th percentile seconds from a tool_use event to its tool_result event."""
        return percentile(self.latencies, 0.99)

    @property
    def reconnects(self) -> int:
        """Client reconnects over the run."""
        return sum(s.reconnects for s in self.sessions)

    @property
    def ok(self) -> bool:
        """No session had a problem and the run could be set up."""
        return not self.problems()

    def problems(self) -> list[str]:
        """Every problem found, each naming its session."""
        out = list(self.setup_problems)
        for s in self.sessions:
            out += [f"session {s.session_id} (slot {s.slot}, {s.user}): {p}" for p in s.problems]
        return out

    def format(self) -> str:
        """A human summary: sessions, events, tool calls, latency, per-service CPU and RSS."""
        events = sum(s.events for s in self.sessions)
        lines = [
            (f"users {self.users}, concurrent sessions {self.slots}, clients per session "
            f"{self.clients_per_session} (attach batch {', '.join(map(str, self.batches))}); "
            f"{len(self.sessions)} sessions over {self.duration_s:.0f} s "
            f"(warm-up {self.warm_s:.0f} s)"),
            (f"events {events} (each to {self.clients_per_session} clients), turns "
            f"{sum(s.turns for s in self.sessions)}, tool calls {self.tool_calls} "
            f"({self.tool_calls_per_s:.1f}/s), client reconnects {self.reconnects}"),
            f"tool latency p50 {self.latency_p50 * 1000:.1f} ms, p99 {self.latency_p99 * 1000:.1f} ms",
            (f"{'service':<10} {'CPU s':>8} {'CPU %':>6} {'RSS warm':>9} {'RSS end':>8} {'RSS max':>8} "
            f"{'growth':>13} {'stopped':>8} {'restarts':>8}"),
        ]
        for u in self.services.values():
            lines.append(
                f"{u.name:<10} {u.cpu_s:>8.1f} {100 * u.cpu_s / max(self.duration_s, 1e-9):>5.0f}% "
                f"{u.rss_warm / 2**20:>7.1f}Mi {u.rss_end / 2**20:>6.1f}Mi {u.rss_max / 2**20:>6.1f}Mi "
                f"{u.growth_mib:>+6.1f}Mi {u.growth_pct:>+4.0f}% {u.rss_after / 2**20:>6.1f}Mi {u.restarts:>8}")
        if self.retries:
            lines.append(f"slots that had to retry starting a session: {len(self.retries)}, first: "
                         f"{self.retries[0]}")
        problems = self.problems()
        lines.append("checks: every client gapless, no duplicates, identical lists, every tool answered, "
                     "no stall: " + ("OK" if not problems else f"{len(problems)} PROBLEM(S)"))
        lines += [f"  {p}" for p in problems[:50]]
        return "\n".join(lines)


class LoadRun:
    """Users, sessions and clients driving a stack through its gateway; see the module docstring."""

    def __init__(self, stack: Stack, *, workdir: Path, users: int = 5, sessions: int = 20,
                 clients_per_session: int = 3, duration: float = 60.0, rounds: int = 30,
                 sandbox: str = "bwrap", stall_s: float = 30.0, sample_s: float = 1.0,
                 think_s: float = 0.0, batches: Sequence[int] = (1, 100, 100), allow_tool_errors: bool = False,
                 settle_s: float = 120.0) -> None:
        """``rounds``: turns per session before the slot starts a new one; ``think_s``: pause
        between a turn's end and the next prompt; ``batches``: the clients' attach batch sizes;
        ``settle_s``: how long after the duration sessions may take to end."""
        if users < 1 or sessions < 1 or clients_per_session < 1 or rounds < 1:
            raise LoadError("users, sessions, clients_per_session and rounds must be at least 1")
        self.stack = stack
        self.workdir = workdir
        self.n_users = users
        self.n_slots = sessions
        self.clients_per_session = clients_per_session
        self.duration = duration
        self.rounds = rounds
        self.sandbox = sandbox
        self.stall_s = stall_s
        self.think_s = think_s
        self.batches = tuple(batches) or (1,)
        self.allow_tool_errors = allow_tool_errors
        self.settle_s = settle_s
        state = StateDir(stack.state_dir)
        self.url = f"wss://127.0.0.1:{stack.gateway_port}/ws"
        self.fingerprint = state.gateway_fingerprint().replace(":", "").lower()
        self._token = state.client_token()
        self.script = json.dumps(round_script(rounds))
        self.users: list[LoadUser] = []
        self.sessions: list[LoadSession] = []
        self._live: dict[int, LoadSession] = {}
        self._marking: list[str] = []
        self.sampler = ResourceSampler(stack, sample_s)
        self.warmed_up = asyncio.Event()
        """Set once every slot has completed a turn."""
        self.steady = asyncio.Event()
        """Set once every slot has been through one whole session (the memory baseline)."""
        self._steady_slots: set[int] = set()
        self._stop_load = asyncio.Event()
        self._setup_problems: list[str] = []
        self._retries: list[str] = []
        self._warm_slots: set[int] = set()
        self._followers: set[asyncio.Task[None]] = set()

    # -- the API for chaos schedules ---------------------------------------------------------------

    def live_sessions(self) -> list[LoadSession]:
        """The session each slot runs now (slots between sessions are left out)."""
        return [s for s in self._live.values() if s.session_id and not s.track.ended]

    def expect_error(self, session_id: str, why: str) -> None:
        """``session_id`` may end with an error without counting as a failure."""
        for s in self.sessions:
            if s.session_id == session_id:
                s.expect_error = why

    @contextlib.asynccontextmanager
    async def expecting_errors(self, *, executor_id: str, why: str = "its executor was killed"
                               ) -> AsyncIterator[list[LoadSession]]:
        """Mark the sessions on ``executor_id`` live now or started inside the block; yields them."""
        marked = [s for s in self.live_sessions() if s.executor_id == executor_id]
        for s in marked:
            s.expect_error = why
        self._marking.append(executor_id)
        try:
            yield marked
        finally:
            self._marking.remove(executor_id)

    # -- the run -----------------------------------------------------------------------------------

    async def run(self, during: Callable[[LoadRun], Awaitable[None]] | None = None) -> LoadReport:
        """Pair the users, run the load (and ``during`` beside it), check everything; the report."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        await self._pair_users()
        stop_sampling = asyncio.Event()
        sampler = asyncio.create_task(self.sampler.run(stop_sampling))
        started = time.monotonic()
        warm_at: list[float] = []
        tasks: list[asyncio.Task[None]] = []
        try:
            slots = [asyncio.create_task(self._slot(i)) for i in range(self.n_slots)]
            tasks += slots
            tasks.append(asyncio.create_task(self._watch_stalls()))

            async def warm() -> None:
                for point in (self.warmed_up, self.steady):
                    await point.wait()
                    warm_at[:] = [time.monotonic() - started]
                    await asyncio.to_thread(self.sampler.sample)
                    self.sampler.mark_warm()

            tasks.append(asyncio.create_task(warm()))

            async def extra() -> None:
                if during is not None:
                    await during(self)

            await asyncio.gather(asyncio.sleep(self.duration), extra())
            self._stop_load.set()
            load_s = time.monotonic() - started
            await asyncio.to_thread(self.sampler.sample)
            self.sampler.mark_end()
            await asyncio.gather(*slots)
            if not self.warmed_up.is_set():
                self._setup_problems.append("not every slot completed a turn: no warm-up point")
                self.sampler.mark_warm()
        finally:  # on success only the watchdog and followers of sessions that never ended remain
            self._stop_load.set()
            leftover = [*tasks, *self._followers]
            for t in leftover:
                t.cancel()
            await asyncio.gather(*leftover, return_exceptions=True)
            stop_sampling.set()
            await sampler
        return self._report(load_s, warm_at[0] if warm_at else load_s)

    async def _pair_users(self) -> None:
        op = GatewayClient(self.url, self.fingerprint, client_name="load-operator")
        try:
            await op.connect(self._token)
            for i in range(self.n_users):
                name = f"load{i}"
                await op.send(PairingCodeRequest(user=name, client_name=f"{name}-driver"))
                code = await asyncio.wait_for(op.receive(), 30)
                if not isinstance(code, PairingCode):
                    raise LoadError(f"no pairing code for {name}: {code}")
                key = ClientKeyPair.generate()
                async with GatewayClient(self.url, self.fingerprint, client_name=f"{name}-driver") as c:
                    paired = await c.pair(code.code, key)
                self.users.append(LoadUser(name, paired.key_id, key))
        finally:
            await op.close()

    async def _connect(self, user: LoadUser, name: str, log: ClientLog | None = None) -> Link:
        """A link for ``user``, retried until it connects or the run gives up on it."""
        give_up = time.monotonic() + self.duration + self.settle_s
        for attempt in range(10**9):
            link = Link(self.url, self.fingerprint, user, name)
            try:
                await link.open()
                return link
            except GatewayError as exc:
                if log is not None:
                    log.errors.append(str(exc))
                if time.monotonic() > give_up:
                    raise
                await asyncio.sleep(RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)])
        raise AssertionError("unreachable")

    async def _upload_workspace(self, user: LoadUser, path: Path) -> None:
        """Make a workspace with a few files and upload it as ``user`` (locked on an executor)."""
        path.mkdir(parents=True)
        (path / "notes").mkdir()
        (path / "README.md").write_text(f"workspace of {user.name}\n")
        (path / "log.txt").write_text("")
        client = GatewayClient(self.url, self.fingerprint, client_name=f"{user.name}-upload")
        out = io.StringIO()
        try:
            await client.connect_key(user.key_id, user.key)
            remote = RemoteWorkspace(client, self.workdir / "transfers" / user.name, path,
                                     f"{user.name}-host", out)
            if await remote.lock(None) != 0:
                raise LoadError(f"upload of {path} failed: {out.getvalue()}")
        finally:
            await client.close()

    async def _slot(self, slot: int) -> None:
        """Keep one session running in this slot until the load stops."""
        user = self.users[slot % len(self.users)]
        generation = 0
        workspace: Path | None = None
        while not self._stop_load.is_set():
            try:
                if workspace is None:
                    workspace = self.workdir / "ws" / f"slot{slot}-{generation}"
                    await self._upload_workspace(user, workspace)
                session = LoadSession(slot=slot, user=user.name, workspace=workspace)
                await self._drive(session, user)
            except (GatewayError, SiloError, OSError, TimeoutError) as exc:
                if self._stop_load.is_set():
                    break
                self._retries.append(f"slot {slot}: {type(exc).__name__}: {exc}")
                workspace = None
                generation += 1
                await asyncio.sleep(1.0)
                continue
            if session.track.errors or session.track.exit_code not in (None, 0):
                workspace, generation = None, generation + 1  # leave the failed one as it was
            if session.track.ended and not self._stop_load.is_set():
                self._steady_slots.add(slot)
                if len(self._steady_slots) == self.n_slots:
                    self.steady.set()

    async def _drive(self, session: LoadSession, user: LoadUser) -> None:
        """Create one session, follow it with its clients, prompt it turn by turn, stop it."""
        ctl = await self._connect(user, f"{user.name}-slot{session.slot}")
        try:
            await ctl.send(CreateSession(workspace=str(session.workspace), workspace_host=f"{user.name}-host",
                                         sandbox=self.sandbox, llm="mock", script=self.script))  # type: ignore[arg-type]
            async with asyncio.timeout(120):
                while True:
                    frame = await ctl.receive()
                    if frame.get("type") == "session_created":
                        break
                    if frame.get("type") in ("error", "overloaded"):
                        raise LoadError(f"create_session refused: {frame}")
        finally:
            await ctl.close()
        session.session_id = frame["session_id"]
        session.executor_id = frame["executor_id"]
        session.started_at = time.monotonic()
        if session.executor_id in self._marking:
            session.expect_error = "its executor was killed"
        self.sessions.append(session)
        self._live[session.slot] = session
        for c in range(self.clients_per_session):
            log = ClientLog(f"client{c}", self.batches[c % len(self.batches)])
            session.logs.append(log)
            task = asyncio.create_task(self._follow(session, user, log))
            self._followers.add(task)
            task.add_done_callback(self._followers.discard)
        track = session.track
        ctl = await self._control(user, session)
        try:
            while (not self._stop_load.is_set() and session.rounds_sent < self.rounds and not track.ended
                   and not session.abandoned):
                text = f"round {session.rounds_sent}"
                ctl = await self._send(ctl, user, session, Prompt(session_id=session.session_id, text=text))
                session.rounds_sent += 1
                ctl = await self._await_turn(ctl, user, session, text, session.rounds_sent)
                if track.turns and session.slot not in self._warm_slots:
                    self._warm_slots.add(session.slot)
                    if len(self._warm_slots) == self.n_slots:
                        self.warmed_up.set()
                if self.think_s:
                    await asyncio.sleep(self.think_s * random.uniform(0.5, 1.5))
            if not track.ended:
                ctl = await self._send(ctl, user, session, Shutdown(session_id=session.session_id))
                await self._await_end(session)
        finally:
            await ctl.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settle_s):
                    while not all(log.ended for log in session.logs):
                        await asyncio.sleep(0.1)

    async def _control(self, user: LoadUser, session: LoadSession) -> Link:
        """The link a slot prompts and stops its session on; what the gateway refuses is a retry."""
        link = await self._connect(user, f"{user.name}-slot{session.slot}")

        def refused(frame: dict[str, Any]) -> None:
            self._retries.append(f"slot {session.slot}: session {session.session_id}: the gateway answered "
                                 f"{frame.get('request') or 'a frame'} with {json.dumps(frame)[:300]}")

        link.drain(refused)
        return link

    async def _send(self, ctl: Link, user: LoadUser, session: LoadSession, frame: ClientFrame) -> Link:
        """Send ``frame`` on the slot's link, reconnecting first when it is gone; the link used."""
        for _ in range(100):
            try:
                await ctl.send(frame)
                return ctl
            except GatewayError:
                await ctl.close()
                ctl = await self._control(user, session)
        raise LoadError(f"could not send {frame.type} for {session.session_id}")

    async def _await_turn(self, ctl: Link, user: LoadUser, session: LoadSession, text: str,
                          turns: int) -> Link:
        """Wait until ``turns`` turns completed; resend the prompt if it never showed up (a lost gateway)."""
        track = session.track
        sent_at = time.monotonic()
        while track.turns < turns and not track.ended:
            track.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(track.changed.wait(), 1.0)
            if text not in track.prompts and time.monotonic() - sent_at > 15.0:
                ctl = await self._send(ctl, user, session, Prompt(session_id=session.session_id, text=text))
                sent_at = time.monotonic()
            if time.monotonic() - track.last_seen > self.stall_s + self.settle_s:
                session.abandoned = True  # the watchdog has reported it; stop driving this session
                break
        return ctl

    async def _await_end(self, session: LoadSession) -> None:
        track = session.track
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settle_s):
                while not track.ended:
                    track.changed.clear()
                    await track.changed.wait()

    async def _follow(self, session: LoadSession, user: LoadUser, log: ClientLog) -> None:
        """One client: attach, record every event until shutdown, reconnect and resume when cut off."""
        track = session.track
        name = f"{user.name}-{session.session_id[:8]}-{log.name}"
        first = True
        while not log.ended:
            link = await self._connect(user, name, log)
            if not first:
                log.reconnects += 1
            first = False
            try:
                await link.send(Attach(session_id=session.session_id, from_seq=log.next_seq,
                                       batch=log.batch))
                while not log.ended:
                    frame = await link.receive()
                    kind = frame.get("type")
                    if kind == "event":
                        events = [frame]
                    elif kind == "events":
                        events = list(frame.get("events") or ())
                    elif kind in ("error", "overloaded"):
                        log.errors.append(json.dumps(frame)[:300])
                        break
                    else:
                        continue
                    for ev in events:
                        if ev.get("session_id") != session.session_id:
                            continue
                        seq = int(ev["seq"])
                        log.add(seq, event_digest(ev))
                        track.offer(ev)
                        if ev.get("kind") == "shutdown":
                            log.ended = True
            except GatewayError as exc:
                log.errors.append(str(exc))
            finally:
                await link.close()
            if not log.ended:
                await asyncio.sleep(random.uniform(0.05, 0.3))

    async def _watch_stalls(self) -> None:
        """Note a session busy with no new event for longer than ``stall_s`` while it happens."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for s in self.live_sessions():
                if s.track.busy and now - s.track.last_seen > self.stall_s and s.stalled_live is None:
                    s.stalled_live = f"stalled: busy with no event for {now - s.track.last_seen:.0f} s " \
                                     f"(seen live, at seq {s.track.next_seq})"

    def _report(self, load_s: float, warm_s: float) -> LoadReport:
        results = []
        latencies: list[float] = []
        on_workspace: dict[Path, list[LoadSession]] = {}
        for s in self.sessions:
            on_workspace.setdefault(s.workspace, []).append(s)
        workspace_problems: dict[str, str | None] = {}
        for group in on_workspace.values():
            found = verify_workspace([s.track.log_lines for s in group])
            workspace_problems.update({s.session_id: p for s, p in zip(group, found, strict=True)})
        for s in self.sessions:
            problems = verify_session(s.logs, s.track, stall_s=self.stall_s, expect_error=s.expect_error is not None,
                                      allow_tool_errors=self.allow_tool_errors)
            if s.stalled_live:
                problems.append(s.stalled_live)
            if workspace_problems.get(s.session_id) and not self.allow_tool_errors:
                problems.append(str(workspace_problems[s.session_id]))
            latencies += s.track.latencies
            results.append(SessionResult(
                session_id=s.session_id, slot=s.slot, user=s.user, workspace=s.workspace,
                executor_id=s.executor_id, events=s.track.next_seq, turns=s.track.turns,
                tool_calls=len(s.track.latencies), reconnects=sum(log.reconnects for log in s.logs),
                expected_error=s.expect_error, exit_code=s.track.exit_code, problems=problems))
        return LoadReport(users=self.n_users, slots=self.n_slots, clients_per_session=self.clients_per_session,
                          duration_s=load_s, warm_s=warm_s, sessions=results, latencies=latencies,
                          services=self.sampler.usage, setup_problems=self._setup_problems,
                          retries=self._retries,
                          batches=tuple(self.batches[c % len(self.batches)]
                                        for c in range(self.clients_per_session)))
