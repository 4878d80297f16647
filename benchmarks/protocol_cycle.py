"""Cost of one request/response cycle, sans I/O: runnel's protocol vs bare h11.

    .venv/bin/python benchmarks/protocol_cycle.py [--requests N]

Both sides parse the same GET and answer a small JSON body (runnel's real
/v1/models, listing one model); the bare side is the minimum h11 work (receive, next_event x2, send Response/Data/EOM,
start_next_cycle). The difference is what runnel adds: routing, auth hook,
request object, headers, the task per request.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import h11

import runnel
from runnel.cli import run

REQUEST = (
    b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUser-Agent: bench\r\n"
    b"Accept: application/json\r\nConnection: keep-alive\r\n\r\n"
)
BODY = b'{"object":"list","data":[{"id":"runnel/echo","object":"model","owned_by":"runnel"}]}'


class NullTransport:
    def __init__(self):
        self.bytes = 0

    def write(self, data):
        self.bytes += len(data)

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 1)

    def close(self):
        pass

    def is_closing(self):
        return False

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


def bare_h11(n: int) -> float:
    conn = h11.Connection(h11.SERVER)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]
    start = time.perf_counter()
    for _ in range(n):
        conn.receive_data(REQUEST)
        conn.next_event()
        conn.next_event()
        out = conn.send(h11.Response(status_code=200, headers=headers))
        out += conn.send(h11.Data(data=BODY)) + conn.send(h11.EndOfMessage())
        conn.start_next_cycle()
    return (time.perf_counter() - start) / n


async def runnel_cycle(n: int) -> float:
    # The real GET /v1/models of the OpenAI surface, with an echo app to list.
    config = runnel.config_from_dict({"server": {"port": 0}, "apps": {"echo": {"backend": "echo"}}})
    server = runnel.Server(config)
    await server.start()
    await server.wait_ready()
    try:
        from runnel.http import HttpProtocol

        protocol = HttpProtocol(server._server_state)
        transport = NullTransport()
        protocol.connection_made(transport)
        # Warm up, then time whole cycles: each request's task must finish before the next.
        start = 0.0
        for i in range(n + 1000):
            if i == 1000:
                start = time.perf_counter()
            protocol.data_received(REQUEST)
            await asyncio.sleep(0)
        elapsed = time.perf_counter() - start
        assert transport.bytes > 0 and not protocol.busy
        protocol.connection_lost(None)
        return elapsed / n
    finally:
        await server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=50_000)
    args = parser.parse_args()
    bare = min(bare_h11(args.requests) for _ in range(3))
    ours = min(run(runnel_cycle(args.requests)) for _ in range(3))
    print(f"bare h11 cycle:   {bare * 1e6:6.1f} us")
    print(f"runnel cycle:     {ours * 1e6:6.1f} us  ({bare / ours:.2f}x of bare h11)")


if __name__ == "__main__":
    main()
