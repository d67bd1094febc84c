"""One gateway as the TUI sees it: a connection that comes back by itself.

A ``GatewayLink`` connects (local token or paired key), reads every frame in
one task, hands events to the app and answers to whoever asked, and when the
connection drops it tries again after 1 s, 2 s, 4 s ... up to 30 s. After a
reconnect it attaches again to every session it follows from the seq after
the last event it has, and drops any event it already has, so the app sees
each event exactly once and in order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from devsilo.cli._client import ClientKeyPair, GatewayClient, GatewayError
from devsilo.protocol import SiloError
from devsilo.protocol.client import (
    Attach,
    ClientFrame,
    ErrorFrame,
    EventFrame,
    EventsFrame,
    ListSessions,
    RequestEvents,
    Sessions,
)

log = structlog.get_logger("tui")

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0


class RequestFailed(SiloError):
    """The gateway answered a request with an error frame."""

    def __init__(self, frame: ErrorFrame) -> None:
        super().__init__(f"{frame.code}: {frame.message}")
        self.frame = frame


@dataclass
class Credentials:
    """How to authenticate: the local token, or a paired key."""

    token: str | None = None
    key_id: str | None = None
    key: ClientKeyPair | None = None


@dataclass
class _Waiter:
    request: str
    answers: tuple[type[Any], ...]
    future: asyncio.Future[Any]
    match: Callable[[Any], bool] | None = None


@dataclass
class LinkState:
    """What the app shows about a link."""

    connected: bool = False
    user: str = ""
    message: str = "connecting"
    retry_in: float | None = None
    connects: int = 0


EventSink = Callable[["GatewayLink", EventFrame], None]
StateSink = Callable[["GatewayLink"], None]


@dataclass
class GatewayLink:
    """A self-healing connection to one gateway."""

    name: str
    url: str
    fingerprint: str
    creds: Credentials
    on_event: EventSink
    on_state: StateSink
    client_name: str = "tui"
    backoff_first: float = BACKOFF_FIRST
    backoff_max: float = BACKOFF_MAX
    state: LinkState = field(default_factory=LinkState)
    next_seq: dict[str, int] = field(default_factory=dict)
    """Per followed session: the seq of the next event the app has not seen."""
    _client: GatewayClient | None = None
    _task: asyncio.Task[None] | None = None
    _waiters: list[_Waiter] = field(default_factory=list)
    _up: asyncio.Event = field(default_factory=asyncio.Event)
    _listeners: list[Callable[[Any], None]] = field(default_factory=list)
    _filling: set[str] = field(default_factory=set)

    def start(self) -> None:
        """Begin connecting (in the background)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"link-{self.name}")

    async def stop(self) -> None:
        """Close the connection for good."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def wait_up(self, timeout: float = 30.0) -> None:
        """Wait until the link is connected and authenticated."""
        await asyncio.wait_for(self._up.wait(), timeout)

    def listen(self, fn: Callable[[Any], None]) -> Callable[[], None]:
        """Call ``fn`` with every frame that is not an event; returns a function to stop."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn)

    # -- connecting ------------------------------------------------------------------------

    async def _connect(self) -> GatewayClient:
        client = GatewayClient(self.url, self.fingerprint, client_name=self.client_name)
        try:
            if self.creds.token is not None:
                user = await client.connect(self.creds.token)
            else:
                assert self.creds.key_id is not None and self.creds.key is not None
                user = await client.connect_key(self.creds.key_id, self.creds.key)
        except BaseException:
            await client.close()
            raise
        self.state.user = user
        return client

    async def _run(self) -> None:
        delay = self.backoff_first
        while True:
            try:
                self._client = await self._connect()
            except (SiloError, OSError) as exc:
                self._down(f"cannot connect: {exc}", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
                continue
            delay = self.backoff_first
            self.state.connected, self.state.retry_in = True, None
            self.state.message = f"connected as {self.state.user}"
            self.state.connects += 1
            try:
                for sid, seq in list(self.next_seq.items()):
                    await self._client.send(Attach(session_id=sid, from_seq=seq, batch=100))
                self._up.set()
                self.on_state(self)
                await self._read(self._client)
            except (SiloError, OSError) as exc:
                self._down(f"connection lost: {exc}", delay)
            except Exception as exc:  # a bug here must not end the link for good: log it, reconnect
                log.exception("link_failed", gateway=self.name)
                self._down(f"connection dropped after an error in the TUI: {exc}", delay)
            finally:
                self._up.clear()
                await self._client.close()
                self._client = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)

    def _down(self, message: str, retry_in: float) -> None:
        self.state.connected, self.state.message, self.state.retry_in = False, message, retry_in
        for w in self._waiters:
            if not w.future.done():
                w.future.set_exception(GatewayError(f"{self.name}: {message}"))
        self._waiters.clear()
        log.info("link_down", gateway=self.name, message=message, retry_in=retry_in)
        self.on_state(self)

    async def _read(self, client: GatewayClient) -> None:
        while True:
            try:
                frame = await client.receive()
            except ValueError as exc:  # not JSON, or no frame this client knows: say so, read on
                log.warning("bad_frame", gateway=self.name, error=str(exc)[:300])
                bad = ErrorFrame(code="bad_frame", message=f"the gateway sent a frame this TUI cannot read "
                                 f"({str(exc).splitlines()[0][:200]}); it was skipped")
                for fn in list(self._listeners):
                    fn(bad)
                continue
            if isinstance(frame, EventFrame):
                self._deliver(frame)
                continue
            if isinstance(frame, EventsFrame):
                for ev in frame.events:
                    self._deliver(ev)
                sid = frame.session_id
                if sid in self._filling:
                    if frame.complete:
                        self._filling.discard(sid)
                    else:
                        await client.send(RequestEvents(session_id=sid, from_seq=self.next_seq[sid]))
                self._answer(frame)
                continue
            if not self._answer(frame):
                for fn in list(self._listeners):
                    fn(frame)

    def _deliver(self, ev: EventFrame) -> None:
        want = self.next_seq.get(ev.session_id)
        if want is None or ev.seq < want:
            return  # not followed, or a duplicate after a reconnect
        if ev.seq > want:  # never expected from the gateway: fill the gap from its stored events
            log.warning("event_gap", gateway=self.name, want=want, got=ev.seq)
            if ev.session_id not in self._filling and self._client is not None:
                self._filling.add(ev.session_id)
                asyncio.ensure_future(self._client.send(RequestEvents(session_id=ev.session_id, from_seq=want)))
            return
        self.next_seq[ev.session_id] = ev.seq + 1
        self.on_event(self, ev)

    def _answer(self, frame: Any) -> bool:
        for w in self._waiters:
            if w.future.done():
                continue
            if isinstance(frame, ErrorFrame) and frame.request == w.request:
                w.future.set_exception(RequestFailed(frame))
            elif isinstance(frame, w.answers) and (w.match is None or w.match(frame)):
                w.future.set_result(frame)
            else:
                continue
            self._waiters.remove(w)
            return True
        return False

    # -- requests ----------------------------------------------------------------------------

    async def send(self, frame: ClientFrame, wait: float = 10.0) -> None:
        """Send a frame, waiting up to ``wait`` seconds for a connection (else GatewayError)."""
        if self._client is None or not self._up.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._up.wait(), wait)
        if self._client is None or not self._up.is_set():
            raise GatewayError(f"{self.name} is not connected ({self.state.message})")
        await self._client.send(frame)

    async def request(self, frame: ClientFrame, *answers: type[Any], timeout: float = 60.0,
                      match: Callable[[Any], bool] | None = None) -> Any:
        """Send ``frame`` and wait for its answer (one of ``answers``), or raise its error."""
        loop = asyncio.get_running_loop()
        waiter = _Waiter(getattr(frame, "type", ""), answers, loop.create_future(), match)
        self._waiters.append(waiter)
        try:
            await self.send(frame)
            return await asyncio.wait_for(waiter.future, timeout)
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    async def follow(self, session_id: str, from_seq: int = 0) -> None:
        """Attach to a session: its events (from ``from_seq``) now reach the app, live too."""
        if session_id in self.next_seq:
            return
        self.next_seq[session_id] = from_seq
        await self.send(Attach(session_id=session_id, from_seq=from_seq, batch=100))

    async def sessions(self) -> Sessions:
        """The sessions this user may see here."""
        result: Sessions = await self.request(ListSessions(), Sessions)
        return result

