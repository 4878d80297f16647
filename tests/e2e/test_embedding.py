"""runnel as a library: two servers in one event loop, each with its own config and plugins."""

from __future__ import annotations

import asyncio

import orjson

import runnel
from runnel import hookimpl, json_response
from runnel.cli import run
from runnel.testing import parse_all


class Tag:
    """A route that only the server it was given to has."""

    def __init__(self, tag: str):
        self.tag = tag

    @hookimpl
    def runnel_register_routes(self, register, server):
        async def tag(request):
            return json_response({"tag": self.tag, "port": server.port})

        register("GET", "/tag", tag)


async def exchange(port: int, method: str, target: str, *, headers: dict | None = None, body: bytes = b""):
    """One request over a fresh asyncio connection; (status line, headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [f"{method} {target} HTTP/1.1", "Host: localhost", "Connection: close",
                 f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    [response] = parse_all(data)
    return response.status_line, response.headers, response.body


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


def test_two_servers_in_one_loop():
    config_a = runnel.config_from_dict(
        {"server": {"port": 0}, "apps": {"alpha": {"backend": "echo", "pace_ms": 30}}}
    )
    config_b = runnel.config_from_dict(
        {
            "server": {"port": 0, "server_header": "bee"},
            "auth": {"kind": "api_key", "keys": ["embedded-key-1"]},
            "apps": {"beta": {"backend": "echo"}},
        }
    )

    async def main():
        async with runnel.Server(config_a, plugins=[Tag("a")]) as a, runnel.Server(config_b, plugins=[Tag("b")]) as b:
            assert await a.wait_ready() and await b.wait_ready()
            assert a.port != b.port and a.port > 0 and b.port > 0
            assert a.url == f"http://127.0.0.1:{a.port}"
            auth_b = {"Authorization": "Bearer embedded-key-1"}

            # A slow stream on A is in flight while B answers requests.
            slow = asyncio.ensure_future(
                exchange(a.port, "POST", "/echo/alpha", body=b'{"prompt": "s", "max_tokens": 10, "stream": true}')
            )
            await asyncio.sleep(0.05)
            assert not slow.done()
            quick = await asyncio.gather(
                exchange(b.port, "POST", "/echo/beta", headers=auth_b, body=b'{"prompt": "q", "max_tokens": 2}'),
                exchange(b.port, "GET", "/tag", headers=auth_b),
                exchange(b.port, "GET", "/tag"),
                exchange(a.port, "GET", "/tag"),
            )
            assert not slow.done()
            (s1, h1, p1), (s2, _, p2), (s3, h3, _), (s4, h4, p4) = quick
            assert s1 == b"HTTP/1.1 200 OK"
            assert orjson.loads(p1) == {"app": "beta", "text": "q q", "tokens": 2}
            assert h1[b"server"] == b"bee"
            assert (s2, orjson.loads(p2)) == (b"HTTP/1.1 200 OK", {"tag": "b", "port": b.port})
            assert s3 == b"HTTP/1.1 401 Unauthorized"  # B's auth, not A's
            assert h3[b"www-authenticate"] == b'Bearer realm="runnel"'
            assert (s4, orjson.loads(p4)) == (b"HTTP/1.1 200 OK", {"tag": "a", "port": a.port})
            assert h4[b"server"] == b"runnel"

            status, headers, payload = await slow
            assert status == b"HTTP/1.1 200 OK"
            events = [orjson.loads(line[6:]) for line in payload.split(b"\n\n") if line]
            assert events[-1] == {"done": True, "tokens": 10}
            assert [e["index"] for e in events[:-1]] == list(range(10))

            # Each server has only its own apps.
            status, _, payload = await exchange(a.port, "POST", "/echo/beta", body=b"{}")
            assert status == b"HTTP/1.1 404 Not Found"
            assert orjson.loads(payload)["error"]["code"] == "app_not_found"
            status, _, _ = await exchange(b.port, "POST", "/echo/alpha", headers=auth_b, body=b"{}")
            assert status == b"HTTP/1.1 404 Not Found"
            ports = a.port, b.port
        # Leaving the block stops both.
        assert await refused(ports[0])
        assert await refused(ports[1])
        return ports

    ports = run(main())
    assert len(set(ports)) == 2


def test_stop_of_one_server_leaves_the_other_serving():
    config = runnel.config_from_dict({"server": {"port": 0}})

    async def main():
        async with runnel.Server(config, load_entrypoints=False) as a:
            async with runnel.Server(config, load_entrypoints=False) as b:
                b_port = b.port
                status, _, payload = await exchange(b_port, "GET", "/health")
                assert (status, payload) == (b"HTTP/1.1 200 OK", b'{"status":"ok"}')
            assert await refused(b_port)
            a_port = a.port
            status, _, payload = await exchange(a_port, "GET", "/health")
            assert (status, payload) == (b"HTTP/1.1 200 OK", b'{"status":"ok"}')
            serving = asyncio.ensure_future(a.serve_forever())
            await asyncio.sleep(0)
            assert not serving.done()
        # stop() releases serve_forever.
        await asyncio.wait_for(serving, 10)
        assert await refused(a_port)

    run(main())
