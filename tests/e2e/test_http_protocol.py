"""End-to-end tests of runnel's HTTP/1.1 layer, over raw sockets against a real server.

Every test starts its own server on 127.0.0.1:0 (see ``start_server`` in runnel.testing)
and asserts what goes over the wire: status lines, headers, framing and bodies.
"""

from __future__ import annotations

import asyncio
import re
import select
import socket
import struct
import threading
import time
from email.utils import parsedate_to_datetime

import orjson
import pytest

from runnel import Response, hookimpl, json_response
from runnel.testing import (
    H11Client,
    RawResponse,
    ResponseReader,
    connect,
    exchange,
    parse_all,
    parse_response,
    raw_exchange,
    read_until_closed,
    recv_until,
    send_post,
    request,
    sse_events,
    wait_until,
)

# -- harness helpers ---------------------------------------------------------------


class Routes:
    """A plugin registering ``{"METHOD /path": handler}``."""

    def __init__(self, table: dict) -> None:
        self.table = table

    @hookimpl
    def runnel_register_routes(self, register, server):
        for key, handler in self.table.items():
            method, path = key.split(" ", 1)
            register(method, path, handler)


def serve(start_server, routes: dict | None = None, **settings):
    """A server with these routes (on top of the built-in ones) and [server] settings."""
    return start_server({"server": settings}, plugins=[Routes(routes or {})])


def connections(server) -> int:
    return server.call_soon(lambda: len(server.server.connections))


def readable(sock: socket.socket, timeout: float) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


