"""Dispatch end to end: routing, error bodies, handler failures, custom error renderers."""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest

import runnel
from runnel import HTTPError, Response, hookimpl, json_response
from runnel.testing import H11Client, error_body, parse_all, raw_exchange, request


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def split_response(data: bytes, *, head: bool = False) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """(status line, headers, body as sent) of the one response in ``data``."""
    [response] = parse_all(data, heads=(0,) if head else ())
    return response.status_line, response.headers, response.wire_body


def render_plain(request, error: HTTPError) -> Response:
    text = f"{error.status} {error.code}: {error.message}".encode()
    return Response(error.status, text, media_type=b"text/plain", headers=((b"x-rendered-by", b"surface"),))


class Routes:
    """A plugin with a handler for every dispatch path under test."""

    @hookimpl
    def runnel_register_routes(self, register, server):
        async def params(request):
            return json_response({"params": request.path_params, "path": request.path})

        async def ok(request):
            return json_response({"method": request.method})

        async def boom(request):
            raise RuntimeError("kaboom in handler")

        async def conflict(request):
            raise HTTPError(409, "already exists", param="name", code="duplicate",
                            headers=((b"x-conflict", b"yes"),))

        async def unavailable(request):
            raise HTTPError(503)

        async def stream_then_fail(request):
            stream = request.stream()
            stream.send({"n": 1})
            stream.send({"n": 2})
            await asyncio.sleep(0.01)
            kind = request.query_param("kind")
            if kind == "http":
                raise HTTPError(429, "slow down", code="rate_limited")
            raise RuntimeError("mid-stream failure")

        async def custom_fail(request):
            raise HTTPError(422, "bad shape", code="shape")

        async def custom_crash(request):
            raise ZeroDivisionError("no")

        register("GET", "/x/{a}/{b}", params)
        register("GET", "/files/{rest:path}", params)
        register("GET", "/users/{user}/items/{item}/raw", params)
        register("POST", "/thing", ok)
        register("PUT", "/thing", ok)
        register("GET", "/getonly", ok)
        register("GET", "/t/{id}", ok)
        register("DELETE", "/t/{id}", ok)
        register("GET", "/boom", boom)
        register("GET", "/conflict", conflict)
        register("GET", "/unavailable", unavailable)
        register("GET", "/stream-fail", stream_then_fail)
        register("GET", "/custom/fail", custom_fail, errors=render_plain)
        register("GET", "/custom/crash", custom_crash, errors=render_plain)


@pytest.fixture
def server(start_server):
    return start_server({}, plugins=[Routes()], load_entrypoints=False)


# -- 404 / 405 --------------------------------------------------------------------


