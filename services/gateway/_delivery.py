"""Event delivery: one verified feed per session, a bounded outbox per client, catch-up from the stream.

A session's events are verified once per gateway (signature, role
harness, session id, seq) by its ``SessionFeed``, which keeps the newest
ones in a ring while anyone follows the session. Each client connection
has an ``Outbox``: a bounded queue of frames and the one task that writes
them to its socket. A ``Follower`` moves one session's events into one
outbox: from the ring while it keeps up, from the JetStream stream when it
has fallen behind the ring (its live feed was dropped) or asked for older
events. It only ever takes as many events as its outbox has room for, so a
client that stops reading fills its own outbox and nothing else: the
session, the feed and every other client go on, and the slow client is
served from the stream, in order and exactly once, when it reads again.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import json
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from devsilo.protocol import MessageRejected, Role, SessionEvent, subjects
from devsilo.protocol.client import EventFrame
from devsilo.runtime import Bus
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry, Counter, Histogram

DEFAULT_RING = 2048
"""Newest events a feed keeps for its followers; one further behind reads the stream."""
DEFAULT_RING_BYTES = 64 * 1024
"""Characters of encoded frames a feed's ring holds at most (option ``event_ring_bytes``). The rings are
the gateway's largest memory under load (decoded, about three times their characters); bounded by count
alone, each grew with its session's age, and the gateway's memory rose and fell with the sessions (and
kept its peaks). Followers that keep up need only the newest events; one further behind, or attaching
from an older seq, reads the stream."""
DEFAULT_OUTBOX = 512
"""Frames queued for one client before its followers wait (and fall behind the ring)."""
OUTBOX_BYTES = 8 * 1024 * 1024
"""Characters of frames queued for one client before its followers wait (events can be large)."""
STREAM_BATCH = 256
"""Events fetched from the stream per round trip."""
KEEP_IDLE = 1024
"""Feeds of sessions nobody follows that a gateway keeps (their stream positions), newest used first."""
MARK_EVERY = 64
"""Every this many seqs a feed remembers the event's stream sequence, to start stream reads near it."""
END_EVENT = "shutdown"
"""A session's last event: a follower that delivered it is done (and lets go of the feed)."""
STREAM_TIMEOUT_S = 10.0
LIVE_HEARTBEAT_S = 1.0
"""The live feed's consumer heartbeat: two missed (its NATS node gone) and the feed is recreated
on another node, from the next event; at the library's 5 s the gap was up to 20 s."""


class DeliveryMetrics:
    """Delivery metrics (no session ids in labels)."""

    def __init__(self, reg: CollectorRegistry) -> None:
        self.lag = Histogram(
            "silo_event_delivery_lag_seconds", "Time from an event's timestamp to its frame being written "
            "to a client, by path (live from the feed, or caught up from the stream).", ["path"],
            registry=reg, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60))
        self.delivered = Counter("silo_events_delivered_total", "Events written to clients.", registry=reg)
        self.from_stream = Counter("silo_events_caught_up_total",
                                   "Events served to clients from the stream rather than the live feed.",
                                   registry=reg)
        self.drops = Counter("silo_delivery_queue_drops_total",
                             "Times a client's live feed was dropped because its queue was full (it then "
                             "catches up from the stream).", registry=reg)
        self.rejected = Counter("silo_events_rejected_total",
                                "Stream messages not delivered: bad signature, wrong sender or session.",
                                registry=reg)
        self.overloaded = Counter("silo_overloaded_total", "Overloaded answers to clients, by reason.",
                                  ["reason"], registry=reg)
        for reason in ("clients", "user_clients", "rate"):  # zeros on the dashboard, not gaps
            self.overloaded.labels(reason=reason)


@dataclass(frozen=True, slots=True)
class FeedEvent:
    """A verified event and its client frame, encoded once for every client.

    The frame is kept encoded only: rings hold thousands of these, and a
    model of the frame would be a third copy of the event's data.
    """

    seq: int
    stream_seq: int
    event: SessionEvent
    wire: str

    @property
    def frame(self) -> EventFrame:
        """The client frame, made again from the event (for ``events`` answers)."""
        return _event_frame(self.event)