def small_buffer_socket(port: int, rcvbuf: int = 65536) -> socket.socket:
    """A connected socket with a small receive buffer, so a non-reading client backs up fast."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def reset_close(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a killed client does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def first_difference(a: bytes, b: bytes) -> int:
    """-1 when equal, else the first index where they differ (cheap on big bodies)."""
    if a == b:
        return -1
    step = 65536
    for start in range(0, max(len(a), len(b)), step):
        if a[start : start + step] != b[start : start + step]:
            for index in range(start, start + step):
                if index >= len(a) or index >= len(b) or a[index] != b[index]:
                    return index
    return min(len(a), len(b))


def error_message(response: RawResponse) -> str:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]["message"]


async def sleeper(request):
    """GET /t/sleep/{n}?delay=seconds -> {"n": n} after the delay."""
    await asyncio.sleep(float(request.query_param("delay", "0")))
    return json_response({"n": request.path_params["n"], "id": request.request_id})


def chunks_route():
    async def chunks(request):
        stream = request.stream(200, headers=[(b"x-custom", b"yes")], media_type=b"text/plain")
        stream.write(b"hello")
        stream.write(b"")  # an empty write must not end the chunked body early
        stream.write(b"x" * 300)
        stream.write(b"!")

    return chunks


CHUNKS_WIRE = b"5\r\nhello\r\n12c\r\n" + b"x" * 300 + b"\r\n1\r\n!\r\n0\r\n\r\n"
CHUNKS_BODY = b"hello" + b"x" * 300 + b"!"

# -- 1. keep-alive and pipelining ----------------------------------------------------------


def test_keep_alive_serves_several_requests_on_one_connection(start_server):
    peers = []

    async def whoami(request):
        body = await request.body()
        peers.append(request.client)
        return json_response({"n": len(peers), "body": body.decode()})

    server = serve(start_server, {"POST /t/whoami": whoami, "GET /t/sleep/{n}": sleeper})
    with H11Client(server.port) as client:
        for n in range(1, 5):
            reply = client.request("POST", "/t/whoami", body=b"req%d" % n)
            assert reply.status == 200
            assert reply.json() == {"n": n, "body": f"req{n}"}
            assert b"connection" not in reply.headers
            reply = client.request("GET", f"/t/sleep/{n}")
            assert reply.json()["n"] == str(n)
            assert connections(server) == 1
        local = client.sock.getsockname()
    assert set(peers) == {local}


def test_pipelined_requests_are_answered_in_order(start_server):
    started = []

    async def slow_first(request):
        started.append(request.path_params["n"])
        return await sleeper(request)

    server = serve(start_server, {"GET /t/sleep/{n}": slow_first})
    data = (
        b"GET /t/sleep/1?delay=0.3 HTTP/1.1\r\nHost: x\r\nX-Request-Id: first\r\n\r\n"
        b"GET /t/sleep/2 HTTP/1.1\r\nHost: x\r\nX-Request-Id: second\r\n\r\n"
        b"GET /t/sleep/3 HTTP/1.1\r\nHost: x\r\nX-Request-Id: third\r\nConnection: close\r\n\r\n"
    )
    responses = exchange(server.port, data)
    assert [r.status for r in responses] == [200, 200, 200]
    assert [r.json() for r in responses] == [
        {"n": "1", "id": "first"},
        {"n": "2", "id": "second"},
        {"n": "3", "id": "third"},
    ]
    assert [r.header(b"x-request-id") for r in responses] == [b"first", b"second", b"third"]
    assert [r.closes for r in responses] == [False, False, True]
    assert started == ["1", "2", "3"]


def test_malformed_request_after_a_good_one_is_answered_after_it_then_closed(start_server):
    server = serve(start_server, {"GET /t/sleep/{n}": sleeper})
    data = b"GET /t/sleep/1?delay=0.2 HTTP/1.1\r\nHost: x\r\n\r\nTHIS IS NOT HTTP\r\n\r\n"
    raw = raw_exchange(server.port, data)  # returns only once the server has closed
    good, bad = parse_all(raw)
    assert good.status == 200 and good.json()["n"] == "1"
    assert not good.closes
    assert (bad.version, bad.status, bad.reason) == (b"HTTP/1.1", 400, b"Bad Request")
    assert bad.closes
    assert bad.header(b"content-type") == b"application/json"
    assert "Invalid HTTP request" in error_message(bad)


# -- 2. request bodies --------------------------------------------------------------------


def test_chunked_request_body_is_streamed_to_the_handler(start_server):
    pieces = []

    async def collect(request):
        async for piece in request.stream_body():
            pieces.append(piece)
        return json_response({"pieces": [p.decode() for p in pieces]})

    server = serve(start_server, {"POST /t/collect": collect})
    with connect(server.port) as sock:
        sock.sendall(b"POST /t/collect HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        # The handler sees the first piece while the rest of the body is still unsent.
        wait_until(lambda: len(pieces) == 1)
        sock.sendall(b"6\r\n world\r\n")
        wait_until(lambda: len(pieces) == 2)
        sock.sendall(b"1\r\n!\r\n0\r\n\r\n")
        raw = recv_until(sock, b"}")
        response, end = parse_response(raw)
    assert response.status == 200
    assert response.json() == {"pieces": ["hello", " world", "!"]}
    assert end == len(raw)


def body_routes(calls):
    async def echo_body(request):
        calls.append(request.request_id)
        body = await request.body()
        return json_response({"length": len(body), "body": body.decode()})

    return {"POST /t/body": echo_body}


def test_content_length_over_limit_is_413_before_the_body_and_without_100_continue(start_server):
    calls = []
    server = serve(start_server, body_routes(calls), max_body_bytes=100)
    # No body is ever sent: the answer must come from the head alone.
    raw = raw_exchange(
        server.port,
        b"POST /t/body HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\nExpect: 100-continue\r\n\r\n",
    )
    assert b"100 Continue" not in raw and not raw.startswith(b"HTTP/1.1 100")
    [response] = parse_all(raw)
    assert response.status == 413
    assert response.closes
    assert "100 bytes" in error_message(response)
    assert calls == []
    # The limit itself is allowed.
    reply = request(server.port, "POST", "/t/body", body=b"a" * 100)
    assert (reply.status, reply.json()["length"]) == (200, 100)


def test_chunked_body_growing_past_limit_is_413(start_server):
    calls = []
    server = serve(start_server, body_routes(calls), max_body_bytes=100)
    head = b"POST /t/body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    responses = exchange(server.port, head + b"3c\r\n" + b"a" * 60 + b"\r\n3c\r\n" + b"b" * 60 + b"\r\n0\r\n\r\n")
    assert [r.status for r in responses] == [413]
    assert responses[0].closes
    assert "100 bytes" in error_message(responses[0])
    # Exactly at the limit, in two chunks, is fine.
    [ok] = exchange(
        server.port,
        head.replace(b"Host: x", b"Host: x\r\nConnection: close")
        + b"32\r\n" + b"a" * 50 + b"\r\n32\r\n" + b"b" * 50 + b"\r\n0\r\n\r\n",
    )
    assert ok.status == 200 and ok.json() == {"length": 100, "body": "a" * 50 + "b" * 50}


def test_chunked_body_growing_past_limit_while_handler_reads_is_413(start_server):
    received = []

    async def reader(request):
        async for piece in request.stream_body():
            received.append(len(piece))
        return json_response({"read": sum(received)})

    server = serve(start_server, {"POST /t/reader": reader}, max_body_bytes=100)
    with connect(server.port) as sock:
        sock.sendall(b"POST /t/reader HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3c\r\n" + b"a" * 60 + b"\r\n")
        wait_until(lambda: received == [60])
        sock.sendall(b"3c\r\n" + b"b" * 60 + b"\r\n")
        raw = read_until_closed(sock)
    [response] = parse_all(raw)
    assert response.status == 413
    assert response.closes
    assert received == [60]


def test_expect_100_continue_is_sent_only_when_the_handler_reads_the_body(start_server):
    entered = threading.Event()
    release = threading.Event()

    async def late_reader(request):
        entered.set()
        while not release.is_set():
            await asyncio.sleep(0.01)
        body = await request.body()
        return json_response({"body": body.decode()})

    server = serve(start_server, {"POST /t/late": late_reader})
    with connect(server.port) as sock:
        sock.sendall(b"POST /t/late HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        wait_until(entered.is_set)
        assert not readable(sock, 0.2), "sent something before the handler asked for the body"
        release.set()
        interim = recv_until(sock, b"\r\n\r\n")
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        raw = recv_until(sock, b"}")
    response, end = parse_response(raw)
    assert response.status == 200 and response.json() == {"body": "hello"}
    assert end == len(raw)


def test_expect_100_continue_is_not_sent_when_the_handler_ignores_the_body(start_server):
    async def ignore(request):
        return json_response({"ignored": True})

    server = serve(start_server, {"POST /t/ignore": ignore})
    raw = raw_exchange(
        server.port, b"POST /t/ignore HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    assert b" 100 " not in raw.split(b"\r\n", 1)[0] and b"Continue" not in raw
    [response] = parse_all(raw)
    assert response.status == 200 and response.json() == {"ignored": True}
    # The unread body may still come, so the connection cannot be reused.
    assert response.closes


# -- 3. malformed and oversized heads ------------------------------------------------------


def test_complete_head_over_max_header_bytes_is_431(start_server):
    server = serve(start_server, max_header_bytes=1024)
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: %s\r\n\r\n"
    # Within the limit: served.
    [ok] = exchange(server.port, head.replace(b"Host: x", b"Host: x\r\nConnection: close") % (b"a" * 900))
    assert ok.status == 200
    # Over it, but well under h11's own incomplete-event limit; arrives in one packet.
    [response] = exchange(server.port, head % (b"a" * 1100))
    assert response.status == 431
    assert response.reason == b"Request Header Fields Too Large"
    assert response.closes
    assert response.header(b"content-type") == b"application/json"


def test_incomplete_head_that_keeps_growing_is_431(start_server):
    server = serve(start_server, max_header_bytes=1024)
    with connect(server.port) as sock:
        sent = 0
        line = b"GET /health HTTP/1.1\r\nHost: x\r\n"
        n = 0
        while True:
            sock.sendall(line)
            sent += len(line)
            if sent > 1024:
                # Past the limit: the answer must come without the head ever ending.
                assert readable(sock, 5), f"no answer after {sent} bytes of an unfinished head"
                break
            if readable(sock, 0.02):
                pytest.fail(f"answered after only {sent} bytes, within the limit")
            n += 1
            line = b"X-Header-%03d: %s\r\n" % (n, b"v" * 80)
        raw = read_until_closed(sock)
    [response] = parse_all(raw)
    assert response.status == 431
    assert response.closes


@pytest.mark.parametrize(
    "request_line",
    [b"GARBAGE", b"GET /health", b"GET /health HTTP/1.1 extra", b"GET /he alth HTTP/1.1"],
)
def test_malformed_request_line_is_400_and_closes(start_server, request_line):
    server = serve(start_server)
    raw = raw_exchange(server.port, request_line + b"\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    [response] = parse_all(raw)  # nothing after the 400: the pipelined request is not served
    assert (response.version, response.status, response.reason) == (b"HTTP/1.1", 400, b"Bad Request")
    assert response.header(b"connection") == b"close"
    assert response.header(b"content-length") == b"%d" % len(response.body)
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_content_length_with_transfer_encoding_is_400_and_closes(start_server):
    calls = []
    server = serve(start_server, body_routes(calls))
    smuggle = (
        b"POST /t/body HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    [response] = exchange(server.port, smuggle)
    assert response.status == 400
    assert response.closes
    assert "Content-Length and Transfer-Encoding" in error_message(response)
    assert calls == []


@pytest.mark.parametrize("fold", [b" ", b"\t", b"   \t"])
def test_obs_fold_header_is_400(start_server, fold):
    server = serve(start_server)
    data = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Folded: first\r\n" + fold + b"second\r\nAccept: */*\r\n\r\n"
    [response] = exchange(server.port, data)
    assert response.status == 400
    assert response.closes
    assert "fold" in error_message(response)


def bare_cr_routes(results):
    async def read(request):
        try:
            body = await request.body()
        except Exception as exc:
            results.append(type(exc).__name__)
            raise
        results.append(body)
        return json_response({"body": body.decode("latin-1")})

    return {"POST /t/chunked": read}


def test_bare_cr_in_chunk_extension_is_400(start_server):
    results = []
    server = serve(start_server, bare_cr_routes(results))
    head = b"POST /t/chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    [response] = exchange(server.port, head + b"5;ext=a\rb\r\nhello\r\n0\r\n\r\n")
    assert response.status == 400
    assert response.closes
    assert "chunked" in error_message(response)
    assert all(r != b"hello" for r in results)
    # Control: the same body without the bare CR is fine.
    [ok] = exchange(
        server.port,
        head.replace(b"Host: x", b"Host: x\r\nConnection: close") + b"5;ext=ab\r\nhello\r\n0\r\n\r\n",
    )
    assert ok.status == 200 and ok.json() == {"body": "hello"}


def test_bare_cr_in_chunk_extension_arriving_after_the_head_is_400(start_server):
    entered = threading.Event()
    results = []

    async def read(request):
        entered.set()
        return await bare_cr_routes(results)["POST /t/chunked"](request)

    server = serve(start_server, {"POST /t/chunked": read})
    with connect(server.port) as sock:
        sock.sendall(b"POST /t/chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        wait_until(entered.is_set)
        sock.sendall(b"5;ext=a\rb\r\nhello\r\n0\r\n\r\n")
        raw = read_until_closed(sock)
    [response] = parse_all(raw)
    assert response.status == 400
    assert response.closes
    assert b"hello" not in results


# -- 4. timeouts ---------------------------------------------------------------------------


def test_header_timeout_cannot_be_extended_by_trickling_bytes(start_server):
    server = serve(start_server, header_timeout=0.5, keepalive_timeout=30)
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"p" * 60 + b"\r\n\r\n"
    sent = 0
    with connect(server.port) as sock:
        for byte in head:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            sent += 1
            if readable(sock, 0.1):
                break
        raw = read_until_closed(sock)
    # One byte per 0.1 s against a 0.5 s deadline: answered after about 5 bytes, long
    # before the head (>100 bytes, >10 s of trickle) could have been completed.
    assert sent < len(head) // 2, f"the head deadline moved: {sent} of {len(head)} bytes were accepted"
    [response] = parse_all(raw)
    assert response.status == 408
    assert response.closes
    assert response.json()["error"]["type"] == "timeout_error"


def test_header_timeout_runs_from_the_first_byte_not_from_connect(start_server):
    server = serve(start_server, header_timeout=0.2, keepalive_timeout=30)
    with H11Client(server.port) as client:
        time.sleep(0.5)  # idle, before any byte: that is keep-alive time, not head time
        assert client.request("GET", "/health").status == 200
        time.sleep(0.5)  # idle between requests too
        assert client.request("GET", "/health").status == 200


def test_keepalive_timeout_closes_an_idle_connection(start_server):
    server = serve(start_server, keepalive_timeout=0.3)
    with H11Client(server.port) as client:
        assert client.request("GET", "/health").status == 200
        assert client.sock.recv(1) == b""  # blocks (10 s socket timeout) until the server closes
    wait_until(lambda: connections(server) == 0)
    with connect(server.port) as sock:  # one that never sends anything is closed too
        assert sock.recv(1) == b""


def test_idle_and_head_timeouts_do_not_cut_a_request_in_progress(start_server):
    server = serve(start_server, {"GET /t/sleep/{n}": sleeper}, keepalive_timeout=0.2, header_timeout=0.3)
    with H11Client(server.port) as client:
        reply = client.request("GET", "/t/sleep/1?delay=0.6")
        assert reply.status == 200 and reply.json()["n"] == "1"
        reply = client.request("GET", "/t/sleep/2")
        assert reply.status == 200 and reply.json()["n"] == "2"


def flood_route(cancelled: threading.Event, state: dict, total_chunks: int = 1 << 14):
    async def flood(request):
        stream = request.stream(200, media_type=b"application/octet-stream")
        try:
            for index in range(total_chunks):
                stream.write(b"%08d" % index * 8192)
                state["sent"] = index + 1
                if stream.paused:
                    state["in_drain"] = True
                    await stream.drain()
                    state["in_drain"] = False
        except asyncio.CancelledError:
            cancelled.set()
            raise

    return flood


def test_write_timeout_drops_a_client_that_stops_reading(start_server):
    cancelled = threading.Event()
    state = {"sent": 0, "in_drain": False}
    server = serve(start_server, {"GET /t/flood": flood_route(cancelled, state)}, write_timeout=0.3)
    with small_buffer_socket(server.port) as sock:
        sock.sendall(b"GET /t/flood HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(cancelled.is_set)  # never reading: the server gives up on us
        wait_until(lambda: connections(server) == 0)
        assert state["sent"] < 1 << 14
    assert request(server.port, "GET", "/health").status == 200


# -- 5. write flow control -------------------------------------------------------------------


def test_slow_reader_pauses_the_producer_and_bounds_the_buffer(start_server):
    total = 512  # x 64 KiB = 32 MiB, far more than socket buffers hold
    cancelled = threading.Event()
    state = {"sent": 0, "in_drain": False}
    server = serve(start_server, {"GET /t/bulk": flood_route(cancelled, state, total)})
    with small_buffer_socket(server.port) as sock:
        sock.sendall(b"GET /t/bulk HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        wait_until(lambda: state["in_drain"])
        stalled_at = state["sent"]
        time.sleep(0.3)
        assert state["in_drain"] and state["sent"] == stalled_at, "the producer kept going without a reader"
        assert stalled_at < total // 2
        buffered = server.call_soon(
            lambda: [c.transport.get_write_buffer_size() for c in server.server.connections]
        )
        assert len(buffered) == 1 and buffered[0] <= 512 * 1024, buffered
        raw = read_until_closed(sock)
    assert not cancelled.is_set()
    [response] = parse_all(raw)
    assert response.status == 200
    assert len(response.chunks) == total
    expected = b"".join(b"%08d" % index * 8192 for index in range(total))
    assert len(response.body) == len(expected)
    assert first_difference(response.body, expected) == -1
    assert state["sent"] == total


def test_pending_drain_fails_when_the_connection_is_lost(start_server):
    outcome = []
    draining = threading.Event()

    async def produce(stream):
        try:
            while True:
                stream.write(b"z" * 65536)
                if stream.paused:
                    draining.set()
                    await stream.drain()
        except ConnectionResetError:
            outcome.append("reset")
        except asyncio.CancelledError:
            outcome.append("cancelled")
            return
        # Once the client is gone, drain fails at once instead of waiting forever.
        try:
            await stream.drain()
        except ConnectionResetError:
            outcome.append("reset again")
        outcome.append(("closed", stream.closed))

    async def detached(request):
        stream = request.stream(200, media_type=b"application/octet-stream")
        # The producer runs in a task of its own, as a model backend's would; the
        # request's task only waits for it.
        await asyncio.shield(asyncio.get_running_loop().create_task(produce(stream)))

    server = serve(start_server, {"GET /t/detached": detached})
    sock = small_buffer_socket(server.port)
    sock.sendall(b"GET /t/detached HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_until(draining.is_set)
    reset_close(sock)
    wait_until(lambda: len(outcome) >= 3)
    assert outcome == ["reset", "reset again", ("closed", True)]
    assert request(server.port, "GET", "/health").status == 200


# -- 6. streaming responses and common headers ---------------------------------------------


def test_streamed_response_uses_chunked_transfer_encoding_on_the_wire(start_server):
    server = serve(start_server, {"GET /t/chunks": chunks_route()})
    raw = raw_exchange(server.port, b"GET /t/chunks HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, _ = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\ntransfer-encoding: chunked\r\n" in head + b"\r\n"
    assert b"content-length" not in head.lower()
    assert raw.endswith(b"\r\n\r\n" + CHUNKS_WIRE)
    [response] = parse_all(raw)
    assert response.header(b"content-type") == b"text/plain"
    assert response.header(b"x-custom") == b"yes"
    assert response.chunks == [b"hello", b"x" * 300, b"!"]
    assert response.wire_body == CHUNKS_WIRE


def test_streamed_response_keeps_the_connection_alive(start_server):
    server = serve(start_server, {"GET /t/chunks": chunks_route()})
    data = b"GET /t/chunks HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    stream, health = exchange(server.port, data)
    assert stream.wire_body == CHUNKS_WIRE and not stream.closes
    assert health.status == 200 and health.json() == {"status": "ok"}


def sse_chunk(payload: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(payload), payload)


ECHO_STREAM = b'{"prompt": "a b", "max_tokens": 2, "stream": true}'
ECHO_EVENTS = [b'{"index":0,"token":"a"}', b'{"index":1,"token":" b"}', b'{"done":true,"tokens":2}']


def echo_stream_request(accept: bytes | None) -> bytes:
    head = b"POST /echo/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
    if accept is not None:
        head += b"Accept: " + accept + b"\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(ECHO_STREAM) + ECHO_STREAM


@pytest.mark.parametrize("accept", [None, b"text/event-stream", b"*/*"])
def test_echo_stream_is_server_sent_events(echo_server, accept):
    [response] = exchange(echo_server.port, echo_stream_request(accept))
    assert response.status == 200
    assert response.header(b"content-type") == b"text/event-stream"
    assert response.header(b"transfer-encoding") == b"chunked"
    assert response.wire_body == b"".join(sse_chunk(b"data: " + e + b"\n\n") for e in ECHO_EVENTS) + b"0\r\n\r\n"


def test_echo_stream_is_ndjson_when_accepted(echo_server):
    [response] = exchange(echo_server.port, echo_stream_request(b"application/x-ndjson"))
    assert response.status == 200
    assert response.header(b"content-type") == b"application/x-ndjson"
    assert response.header(b"transfer-encoding") == b"chunked"
    assert response.wire_body == b"".join(sse_chunk(e + b"\n") for e in ECHO_EVENTS) + b"0\r\n\r\n"
    assert [orjson.loads(line) for line in response.body.splitlines()] == [orjson.loads(e) for e in ECHO_EVENTS]


def test_head_returns_the_get_headers_without_a_body(start_server):
    server = serve(start_server)
    data = b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    raw = raw_exchange(server.port, data)
    head_end = raw.index(b"\r\n\r\n") + 4
    assert raw[head_end:].startswith(b"HTTP/1.1 200 OK\r\n"), "the HEAD response carried a body"
    head, get = parse_all(raw, heads=(0,))
    assert head.status == get.status == 200
    assert get.body == b'{"status":"ok"}'
    assert head.header(b"content-length") == get.header(b"content-length") == b"%d" % len(get.body)
    assert head.header(b"content-type") == get.header(b"content-type") == b"application/json"
    assert head.body == b""


def test_head_on_a_streaming_route_sends_no_body(start_server):
    server = serve(start_server, {"GET /t/chunks": chunks_route()})
    data = b"HEAD /t/chunks HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    head, health = exchange(server.port, data, heads=(0,))
    assert head.status == 200 and head.header(b"content-type") == b"text/plain"
    assert health.status == 200 and health.body == b'{"status":"ok"}'


IMF_FIXDATE = re.compile(
    rb"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), [0-3][0-9] (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
    rb"[0-9]{4} [0-2][0-9]:[0-5][0-9]:[0-6][0-9] GMT"
)


def test_date_and_server_headers(start_server):
    server = serve(start_server, {"GET /t/chunks": chunks_route()})
    before = time.time()
    data = (
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /t/chunks HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    responses = exchange(server.port, data)
    after = time.time()
    assert [r.status for r in responses] == [200, 404, 200]
    for response in responses:
        date = response.header(b"date")
        assert IMF_FIXDATE.fullmatch(date), date
        assert before - 2 <= parsedate_to_datetime(date.decode()).timestamp() <= after + 1
        assert response.header(b"server") == b"runnel"
    [bad] = exchange(server.port, b"BAD\r\n\r\n")
    assert IMF_FIXDATE.fullmatch(bad.header(b"date")) and bad.header(b"server") == b"runnel"


def test_server_header_can_be_turned_off(start_server):
    server = serve(start_server, server_header="")
    [response] = exchange(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert response.status == 200
    assert response.values(b"server") == []
    assert response.header(b"date") is not None


def test_request_id_is_echoed_or_generated(start_server):
    seen = []

    async def show(request):
        seen.append(request.request_id)
        return json_response({"id": request.request_id})

    server = serve(start_server, {"GET /t/id": show, "GET /t/chunks": chunks_route()})
    with H11Client(server.port) as client:
        reply = client.request("GET", "/t/id", headers=[("x-request-id", "client-id-42")])
        assert reply.header(b"x-request-id") == b"client-id-42"
        assert reply.json() == {"id": "client-id-42"}
        generated = []
        for target in ("/t/id", "/t/id", "/t/chunks", "/nowhere"):
            reply = client.request("GET", target)
            value = reply.header(b"x-request-id")
            assert value is not None and re.fullmatch(rb"[0-9a-f]{24}", value), value
            generated.append(value)
        assert len(set(generated)) == len(generated)
        assert seen[1:] == [g.decode() for g in generated[:2]]
        # An overlong client id is not trusted.
        reply = client.request("GET", "/t/id", headers=[("x-request-id", "x" * 200)])
        assert re.fullmatch(rb"[0-9a-f]{24}", reply.header(b"x-request-id"))


@pytest.mark.parametrize("value", [b"caf\xe9", b"has space", b"", b"x" * 129])
def test_unusable_client_request_id_is_replaced(start_server, value):
    server = serve(start_server)
    data = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Request-Id: %b\r\nConnection: close\r\n\r\n" % value
    [response] = exchange(server.port, data)
    assert response.status == 200
    assert re.fullmatch(rb"[0-9a-f]{24}", response.header(b"x-request-id")), response.headers


# -- 7. client disconnects -------------------------------------------------------------------


def hang_routes(entered: threading.Event, cancelled: threading.Event):
    async def hang(request):
        entered.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return json_response({"finished": True})

    async def ticker(request):
        stream = request.stream()
        try:
            for index in range(1200):
                stream.send({"tick": index})
                entered.set()
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    return {"GET /t/hang": hang, "GET /t/ticker": ticker}


@pytest.mark.parametrize("close", [socket.socket.close, reset_close], ids=["close", "reset"])
@pytest.mark.parametrize("target", [b"/t/hang", b"/t/ticker"], ids=["whole", "streaming"])
def test_client_disconnect_cancels_the_handler(start_server, target, close):
    entered, cancelled = threading.Event(), threading.Event()
    server = serve(start_server, hang_routes(entered, cancelled))
    sock = connect(server.port)
    try:
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(entered.is_set)
        if target == b"/t/ticker":
            assert recv_until(sock, b"data: ").startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        close(sock)
    wait_until(cancelled.is_set, timeout=5)
    wait_until(lambda: connections(server) == 0, timeout=5)
    # And the server goes on serving.
    assert request(server.port, "GET", "/health").json() == {"status": "ok"}
    with H11Client(server.port) as client:
        assert client.request("GET", "/health").status == 200
        assert client.request("GET", "/health").status == 200


# -- 8. HTTP/1.0 -----------------------------------------------------------------------------


def test_http_10_streamed_response_is_not_chunked_and_closes(start_server):
    server = serve(start_server, {"GET /t/chunks": chunks_route()})
    raw = raw_exchange(server.port, b"GET /t/chunks HTTP/1.0\r\n\r\n")  # returns once closed
    [response] = parse_all(raw)
    assert response.status == 200
    assert response.header(b"transfer-encoding") is None
    assert response.header(b"content-length") is None
    assert response.closes
    assert response.body == CHUNKS_BODY  # close-delimited, no chunk framing


def test_http_10_whole_response_closes(start_server):
    server = serve(start_server)
    raw = raw_exchange(server.port, b"GET /health HTTP/1.0\r\n\r\nGET /health HTTP/1.0\r\n\r\n")
    [response] = parse_all(raw)  # only one: no keep-alive for HTTP/1.0
    assert response.status == 200
    assert response.header(b"content-length") == b"15"
    assert response.body == b'{"status":"ok"}'
    assert response.closes


def test_http_10_echo_stream_is_close_delimited_sse(echo_server):
    body = ECHO_STREAM
    raw = raw_exchange(
        echo_server.port, b"POST /echo/echo HTTP/1.0\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    [response] = parse_all(raw)
    assert response.header(b"content-type") == b"text/event-stream"
    assert response.header(b"transfer-encoding") is None
    assert response.body == b"".join(b"data: " + e + b"\n\n" for e in ECHO_EVENTS)


# -- 9. hostile clients (issue 10) -----------------------------------------------------------


def sample_pending(server, peak: list[int], running: list[bool]) -> None:
    """Keep peak[0] at the most bytes any connection's transport held, sampled on the server's loop."""
    def sample(loop) -> None:
        for connection in list(server.server.connections):
            peak[0] = max(peak[0], connection.flow.pending_bytes())
        if running[0]:
            loop.call_later(0.0005, sample, loop)

    server.call_soon(lambda: sample(asyncio.get_running_loop()))


def test_a_client_that_pipelines_and_never_reads_holds_one_response_not_all(start_server):
    size, total = 1 << 20, 40
    executed = []

    async def big(request):
        executed.append(request.request_id)
        return Response(200, b"%07d\n" % len(executed) * (size // 8), media_type=b"application/octet-stream")

    server = serve(start_server, {"GET /t/big": big})
    peak, running = [0], [True]
    sample_pending(server, peak, running)
    with small_buffer_socket(server.port) as sock:
        sock.sendall(b"GET /t/big HTTP/1.1\r\nHost: x\r\n\r\n" * total)  # and reads nothing
        wait_until(lambda: server.call_soon(lambda: any(c.flow.writing_paused for c in server.server.connections)))
        time.sleep(0.5)
        stalled_at = len(executed)
        # What the kernel's socket buffers took, then one response waiting in the transport;
        # the other requests wait (not executed), however long the client does not read.
        assert stalled_at < total // 2, stalled_at
        assert peak[0] <= size + 64 * 1024 + 1024, peak[0]
        time.sleep(0.3)
        assert len(executed) == stalled_at
        # Everyone else is served meanwhile.
        assert request(server.port, "GET", "/health").status == 200
        # Once the client reads, it gets every response, in order.
        reader = ResponseReader(sock)
        for index in range(1, total + 1):
            response = reader.read_body(reader.read_head())
            assert response.status == 200
            assert response.body == b"%07d\n" % index * (size // 8), index
    running[0] = False
    assert len(executed) == total
    assert peak[0] <= size + 64 * 1024 + 1024, peak[0]


async def read_all(request):
    body = await request.body()
    return json_response({"received": len(body)})


def test_a_body_trickled_byte_by_byte_gets_408_within_the_rate_bound(start_server):
    server = serve(start_server, {"POST /t/read": read_all}, body_timeout=0.5, body_min_rate=100)
    with connect(server.port) as sock:
        sock.sendall(b"POST /t/read HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        started = time.monotonic()
        sent = 0
        # A byte every 50 ms is progress ten times within body_timeout; only the rate floor stops it.
        while not readable(sock, 0.05) and time.monotonic() - started < 10:
            sock.sendall(b"x")
            sent += 1
        elapsed = time.monotonic() - started
        raw = read_until_closed(sock)
    # body_timeout plus a second per 100 bytes: ~0.5 s + ~0.1 s, well short of the 50 s it would take.
    assert elapsed < 2.0, (elapsed, sent)
    [response] = parse_all(raw)
    assert response.status == 408
    assert response.closes
    assert response.json()["error"]["type"] == "timeout_error"
    # A body at a decent pace is read in full.
    assert request(server.port, "POST", "/t/read", body=b"y" * 5000).json() == {"received": 5000}


def test_past_max_connections_new_connections_get_503_while_open_ones_are_served(start_server):
    server = serve(start_server, max_connections=3, keepalive_timeout=30)
    clients = [H11Client(server.port) for _ in range(3)]
    try:
        for client in clients:
            assert client.request("GET", "/health").status == 200
        # A fourth connection is answered at once, before it sends anything...
        with connect(server.port) as sock:
            [refused] = parse_all(read_until_closed(sock))
        assert refused.status == 503
        assert refused.header(b"retry-after") == b"1"
        assert refused.closes
        assert refused.json()["error"]["code"] == "too_many_connections"
        # ...and one that sends its request first still reads the answer, not a reset.
        with connect(server.port) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            [refused] = parse_all(read_until_closed(sock))
        assert refused.status == 503
        # The keep-alive clients within the limit go on being served.
        for client in clients:
            assert client.request("GET", "/health").status == 200
        clients.pop().close()
        wait_until(lambda: server.call_soon(
            lambda: len(server.server.connections) - server.server._server_state.refusing) == 2)
        assert request(server.port, "GET", "/health").status == 200  # room again
    finally:
        for client in clients:
            client.close()


def test_a_normal_client_is_answered_during_a_trickle_attack(start_server):
    server = serve(start_server, {"POST /t/read": read_all}, header_timeout=3, body_timeout=3, body_min_rate=100)
    attackers = []
    for index in range(300):
        sock = connect(server.port)
        if index % 2:
            sock.sendall(b"POST /t/read HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")  # then a trickled body
        else:
            sock.sendall(b"GET /health HTTP/1.1\r\n")  # then a trickled head
        attackers.append(sock)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            for sock in attackers:
                try:
                    sock.send(b"x")
                except OSError:
                    pass
            stop.wait(0.2)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        latencies = []
        for _ in range(20):
            started = time.monotonic()
            assert request(server.port, "GET", "/health").status == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.05)
        assert max(latencies) < 1.0, latencies
        assert connections(server) >= 250  # the attack was on while they were answered
    finally:
        stop.set()
        thread.join()
        for sock in attackers:
            sock.close()


def test_open_file_limit_is_raised_to_the_hard_limit_at_start_up(start_server):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, 512)
    if hard != resource.RLIM_INFINITY and hard <= lowered:
        pytest.skip("the hard open-file limit leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        serve(start_server)
        now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert now > lowered
        assert now == hard or hard == resource.RLIM_INFINITY
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("line, status", [
    (b"GET a/b/c/health HTTP/1.1", 400),
    (b"GET * HTTP/1.1", 400),
    (b"CONNECT 127.0.0.1:80 HTTP/1.1", 400),
    (b"GET /health HTTP/2.0", 505),
    (b"GET /health HTTP/1.2", 505),
])
def test_request_lines_the_server_does_not_serve_are_refused_and_closed(start_server, line, status):
    server = serve(start_server)
    then = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"  # never read: the connection closes first
    [response] = parse_all(raw_exchange(server.port, line + b"\r\nHost: x\r\n\r\n" + then))
    assert response.status == status
    assert response.closes
    absolute = b"GET http://127.0.0.1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert [r.status for r in parse_all(raw_exchange(server.port, absolute))] == [200]


class ShapedRoutes:
    """A streaming route whose errors render in a shape of its own, as a surface's do."""

    def __init__(self, started: threading.Event, cancelled: threading.Event) -> None:
        self.started, self.cancelled = started, cancelled

    @hookimpl
    def runnel_register_routes(self, register, server):
        async def endless(request):
            stream = request.stream()
            try:
                for index in range(100000):
                    stream.send({"n": index})
                    self.started.set()
                    await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise

        async def stuck(request):
            self.started.set()
            await asyncio.sleep(60)

        def shaped(request, error):
            return {"failure": error.message, "status": error.status}

        register("GET", "/t/endless", endless, errors=shaped)
        register("GET", "/t/stuck", stuck, errors=shaped)


