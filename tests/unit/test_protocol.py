"""HttpProtocol without sockets: raw request bytes in, exact response bytes out.

Each test drives one protocol on a plain asyncio loop through a fake transport
that records what the server does to it. Time is a fake clock (``loop.time`` is
replaced on the loop instance, which asyncio's timers read), so deadlines are
tested by moving the clock, never by sleeping. The Date header is pinned to the
epoch and request ids come from the test.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
from http import HTTPStatus

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runnel.errors import HTTPError
from runnel.http.dates import DateHeader
from runnel.http.protocol import BODY_HIGH_WATER, HttpProtocol
from runnel.http.response import Response
from runnel.http.server_state import ServerState
from runnel.serializers import NDJSON, Negotiator, ServerSentEvents
from runnel.testing import error_body as error_envelope
from runnel.testing import parse_all

T0 = 1000.0  # the fake clock's start

DATE = b"date: Thu, 01 Jan 1970 00:00:00 GMT"
SERVER = b"server: runnel"

GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"

HELLO_200 = (
    b"HTTP/1.1 200 OK\r\n"
    b"date: Thu, 01 Jan 1970 00:00:00 GMT\r\n"
    b"server: runnel\r\n"
    b"x-request-id: rid\r\n"
    b"content-type: text/plain\r\n"
    b"content-length: 5\r\n"
    b"\r\n"
    b"hello"
)


# --- harness -------------------------------------------------------------------------


class FakeTransport:
    """Records every call the protocol makes, in order."""

    def __init__(self) -> None:
        self.events: list = []
        self.buffered = 0  # what get_write_buffer_size() answers: bytes "not yet sent"

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name, default=None):
        return ("203.0.113.7", 54321) if name == "peername" else default

    def write(self, data) -> None:
        self.events.append(("write", bytes(data)))

    def pause_reading(self) -> None:
        self.events.append("pause_reading")

    def resume_reading(self) -> None:
        self.events.append("resume_reading")

    def close(self) -> None:
        self.events.append("close")

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.events.append("write_eof")

    def abort(self) -> None:
        self.events.append("abort")

    def is_closing(self) -> bool:
        return "close" in self.events or "abort" in self.events

    @property
    def writes(self) -> list[bytes]:
        return [event[1] for event in self.events if type(event) is tuple]

    @property
    def written(self) -> bytes:
        return b"".join(self.writes)

    @property
    def calls(self) -> list[str]:
        """The events other than writes."""
        return [event for event in self.events if type(event) is str]


class Env:
    """A plain asyncio loop on a fake clock, and every task created on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        if not isinstance(self.loop, asyncio.BaseEventLoop):  # an installed uvloop policy: no fake clock there
            self.loop.close()
            self.loop = asyncio.SelectorEventLoop()
        self.now = T0
        self.loop.time = lambda: self.now  # BaseEventLoop schedules call_at/call_later off self.time()
        self.tasks: list[asyncio.Task] = []
        self.expected_failures: set[asyncio.Task] = set()
        self.loop.set_task_factory(self._task_factory)
        self.loop_errors: list[dict] = []
        self.loop.set_exception_handler(lambda loop, context: self.loop_errors.append(context))

    def _task_factory(self, loop, coro, **kwargs):
        task = asyncio.Task(coro, loop=loop, **kwargs)
        self.tasks.append(task)
        return task

    def spin(self, times: int = 8) -> None:
        """Run whatever is ready (and whatever timers are due) a few rounds."""
        for _ in range(times):
            self.loop.run_until_complete(asyncio.sleep(0))

    def failed_as_expected(self, task: asyncio.Task, kind: type[BaseException]) -> None:
        assert task.done() and not task.cancelled()
        assert isinstance(task.exception(), kind), task.exception()
        self.expected_failures.add(task)

    def advance_to(self, offset: float) -> None:
        """Move the clock to T0 + offset and run what came due."""
        assert T0 + offset >= self.now, "the clock only moves forward"
        self.now = T0 + offset
        self.spin()

    def close(self) -> list[str]:
        """Cancel what is left, close the loop; return the problems seen on the way."""
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        problems = [
            f"task {task.get_coro()!r} raised {task.exception()!r}"
            for task in self.tasks
            if task.done() and not task.cancelled() and task.exception() is not None
            and task not in self.expected_failures
        ]
        problems += [f"loop error: {context.get('message')} {context.get('exception')!r}" for context in self.loop_errors]
        self.loop.close()
        return problems


@pytest.fixture
def env():
    env = Env()
    yield env
    problems = env.close()
    assert not problems, "the server left unhandled errors behind:\n" + "\n".join(problems)


NEGOTIATE = Negotiator({b"text/event-stream": ServerSentEvents(), b"application/x-ndjson": NDJSON()})


async def hello(request):
    return Response(200, b"hello", media_type=b"text/plain")


class Conn:
    """One HttpProtocol on a FakeTransport with a dispatch the test controls."""

    def __init__(self, env: Env, handler=hello, *, request_ids=None, **site_options) -> None:
        self.env = env
        self.handler = handler
        self.requests: list = []
        self.site = ServerState(
            dispatch=self.dispatch,
            negotiate=NEGOTIATE,
            dates=DateHeader(clock=lambda: 0.0),
            new_request_id=request_ids or (lambda: "rid"),
            **site_options,
        )
        self.transport = FakeTransport()
        self.protocol = HttpProtocol(self.site, env.loop)
        self.protocol.connection_made(self.transport)

    async def dispatch(self, request):
        self.requests.append(request)
        try:
            return await self.handler(request)
        except HTTPError as error:
            return Response(error.status, orjson.dumps(error.to_dict()), media_type=b"application/json", headers=error.headers)

    def feed(self, *pieces: bytes) -> None:
        for piece in pieces:
            self.protocol.data_received(piece)
            self.env.spin()

    @property
    def events(self) -> list:
        return self.transport.events


def counter_ids():
    numbers = itertools.count(1)
    return lambda: f"id-{next(numbers)}"


def request(method: bytes = b"GET", target: bytes = b"/", *headers: bytes, body: bytes = b"", version: bytes = b"1.1") -> bytes:
    lines = [b"%b %b HTTP/%b" % (method, target, version)]
    if version == b"1.1":
        lines.append(b"Host: x")
    lines.extend(headers)
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def head(status: int, *fields: bytes, rid: bytes = b"rid", close: bool = False) -> bytes:
    """A response head in the server's field order: date, server, x-request-id, the rest, connection."""
    lines = [b"HTTP/1.1 %d %b" % (status, HTTPStatus(status).phrase.encode()), DATE, SERVER, b"x-request-id: " + rid]
    lines.extend(fields)
    if close:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def error_body(message: str, type: str = "invalid_request_error") -> bytes:
    """The envelope's bytes as the server writes them (orjson keeps the envelope's key order)."""
    return orjson.dumps(error_envelope(message, type))


