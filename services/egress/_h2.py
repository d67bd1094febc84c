"""HTTP/2 from the sandbox: one intercepted tunnel, many streams, each checked like an HTTP/1.1 request.

When the sandbox's TLS client offers ``h2`` in ALPN, the tunnel speaks HTTP/2
(the ``h2`` library drives the protocol state; this module only moves bytes
and applies the proxy's rules). Every stream is turned into the request it
stands for — ``:method``, ``:path``, and ``:authority`` as the Host — and
goes through the very same checks as an HTTP/1.1 request
(:meth:`EgressProxy._prepare`: the authority must name the tunnel's host and
port, credentials for that exact host, hop-by-hop headers dropped), then
upstream over HTTP/1.1 connections the tunnel keeps in a small pool.
Responses stream back under HTTP/2 flow control, so a slow sandbox slows
the upstream read instead of filling memory. A refused stream gets the
usual ``X-Devsilo-Blocked`` response; the rest of the connection carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h11

if TYPE_CHECKING:
    from ._proxy import Blocked, EgressProxy, TrafficRecord, _Half, _Route

MAX_STREAMS = 100
MAX_HEADER_LIST = 64 * 1024
"""Advertised to the client; a larger header block ends the connection (GOAWAY)."""
POOL_MAX = 8
# Response headers that belong to one HTTP/1.1 hop and are forbidden in HTTP/2.
_CONNECTION_SPECIFIC = {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}


class _Stream:
    def __init__(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.id = stream_id
        self.headers = headers
        self.body: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.no_body = False


class H2Tunnel:
    """Serves one intercepted tunnel whose client chose HTTP/2."""

    def __init__(self, proxy: EgressProxy, route: _Route, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, first_up: _Half | None) -> None:
        self.proxy = proxy
        self.route = route
        self.reader = reader
        self.writer = writer
        self.pool: list[_Half] = [first_up] if first_up is not None else []
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.streams: dict[int, _Stream] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.window = asyncio.Event()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)

    async def run(self) -> None:
        from ._proxy import CHUNK, IDLE_TIMEOUT

        self.conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                                   h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST})
        self.conn.initiate_connection()
        self.flush()
        try:
            while True:
                data = await asyncio.wait_for(self.reader.read(CHUNK), IDLE_TIMEOUT)
                if not data:
                    return
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    self.flush()  # the GOAWAY h2 queued
                    return
                for event in events:
                    if not self._on_event(event):
                        self.flush()
                        return
                self.flush()
                await self.writer.drain()
        finally:
            for task in self.tasks.values():
                task.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            for up in self.pool:
                self.proxy._release(self.route, up)

    def _on_event(self, event: h2.events.Event) -> bool:
        if isinstance(event, h2.events.RequestReceived):
            stream = _Stream(event.stream_id, list(event.headers))  # type: ignore[arg-type]
            self.streams[event.stream_id] = stream
            self.tasks[event.stream_id] = asyncio.create_task(self._serve(stream))
            if event.stream_ended is not None:
                stream.no_body = True
                stream.body.put_nowait(None)
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)  # type: ignore[arg-type]
            if stream is not None:
                stream.body.put_nowait(event.data or b"")
                # flow control is given back as the body goes upstream (see _serve)
                if not event.data and event.flow_controlled_length:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)  # type: ignore[arg-type]
            if stream is not None:
                stream.body.put_nowait(None)
        elif isinstance(event, h2.events.StreamReset):
            task = self.tasks.pop(event.stream_id, None)  # type: ignore[arg-type]
            self.streams.pop(event.stream_id, None)  # type: ignore[arg-type]
            if task is not None:
                task.cancel()
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self.window.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            return False
        return True

    async def _serve(self, stream: _Stream) -> None:
        from ._proxy import Blocked, TrafficRecord, _path

        fields = dict(stream.headers)
        method = fields.get(b":method", b"")
        path = fields.get(b":path", b"")
        authority = fields.get(b":authority") or fields.get(b"host", b"")
        record = TrafficRecord(self.route.session.session_id, self.route.host, self.route.port,
                               method.decode("ascii", "replace"), _path(path or b"/"))
        up: _Half | None = None
        try:
            try:
                if method == b"CONNECT" or not path:
                    raise Blocked("CONNECT inside an HTTP/2 tunnel is not supported", "bad_request", 400)
                hosts = {v for k, v in stream.headers if k == b"host"}
                if hosts - {authority}:
                    raise Blocked("Host header disagrees with :authority", "host_mismatch")
                headers = [(b"host", authority)] + [
                    (k, v) for k, v in stream.headers if not k.startswith(b":") and k != b"host"]
                try:
                    request = h11.Request(method=method, target=path, headers=headers)
                except h11.LocalProtocolError as exc:
                    raise Blocked(f"bad request: {exc}", "bad_request", 400) from None
                target, headers, record.credential = self.proxy._prepare(self.route, request)
                up = self.pool.pop() if self.pool else await self.proxy._open_upstream(self.route)
                up.reused = False  # h2 streams are not retried: their bodies may be gone already
            except Blocked as blocked:
                await self._refuse(stream, blocked, record)
                return
            await self._exchange(stream, up, method, target, headers, record)
            record.allowed = True
            self.proxy._finish(record)
            if (up.conn.our_state is h11.DONE and up.conn.their_state is h11.DONE
                    and len(self.pool) < POOL_MAX):
                up.conn.start_next_cycle()
                self.pool.append(up)
                up = None
        except (ConnectionError, TimeoutError, h11.ProtocolError, h2.exceptions.StreamClosedError):
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.reset_stream(stream.id, h2.errors.ErrorCodes.CANCEL)
                self.flush()
        finally:
            if up is not None:
                up.close()
            self.streams.pop(stream.id, None)
            self.tasks.pop(stream.id, None)

    async def _exchange(self, stream: _Stream, up: _Half, method: bytes, target: bytes,
                        headers: list[tuple[bytes, bytes]], record: TrafficRecord) -> None:
        from ._proxy import _HOP_BY_HOP

        if not stream.no_body and not any(k in (b"content-length", b"transfer-encoding") for k, _ in headers):
            headers = [*headers, (b"transfer-encoding", b"chunked")]  # an HTTP/2 body of unknown length
        await up.send(h11.Request(method=method, target=target, headers=headers))
        while (chunk := await stream.body.get()) is not None:
            if chunk:
                record.bytes_out += len(chunk)
                await up.send(h11.Data(data=chunk))
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.conn.acknowledge_received_data(len(chunk), stream.id)
                    self.flush()
        await up.send(h11.EndOfMessage())
        while True:
            response = await up.next_event()
            if isinstance(response, h11.InformationalResponse):
                continue  # 1xx have no HTTP/2 meaning here; 101 cannot happen (no Upgrade sent)
            if not isinstance(response, h11.Response):
                raise ConnectionError("upstream closed before answering")
            break
        record.status = response.status_code
        out = [(b":status", str(response.status_code).encode())] + [
            (k, v) for k, v in response.headers if k not in _CONNECTION_SPECIFIC and k not in _HOP_BY_HOP]
        self.conn.send_headers(stream.id, out)
        self.flush()
        while True:
            event = await up.next_event()
            if isinstance(event, h11.Data):
                record.bytes_in += len(event.data)
                await self._send_data(stream.id, bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self.conn.end_stream(stream.id)
                self.flush()
                return
            else:
                raise ConnectionError("upstream closed mid-response")

    async def _send_data(self, stream_id: int, data: bytes) -> None:
        while data:
            window = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
            if window <= 0:
                self.window.clear()
                await self.window.wait()
                continue
            self.conn.send_data(stream_id, data[:window])
            data = data[window:]
            self.flush()
            await self.writer.drain()

    async def _refuse(self, stream: _Stream, blocked: Blocked, record: TrafficRecord) -> None:
        from ._proxy import BLOCKED_HEADER

        reason = " ".join(blocked.reason.split())[:300]
        body = f"blocked: {reason}\n".encode()
        record.status, record.reason, record.label = blocked.status, reason, blocked.label
        self.proxy._finish(record)
        self.conn.send_headers(stream.id, [
            (b":status", str(blocked.status).encode()),
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (BLOCKED_HEADER.lower().encode(), reason.encode("ascii", "replace")),
        ])
        await self._send_data(stream.id, body)
        self.conn.end_stream(stream.id)
        self.flush()