def _event_frame(event: SessionEvent) -> EventFrame:
    return EventFrame(session_id=event.session_id, seq=event.seq, kind=event.kind, agent=event.agent,
                      ts=event.ts, data=event.data)


class SessionFeed:
    """One session's verified events: the live ring while followed, and reads from the stream."""

    def __init__(self, bus: Bus, sid: str, *, ring: int, metrics: DeliveryMetrics, log: Any,
                 ring_bytes: int = DEFAULT_RING_BYTES) -> None:
        self.bus = bus
        self.sid = sid
        self.subject = subjects.session_events(sid)
        self.metrics = metrics
        self.log = log.bind(session=sid)
        self._ring: deque[FeedEvent] = deque()
        self._ring_max = ring
        self._ring_max_bytes = ring_bytes
        self._ring_bytes = 0
        self._marks: list[tuple[int, int]] = []
        """(seq, stream seq) of every MARK_EVERY-th event seen, sorted."""
        self._changed: asyncio.Future[None] | None = None
        self._sub: Any = None
        self._starting: asyncio.Lock = asyncio.Lock()
        self.followers = 0

    # -- live --------------------------------------------------------------------------

    async def follow(self) -> None:
        """One more follower: the live subscription runs while there is any."""
        self.followers += 1
        try:
            async with self._starting:
                if self._sub is None:
                    self._sub = await self.bus.js.subscribe(
                        self.subject, ordered_consumer=True, cb=self._on_live, idle_heartbeat=LIVE_HEARTBEAT_S,
                        config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW))
        except BaseException:
            self.followers -= 1
            raise

    async def unfollow(self) -> None:
        """One follower less; the last one stops the live subscription and empties the ring."""
        self.followers -= 1
        if self.followers == 0 and self._sub is not None:
            sub, self._sub = self._sub, None
            self._clear_ring()
            try:
                await sub.unsubscribe()
            except (NatsError, TimeoutError) as exc:  # NATS is gone; the consumer expires on its own
                self.log.info("feed_unsubscribe_failed", error=str(exc))

    async def _on_live(self, msg: Msg) -> None:
        ev = self._verify(msg)
        if ev is None:
            return
        ring = self._ring
        if ring:
            last = ring[-1].seq
            if ev.seq <= last:
                return  # redelivered
            if ev.seq != last + 1:
                # Never expected (the consumer is ordered); the stream has the ones between.
                self.log.warning("feed_gap", expected=last + 1, got=ev.seq)
                self._clear_ring()
        ring.append(ev)
        self._ring_bytes += len(ev.wire)
        while len(ring) > 1 and (len(ring) > self._ring_max or self._ring_bytes > self._ring_max_bytes):
            self._ring_bytes -= len(ring.popleft().wire)
        changed, self._changed = self._changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)

    def _clear_ring(self) -> None:
        self._ring.clear()
        self._ring_bytes = 0

    async def changed(self) -> None:
        """Wait for the next live event."""
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        # Shielded: a follower cancelled while waiting must not cancel the others' wait.
        await asyncio.shield(self._changed)

    @property
    def ring_size(self) -> int:
        """Events in the ring now."""
        return len(self._ring)

    @property
    def ring_chars(self) -> int:
        """Characters of encoded frames in the ring now."""
        return self._ring_bytes

    @property
    def live_next(self) -> int | None:
        """The seq after the newest live event, None when the ring is empty."""
        return self._ring[-1].seq + 1 if self._ring else None

    def from_ring(self, from_seq: int, limit: int) -> list[FeedEvent] | None:
        """Events from ``from_seq`` out of the ring; None when it does not hold ``from_seq``
        (empty list: nothing newer yet)."""
        ring = self._ring
        if not ring or from_seq < ring[0].seq:
            return None
        start = from_seq - ring[0].seq
        if start >= len(ring):
            return [] if start == len(ring) else None
        return list(itertools.islice(ring, start, start + limit))

    # -- verification ------------------------------------------------------------------

    def _verify(self, msg: Msg) -> FeedEvent | None:
        try:
            env = self.bus.open(msg.data, msg.subject, fresh=False)
            event = env.expect(SessionEvent)
        except MessageRejected:
            self.metrics.rejected.inc()
            return None
        if env.header.role is not Role.HARNESS or event.session_id != self.sid or env.header.sid != self.sid:
            self.metrics.rejected.inc()
            self.log.warning("event_rejected", sender=env.header.sender, claimed_session=event.session_id)
            return None
        frame = _event_frame(event)
        stream_seq = msg.metadata.sequence.stream
        if event.seq % MARK_EVERY == 0:
            mark = (event.seq, stream_seq)
            i = bisect.bisect_left(self._marks, mark)
            if i == len(self._marks) or self._marks[i][0] != event.seq:
                self._marks.insert(i, mark)
        return FeedEvent(event.seq, stream_seq, event, frame.model_dump_json())

    # -- the stream ----------------------------------------------------------------------

    async def read(self, from_seq: int, limit: int) -> tuple[list[FeedEvent], bool]:
        """Up to ``limit`` events from ``from_seq`` in order, and whether they reach the newest stored."""
        cached = self.from_ring(from_seq, limit)
        if cached:
            return cached, cached[-1].seq + 1 == self.live_next
        return await self.read_stream(from_seq, limit)

    async def read_stream(self, from_seq: int, limit: int) -> tuple[list[FeedEvent], bool]:
        """Up to ``limit`` events from ``from_seq`` read from the stream (an ephemeral pull consumer)."""
        i = bisect.bisect_right(self._marks, (from_seq, 1 << 62)) - 1
        start = self._marks[i][1] if i >= 0 else None
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start else DeliverPolicy.ALL,
            opt_start_seq=start, ack_policy=AckPolicy.NONE, inactive_threshold=30.0, mem_storage=True,
            filter_subject=self.subject)
        js = self.bus.js
        psub = await js.pull_subscribe(self.subject, stream=subjects.EVENTS_STREAM, config=config)
        out: list[FeedEvent] = []
        name: str | None = None
        try:
            info = await psub.consumer_info()
            name = info.name
            pending = info.num_pending or 0
            while pending and len(out) < limit:
                msgs = await psub.fetch(min(pending, STREAM_BATCH), timeout=STREAM_TIMEOUT_S)
                for msg in msgs:
                    pending = msg.metadata.num_pending
                    ev = self._verify(msg)
                    if ev is None or ev.seq < from_seq + len(out):
                        continue  # rejected, before from_seq, or a duplicate
                    if ev.seq != from_seq + len(out):
                        self.log.error("stream_gap", expected=from_seq + len(out), got=ev.seq)
                        return out, False
                    out.append(ev)
                    if len(out) == limit:
                        break
        finally:
            await _drop_consumer(js, psub, name, self.log)
        return out, pending == 0

    async def ended_before(self, seq: int) -> bool:
        """Whether the session ended (its last event, ``shutdown``) before ``seq``: nothing more comes."""
        last = await self.last_event()
        return last is not None and last.kind == END_EVENT and last.seq < seq

    async def last_event(self) -> SessionEvent | None:
        """The session's newest stored event (verified), None when it has none."""
        if self._ring:
            return self._ring[-1].event
        try:
            msg = await self.bus.js.get_last_msg(subjects.EVENTS_STREAM, self.subject, direct=True)
        except NotFoundError:
            return None
        try:
            env = self.bus.open(msg.data or b"", msg.subject or self.subject, fresh=False)
            event = env.expect(SessionEvent)
        except MessageRejected:
            return None
        if env.header.role is not Role.HARNESS or event.session_id != self.sid:
            return None
        return event