def test_a_stream_cut_at_the_end_of_the_shutdown_grace_ends_with_an_error_event_and_the_last_chunk(start_server):
    started, cancelled = threading.Event(), threading.Event()
    server = start_server({}, plugins=[ShapedRoutes(started, cancelled)])
    with connect(server.port) as sock:
        sock.sendall(b"GET /t/endless HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(started.is_set)
        began = time.monotonic()
        server.stop(grace=0.3)  # returns once stopped
        assert time.monotonic() - began < 3
        raw = read_until_closed(sock)
    [response] = parse_all(raw)
    assert response.status == 200
    assert response.wire_body.endswith(b"\r\n0\r\n\r\n")  # the chunked terminator: not a cut
    events = response.body[:-2].split(b"\n\n")
    assert all(event.startswith(b"data: {\"n\":") for event in events[:-1])
    assert events[-1] == b'event: error\ndata: {"failure":"Server is shutting down","status":503}'
    assert cancelled.is_set()


def test_a_request_unanswered_at_the_end_of_the_shutdown_grace_gets_503(start_server):
    started = threading.Event()
    server = start_server({}, plugins=[ShapedRoutes(started, threading.Event())])
    with connect(server.port) as sock:
        sock.sendall(b"GET /t/stuck HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(started.is_set)
        server.stop(grace=0.2)
        [response] = parse_all(read_until_closed(sock))
    assert response.status == 503
    assert response.header(b"retry-after") == b"1"
    assert response.closes
    assert response.json() == {"failure": "Server is shutting down", "status": 503}


def test_an_openai_stream_cut_at_shutdown_ends_with_its_error_event(start_server):
    server = start_server({"apps": {"echo": {"backend": "echo", "pace_ms": 20.0}}})
    assert server.wait_ready()
    body = orjson.dumps({"model": "echo", "messages": [{"role": "user", "content": "word " * 500}],
                         "max_tokens": 500, "stream": True})
    with connect(server.port) as sock:
        send_post(sock, "/v1/chat/completions", body)
        first = recv_until(sock, b"data: ")
        server.stop(grace=0.2)
        raw = first + read_until_closed(sock)
    [response] = parse_all(raw)
    assert response.wire_body.endswith(b"\r\n0\r\n\r\n")
    payloads = sse_events(response.body)
    assert b"[DONE]" not in payloads
    error = orjson.loads(payloads[-1])["error"]
    assert error["message"] == "Server is shutting down"
    assert error["code"] == "server_shutting_down"