def error(status: int, message: str, *, type: str = "invalid_request_error", rid: bytes = b"rid", close: bool = True) -> bytes:
    body = error_body(message, type)
    fields = (b"content-type: application/json", b"content-length: %d" % len(body))
    return head(status, *fields, rid=rid, close=close) + body


def plain(status: int, body: bytes, *, rid: bytes = b"rid", close: bool = False, media_type: bytes = b"text/plain") -> bytes:
    return head(status, b"content-type: " + media_type, b"content-length: %d" % len(body), rid=rid, close=close) + body


def split_response(data: bytes) -> tuple[bytes, bytes]:
    head_end = data.index(b"\r\n\r\n") + 4
    return data[:head_end], data[head_end:]


# --- one request, keep-alive and close ------------------------------------------------------


def test_simple_get_exact_bytes(env):
    conn = Conn(env)
    conn.feed(GET)
    assert conn.events == [("write", HELLO_200)]
    assert HELLO_200 == plain(200, b"hello")  # the helpers below build the same bytes


def test_handler_sees_the_request(env):
    seen = {}

    async def handler(req):
        seen.update(
            method=req.method,
            target=req.target,
            path=req.path,
            query=req.query,
            params=req.query_params,
            version=req.http_version,
            agent=req.header(b"user-agent"),
            missing=req.header(b"x-missing", b"default"),
            client=req.client,
            rid=req.request_id,
        )
        return Response(204)

    conn = Conn(env, handler)
    conn.feed(b"GET /v1/models?limit=2&x=a%20b HTTP/1.1\r\nHost: x\r\nUser-Agent: t/1\r\n\r\n")
    assert seen == {
        "method": "GET",
        "target": b"/v1/models?limit=2&x=a%20b",
        "path": "/v1/models",
        "query": "limit=2&x=a%20b",
        "params": {"limit": ["2"], "x": ["a b"]},
        "version": b"1.1",
        "agent": b"t/1",
        "missing": b"default",
        "client": ("203.0.113.7", 54321),
        "rid": "rid",
    }
    # 204 has neither a body nor a Content-Length.
    assert conn.events == [("write", head(204))]


def test_absolute_form_target(env):
    paths = []

    async def handler(req):
        paths.append((req.path, req.query))
        return await hello(req)

    conn = Conn(env, handler)
    conn.feed(request(b"GET", b"http://example.com/v1/models?x=1"), request(b"GET", b"http://example.com"))
    assert paths == [("/v1/models", "x=1"), ("/", "")]
    assert conn.transport.writes == [HELLO_200, HELLO_200]


def test_keep_alive_second_request_on_the_same_connection(env):
    async def handler(req):
        return Response(200, req.path.encode(), media_type=b"text/plain")

    conn = Conn(env, handler, request_ids=counter_ids())
    conn.feed(request(b"GET", b"/one"))
    assert conn.events == [("write", plain(200, b"/one", rid=b"id-1"))]
    conn.feed(request(b"GET", b"/two"))
    assert conn.events == [("write", plain(200, b"/one", rid=b"id-1")), ("write", plain(200, b"/two", rid=b"id-2"))]
    assert conn.protocol in conn.site.connections
    assert not conn.protocol.busy


def test_connection_close_from_the_client_closes_after_the_response(env):
    conn = Conn(env)
    conn.feed(request(b"GET", b"/", b"Connection: close"))
    assert conn.events == [
        (
            "write",
            b"HTTP/1.1 200 OK\r\n"
            b"date: Thu, 01 Jan 1970 00:00:00 GMT\r\n"
            b"server: runnel\r\n"
            b"x-request-id: rid\r\n"
            b"content-type: text/plain\r\n"
            b"content-length: 5\r\n"
            b"connection: close\r\n"
            b"\r\n"
            b"hello",
        ),
        "close",
    ]


def test_connection_close_among_other_tokens(env):
    conn = Conn(env)
    conn.feed(request(b"GET", b"/", b"Connection: TE, Close"))
    assert conn.events == [("write", plain(200, b"hello", close=True)), "close"]


def test_http10_request_is_answered_then_closed(env):
    conn = Conn(env)
    conn.feed(b"GET / HTTP/1.0\r\n\r\n")
    assert conn.events == [("write", plain(200, b"hello", close=True)), "close"]


def test_head_request_gets_the_get_head_without_the_body(env):
    conn = Conn(env)
    conn.feed(request(b"HEAD"), request(b"GET"))
    assert conn.events == [("write", head(200, b"content-type: text/plain", b"content-length: 5")), ("write", HELLO_200)]


def test_handler_headers_follow_the_server_fields(env):
    async def handler(req):
        return Response(201, b"{}", media_type=b"application/json", headers=[(b"location", b"/v1/x"), (b"x-a", b"1")])

    conn = Conn(env, handler)
    conn.feed(GET)
    assert conn.events == [
        (
            "write",
            head(201, b"content-type: application/json", b"content-length: 2", b"location: /v1/x", b"x-a: 1") + b"{}",
        )
    ]


def test_invalid_handler_header_becomes_a_500(env):
    async def handler(req):
        return Response(200, b"x", headers=[(b"x-bad", b"line\r\nbreak")])

    conn = Conn(env, handler)
    conn.feed(GET)
    assert conn.events == [("write", error(500, "Handler produced an invalid response", type="server_error", close=False))]


def test_dispatch_that_raises_is_a_500_and_the_connection_lives_on(env):
    async def handler(req):
        if req.path == "/boom":
            raise RuntimeError("boom")
        return await hello(req)

    conn = Conn(env, handler)
    conn.feed(request(b"GET", b"/boom"), GET)
    assert conn.events == [
        ("write", error(500, "Internal server error (request id rid)", type="server_error", close=False)),
        ("write", HELLO_200),
    ]


def test_dispatch_that_returns_nothing_is_a_500(env):
    async def handler(req):
        return None

    conn = Conn(env, handler)
    conn.feed(GET)
    assert conn.events == [("write", error(500, "Handler returned no response", type="server_error", close=False))]


def test_finished_observer_gets_request_status_and_duration(env):
    finished = []
    gate = env.loop.create_future()

    async def handler(req):
        await gate
        return await hello(req)

    conn = Conn(env, handler, finished=lambda req, status, seconds: finished.append((req.path, status, seconds)))
    conn.feed(GET)
    env.advance_to(2.5)
    gate.set_result(None)
    env.spin()
    assert finished == [("/", 200, 2.5)]


# --- pipelining --------------------------------------------------------------------------------


