"""GET /health: readiness of every app, over real connections."""

from __future__ import annotations

from runnel import hookimpl
from runnel.testing import H11Client, raw_exchange, request, wait_until


def test_health_ok_when_ready(echo_server):
    data = raw_exchange(echo_server.port, b"GET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    assert b"content-type: application/json" in lines
    assert b"content-length: 15" in lines
    assert body == b'{"status":"ok"}'


def test_health_head_and_wrong_method(echo_server):
    data = raw_exchange(echo_server.port, b"HEAD /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 200 OK"
    assert b"content-length: 15" in head.split(b"\r\n")
    assert body == b""
    reply = request(echo_server.port, "POST", "/health", body=b"")
    assert reply.status == 405
    assert reply.header(b"allow") == b"GET, HEAD"


def test_health_503_while_loading_then_200(start_server):
    config = {
        "apps": {
            "slow": {"backend": "echo", "load_seconds": 1.5},
            "fast": {"backend": "echo"},
        }
    }
    server = start_server(config, ready=False)
    port = server.port

    def fast_ready_slow_loading():
        reply = request(port, "GET", "/health")
        return reply if reply.json().get("apps", {}).get("fast") == "ready" else None

    reply = wait_until(fast_ready_slow_loading, timeout=10)
    assert (reply.status, reply.reason) == (503, b"Service Unavailable")
    assert reply.header(b"content-type") == b"application/json"
    assert reply.json() == {"status": "loading", "apps": {"slow": "loading", "fast": "ready"}}

    # The loading app refuses work meanwhile; the ready one serves.
    with H11Client(port) as client:
        reply = client.request("POST", "/echo/slow", body=b'{"prompt": "x", "max_tokens": 1}')
        assert reply.status == 503
        assert reply.json()["error"]["code"] == "app_not_ready"
        reply = client.request("POST", "/echo/fast", body=b'{"prompt": "x", "max_tokens": 1}')
        assert reply.json() == {"app": "fast", "text": "x", "tokens": 1}

    reply = wait_until(lambda: (r := request(port, "GET", "/health")).status == 200 and r, timeout=15)
    assert reply.body == b'{"status":"ok"}'
    assert request(port, "POST", "/echo/slow", body=b'{"prompt": "y", "max_tokens": 1}').status == 200


def test_health_with_no_apps_is_ok(start_server):
    server = start_server({}, load_entrypoints=False)
    reply = request(server.port, "GET", "/health")
    assert reply.status == 200
    assert reply.body == b'{"status":"ok"}'


class FailingApp:
    async def start(self):
        raise RuntimeError("weights are corrupt")

    async def close(self):
        pass


class FailingBackend:
    @hookimpl
    def runnel_register_backends(self, register):
        def factory(app_config, table, server):
            table.finish()
            return FailingApp()

        register("failing", factory)


def test_health_reports_failed_app(start_server):
    server = start_server(
        {"apps": {"broken": {"backend": "failing"}, "echo": {"backend": "echo"}}},
        plugins=[FailingBackend()],
    )
    reply = request(server.port, "GET", "/health")
    assert reply.status == 503
    assert reply.json() == {"status": "failed", "apps": {"broken": "failed", "echo": "ready"}}