async def _drop_consumer(js: Any, psub: Any, name: str | None, log: Any) -> None:
    try:
        await psub.unsubscribe()
        if name is not None:
            await js.delete_consumer(subjects.EVENTS_STREAM, name)
    except (NatsError, TimeoutError) as exc:  # an ephemeral consumer expires on its own (inactive_threshold)
        log.info("stream_reader_cleanup_failed", error=str(exc))


class Feeds:
    """The gateway's session feeds: one per session followed now, and the most recently used others."""

    def __init__(self, bus: Bus, metrics: DeliveryMetrics, log: Any, *, ring: int = DEFAULT_RING,
                 ring_bytes: int = DEFAULT_RING_BYTES, keep_idle: int = KEEP_IDLE) -> None:
        self.bus = bus
        self.metrics = metrics
        self.log = log
        self.ring = ring
        self.ring_bytes = ring_bytes
        self.keep_idle = keep_idle
        self._feeds: OrderedDict[str, SessionFeed] = OrderedDict()

    @property
    def held(self) -> int:
        """Feeds held: followed ones and up to ``keep_idle`` others."""
        return len(self._feeds)

    @property
    def followed(self) -> int:
        """Feeds with a follower (each has a live subscription and a ring)."""
        return sum(1 for f in self._feeds.values() if f.followers)

    @property
    def ring_events(self) -> int:
        """Events held in the feeds' rings."""
        return sum(f.ring_size for f in self._feeds.values())

    @property
    def ring_chars(self) -> int:
        """Characters of encoded frames held in the feeds' rings."""
        return sum(f.ring_chars for f in self._feeds.values())

    def get(self, sid: str) -> SessionFeed:
        """The feed of ``sid`` (made on first use)."""
        feed = self._feeds.get(sid)
        if feed is None:
            feed = self._feeds[sid] = SessionFeed(self.bus, sid, ring=self.ring, ring_bytes=self.ring_bytes,
                                                  metrics=self.metrics, log=self.log)
            idle = [k for k, f in self._feeds.items() if f.followers == 0 and k != sid]
            for k in idle[: max(0, len(idle) + 1 - self.keep_idle)]:  # oldest first; the new one counts
                del self._feeds[k]
        else:
            self._feeds.move_to_end(sid)
        return feed