def test_pipelined_requests_are_answered_one_at_a_time_in_order(env):
    gate = env.loop.create_future()

    async def handler(req):
        if req.path == "/slow":
            await gate
        return Response(200, req.path.encode(), media_type=b"text/plain")

    conn = Conn(env, handler, request_ids=counter_ids())
    conn.feed(request(b"GET", b"/slow") + request(b"GET", b"/fast"))
    # The second request is buffered (h11 PAUSED): reading stops, nothing is written,
    # and its handler has not started.
    assert conn.events == ["pause_reading"]
    assert [r.path for r in conn.requests] == ["/slow"]
    env.spin()
    assert conn.events == ["pause_reading"]

    gate.set_result(None)
    env.spin()
    assert conn.events == [
        "pause_reading",
        ("write", plain(200, b"/slow", rid=b"id-1")),
        "resume_reading",
        ("write", plain(200, b"/fast", rid=b"id-2")),
    ]
    assert [r.path for r in conn.requests] == ["/slow", "/fast"]


def test_three_pipelined_requests_with_bodies(env):
    async def echo(req):
        return Response(200, await req.body(), media_type=b"text/plain")

    conn = Conn(env, echo, request_ids=counter_ids())
    conn.feed(
        request(b"POST", b"/", body=b"one")
        + b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\ntwo\r\n0\r\nX-T: 1\r\n\r\n"
        + request(b"POST", b"/", body=b"three")
    )
    assert conn.transport.writes == [
        plain(200, b"one", rid=b"id-1"),
        plain(200, b"two", rid=b"id-2"),
        plain(200, b"three", rid=b"id-3"),
    ]
    assert "close" not in conn.events


def test_bad_request_after_a_good_one(env):
    conn = Conn(env)
    conn.feed(GET + b"GARBAGE\r\n\r\n")
    assert conn.events[:3] == ["pause_reading", ("write", HELLO_200), "resume_reading"]
    assert conn.events[4:] == ["close"]
    response_head, body = split_response(conn.events[3][1])
    assert response_head == head(
        400, b"content-type: application/json", b"content-length: %d" % len(body), close=True
    )
    message = orjson.loads(body)["error"]["message"]
    assert message.startswith("Invalid HTTP request: ")


def test_obs_fold_after_a_good_request(env):
    conn = Conn(env)
    conn.feed(GET + b"GET / HTTP/1.1\r\nHost: x\r\nX-A: one\r\n two\r\n\r\n")
    assert conn.events == [
        "pause_reading",
        ("write", HELLO_200),
        "resume_reading",
        ("write", error(400, "obsolete line folding in header")),
        "close",
    ]
    assert len(conn.requests) == 1


# --- heads the server refuses -------------------------------------------------------------------


def test_431_for_an_oversized_complete_head(env):
    conn = Conn(env, max_header_bytes=1024)
    conn.feed(request(b"GET", b"/", b"X-Big: " + b"a" * 2000))
    assert conn.events == [("write", error(431, "request header block too large")), "close"]
    assert conn.requests == []


def test_a_head_of_exactly_the_limit_is_accepted(env):
    conn = Conn(env, max_header_bytes=len(GET))
    conn.feed(GET)
    assert conn.events == [("write", HELLO_200)]
    conn = Conn(env, max_header_bytes=len(GET) - 1)
    conn.feed(GET)
    assert conn.events == [("write", error(431, "request header block too large")), "close"]


def test_431_for_an_incomplete_head_growing_past_the_limit(env):
    conn = Conn(env, max_header_bytes=1024)
    conn.feed(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 900)
    assert conn.events == []
    conn.feed(b"a" * 200)
    assert conn.events == [("write", error(431, "request header block too large")), "close"]
    assert conn.requests == []