def test_unknown_path_is_404_with_openai_error_envelope(server):
    data = raw_exchange(server.port, b"GET /no/such/thing?x=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    status_line, headers, body = split_response(data)
    assert status_line == b"HTTP/1.1 404 Not Found"
    assert headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(body)
    assert orjson.loads(body) == error_body("No route for /no/such/thing", "not_found_error", "route_not_found")


def test_single_segment_param_does_not_span_slashes(server):
    reply = request(server.port, "GET", "/x/a/b/c")
    assert reply.status == 404
    assert reply.json() == error_body("No route for /x/a/b/c", "not_found_error", "route_not_found")


def test_wrong_method_is_405_with_allow(server):
    with H11Client(server.port) as client:
        reply = client.request("DELETE", "/thing")
        assert (reply.status, reply.reason) == (405, b"Method Not Allowed")
        assert reply.header(b"allow") == b"POST, PUT"
        assert reply.json() == error_body(
            "Method DELETE is not allowed for /thing; allowed: POST, PUT", "invalid_request_error", "method_not_allowed"
        )
        # GET implies HEAD in Allow.
        reply = client.request("POST", "/getonly", body=b"")
        assert reply.status == 405
        assert reply.header(b"allow") == b"GET, HEAD"
        # Templates too.
        reply = client.request("PATCH", "/t/7")
        assert reply.status == 405
        assert reply.header(b"allow") == b"DELETE, GET, HEAD"
        # The connection is still usable after 405s.
        assert client.request("PUT", "/thing", body=b"").json() == {"method": "PUT"}


def test_head_is_served_by_the_get_handler_without_a_body(server):
    data = raw_exchange(server.port, b"HEAD /getonly HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    status_line, headers, body = split_response(data, head=True)
    assert status_line == b"HTTP/1.1 200 OK"
    assert headers[b"content-length"] == str(len(b'{"method":"HEAD"}')).encode()
    assert body == b""


# -- path templates ---------------------------------------------------------------


def test_path_params_are_percent_decoded_after_matching(server):
    reply = request(server.port, "GET", "/x/hello%20world/caf%C3%A9")
    assert reply.status == 200
    assert reply.json() == {"params": {"a": "hello world", "b": "café"}, "path": "/x/hello%20world/caf%C3%A9"}
    # An encoded slash stays inside its segment.
    assert request(server.port, "GET", "/x/a%2Fb/c").json()["params"] == {"a": "a/b", "b": "c"}
    reply = request(server.port, "GET", "/users/u%3A1/items/%2B42/raw")
    assert reply.json()["params"] == {"user": "u:1", "item": "+42"}
    # The query is not part of any parameter, and '+' is not a space in a path.
    reply = request(server.port, "GET", "/x/a+b/c?b=zzz")
    assert reply.json() == {"params": {"a": "a+b", "b": "c"}, "path": "/x/a+b/c"}


def test_path_param_spans_slashes(server):
    reply = request(server.port, "GET", "/files/dir/sub%20dir/file%2Ename.txt")
    assert reply.status == 200
    assert reply.json()["params"] == {"rest": "dir/sub dir/file.name.txt"}
    assert request(server.port, "GET", "/files/").status == 404


# -- handler failures -------------------------------------------------------------


def test_handler_exception_is_500_with_request_id_and_logged(server, caplog):
    caplog.set_level(logging.ERROR, logger="runnel.dispatch")
    with H11Client(server.port) as client:
        reply = client.request("GET", "/boom", headers=[("x-request-id", "req-boom-1")])
        assert (reply.status, reply.reason) == (500, b"Internal Server Error")
        assert reply.header(b"x-request-id") == b"req-boom-1"
        assert reply.json() == error_body(
            "Internal server error (request id req-boom-1)", "server_error", "internal_error"
        )
        # Same connection keeps serving.
        assert client.request("GET", "/getonly").json() == {"method": "GET"}
        # A generated request id is reported in the body too.
        reply = client.request("GET", "/boom")
        generated = reply.header(b"x-request-id").decode()
        assert len(generated) >= 8
        assert reply.json()["error"]["message"] == f"Internal server error (request id {generated})"
        assert client.request("GET", "/getonly").status == 200
    # And a new connection too.
    assert request(server.port, "GET", "/getonly").json() == {"method": "GET"}

    records = [r for r in caplog.records if r.name == "runnel.dispatch"]
    assert len(records) == 2
    for record, request_id in zip(records, ["req-boom-1", generated]):
        assert record.levelno == logging.ERROR
        assert request_id in record.getMessage()
        assert "/boom" in record.getMessage()
        assert record.exc_info is not None
        assert record.exc_info[0] is RuntimeError
        assert str(record.exc_info[1]) == "kaboom in handler"


def test_http_error_in_handler_sets_status_body_and_headers(server):
    data = raw_exchange(server.port, b"GET /conflict HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    status_line, headers, body = split_response(data)
    assert status_line == b"HTTP/1.1 409 Conflict"
    assert headers[b"x-conflict"] == b"yes"
    assert headers[b"content-type"] == b"application/json"
    assert orjson.loads(body) == error_body("already exists", "invalid_request_error", "duplicate", "name")

    reply = request(server.port, "GET", "/unavailable")
    assert (reply.status, reply.reason) == (503, b"Service Unavailable")
    assert reply.json() == error_body("Service Unavailable", "server_error")


def _stream_error(message: str, type_: str, code: str) -> bytes:
    return orjson.dumps(error_body(message, type_, code))


def test_exception_after_stream_started_ends_with_sse_error_event(server, caplog):
    caplog.set_level(logging.ERROR, logger="runnel.dispatch")
    data = raw_exchange(
        server.port,
        b"GET /stream-fail HTTP/1.1\r\nHost: a\r\nX-Request-Id: s-1\r\nConnection: close\r\n\r\n",
    )
    status_line, headers, body = split_response(data)
    assert status_line == b"HTTP/1.1 200 OK"
    assert headers[b"content-type"] == b"text/event-stream"
    assert headers[b"transfer-encoding"] == b"chunked"
    error = _stream_error("Internal server error (request id s-1)", "server_error", "internal_error")
    assert body == (
        chunk(b'data: {"n":1}\n\n')
        + chunk(b'data: {"n":2}\n\n')
        + chunk(b"event: error\ndata: " + error + b"\n\n")
        + b"0\r\n\r\n"
    )
    assert any("s-1" in r.getMessage() for r in caplog.records if r.name == "runnel.dispatch")


def test_stream_error_keeps_connection_usable_and_follows_negotiated_framing(server):
    with H11Client(server.port) as client:
        reply = client.request("GET", "/stream-fail?kind=http", headers=[("x-request-id", "s-2")])
        assert reply.status == 200
        error = _stream_error("slow down", "rate_limit_error", "rate_limited")
        assert reply.body == b'data: {"n":1}\n\ndata: {"n":2}\n\nevent: error\ndata: ' + error + b"\n\n"
        # The chunked body was terminated properly: the same connection goes on.
        reply = client.request("GET", "/stream-fail", headers=[("accept", "application/x-ndjson")])
        assert reply.header(b"content-type") == b"application/x-ndjson"
        request_id = reply.header(b"x-request-id").decode()
        error = _stream_error(f"Internal server error (request id {request_id})", "server_error", "internal_error")
        assert reply.body == b'{"n":1}\n{"n":2}\n' + error + b"\n"
        assert client.request("GET", "/getonly").json() == {"method": "GET"}


def test_route_custom_error_renderer_is_used(server):
    data = raw_exchange(server.port, b"GET /custom/fail HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    status_line, headers, body = split_response(data)
    assert status_line == b"HTTP/1.1 422 Unprocessable Entity"
    assert headers[b"content-type"] == b"text/plain"
    assert headers[b"x-rendered-by"] == b"surface"
    assert body == b"422 shape: bad shape"

    # Unhandled exceptions on that route are rendered by it too.
    reply = request(server.port, "GET", "/custom/crash", headers=[("x-request-id", "c-1")])
    assert reply.status == 500
    assert reply.body == b"500 internal_error: Internal server error (request id c-1)"
    # Other routes keep the default envelope.
    assert request(server.port, "GET", "/conflict").header(b"content-type") == b"application/json"


# -- building ---------------------------------------------------------------------


class DuplicateHealth:
    @hookimpl
    def runnel_register_routes(self, register, server):
        async def other(request):
            return json_response({})

        register("GET", "/health", other)


class DuplicateTemplate:
    @hookimpl
    def runnel_register_routes(self, register, server):
        async def handler(request):
            return json_response({})

        register("GET", "/m/{name}", handler)
        register("POST", "/m/{name}", handler)  # another method is fine
        register("get", "/m/{name}", handler)


@pytest.mark.parametrize(
    ("plugin", "message"),
    [(DuplicateHealth(), "GET /health is registered twice"), (DuplicateTemplate(), "GET /m/{name} is registered twice")],
)
def test_duplicate_route_registration_raises_at_build(plugin, message):
    server = runnel.Server(runnel.config_from_dict({}), plugins=[plugin], load_entrypoints=False)
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        server.build()