class Outbox:
    """One client's bounded queue of frames and the task that writes them, in order, to its socket."""

    def __init__(self, ws: web.WebSocketResponse, metrics: DeliveryMetrics, *, limit: int = DEFAULT_OUTBOX,
                 limit_bytes: int = OUTBOX_BYTES, clock: Callable[[], float] = time.time) -> None:
        self.ws = ws
        self.metrics = metrics
        self.limit = limit
        self.limit_bytes = limit_bytes
        self._bytes = 0
        self._clock = clock
        self._queue: deque[tuple[str, tuple[float, ...], bool]] = deque()
        """(frame, timestamps of the events in it, whether they came from the stream)"""
        self._ready = asyncio.Event()
        self._room: asyncio.Future[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._dead = asyncio.Event()
        """Set when the socket failed: nothing more is written, and followers wait for the close."""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the writer."""
        self._task = asyncio.create_task(self._write())

    @property
    def room(self) -> int:
        """Frames that fit now."""
        if self._bytes >= self.limit_bytes:
            return 0
        return max(0, self.limit - len(self._queue))

    def _half_empty(self) -> bool:
        return len(self._queue) <= self.limit // 2 and self._bytes <= self.limit_bytes // 2

    async def wait_room(self) -> None:
        """Wait until at least half the queue is free (so followers refill it in batches)."""
        while not self._half_empty() or self._dead.is_set():
            if self._dead.is_set():
                await asyncio.Event().wait()  # until the connection's close cancels us
            if self._room is None or self._room.done():
                self._room = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._room)

    async def put(self, text: str) -> None:
        """Queue a reply or notice (waits while the queue is full)."""
        while self.room == 0:
            await self.wait_room()
        self._queue.append((text, (), False))
        self._bytes += len(text)
        self._idle.clear()
        self._ready.set()

    def put_event(self, ev: FeedEvent, *, from_stream: bool) -> bool:
        """Queue an event frame if there is room; whether it was queued."""
        if self.room == 0:
            return False
        self._queue.append((ev.wire, (ev.event.ts,), from_stream))
        self._bytes += len(ev.wire)
        self._idle.clear()
        self._ready.set()
        return True

    def put_events(self, sid: str, events: list[FeedEvent], *, complete: bool, from_stream: bool) -> None:
        """Queue several consecutive events as one ``events`` frame (the caller made sure there is room).

        The frame is assembled from the events' frames as encoded once for
        every client, so nothing is encoded again per client.
        """
        text = (f'{{"type":"events","session_id":{json.dumps(sid)},"events":['
                + ",".join(ev.wire for ev in events)
                + f'],"next_seq":{events[-1].seq + 1},"complete":{"true" if complete else "false"}}}')
        self._queue.append((text, tuple(ev.event.ts for ev in events), from_stream))
        self._bytes += len(text)
        self._idle.clear()
        self._ready.set()

    async def flush(self, timeout: float) -> None:
        """Wait (up to ``timeout``) until every queued frame was written."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            pass  # a client that does not read gets no more

    async def _write(self) -> None:
        queue = self._queue
        lag = self.metrics.lag
        live, stream = lag.labels(path="live"), lag.labels(path="stream")
        delivered = self.metrics.delivered
        while True:
            await self._ready.wait()
            while queue:
                text, stamps, from_stream = queue.popleft()
                self._bytes -= len(text)
                if self._half_empty() and self._room is not None and not self._room.done():
                    self._room.set_result(None)
                if self.ws.closed or self._dead.is_set():
                    continue
                try:
                    await self.ws.send_str(text)
                except ConnectionError:
                    self._dead.set()
                    queue.clear()
                    self._bytes = 0
                    break
                if stamps:
                    now = self._clock()
                    path = stream if from_stream else live
                    for ts in stamps:
                        path.observe(max(0.0, now - ts))
                    delivered.inc(len(stamps))
            self._ready.clear()
            self._idle.set()

    async def close(self) -> None:
        """Stop the writer (queued frames are dropped: the client is gone)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None  # its traceback holds this outbox: no cycle left for the collector
        if self._room is not None and not self._room.done():
            self._room.cancel()


async def follow(feed: SessionFeed, outbox: Outbox, from_seq: int, log: Any, *, per_frame: int = 1) -> None:
    """Move ``feed``'s events from ``from_seq`` into ``outbox``: the backlog, then live, until the
    session's last event (``shutdown``) is queued, or at once when it ended before ``from_seq``.

    While it keeps up it takes events from the ring; when the client reads
    too slowly and falls behind the ring, its live feed is dropped (counted)
    and it reads on from the stream until it is back in the ring.
    ``per_frame`` above 1: up to that many events waiting at once go out as
    one ``events`` frame (fewer, larger writes when the client is busy).
    """
    await feed.follow()
    next_seq = from_seq
    live = False
    try:
        while True:
            await outbox.wait_room()
            room = outbox.room
            batch = feed.from_ring(next_seq, room)
            from_stream = batch is None
            if batch is None:
                if live:
                    feed.metrics.drops.inc()
                    log.info("client_fell_behind", session=feed.sid, seq=next_seq)
                live = False
                batch, _ = await feed.read_stream(next_seq, min(room, STREAM_BATCH))
                if not batch:
                    if await feed.ended_before(next_seq):
                        return
                    live_next = feed.live_next
                    if live_next is None or live_next <= next_seq:
                        await feed.changed()  # nothing newer anywhere yet
                    continue
            elif not batch:
                live = True
                if await feed.ended_before(next_seq):  # (the ring's newest event: no round trip)
                    return
                await feed.changed()
                continue
            else:
                live = True
            queued = 0
            if per_frame > 1 and len(batch) > 1:
                for i in range(0, len(batch), per_frame):
                    group = batch[i:i + per_frame]
                    outbox.put_events(feed.sid, group, complete=group[-1].seq + 1 == feed.live_next,
                                      from_stream=from_stream)
                    queued += len(group)
                    if outbox.room == 0:
                        break
            else:
                for ev in batch:
                    if not outbox.put_event(ev, from_stream=from_stream):
                        break
                    queued += 1
            if from_stream:
                feed.metrics.from_stream.inc(queued)
            if queued:
                next_seq = batch[queued - 1].seq + 1
                if batch[queued - 1].event.kind == END_EVENT:
                    return
    finally:
        await feed.unfollow()