def test_400_for_obs_fold(env):
    conn = Conn(env)
    conn.feed(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: one\r\n\ttwo\r\n\r\n")
    assert conn.events == [("write", error(400, "obsolete line folding in header")), "close"]
    assert conn.requests == []


def test_400_for_content_length_with_transfer_encoding(env):
    conn = Conn(env)
    conn.feed(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    assert conn.events == [("write", error(400, "Request has both Content-Length and Transfer-Encoding")), "close"]
    assert conn.requests == []


CHUNKED_POST = b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


async def read_body(req):
    body = await req.body()
    return Response(200, b"got %d" % len(body), media_type=b"text/plain")


def test_400_for_a_bare_cr_in_a_chunk_extension_sent_with_the_head(env):
    conn = Conn(env, read_body)
    conn.feed(CHUNKED_POST + b"5;a=b\rc\r\nhello\r\n0\r\n\r\n")
    assert conn.events == [("write", error(400, "Invalid chunked framing in request body")), "close"]
    assert conn.requests == []


def test_400_for_a_bare_cr_in_a_chunk_extension_sent_after_the_head(env):
    conn = Conn(env, read_body)
    conn.feed(CHUNKED_POST)
    assert conn.events == []
    conn.feed(b"5;a=b\rc\r\nhello\r\n0\r\n\r\n")
    assert conn.events == [
        "pause_reading",
        ("write", error(400, "Invalid chunked framing in request body")),
        "close",
    ]


def test_400_for_a_bare_cr_in_a_trailer(env):
    conn = Conn(env, read_body)
    conn.feed(CHUNKED_POST, b"5\r\nhello\r\n0\r\nX-T: a\rb\r\n\r\n")
    assert conn.events == [
        "pause_reading",
        ("write", error(400, "Invalid chunked framing in request body")),
        "close",
    ]


def test_a_negative_chunk_size_does_not_hang_the_server():
    # The chunk checker runs on the body bytes before h11 does; a "-6" size line
    # must not send it round in circles with the event loop blocked.
    code = r"""
import asyncio
from runnel.http.protocol import HttpProtocol
from runnel.http.server_state import ServerState
from runnel.serializers import Negotiator, ServerSentEvents

class Transport:
    out = []
    def get_extra_info(self, name, default=None): return None
    def write(self, data): self.out.append(bytes(data))
    def pause_reading(self): pass
    def resume_reading(self): pass
    def close(self): pass
    def abort(self): pass

async def dispatch(request):
    return None

loop = asyncio.new_event_loop()
site = ServerState(dispatch=dispatch, negotiate=Negotiator({b"text/event-stream": ServerSentEvents()}))
protocol = HttpProtocol(site, loop)
protocol.connection_made(Transport())
protocol.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n-6\r\nZ")
loop.run_until_complete(asyncio.sleep(0))
print(b"".join(Transport.out).split(b"\r\n", 1)[0].decode())
for task in asyncio.all_tasks(loop):
    task.cancel()
loop.close()
"""
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("data_received never returned: the event loop would be blocked for good")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "HTTP/1.1 400 Bad Request"


# --- request bodies ----------------------------------------------------------------------------------


def test_413_for_content_length_over_the_limit_without_100_continue(env):
    conn = Conn(env, read_body, max_body_bytes=1000)
    conn.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\nExpect: 100-continue\r\n\r\n")
    assert conn.events == [
        ("write", error(413, "Request body is larger than the limit of 1000 bytes")),
        "close",
    ]
    assert b"100 Continue" not in conn.transport.written
    assert conn.requests == []


def test_content_length_of_exactly_the_limit_is_read(env):
    conn = Conn(env, read_body, max_body_bytes=10)
    conn.feed(request(b"POST", b"/", body=b"0123456789"))
    assert conn.events == [("write", plain(200, b"got 10"))]


def test_chunked_body_over_the_limit_is_413_then_close(env):
    caught = []

    async def handler(req):
        try:
            await req.body()
        except HTTPError as exc:
            caught.append(exc.status)
            raise
        return Response(200)  # pragma: no cover

    conn = Conn(env, handler, max_body_bytes=1500)
    conn.feed(CHUNKED_POST, b"400\r\n" + b"a" * 1024 + b"\r\n")
    assert conn.events == []
    conn.feed(b"400\r\n" + b"b" * 1024 + b"\r\n0\r\n\r\n")
    assert caught == [413]
    assert conn.events == [
        "pause_reading",
        ("write", error(413, "Request body is larger than the limit of 1500 bytes")),
        "close",
    ]


def test_expect_100_continue_is_answered_only_when_the_handler_reads(env):
    gate = env.loop.create_future()

    async def handler(req):
        await gate
        return await read_body(req)

    conn = Conn(env, handler)
    conn.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    assert conn.events == []
    gate.set_result(None)
    env.spin()
    assert conn.events == [("write", b"HTTP/1.1 100 Continue\r\n\r\n")]
    conn.feed(b"hello")
    assert conn.events == [("write", b"HTTP/1.1 100 Continue\r\n\r\n"), ("write", plain(200, b"got 5"))]


def test_100_continue_is_sent_once_for_several_reads(env):
    async def handler(req):
        first = await req.body()
        again = await req.body()
        chunks = [chunk async for chunk in req.stream_body()]
        return Response(200, b"%b|%b|%d" % (first, again, len(chunks)), media_type=b"text/plain")

    conn = Conn(env, handler)
    conn.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n", b"ok")
    assert conn.transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n", plain(200, b"ok|ok|0")]


def test_no_100_continue_when_the_handler_answers_without_reading(env):
    conn = Conn(env)
    conn.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    # The unread body is still on its way: the connection cannot be reused.
    assert conn.events == [("write", plain(200, b"hello", close=True)), "close"]


def test_no_100_continue_when_the_body_came_with_the_head(env):
    conn = Conn(env, read_body)
    conn.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello")
    assert conn.events == [("write", plain(200, b"got 5"))]


def test_body_flow_control_pauses_and_resumes_reading(env):
    gate = env.loop.create_future()

    async def handler(req):
        await gate
        return await read_body(req)

    piece = 100 * 1024
    total = 4 * piece
    assert 2 * piece < BODY_HIGH_WATER < 3 * piece
    conn = Conn(env, handler)
    conn.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % total)
    conn.feed(b"a" * piece, b"b" * piece)
    assert conn.events == []  # 200 KiB buffered: under the high-water mark
    conn.feed(b"c" * piece)
    assert conn.events == ["pause_reading"]  # 300 KiB buffered and nobody reading

    gate.set_result(None)  # the handler reads what is buffered
    env.spin()
    assert conn.events == ["pause_reading", "resume_reading"]

    conn.feed(b"d" * piece)
    assert conn.events == ["pause_reading", "resume_reading", ("write", plain(200, b"got %d" % total))]


def test_stream_body_yields_pieces_as_they_arrive(env):
    seen = []

    async def handler(req):
        async for chunk in req.stream_body():
            seen.append(chunk)
        return Response(204)

    conn = Conn(env, handler)
    conn.feed(CHUNKED_POST, b"3\r\nabc\r\n")
    assert seen == [b"abc"]
    conn.feed(b"2\r\nde\r\n0\r\n\r\n")
    assert seen == [b"abc", b"de"]
    assert conn.events == [("write", head(204))]


# --- streamed responses -----------------------------------------------------------------------------


def streaming_handler(gates):
    """At /stream: send {"a": 1}, wait for gates[0], end the stream. Elsewhere: hello."""

    async def handler(req):
        if req.path != "/stream":
            return await hello(req)
        stream = req.stream()
        stream.send({"a": 1})
        await gates[0]
        stream.end()

    return handler


SSE_HEAD = head(200, b"content-type: text/event-stream", b"transfer-encoding: chunked")


def test_stream_writes_chunks_then_the_last_chunk(env):
    gate = env.loop.create_future()
    conn = Conn(env, streaming_handler([gate]))
    conn.feed(request(b"GET", b"/stream"))
    event = b'data: {"a":1}\n\n'
    assert len(event) == 0xF
    assert conn.transport.writes == [
        b"HTTP/1.1 200 OK\r\n"
        b"date: Thu, 01 Jan 1970 00:00:00 GMT\r\n"
        b"server: runnel\r\n"
        b"x-request-id: rid\r\n"
        b"content-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\n"
        b"\r\n",
        b'f\r\ndata: {"a":1}\n\n\r\n',
    ]
    gate.set_result(None)
    env.spin()
    assert conn.transport.writes[2:] == [b"0\r\n\r\n"]
    assert "close" not in conn.events
    conn.feed(GET)  # keep-alive after a stream
    assert conn.transport.writes[3:] == [HELLO_200]


def test_stream_negotiates_ndjson_and_frames_lengths_in_hex(env):
    async def handler(req):
        stream = req.stream(headers=[(b"cache-control", b"no-cache")])
        stream.send({"text": "x" * 20})
        stream.write(b"")  # nothing: an empty chunk would end the body
        stream.write(b"raw")
        stream.end()
        stream.end()  # once only

    conn = Conn(env, handler)
    conn.feed(request(b"POST", b"/", b"Accept: application/x-ndjson", body=b"{}"))
    line = b'{"text":"' + b"x" * 20 + b'"}\n'
    assert len(line) == 0x20
    assert conn.transport.writes == [
        head(200, b"content-type: application/x-ndjson", b"transfer-encoding: chunked", b"cache-control: no-cache"),
        b"20\r\n" + line + b"\r\n",
        b"3\r\nraw\r\n",
        b"0\r\n\r\n",
    ]


def test_stream_ended_by_returning(env):
    async def handler(req):
        req.stream().send("hi")
        return None

    conn = Conn(env, handler)
    conn.feed(GET)
    assert conn.transport.writes == [SSE_HEAD, b"a\r\ndata: hi\n\n\r\n", b"0\r\n\r\n"]


def test_head_request_stream_writes_the_head_only(env):
    gate = env.loop.create_future()
    gate.set_result(None)
    conn = Conn(env, streaming_handler([gate]))
    conn.feed(request(b"HEAD", b"/stream"))
    assert conn.transport.written == SSE_HEAD
    assert "close" not in conn.events
    conn.feed(GET)
    assert conn.transport.written == SSE_HEAD + HELLO_200


def test_http10_stream_has_no_chunk_framing_and_closes_at_the_end(env):
    gate = env.loop.create_future()
    conn = Conn(env, streaming_handler([gate]))
    conn.feed(b"GET /stream HTTP/1.0\r\n\r\n")
    assert conn.transport.writes == [
        head(200, b"content-type: text/event-stream", close=True),
        b'data: {"a":1}\n\n',
    ]
    gate.set_result(None)
    env.spin()
    assert conn.transport.written == head(200, b"content-type: text/event-stream", close=True) + b'data: {"a":1}\n\n'
    assert conn.events[-1] == "close"


class Terminated(ServerSentEvents):
    """SSE with a terminator, as OpenAI's stream has ``data: [DONE]``."""

    end = b"data: [DONE]\n\n"


def test_stream_end_writes_the_serializers_terminator_and_fail_does_not(env):
    async def handler(req):
        stream = req.stream(serializer=Terminated())
        stream.send(b'{"pre":"encoded"}')
        if req.path == "/fail":
            stream.fail({"error": "late"})
        stream.end()  # after fail: nothing more
        stream.send("dropped")

    conn = Conn(env, handler, keepalive_timeout=100.0)
    conn.feed(request(b"GET", b"/ok"))
    assert conn.transport.writes == [
        SSE_HEAD, b'19\r\ndata: {"pre":"encoded"}\n\n\r\n', b"e\r\ndata: [DONE]\n\n\r\n", b"0\r\n\r\n"]
    conn.transport.events.clear()
    conn.feed(request(b"GET", b"/fail"))
    assert conn.transport.writes == [
        SSE_HEAD, b'19\r\ndata: {"pre":"encoded"}\n\n\r\n', b'25\r\nevent: error\ndata: {"error":"late"}\n\n\r\n',
        b"0\r\n\r\n"]
    assert "close" not in conn.events  # the cycle completed: keep-alive


def test_a_stream_past_its_buffer_bound_drops_the_client_and_cancels_the_handler(env):
    log = []

    async def handler(req):
        stream = req.stream()
        try:
            while True:  # a producer that cannot pause (a model's batch row)
                stream.send("x" * 100)
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            log.append("cancelled")
            raise

    conn = Conn(env, handler, max_stream_buffer_bytes=1000)
    conn.feed(GET)
    conn.transport.buffered = 5000
    env.spin(3)
    assert "abort" not in conn.events  # not paused: the transport has not said it is full
    conn.protocol.pause_writing()
    conn.transport.buffered = 1000
    env.spin(3)
    assert "abort" not in conn.events  # at the bound, not past it
    written = len(conn.transport.writes)
    conn.transport.buffered = 1001
    env.spin()
    assert conn.transport.calls == ["abort"]
    assert log == ["cancelled"]
    assert len(conn.transport.writes) == written + 1  # the write that crossed the bound, then nothing
    conn.protocol.connection_lost(None)
    env.spin()


# --- timers -------------------------------------------------------------------------------------------


def test_idle_connection_is_closed_at_the_keepalive_timeout(env):
    conn = Conn(env, keepalive_timeout=5.0)
    env.advance_to(4.99)
    assert conn.events == []
    env.advance_to(5.0)
    assert conn.events == ["close"]


def test_keepalive_timeout_runs_from_the_last_response(env):
    conn = Conn(env, keepalive_timeout=5.0)
    env.advance_to(3.0)
    conn.feed(GET)
    env.advance_to(7.99)
    assert conn.events == [("write", HELLO_200)]
    env.advance_to(8.0)
    assert conn.events == [("write", HELLO_200), "close"]


def test_head_deadline_runs_from_the_first_byte_and_is_not_extended(env):
    conn = Conn(env, header_timeout=10.0, keepalive_timeout=5.0)
    env.advance_to(1.0)
    conn.feed(b"GET / HT")
    env.advance_to(6.0)  # past the keep-alive timeout: a started head is not idle
    assert conn.events == []
    env.advance_to(9.0)
    conn.feed(b"TP/1.1\r\n")  # more bytes do not move the deadline
    env.advance_to(10.99)
    assert conn.events == []
    env.advance_to(11.0)
    assert conn.events == [
        ("write", error(408, "Request head was not received in time", type="timeout_error")),
        "close",
    ]
    assert conn.requests == []


def test_head_deadline_stops_once_the_head_is_in(env):
    gate = env.loop.create_future()

    async def handler(req):
        await gate
        return await hello(req)

    conn = Conn(env, handler, header_timeout=10.0)
    conn.feed(GET)
    env.advance_to(60.0)  # a slow handler is not a slow client
    assert conn.events == []
    gate.set_result(None)
    env.spin()
    assert conn.events == [("write", HELLO_200)]


def test_body_timeout_while_the_handler_waits_for_a_stalled_body(env):
    conn = Conn(env, read_body, body_timeout=30.0, body_min_rate=0)  # the progress guard alone
    conn.feed(request(b"POST", b"/", body=b"0123456789")[:-7])  # head and 3 bytes of 10
    env.advance_to(20.0)
    conn.feed(b"345")  # progress moves the deadline to 50
    env.advance_to(49.9)
    assert conn.events == []
    env.advance_to(50.0)
    assert conn.events == [
        "pause_reading",
        ("write", error(408, "Request body was not received in time", type="timeout_error")),
        "close",
    ]


def stalled_stream_handler(release, log):
    async def handler(req):
        stream = req.stream()
        stream.send("one")
        await release
        try:
            await stream.drain()
        except asyncio.CancelledError:
            log.append("cancelled")
            raise
        log.append("drained")
        stream.send("two")
        stream.end()

    return handler


def test_write_stall_aborts_the_connection_and_cancels_the_handler(env):
    release, log = env.loop.create_future(), []
    conn = Conn(env, stalled_stream_handler(release, log), write_timeout=30.0)
    conn.feed(GET)
    task = conn.protocol._task
    conn.protocol.pause_writing()
    release.set_result(None)
    env.spin()
    assert log == []
    env.advance_to(29.9)
    assert "abort" not in conn.events
    env.advance_to(30.0)
    assert conn.transport.calls == ["abort"]
    assert log == ["cancelled"]
    assert task.cancelled()
    conn.protocol.connection_lost(None)  # what the transport does after abort()
    env.spin()
    assert conn.transport.writes == [SSE_HEAD, b"b\r\ndata: one\n\n\r\n"]


def test_resume_writing_before_the_write_timeout_keeps_the_connection(env):
    release, log = env.loop.create_future(), []
    conn = Conn(env, stalled_stream_handler(release, log), write_timeout=30.0, keepalive_timeout=100.0)
    conn.feed(GET)
    conn.protocol.pause_writing()
    release.set_result(None)
    env.advance_to(10.0)
    assert log == []
    conn.protocol.resume_writing()
    env.spin()
    assert log == ["drained"]
    env.advance_to(45.0)
    assert conn.transport.calls == []
    assert conn.transport.writes == [SSE_HEAD, b"b\r\ndata: one\n\n\r\n", b"b\r\ndata: two\n\n\r\n", b"0\r\n\r\n"]


# --- the client going away ----------------------------------------------------------------------------


def test_connection_lost_cancels_the_running_handler(env):
    log = []

    async def handler(req):
        try:
            await env.loop.create_future()
        except asyncio.CancelledError:
            log.append("cancelled")
            raise

    conn = Conn(env, handler)
    conn.feed(GET)
    task = conn.protocol._task
    conn.protocol.connection_lost(None)
    env.spin()
    assert log == ["cancelled"]
    assert task.cancelled()
    assert conn.events == []
    assert conn.protocol not in conn.site.connections


def test_connection_lost_fails_a_pending_drain_and_a_pending_body_read(env):
    started = {}

    async def handler(req):
        started["stream"] = req.stream()
        started["reader"] = asyncio.get_running_loop().create_task(req.body())
        await asyncio.get_running_loop().create_future()

    conn = Conn(env, handler)
    conn.feed(request(b"POST", b"/", b"Content-Length: 10"))
    stream = started["stream"]
    conn.protocol.pause_writing()
    assert stream.paused
    drainer = env.loop.create_task(stream.drain())
    env.spin()
    assert not drainer.done()
    assert not started["reader"].done()

    conn.protocol.connection_lost(None)
    env.spin()
    env.failed_as_expected(drainer, ConnectionResetError)
    env.failed_as_expected(started["reader"], ConnectionResetError)
    assert stream.closed
    # Later drains fail at once, later writes are dropped.
    late = env.loop.create_task(stream.drain())
    env.spin()
    env.failed_as_expected(late, ConnectionResetError)
    stream.send("after")
    # The body had not arrived when the stream started: its head says the connection closes.
    assert conn.transport.writes == [head(200, b"content-type: text/event-stream", b"transfer-encoding: chunked", close=True)]


def test_eof_on_an_idle_connection_closes_it(env):
    conn = Conn(env)
    assert conn.protocol.eof_received() is False  # asyncio then closes the transport
    assert conn.events == []


def test_eof_during_a_request_means_the_client_is_gone(env):
    gate = env.loop.create_future()
    cancelled = []

    async def handler(req):
        try:
            await gate
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return await hello(req)

    conn = Conn(env, handler)
    conn.feed(GET)
    env.spin()
    assert conn.protocol.eof_received() is False  # the transport closes itself
    conn.protocol.connection_lost(None)
    env.spin()
    assert cancelled == [True]
    assert conn.events == []  # nothing is written for a client that left


def test_shutdown_closes_an_idle_connection_now(env):
    conn = Conn(env)
    conn.feed(GET)
    conn.protocol.shutdown()
    assert conn.events == [("write", HELLO_200), "close"]


def test_shutdown_lets_the_request_in_flight_finish_then_closes(env):
    gate = env.loop.create_future()

    async def handler(req):
        await gate
        return await hello(req)

    conn = Conn(env, handler)
    conn.feed(GET)
    conn.protocol.shutdown()
    assert conn.events == []
    gate.set_result(None)
    env.spin()
    assert conn.events == [("write", plain(200, b"hello", close=True)), "close"]


# --- request ids ------------------------------------------------------------------------------------------


def test_x_request_id_is_echoed(env):
    seen = []

    async def handler(req):
        seen.append(req.request_id)
        return await hello(req)

    conn = Conn(env, handler, request_ids=counter_ids())
    conn.feed(request(b"GET", b"/", b"X-Request-Id: abc-123"))
    assert seen == ["abc-123"]
    assert conn.events == [("write", plain(200, b"hello", rid=b"abc-123"))]


def test_x_request_id_is_generated_when_absent_empty_or_too_long(env):
    conn = Conn(env, request_ids=counter_ids())
    conn.feed(
        GET,
        request(b"GET", b"/", b"X-Request-Id: "),
        request(b"GET", b"/", b"X-Request-Id: " + b"r" * 129),
        request(b"GET", b"/", b"X-Request-Id: " + b"k" * 128),
    )
    assert conn.transport.writes == [
        plain(200, b"hello", rid=b"id-1"),
        plain(200, b"hello", rid=b"id-2"),
        plain(200, b"hello", rid=b"id-3"),
        plain(200, b"hello", rid=b"k" * 128),
    ]


def test_a_non_ascii_x_request_id_still_gets_a_response(env):
    conn = Conn(env)
    conn.feed(request(b"GET", b"/", b"X-Request-Id: caf\xe9"))
    assert len(conn.transport.writes) == 1
    response_head, body = split_response(conn.transport.writes[0])
    assert body == b"hello"
    assert response_head.startswith(b"HTTP/1.1 200 OK\r\n")
    # Echoed as sent, or replaced by a fresh id: either way a valid field value.
    assert (b"x-request-id: caf\xe9\r\n" in response_head) or (b"x-request-id: rid\r\n" in response_head)


# --- hardening: hostile clients (issue 10) ------------------------------------------------------------------


def echo_path(req):
    async def answer():
        return Response(200, req.path.encode(), media_type=b"text/plain")

    return answer()


def test_a_pipelined_request_waits_until_the_client_reads_the_previous_response(env):
    conn = Conn(env, echo_path, request_ids=counter_ids())
    conn.protocol.pause_writing()  # the transport's buffer is over its high-water mark
    conn.feed(request(b"GET", b"/one") + request(b"GET", b"/two"))
    # /one is answered; /two is not started while the client takes nothing, and reading stays paused.
    assert conn.events == ["pause_reading", ("write", plain(200, b"/one", rid=b"id-1"))]
    env.advance_to(20.0)
    assert [r.path for r in conn.requests] == ["/one"]
    assert conn.events == ["pause_reading", ("write", plain(200, b"/one", rid=b"id-1"))]
    conn.protocol.resume_writing()
    env.spin()
    assert conn.events == [
        "pause_reading",
        ("write", plain(200, b"/one", rid=b"id-1")),
        "resume_reading",
        ("write", plain(200, b"/two", rid=b"id-2")),
    ]
    assert [r.path for r in conn.requests] == ["/one", "/two"]


def test_a_client_that_pipelines_and_never_reads_is_dropped_at_the_write_timeout(env):
    conn = Conn(env, echo_path, write_timeout=30.0, keepalive_timeout=5.0)
    conn.protocol.pause_writing()
    conn.feed(request(b"GET", b"/one") + request(b"GET", b"/two"))
    env.advance_to(29.9)  # past the keep-alive timeout: waiting on the client is not idleness
    assert conn.transport.calls == ["pause_reading"]
    env.advance_to(30.0)
    assert conn.transport.calls == ["pause_reading", "abort"]
    assert [r.path for r in conn.requests] == ["/one"]
    conn.protocol.connection_lost(None)
    env.spin()


def test_shutdown_while_a_pipelined_request_waits_for_the_client_closes(env):
    conn = Conn(env, echo_path)
    conn.protocol.pause_writing()
    conn.feed(request(b"GET", b"/one") + request(b"GET", b"/two"))
    conn.protocol.shutdown()
    conn.protocol.resume_writing()
    env.spin()
    assert [r.path for r in conn.requests] == ["/one"]
    assert conn.transport.calls[-1] == "close"


def test_a_body_trickled_a_byte_a_second_gets_408_at_the_minimum_rate_bound(env):
    conn = Conn(env, read_body, body_timeout=10.0, body_min_rate=100.0)
    conn.feed(request(b"POST", b"/", body=b"x" * 1000)[:-1000])  # the head; the handler starts reading now
    for second in range(1, 11):
        env.advance_to(float(second))
        conn.feed(b"x")  # each byte is progress: body_timeout alone would never fire
    # body_timeout plus one second per 100 bytes received: 10 + 10 / 100.
    env.advance_to(10.09)
    assert conn.events == []
    env.advance_to(10.1)
    assert conn.events == [
        "pause_reading",
        ("write", error(408, "Request body was not received in time", type="timeout_error")),
        "close",
    ]


def test_a_body_at_the_minimum_rate_is_read_to_its_end(env):
    conn = Conn(env, read_body, body_timeout=10.0, body_min_rate=100.0)
    conn.feed(request(b"POST", b"/", body=b"x" * 3000)[:-3000])
    for second in range(1, 31):
        env.advance_to(float(second))
        conn.feed(b"x" * 100)
    assert conn.events == [("write", plain(200, b"got 3000"))]


def refused(message: str = "Server is at its connection limit; retry later") -> bytes:
    body = orjson.dumps({"error": {"message": message, "type": "server_error", "param": None,
                                   "code": "too_many_connections"}})
    return head(503, b"content-type: application/json", b"content-length: %d" % len(body), b"retry-after: 1",
                close=True) + body


def test_past_max_connections_a_new_connection_gets_503_and_is_closed(env):
    first = Conn(env, max_connections=1, header_timeout=10.0)
    extra = FakeTransport()
    protocol = HttpProtocol(first.site, env.loop)
    protocol.connection_made(extra)
    # Answered before its request is read; the request is then read and dropped (so the
    # close does not reset the connection under the answer), for at most a second.
    assert extra.events == [("write", refused()), "write_eof"]
    protocol.data_received(GET)
    env.spin()
    assert extra.events == [("write", refused()), "write_eof"]
    first.feed(GET)  # the connection within the limit is served meanwhile
    assert first.events == [("write", HELLO_200)]
    env.advance_to(1.0)
    assert extra.events == [("write", refused()), "write_eof", "close"]
    protocol.connection_lost(None)
    assert first.site.refusing == 0
    assert first.site.connections == {first.protocol}


def test_a_refused_connection_does_not_count_against_max_connections(env):
    first = Conn(env, max_connections=2)
    refused_one = HttpProtocol(first.site, env.loop)
    second, third = FakeTransport(), FakeTransport()
    HttpProtocol(first.site, env.loop).connection_made(second)  # the second of two: served
    refused_one.connection_made(third)
    assert third.events[0] == ("write", refused())
    late = FakeTransport()
    first.protocol.connection_lost(None)  # one served connection leaves: room for one more
    HttpProtocol(first.site, env.loop).connection_made(late)
    assert late.events == []


NOT_A_PATH = "the request target must be a path starting with '/' or an absolute http(s) URI"


@pytest.mark.parametrize("target, reason", [
    (b"a/b/c/health", NOT_A_PATH),
    (b"health", NOT_A_PATH),
    (b"*", "the request target '*' is only for OPTIONS"),
    (b"example.com:443", NOT_A_PATH),
    (b"http://user@example.com/health", NOT_A_PATH),
    (b"http:///health", NOT_A_PATH),
    (b"ftp://example.com/health", NOT_A_PATH),
    (b"http://example.com/health#top", NOT_A_PATH),
])
def test_a_target_in_no_form_the_server_serves_is_400(env, target, reason):
    conn = Conn(env)
    conn.feed(request(b"GET", target) + GET)
    assert conn.events == [("write", error(400, f"Invalid request target: {reason}")), "close"]
    assert conn.requests == []


def test_absolute_form_targets_use_their_path_and_query(env):
    seen = []

    async def handler(req):
        seen.append((req.path, req.query))
        return await hello(req)

    conn = Conn(env, handler)
    conn.feed(request(b"GET", b"HTTPS://Example.com:8443/a/b?x=1"), request(b"GET", b"http://example.com?y=2"),
              request(b"GET", b"http://[::1]:80/v6"), request(b"OPTIONS", b"*"))
    assert seen == [("/a/b", "x=1"), ("/", "y=2"), ("/v6", ""), ("*", "")]
    assert conn.transport.writes == [HELLO_200] * 4


@pytest.mark.parametrize("version", [b"2.0", b"1.2", b"0.9", b"3.0"])
def test_an_http_version_other_than_1_0_and_1_1_is_505(env, version):
    conn = Conn(env)
    conn.feed(b"GET / HTTP/%b\r\nHost: x\r\n\r\n" % version)
    message = f"HTTP/{version.decode()} is not supported; use HTTP/1.1"
    assert conn.events == [("write", error(505, message, type="server_error")), "close"]
    assert conn.requests == []


SHUTTING_DOWN = HTTPError(503, "Server is shutting down", code="server_shutting_down",
                          headers=((b"retry-after", b"1"),))


def test_cut_off_ends_an_open_stream_with_an_error_event_and_the_last_chunk(env):
    log = []

    async def handler(req):
        stream = req.stream()
        stream.send({"a": 1})
        try:
            await env.loop.create_future()  # a stream that would go on for ever
        except asyncio.CancelledError:
            log.append("cancelled")
            stream.send({"after": "cut"})  # ended: dropped
            raise

    conn = Conn(env, handler)
    conn.feed(GET)
    conn.protocol.cut_off(SHUTTING_DOWN)
    env.spin()
    event = b"event: error\ndata: " + orjson.dumps(SHUTTING_DOWN.to_dict()) + b"\n\n"
    assert conn.events == [
        ("write", SSE_HEAD),
        ("write", b'f\r\ndata: {"a":1}\n\n\r\n'),
        ("write", b"%x\r\n%b\r\n" % (len(event), event)),
        ("write", b"0\r\n\r\n"),
        "close",
    ]
    assert log == ["cancelled"]


def test_cut_off_answers_a_request_not_answered_yet_with_the_error(env):
    release = env.loop.create_future()

    async def handler(req):
        try:
            await release
        except asyncio.CancelledError:
            return await hello(req)  # a handler that answers anyway: too late, nothing is written

    conn = Conn(env, handler)
    conn.feed(GET)
    conn.protocol.cut_off(SHUTTING_DOWN)
    env.spin()
    body = orjson.dumps(SHUTTING_DOWN.to_dict())
    response = head(503, b"content-type: application/json", b"content-length: %d" % len(body), b"retry-after: 1",
                    close=True) + body
    assert conn.events == [("write", response), "close"]


def test_cut_off_closes_an_idle_connection(env):
    conn = Conn(env)
    conn.feed(GET)
    conn.protocol.cut_off(SHUTTING_DOWN)
    assert conn.events == [("write", HELLO_200), "close"]


# --- properties: any split of the bytes, and garbage (hypothesis) --------------------------------------------

_TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$%&'*+.^_`|~"
_PATH_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-._~%!$&'()*+,;=:@/"
_VALUE_CHARS = "".join(chr(c) for c in range(0x21, 0x7F)) + " \t"
_RESERVED = {"host", "content-length", "transfer-encoding", "expect", "connection", "x-request-id"}

header_fields = st.lists(
    st.tuples(
        st.text(_TOKEN_CHARS, min_size=1, max_size=12).filter(lambda name: name.lower() not in _RESERVED),
        st.text(_VALUE_CHARS, max_size=20).map(str.strip),
    ),
    max_size=4,
)


@st.composite
def http_requests(draw) -> bytes:
    """One well-formed request: a method, an origin- or absolute-form target, headers, a framed body."""
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]))
    path = "/" + draw(st.text(_PATH_CHARS, max_size=20))
    if draw(st.booleans()):
        path += "?" + draw(st.text(_PATH_CHARS + "?", max_size=20))
    if draw(st.integers(0, 9)) == 0:
        path = "http://example.com" + path
    version = draw(st.sampled_from(["1.1", "1.1", "1.1", "1.0"]))
    lines = [f"{method} {path} HTTP/{version}"]
    if version == "1.1":
        lines.append("Host: example.com")
    lines += [f"{name}: {value}" for name, value in draw(header_fields)]
    if draw(st.integers(0, 5)) == 0:
        lines.append("Connection: close")
    body = draw(st.binary(max_size=64))
    framing = draw(st.sampled_from(["none", "length", "chunked"])) if version == "1.1" else "length"
    if framing == "none" or (framing == "length" and not body and draw(st.booleans())):
        encoded = b""
    elif framing == "length":
        lines.append(f"Content-Length: {len(body)}")
        encoded = body
    else:
        lines.append("Transfer-Encoding: chunked")
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=3)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if b > a]
        extension = b";ext=1" if draw(st.booleans()) else b""
        encoded = b"".join(b"%x%b\r\n%b\r\n" % (len(piece), extension, piece) for piece in pieces)
        encoded += b"0\r\n" + (b"X-Trailer: t\r\n" if draw(st.booleans()) else b"") + b"\r\n"
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + encoded


