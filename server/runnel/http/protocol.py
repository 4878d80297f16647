"""HTTP/1.1 on h11: one HttpProtocol per connection, one request at a time.

The shape follows h11's reference server loop: NEED_DATA reads more, PAUSED stops
reading until our response is done, and both sides DONE starts the next cycle,
which is also what makes pipelined responses go out strictly in request order.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus

import h11
import orjson

from ..errors import HTTPError
from .request import Request
from .response import JSON, ResponseStream
from .site import Site
from .strict import ChunkedBodyChecker, check_head

REASONS = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}

# Past this much unread request body we stop reading the socket until the handler catches up.
BODY_HIGH_WATER = 256 * 1024

# Statuses whose responses never have a body (nor a Content-Length).
_NO_BODY = frozenset((204, 304))

# What the single connection deadline is guarding at the moment.
_IDLE, _HEAD, _BODY = 1, 2, 3


class HttpProtocol(asyncio.Protocol):
    __slots__ = (
        "site",
        "loop",
        "transport",
        "conn",
        "peer",
        "lost",
        "write_paused",
        "_drain_waiter",
        "_stall_timer",
        "_request",
        "_task",
        "_reading_paused",
        "_chunk_checker",
        "_closing",
        "_head_started",
        "_deadline",
        "_deadline_kind",
        "_timer",
    )

    def __init__(self, site: Site, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.site = site
        self.loop = loop or asyncio.get_running_loop()
        self.transport = None
        # h11 bounds only a head that has not fully arrived; check_head bounds complete
        # ones. The slack lets check_head answer first, with our own message.
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=site.max_header_bytes + 1024)
        self.peer = None
        self.lost = False
        self.write_paused = False
        self._drain_waiter = None
        self._stall_timer = None
        self._request: Request | None = None
        self._task = None
        self._reading_paused = False
        self._chunk_checker: ChunkedBodyChecker | None = None
        self._closing = False
        self._head_started = False
        self._deadline = 0.0
        self._deadline_kind = 0
        self._timer = None

    # -- asyncio callbacks ----------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        self.site.connections.add(self)
        self._set_deadline(self.site.keepalive_timeout, _IDLE)

    def data_received(self, data: bytes) -> None:
        if self._request is None:
            if not self._head_started:
                # The head deadline runs from the first byte and is never extended,
                # so trickling bytes (slowloris) cannot keep a connection forever.
                self._head_started = True
                self._set_deadline(self.site.header_timeout, _HEAD)
        elif self._deadline_kind == _BODY:
            self._deadline = self.loop.time() + self.site.body_timeout
        self.conn.receive_data(data)
        checker = self._chunk_checker
        if checker is not None:
            if not checker.feed(data):
                self._body_failed(400, "Invalid chunked framing in request body")
                return
            if checker.done:
                self._chunk_checker = None
        self._process()

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")
        self._process()
        # Keep the transport open so an in-flight response can still be written.
        return self._request is not None

    def connection_lost(self, exc) -> None:
        self.lost = True
        self.site.connections.discard(self)
        self._deadline_kind = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("client disconnected"))
        request = self._request
        if request is not None and not request._complete:
            request._finish(ConnectionResetError("client disconnected"))
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the handler and whatever it started stop now

    def pause_writing(self) -> None:
        self.write_paused = True
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(self.site.write_timeout, self._on_write_stall)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- parsing ---------------------------------------------------------------
    def _process(self) -> None:
        conn = self.conn
        while not self.lost:
            if self._request is None and conn.their_state is h11.IDLE:
                buffered = conn.trailing_data[0]
                if buffered:
                    problem = check_head(buffered, self.site.max_header_bytes)
                    if problem is not None:
                        self._refuse(*problem)
                        return
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if self._request is not None:
                    self._body_failed(exc.error_status_hint, f"Invalid request body: {exc}")
                else:
                    self._refuse(exc.error_status_hint, f"Invalid HTTP request: {exc}")
                return
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:
                self._pause_reading()
                return
            kind = type(event)
            if kind is h11.Data:
                self._on_body(event.data)
            elif kind is h11.Request:
                if not self._on_request(event):
                    return
            elif kind is h11.EndOfMessage:
                if self._deadline_kind == _BODY:
                    self._deadline_kind = 0
                self._request._finish()
            elif kind is h11.ConnectionClosed:
                if self._request is None:
                    self.transport.close()
                return

    def _on_request(self, event: h11.Request) -> bool:
        self._deadline_kind = 0
        content_length = None
        chunked = False
        request_id = None
        for name, value in event.headers:
            if name == b"content-length":
                content_length = int(value)
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"x-request-id":
                request_id = value
        request = Request(self, event.method.decode("ascii"), event.target, event.headers, event.http_version)
        if request_id is not None and 0 < len(request_id) <= 128:
            request.request_id = request_id.decode("ascii", "replace")
        else:
            request.request_id = self.site.new_request_id()
        request.started_at = self.loop.time()
        self._request = request
        if chunked and content_length is not None:
            # RFC 9112 6.3: a server MAY reject this outright; accepting it is how
            # requests get smuggled past proxies that pick the other framing.
            self._refuse(400, "Request has both Content-Length and Transfer-Encoding")
            return False
        if content_length is not None and content_length > self.site.max_body_bytes:
            self._refuse(413, f"Request body is larger than the limit of {self.site.max_body_bytes} bytes")
            return False
        if chunked:
            checker = ChunkedBodyChecker()
            if not checker.feed(self.conn.trailing_data[0]):
                self._refuse(400, "Invalid chunked framing in request body")
                return False
            self._chunk_checker = None if checker.done else checker
        self._task = self.loop.create_task(self._run(request))
        return True

    def _on_body(self, data: bytes) -> None:
        request = self._request
        request._received += len(data)
        if request._received > self.site.max_body_bytes:
            self._body_failed(413, f"Request body is larger than the limit of {self.site.max_body_bytes} bytes")
            return
        request._feed(data)
        if request._buffered > BODY_HIGH_WATER:
            self._pause_reading()

    def _body_failed(self, status: int, message: str) -> None:
        """The body cannot be read to its end: tell the handler, answer, then close."""
        self._closing = True
        self._chunk_checker = None
        self._pause_reading()
        request = self._request
        if request is None:
            self._refuse(status, message)
        elif not request._complete and request._error is None:
            request._finish(HTTPError(status, message))

    # -- called by Request -------------------------------------------------------
    def body_wanted(self, request: Request) -> None:
        conn = self.conn
        if conn.they_are_waiting_for_100_continue:
            self.transport.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        if not request._complete and request._error is None:
            self._set_deadline(self.site.body_timeout, _BODY)

    def body_consumed(self) -> None:
        if self._reading_paused and self.conn.their_state is h11.SEND_BODY:
            self._reading_paused = False
            self.transport.resume_reading()

    async def drain(self) -> None:
        if self.lost:
            raise ConnectionResetError("client disconnected")
        if not self.write_paused:
            return
        waiter = self._drain_waiter
        if waiter is None or waiter.done():
            waiter = self._drain_waiter = self.loop.create_future()
        await waiter

    # -- answering ---------------------------------------------------------------
    async def _run(self, request: Request) -> None:
        try:
            response = await self.site.dispatch(request)
        except Exception:
            self.site.logger.exception("dispatch failed for request %s", request.request_id)
            response = None
            if request._stream is not None:
                self.transport.close()
                return
        if self.lost:
            return
        stream = request._stream
        if stream is not None:
            if not stream.ended:
                stream.end()
        elif response is not None:
            self.send_response(request, response)
        else:
            self._send_error(request, HTTPError(500, "Handler returned no response"))

    def _head_headers(self, request: Request | None) -> list:
        site = self.site
        headers = [(b"date", site.dates.value())]
        if site.server_header:
            headers.append((b"server", site.server_header))
        if request is not None:
            headers.append((b"x-request-id", request.request_id.encode("latin-1")))
        if self._closing or self.conn.their_state is not h11.DONE:
            headers.append((b"connection", b"close"))
        return headers

    def send_response(self, request: Request, response) -> None:
        headers = self._head_headers(request)
        if response.media_type is not None:
            headers.append((b"content-type", response.media_type))
        body = response.body
        status = response.status
        if status not in _NO_BODY:
            headers.append((b"content-length", b"%d" % len(body)))
        if response.headers:
            headers.extend(response.headers)
        conn = self.conn
        try:
            out = conn.send(h11.Response(status_code=status, headers=headers, reason=REASONS.get(status, b"")))
            if body and request.method != "HEAD" and status not in _NO_BODY:
                out += conn.send(h11.Data(data=body))
            out += conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            self.site.logger.exception("could not send response to request %s", request.request_id)
            self.transport.close()
            return
        self.transport.write(out)
        request.status = status
        self._cycle_done(request)

    def _send_error(self, request: Request, error: HTTPError) -> None:
        from .response import Response

        self.send_response(request, Response(error.status, orjson.dumps(error.to_dict()), media_type=JSON, headers=error.headers))

    def start_stream(self, request: Request, status: int, headers, media_type: bytes, serializer) -> ResponseStream:
        head = self._head_headers(request)
        head.append((b"content-type", media_type))
        head.append((b"transfer-encoding", b"chunked"))
        if headers:
            head.extend(headers)
        conn = self.conn
        self.transport.write(conn.send(h11.Response(status_code=status, headers=head, reason=REASONS.get(status, b""))))
        request.status = status
        # h11 keeps chunked framing for HTTP/1.1 clients and falls back to
        # close-delimited bodies for HTTP/1.0 ones; the stream must frame to match.
        chunked = conn.their_http_version is not None and conn.their_http_version >= b"1.1"
        return ResponseStream(
            self, self.transport, chunked=chunked, discard=request.method == "HEAD", serializer=serializer
        )

    def end_stream(self) -> None:
        request = self._request
        if self.lost or request is None:
            return
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        self._cycle_done(request)

    def _cycle_done(self, request: Request) -> None:
        finished = self.site.finished
        if finished is not None:
            try:
                finished(request, request.status, self.loop.time() - request.started_at)
            except Exception:
                self.site.logger.exception("request-finished observer failed")
        self._request = None
        self._task = None
        conn = self.conn
        if self._closing or conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
            self.transport.close()
            return
        conn.start_next_cycle()
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        if conn.trailing_data[0]:  # a pipelined request is already here
            self._head_started = True
            self._set_deadline(self.site.header_timeout, _HEAD)
            self._process()
        else:
            self._head_started = False
            self._set_deadline(self.site.keepalive_timeout, _IDLE)

    def _refuse(self, status: int, message: str) -> None:
        """Answer a request we will not process (bad head, too large) and close."""
        self._closing = True
        self._deadline_kind = 0
        conn = self.conn
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self.transport.close()
            return
        body = orjson.dumps(HTTPError(status, message).to_dict())
        headers = self._head_headers(self._request)  # says "connection: close": _closing is set
        headers += [(b"content-type", JSON), (b"content-length", b"%d" % len(body))]
        try:
            out = conn.send(h11.Response(status_code=status, headers=headers, reason=REASONS.get(status, b"")))
            out += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            self.transport.close()
            return
        self.transport.write(out)
        if self._request is not None:
            self._request.status = status
            finished = self.site.finished
            if finished is not None:
                finished(self._request, status, self.loop.time() - self._request.started_at)
        self.transport.close()

    # -- shutdown ----------------------------------------------------------------
    def shutdown(self) -> None:
        """Finish the request in flight, if any, then close; close an idle connection now."""
        self._closing = True
        if self._request is None and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self.transport is not None:
            self.transport.abort()

    @property
    def busy(self) -> bool:
        return self._request is not None

    # -- timers and flow control ---------------------------------------------------
    def _set_deadline(self, delay: float, kind: int) -> None:
        # One timer per connection with the deadline kept beside it: moving the
        # deadline later is an attribute write, not a new timer per request.
        deadline = self.loop.time() + delay
        self._deadline = deadline
        self._deadline_kind = kind
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        kind = self._deadline_kind
        if not kind or self.lost:
            return
        if self._deadline - self.loop.time() > 0.001:
            self._timer = self.loop.call_at(self._deadline, self._on_timer)
            return
        self._deadline_kind = 0
        if kind == _IDLE:
            self.transport.close()
        elif kind == _HEAD:
            self._refuse(408, "Request head was not received in time")
        elif kind == _BODY:
            self._body_failed(408, "Request body was not received in time")

    def _on_write_stall(self) -> None:
        self._stall_timer = None
        self.site.logger.info("dropping a client that stopped reading for %ss", self.site.write_timeout)
        self.abort()

    def _pause_reading(self) -> None:
        if not self._reading_paused and not self.lost:
            self._reading_paused = True
            self.transport.pause_reading()
