"""The load generator's own ceiling: load a server that does nothing.

    .venv/bin/python -m benchmarks.loadgen.ceiling [--duration 3] [--pin] [-v]

The server (a child process, uvloop when installed) answers every request head it
reads with canned bytes and parses nothing else: GET /json is a small JSON body,
GET /sse 64 OpenAI chat chunks and [DONE], one HTTP chunk each, in one write. With --pin (and
taskset) the server runs on core 0 and the client on core 1.

Rates move with whatever else the machine runs; the client's CPU time per request
(its CPU time over requests sent, warmup included) moves much less, and its inverse
is the most the client can drive from one free core. A server measured near that
rate is measured against the client too: compare a report's ``client_cpu_s`` with
its ``wall_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time

from .client import LoadSpec, Workload, run_load
from .report import format_table

JSON_BODY = b'{"status":"ok"}'
CHUNK = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":" word"}}]}\n\n'


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# One HTTP chunk per event, as runnel frames a stream.
SSE_BODY = _chunk(CHUNK) * 64 + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


RESPONSES = {
    b"/json": b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
    % (len(JSON_BODY), JSON_BODY),
    b"/sse": b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    + SSE_BODY,
}


class Canned(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buffer = b""

    def data_received(self, data):
        self.buffer += data
        out = []
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            path = head.split(b" ", 2)[1]
            out.append(RESPONSES.get(path, RESPONSES[b"/json"]))
        if out:
            self.transport.write(b"".join(out))


def serve(port: int) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main():
        server = await asyncio.get_running_loop().create_server(Canned, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--verbose", "-v", action="store_true", help="print each run's full table")
    p.add_argument("--pin", action="store_true", help="server on core 0, client on core 1 (taskset)")
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pin = args.pin and shutil.which("taskset") and (os.cpu_count() or 1) >= 2
    cmd = [sys.executable, "-m", "benchmarks.loadgen.ceiling", "--serve", str(port)]
    server = subprocess.Popen((["taskset", "-c", "0"] if pin else []) + cmd)
    try:
        if pin:
            os.sched_setaffinity(0, {1})
        for _ in range(100):  # bounded wait for the server to listen
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        for name, workload, spec in (
            ("GET small JSON, closed loop c=1", Workload(f"{base}/json"), LoadSpec(concurrency=1)),
            ("GET small JSON, closed loop c=8", Workload(f"{base}/json"), LoadSpec(concurrency=8)),
            ("SSE 64 chunks, closed loop c=8", Workload(f"{base}/sse", stream=True), LoadSpec(concurrency=8)),
            ("GET small JSON, open loop 2000/s", Workload(f"{base}/json"), LoadSpec(rate=2000)),
        ):
            spec.duration, spec.warmup = args.duration, 0.5
            report = run_load(workload, spec)
            if args.verbose:
                print(f"== {name}\n{format_table(report)}\n")
            cpu_us = report["client_cpu_s"] / report["sent"] * 1e6
            tokens = report["tokens"] / report["requests"] if report["requests"] else 0
            print(
                f"{name:<34} {report['requests_per_s']:8.0f} req/s  "
                f"{report['tokens_per_s']:8.0f} tok/s  "
                f"CPU {100 * report['client_cpu_s'] / report['wall_s']:3.0f}%  "
                f"{cpu_us:5.0f} us/request -> one core: {1e6 / cpu_us:6.0f} req/s"
                + (f", {tokens * 1e6 / cpu_us:7.0f} tok/s" if tokens else "")
            )
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