def run_pieces(pieces: list[bytes], *, end_after: float = 0.0) -> tuple[list, bytes, list[str]]:
    """Feed ``pieces`` to a fresh connection: what the dispatcher saw, what was written, and the other calls."""
    seen = []

    async def record_and_echo(req):
        body = await req.body()
        seen.append((req.method, req.target, req.path, req.query, tuple(req.headers), req.http_version, body))
        return Response(200, b"%d bytes" % len(body), media_type=b"text/plain")

    env = Env()
    try:
        conn = Conn(env, record_and_echo, request_ids=counter_ids())
        for piece in pieces:
            if conn.transport.is_closing():  # a real transport delivers nothing after close()
                break
            conn.protocol.data_received(piece)
            env.spin()
        if end_after:
            env.advance_to(end_after)
        return seen, conn.transport.written, conn.transport.calls
    finally:
        problems = env.close()
        assert not problems, "the server left unhandled errors behind:\n" + "\n".join(problems)


PROPERTY_SETTINGS = settings(max_examples=300, derandomize=True, deadline=None, database=None,
                             suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(st.lists(http_requests(), min_size=1, max_size=3), st.data())
def test_requests_parse_the_same_in_any_pieces_as_at_once(requests, data):
    wire = b"".join(requests)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(wire) - 1)), max_size=12), label="cuts")))
    pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True) if b > a]
    at_once = run_pieces([wire])
    in_pieces = run_pieces(pieces)
    assert in_pieces[0] == at_once[0]  # the requests the dispatcher saw, bodies included
    assert in_pieces[1] == at_once[1]  # the bytes written
    assert ("close" in in_pieces[2]) == ("close" in at_once[2])
    assert len(at_once[0]) >= 1  # a well-formed request is always served


