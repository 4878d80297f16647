"""HTTP/1.1 on h11: one HttpProtocol per connection, one request at a time.

The shape follows h11's reference server loop: NEED_DATA reads more, PAUSED stops
reading until our response is done, and both sides DONE starts the next cycle,
which is also what makes pipelined responses go out strictly in request order.

The state of a connection, and why it is consistent (h11's ``_state.py`` keeps
its invariants the same way, next to the state):

- ``_request`` is the request of the current cycle: set when h11 hands over a
  complete head (``_on_request``), cleared when its response is complete
  (``_cycle_done``). While it is None the connection is between requests: idle,
  or reading a head. At most one request is in flight; a pipelined one waits in
  h11's buffer (reading paused on ``PAUSED``) until the cycle ends.
- ``request.status`` says what has been sent for ``_request``: 0 nothing, 100 an
  interim ``100 Continue`` (only when the handler reads the body), >= 200 a final
  status line. Once >= 200 the only way to report a failure is to close (or, in a
  stream, the serializer's error event): ``_refuse`` checks it for that reason.
- A request answered with a stream (``request.response_stream``): the stream
  ends itself (``end``/``fail``) and then calls ``_stream_ended``, which completes
  the cycle. A handler that returns with its stream open has it ended then.
- One deadline at a time, in ``_deadline`` with its kind in ``_deadline_kind``:
  ``_IDLE`` between requests (keep-alive), ``_HEAD`` from a head's first byte
  until it is complete (never extended: slowloris), ``_BODY`` while a handler
  waits for body bytes (each arrival extends it, but never past what the minimum
  body rate allows since the handler began to read: ``_body_since``), 0 while the
  handler works or the response is written. A write stall has its own timer
  (``_stall_timer``), armed only while the transport is paused.
- ``_drain_first``: a response ended while the transport's buffer was over its
  high-water mark, so the next request waits (reading paused, no deadline but the
  write stall's) until ``resume_writing``: a client that pipelines requests and
  never reads costs one response beyond the transport's buffer, not one per request.
- ``_refused``: accepted past ``max_connections`` and answered 503 at once; what the
  client sends is discarded until it closes or the short linger deadline passes.
- ``_closing`` is sticky: once set, the response in flight is the last and the
  transport closes after it. ``flow.lost`` is set by ``connection_lost`` only;
  after it nothing is written and the handler task has been cancelled.
- Responses never go through h11 (we write them), so h11's connection is
  replaced at each cycle's end and fed the bytes that followed the request.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, cast

import h11
import orjson

from ..errors import HTTPError
from .body import RequestBody
from .flow_control import FlowControl
from .head import encode_fields, status_line
from .request import Request
from .response import JSON, Headers, Response, ResponseStream, error_response
from .server_state import ServerState
from .strict import ChunkedBodyChecker, check_head

if TYPE_CHECKING:
    from ..serializers import Serializer

# Past this much unread request body we stop reading the socket until the handler catches up.
BODY_HIGH_WATER = 256 * 1024

# A client's X-Request-Id is echoed only when it is safe to log and to send back.
_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")

# Statuses whose responses never have a body (nor a Content-Length).
_NO_BODY = frozenset((204, 304))

# What the single connection deadline is guarding at the moment.
_IDLE, _HEAD, _BODY = 1, 2, 3

# The status a request whose client went away before its response was complete is
# reported with (to the access log and the metrics): nginx's "client closed request".
CLIENT_GONE = 499

# How long a refused connection (over max_connections) is kept open after its 503, so
# the client reads the answer instead of a reset caused by closing on its unread request.
REFUSED_LINGER = 1.0


class HttpProtocol(asyncio.Protocol):
    __slots__ = (
        "server_state",
        "loop",
        "transport",
        "conn",
        "peer",
        "flow",
        "_stall_timer",
        "_request",
        "_body_limit",
        "_task",
        "_chunk_checker",
        "_closing",
        "_head_started",
        "_deadline",
        "_deadline_kind",
        "_timer",
        "_keep_alive",
        "_server_field",
        "_body_since",
        "_drain_first",
        "_refused",
    )

    def __init__(self, server_state: ServerState, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.server_state = server_state
        self.loop = loop or asyncio.get_running_loop()
        # Both set by connection_made, which asyncio calls before any other callback:
        # typed as always there, since every use but shutdown/abort/lost comes after it.
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.flow: FlowControl = None  # type: ignore[assignment]
        self.conn = self._new_h11()
        self.peer: tuple[str, int] | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self._request: Request | None = None
        self._body_limit = server_state.max_body_bytes  # the current request's (ServerState.body_limits)
        self._task: asyncio.Task[None] | None = None
        self._chunk_checker: ChunkedBodyChecker | None = None
        self._closing = False
        self._head_started = False
        self._deadline = 0.0
        self._deadline_kind = 0
        self._timer: asyncio.TimerHandle | None = None
        self._keep_alive = True
        self._server_field = b"server: %b\r\n" % server_state.server_header if server_state.server_header else b""
        self._body_since = 0.0
        self._drain_first = False
        self._refused = False

    def _new_h11(self) -> h11.Connection:
        # h11 bounds only a head that has not fully arrived; check_head bounds complete
        # ones. The slack lets check_head answer first, with our own message.
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self.server_state.max_header_bytes + 1024)

    # -- asyncio callbacks ----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = self.transport = cast(asyncio.Transport, transport)  # a stream server's transport
        self.flow = FlowControl(transport, self.loop)
        self.peer = transport.get_extra_info("peername")
        state = self.server_state
        if state.max_connections and len(state.connections) - state.refusing >= state.max_connections:
            self._refuse_connection()
            return
        state.connections.add(self)
        self._set_deadline(state.keepalive_timeout, _IDLE)

    def _refuse_connection(self) -> None:
        """Past max_connections: answer 503 with Retry-After before reading anything, then close.

        Answering costs the descriptor for at most REFUSED_LINGER seconds, and the client
        learns why (and when to come back) instead of waiting on a full accept queue.
        """
        state = self.server_state
        self._refused = self._closing = True
        state.connections.add(self)  # so stop() closes it too
        state.refusing += 1
        state.refused_total += 1
        error = HTTPError(503, "Server is at its connection limit; retry later", code="too_many_connections",
                          headers=((b"retry-after", b"1"),))
        body = orjson.dumps(error.to_dict())
        fields = b"content-type: %b\r\ncontent-length: %d\r\n%b" % (JSON, len(body), encode_fields(error.headers))
        self.transport.write(self._head(None, 503, fields) + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the client sees the end of the answer; its request is read and dropped
        self._set_deadline(min(REFUSED_LINGER, state.header_timeout), _IDLE)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._request is None:
            if not self._head_started:
                # The head deadline runs from the first byte and is never extended,
                # so trickling bytes (slowloris) cannot keep a connection forever.
                self._head_started = True
                self._set_deadline(self.server_state.header_timeout, _HEAD)
        self.conn.receive_data(data)
        checker = self._chunk_checker
        if checker is not None:
            if not checker.feed(data):
                self._body_failed(400, "Invalid chunked framing in request body")
                return
            if checker.done:
                self._chunk_checker = None
        self._process()
        if self._deadline_kind == _BODY:  # still waiting for body bytes: these were progress
            self._body_progress()

    def eof_received(self) -> bool:
        # A client that closes its side has gone: HTTP clients do not half-close
        # while they wait for an answer. Returning False closes the transport,
        # and connection_lost cancels the handler and the work it started.
        return False

    @property
    def lost(self) -> bool:
        """The connection is gone: nothing more is read or written."""
        return self.flow is not None and self.flow.lost

    def connection_lost(self, exc: Exception | None) -> None:
        self.flow.connection_lost()
        self.server_state.connections.discard(self)
        if self._refused:
            self._refused = False
            self.server_state.refusing -= 1
        self._deadline_kind = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        request = self._request
        if request is not None:
            request.incoming.fail(ConnectionResetError("client disconnected"))
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the handler and whatever it started stop now
        if request is not None:
            # Reported too, so dropped requests show in the log and the metrics; once
            # only: a cycle that completed or was refused has no _request any more.
            self._request = None
            self._report_status(request, CLIENT_GONE)

    def pause_writing(self) -> None:
        self.flow.pause_writing()
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(self.server_state.write_timeout, self._on_write_stall)

    def resume_writing(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self.flow.resume_writing()
        if self._drain_first:
            self._drain_first = False
            self._next_cycle()

    # -- parsing ---------------------------------------------------------------
    def _process(self) -> None:
        conn = self.conn
        flow = self.flow
        while not flow.lost:
            if self._request is None and conn.their_state is h11.IDLE:
                buffered = conn.trailing_data[0]
                if buffered:
                    problem = check_head(buffered, self.server_state.max_header_bytes)
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
                self.flow.pause_reading()
                return
            kind = type(event)
            if kind is h11.Data:
                self._on_body(cast(h11.Data, event).data)
            elif kind is h11.Request:
                if not self._on_request(cast(h11.Request, event)):
                    return
            elif kind is h11.EndOfMessage:
                if self._deadline_kind == _BODY:
                    self._deadline_kind = 0
                request = self._request
                assert request is not None  # h11 ends only a message whose Request it gave us
                request.incoming.finish()
            elif kind is h11.ConnectionClosed:
                if self._request is None:
                    self.transport.close()
                return

    def _on_request(self, event: h11.Request) -> bool:
        self._deadline_kind = 0
        self._body_since = 0.0
        if event.http_version != b"1.1" and event.http_version != b"1.0":
            # h11 takes any digit.digit; HTTP/2 has its own framing, and a "1.x"
            # no client sends is more likely a probe than a client to serve.
            self._refuse(505, f"HTTP/{event.http_version.decode('ascii')} is not supported; use HTTP/1.1")
            return False
        content_length = None
        chunked = False
        request_id = None
        keep_alive = event.http_version == b"1.1"
        for name, value in event.headers:
            if name == b"content-length":
                content_length = int(value)
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"x-request-id":
                request_id = value
            elif name == b"connection" and b"close" in [token.strip() for token in value.lower().split(b",")]:
                keep_alive = False
        body = RequestBody(self.loop, self)
        try:
            request = Request(self, event.method.decode("ascii"), event.target, event.headers, event.http_version,
                              body)
        except ValueError as exc:  # a request-target in no form this server serves
            self._refuse(400, f"Invalid request target: {exc}")
            return False
        if request_id is not None and _REQUEST_ID.fullmatch(request_id):
            request.request_id = request_id.decode("ascii")
        else:
            request.request_id = self.server_state.new_request_id()
        request.started_at = self.loop.time()
        self._request = request
        self._keep_alive = keep_alive
        if chunked and content_length is not None:
            # RFC 9112 6.3: a server MAY reject this outright; accepting it is how
            # requests get smuggled past proxies that pick the other framing.
            self._refuse(400, "Request has both Content-Length and Transfer-Encoding")
            return False
        state = self.server_state
        limit = self._body_limit = state.body_limits.get(request.path, state.max_body_bytes) if state.body_limits \
            else state.max_body_bytes
        if content_length is not None and content_length > limit:
            self._refuse(413, f"Request body is larger than the limit of {limit} bytes")
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
        assert request is not None  # h11 gives Data only after its Request
        body = request.incoming
        if body.received + len(data) > self._body_limit:
            self._body_failed(413, f"Request body is larger than the limit of {self._body_limit} bytes")
            return
        body.feed(data)
        if body.buffered > BODY_HIGH_WATER:
            self.flow.pause_reading()

    def _body_failed(self, status: int, message: str) -> None:
        """The body cannot be read to its end: tell the handler, answer, then close."""
        self._closing = True
        self._chunk_checker = None
        self.flow.pause_reading()
        request = self._request
        if request is None:
            self._refuse(status, message)
        else:
            request.incoming.fail(HTTPError(status, message))

    # -- called back by the request body as the handler reads it ----------------------
    def body_wanted(self) -> None:
        request = self._request
        if request is None or self.lost:
            return
        if self.conn.they_are_waiting_for_100_continue and not request.status:
            request.status = 100  # once only
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not request.incoming.done:
            if not self._body_since:
                self._body_since = self.loop.time()
            self._body_progress()

    def _body_progress(self) -> None:
        """Move the body deadline: body_timeout from now, but no later than the minimum rate allows.

        Each arrival is progress, so a body sent a byte at a time would otherwise
        never time out; the rate bound gives the body body_timeout plus one second
        per body_min_rate bytes received, counted from when the handler began to read.
        """
        state = self.server_state
        delay = state.body_timeout
        request = self._request
        if state.body_min_rate and request is not None:
            allowed = self._body_since + state.body_timeout + request.incoming.received / state.body_min_rate
            delay = min(delay, allowed - self.loop.time())
        self._set_deadline(delay, _BODY)

    def body_consumed(self) -> None:
        if self.flow.reading_paused and self.conn.their_state is h11.SEND_BODY:
            self.flow.resume_reading()

    # -- answering ---------------------------------------------------------------
    async def _run(self, request: Request) -> None:
        try:
            response = await self.server_state.dispatch(request)
        except Exception:
            self.server_state.logger.exception("dispatch failed for request %s", request.request_id)
            response = error_response(HTTPError(500, f"Internal server error (request id {request.request_id})"))
        if self.flow.lost or self._request is not request:  # gone, or answered already (cut_off)
            return
        stream = request.response_stream
        if stream is not None:
            stream.end()  # left open by its handler; a no-op once ended
        elif response is not None:
            self.send_response(request, response)
        else:
            self.send_response(request, error_response(HTTPError(500, "Handler returned no response")))

    def _head(self, request: Request | None, status: int, fields: bytes) -> bytes:
        """Status line and headers; decides here whether the connection closes after."""
        if not self._closing and not (self._keep_alive and self.conn.their_state is h11.DONE):
            self._closing = True
        request_id = request.request_id if request is not None else self.server_state.new_request_id()
        cors = self.server_state.cors
        if cors is not None and request is not None:
            fields += cors.fields(request)
        return b"%bdate: %b\r\n%bx-request-id: %b\r\n%b%b\r\n" % (
            status_line(status),
            self.server_state.dates.value(),
            self._server_field,
            request_id.encode("latin-1"),
            fields,
            b"connection: close\r\n" if self._closing else b"",
        )

    def send_response(self, request: Request, response: Response) -> None:
        status = response.status
        body = response.body
        fields = b""
        if response.media_type is not None:
            fields = b"content-type: %b\r\n" % response.media_type
        if status not in _NO_BODY:
            fields += b"content-length: %d\r\n" % len(body)
        try:
            if response.headers:
                fields += encode_fields(response.headers)
            head = self._head(request, status, fields)
        except ValueError:
            self.server_state.logger.exception("invalid response to request %s", request.request_id)
            status, response = 500, error_response(HTTPError(500, "Handler produced an invalid response"))
            body = response.body
            head = self._head(request, 500, b"content-type: %b\r\ncontent-length: %d\r\n" % (JSON, len(body)))
        if request.method == "HEAD" or status in _NO_BODY or not body:
            self.transport.write(head)
            request.bytes_sent = len(head)
        else:
            self.transport.write(head + body)
            request.bytes_sent = len(head) + len(body)
        request.status = status
        self._cycle_done(request)

    def start_stream(self, request: Request, status: int, headers: Headers, media_type: bytes,
                     serializer: Serializer) -> ResponseStream:
        # HTTP/1.0 has no chunked framing: the body runs until we close.
        chunked = request.http_version != b"1.0"
        fields = b"content-type: %b\r\n" % media_type
        if chunked:
            fields += b"transfer-encoding: chunked\r\n"
        if headers:
            fields += encode_fields(headers)
        self.transport.write(self._head(request, status, fields))
        request.status = status
        return ResponseStream(
            self.transport, self.flow, serializer=serializer, chunked=chunked, discard=request.method == "HEAD",
            max_pending=self.server_state.max_stream_buffer_bytes, on_end=self._stream_ended,
            on_overflow=self._stream_overflowed,
        )

    def _stream_ended(self) -> None:
        request = self._request
        if request is not None and not self.lost:
            self._cycle_done(request)

    def _stream_overflowed(self, pending: int) -> None:
        self.server_state.logger.info("dropping a client that fell %d bytes behind its stream (limit %d)", pending,
                              self.server_state.max_stream_buffer_bytes)
        self.abort()

    def _report_finished(self, request: Request) -> None:
        self._report_status(request, request.status)

    def _report_status(self, request: Request, status: int) -> None:
        finished = self.server_state.finished
        if finished is not None:
            try:
                finished(request, status, self.loop.time() - request.started_at)
            except Exception:
                self.server_state.logger.exception("request-finished observer failed")

    def _cycle_done(self, request: Request) -> None:
        self._report_finished(request)
        self._request = None
        self._task = None
        if self._closing or self.conn.their_state is not h11.DONE:
            self.transport.close()
            return
        if self.flow.writing_paused:
            # The client has not taken this response yet: the next one waits, so one
            # that pipelines requests and never reads holds one response, not all of them.
            # The write stall timer (armed while paused) drops it if it never reads.
            self._drain_first = True
            self._deadline_kind = 0
            self.flow.pause_reading()
            return
        self._next_cycle()

    def _next_cycle(self) -> None:
        if self._closing:  # shut down while waiting for the client to read
            self.transport.close()
            return
        # Responses never go through h11, so its side of the cycle never reaches
        # DONE; a fresh connection object fed the leftover bytes is the next cycle.
        conn = self.conn
        leftover, closed = conn.trailing_data
        self.conn = conn = self._new_h11()
        if leftover:
            conn.receive_data(leftover)
        if closed:
            conn.receive_data(b"")
        if self.flow.reading_paused:
            self.flow.resume_reading()
        if leftover or closed:  # a pipelined request is already here
            self._head_started = True
            self._set_deadline(self.server_state.header_timeout, _HEAD)
            self._process()
        else:
            self._head_started = False
            self._set_deadline(self.server_state.keepalive_timeout, _IDLE)

    def _refuse(self, status: int, message: str) -> None:
        """Answer a request we will not process (bad head, too large) and close."""
        self._closing = True
        self._deadline_kind = 0
        request = self._request
        if request is not None and request.status:  # a response has started already
            self.transport.close()
            return
        body = orjson.dumps(HTTPError(status, message).to_dict())
        fields = b"content-type: %b\r\ncontent-length: %d\r\n" % (JSON, len(body))
        answer = self._head(request, status, fields) + body
        self.transport.write(answer)
        if request is not None:
            request.status = status
            request.bytes_sent = len(answer)
            self._request = None  # answered: connection_lost does not report it again
            self._report_finished(request)
        self.transport.close()

    # -- shutdown ----------------------------------------------------------------
    def shutdown(self) -> None:
        """Finish the request in flight, if any, then close; close an idle connection now."""
        self._closing = True
        if self._request is None and self.transport is not None:
            self.transport.close()

    def cut_off(self, error: HTTPError) -> None:
        """End the request in flight with ``error`` now (the shutdown grace is over), then close.

        The handler is cancelled. A stream ends with ``error`` as its error event and
        its terminator, a request not answered yet gets ``error`` as its response, both
        in the route's shape (``ServerState.fail``): a client can tell a cut from a
        finish. The transport closes once that is flushed.
        """
        self._closing = True
        task, request = self._task, self._request
        if task is not None and not task.done():
            task.cancel()
        if request is not None and not self.lost:
            try:
                response = self.server_state.fail(request, error)
            except Exception:
                self.server_state.logger.exception("rendering the shutdown error failed")
                response = None if request.response_stream is not None else error_response(error)
            stream = request.response_stream
            if stream is not None:
                stream.fail(error.to_dict())  # a no-op when the route's renderer ended it
            elif response is not None and request.status < 200:
                self.send_response(request, response)
        # Ending the request closed the transport (after the flush; stop() aborts a client
        # that never takes it); an idle connection is closed here.
        if self.transport is not None and (request is None or self._request is request):
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
        self.server_state.logger.info("dropping a client that stopped reading for %ss", self.server_state.write_timeout)
        self.abort()