def mutated(wire: bytes, data) -> bytes:
    """A well-formed request with a few bytes replaced, inserted or deleted."""
    out = bytearray(wire)
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        position = data.draw(st.integers(0, len(out)), label="position")
        byte = data.draw(st.sampled_from(b"\x00\r\n :/\t\x7f\xff%?#*0-9aZ"), label="byte")
        kind = data.draw(st.sampled_from(["replace", "insert", "delete"]), label="kind")
        if kind == "insert" or position == len(out):
            out[position:position] = bytes([byte])
        elif kind == "replace":
            out[position] = byte
        else:
            del out[position]
    return bytes(out)


@PROPERTY_SETTINGS
@given(st.data())
def test_garbage_gets_a_4xx_and_a_close_never_an_exception(data):
    if data.draw(st.booleans(), label="from a request"):
        garbage = mutated(data.draw(http_requests(), label="request"), data)
    else:
        garbage = data.draw(st.binary(min_size=1, max_size=200), label="bytes")
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(garbage) - 1)), max_size=4), label="cuts")))
    pieces = [garbage[a:b] for a, b in zip([0, *cuts], [*cuts, len(garbage)], strict=True) if b > a]
    _, written, calls = run_pieces(pieces, end_after=1000.0)  # past every deadline
    assert "close" in calls or "abort" in calls  # the connection ends, whatever came in
    responses = parse_all(written)
    statuses = [response.status for response in responses]
    # A mutation may leave a valid request (or a valid prefix, answered in turn); the first
    # thing the server cannot serve is answered with a client error, last, and closes.
    refused = [status for status in statuses if status >= 400]
    assert refused == statuses[len(statuses) - len(refused):], statuses
    assert len(refused) <= 1, statuses
    if refused:
        # 501 and 505 are what RFC 9112 names for a transfer coding or a version not implemented.
        assert refused[0] in (400, 408, 413, 431, 501, 505), statuses
        assert responses[-1].closes
