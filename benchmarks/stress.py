"""Attacks on a real runnel server, and what a normal client sees meanwhile.

    python benchmarks/stress.py [--quick] [--out FILE]

Starts ``runnel serve`` (this checkout's, in a subprocess, on 127.0.0.1 and a port the
OS picks) and runs one attack at a time, each bounded in count and in time, while a
normal client asks ``GET /health`` every 50 ms on its own connection:

  slowloris        connections that send a request head one byte a second
  slow bodies      POSTs whose declared body arrives one byte every two seconds
  stalled streams  OpenAI streams (echo, as fast as it goes) whose client never reads
  pipelining       connections that pipeline 400 requests for 256 KB answers and never read
  crash loop       async runs submitted at a steady rate while the server is SIGKILLed
                   and restarted five times; then every accepted run is looked up

For each: the normal client's p50/p99 and failures, the server's RSS (VmRSS of its
process, sampled every 50 ms) before, at peak and after, and for the crash loop the
runs accepted, finished, interrupted, lost (unknown afterwards) and run twice. The
figures go to stdout (Markdown) and, with ``--out``, to a file; benchmarks/README.md
keeps the latest. Loopback only; nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson
import trio

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
APP = '''
import os, time

BIG = "x" * 262144


async def big():
    """A 256 KB answer that costs nothing to make: what a pipelining client asks for many of."""
    return BIG

def record(tag: str):
    """Appends its tag to the ledger once per execution: a tag twice means a run ran twice."""
    time.sleep(0.05)
    fd = os.open(os.environ["STRESS_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (tag + "\\n").encode())
    finally:
        os.close(fd)
    return tag
'''
CONFIG = """
[server]
host = "127.0.0.1"
log_level = "warning"
runs_path = "{runs}"
shutdown_grace = 1.0

[apps.echo]
backend = "echo"
context_length = 200000

[apps.stress]
backend = "python"
module = "{module}"

[apps.stress.functions]
public = true
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class Server:
    """``runnel serve`` in a subprocess; restartable on the same port and files."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        module = workdir / "stress_app.py"
        module.write_text(APP)
        self.ledger = workdir / "ledger"
        self.config = workdir / "runnel.toml"
        self.config.write_text(CONFIG.format(runs=workdir / "runs.sqlite3", module=module))
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "STRESS_LEDGER": str(self.ledger)}
        log = open(self.workdir / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runnel", "serve", "--config", str(self.config), "--port", str(self.port)],
            cwd=self.workdir, env=env, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {(self.workdir / 'server.log').read_text()[-2000:]}")
            try:
                with socket.create_connection((HOST, self.port), timeout=1) as sock:
                    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if sock.recv(64).startswith(b"HTTP/1.1 200"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the server did not become ready in 30 s")

    def rss(self) -> int:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except (OSError, AttributeError):
            pass
        return 0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


# -- clients -------------------------------------------------------------------------------


async def http(port: int, method: str, target: str, body: bytes = b"", timeout: float = 5.0) -> tuple[int, bytes]:
    """One request on its own connection; (status, body). Connection: close, so the body ends at EOF."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(HOST, port)
        async with stream:
            head = f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            if body or method == "POST":
                head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            await stream.send_all(head.encode() + b"\r\n" + body)
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    status = int(data.split(b" ", 2)[1])
    _, _, payload = data.partition(b"\r\n\r\n")
    return status, payload


async def probe(port: int, results: list, stop: trio.Event) -> None:
    """The normal client: GET /health every 50 ms on one keep-alive connection (reconnecting if needed)."""
    stream = None
    while not stop.is_set():
        started = time.perf_counter()
        try:
            with trio.fail_after(5):
                if stream is None:
                    stream = await trio.open_tcp_stream(HOST, port)
                await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                data = b""
                while b"\r\n\r\n" not in data or not data.endswith(b"}"):
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        raise ConnectionError("closed")
                    data += chunk
            results.append((time.perf_counter() - started, data.startswith(b"HTTP/1.1 200")))
        except (OSError, ConnectionError, trio.TooSlowError, trio.BrokenResourceError):
            results.append((time.perf_counter() - started, False))
            if stream is not None:
                await stream.aclose()
            stream = None
        await trio.sleep(max(0.0, 0.05 - (time.perf_counter() - started)))
    if stream is not None:
        await stream.aclose()


async def hold(port: int, payload: bytes, pace: float, until: float, prefix: bytes = b"") -> None:
    """Send ``prefix`` at once, then ``payload`` one byte every ``pace`` seconds until ``until``
    (or the server closes), never reading."""
    try:
        stream = await trio.open_tcp_stream(HOST, port)
    except OSError:
        return
    async with stream:
        try:
            if prefix:
                await stream.send_all(prefix)
            for byte in payload:
                if trio.current_time() >= until:
                    return
                await stream.send_all(bytes([byte]))
                await trio.sleep(pace)
            await trio.sleep_until(until)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return


async def flood_unread(port: int, payload: bytes, until: float) -> None:
    """Send ``payload`` (pipelined requests, or one streaming request) at once and never read."""
    await hold(port, b"", 0.0, until, prefix=payload)


# -- phases --------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def under_attack(server: Server, attack, seconds: float) -> dict:
    """Run ``attack(until)`` for ``seconds`` with the probe and an RSS sampler alongside."""
    results: list = []
    samples: list[int] = []
    before = server.rss()
    stop = trio.Event()

    async def sample() -> None:
        while not stop.is_set():
            samples.append(server.rss())
            await trio.sleep(0.05)

    until = trio.current_time() + seconds
    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe, server.port, results, stop)
        nursery.start_soon(sample)
        await attack(until)
        await trio.sleep_until(until)
        stop.set()
    await trio.sleep(1.0)  # let the server let go of what the attack cost
    latencies = [latency * 1000 for latency, ok in results]
    return {"probes": len(results), "failed": sum(not ok for _, ok in results),
            "p50_ms": percentile(latencies, 0.5), "p99_ms": percentile(latencies, 0.99),
            "rss_before": before, "rss_peak": max(samples, default=before), "rss_after": server.rss()}


async def baseline(server: Server, seconds: float) -> dict:
    async def nothing(until: float) -> None:
        pass

    return await under_attack(server, nothing, seconds)


def slowloris(count: int):
    async def attack(until: float) -> None:
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(hold, SERVER_PORT, head, 1.0, until)
                await trio.sleep(0.002)
    return attack


def slow_bodies(count: int):
    async def attack(until: float) -> None:
        body = b"x" * 10_000
        request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n" % len(body))
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(hold, SERVER_PORT, body, 2.0, until, request)
                await trio.sleep(0.002)
    return attack


def stalled_streams(count: int):
    async def attack(until: float) -> None:
        body = orjson.dumps({"model": "echo", "prompt": "flood " * 20, "stream": True, "ignore_eos": True,
                             "max_tokens": 150_000})
        request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(flood_unread, SERVER_PORT, request, until)
    return attack


def pipelining(count: int, depth: int):
    async def attack(until: float) -> None:
        # Each answer is 256 KB and costs the server next to nothing to make, so a
        # connection that never reads asks it to hold depth x 256 KB if it kept going.
        request = b"POST /v4/p/stress/big HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n" * depth
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(flood_unread, SERVER_PORT, request, until)
    return attack


async def crash_loop(server: Server, kills: int, seconds_between: float) -> dict:
    """Submit async runs steadily; SIGKILL and restart the server ``kills`` times; account for every run."""
    accepted: list[str] = []
    refused = 0
    for round_ in range(kills + 1):
        deadline = trio.current_time() + seconds_between
        while trio.current_time() < deadline:
            tag = uuid.uuid4().hex
            try:
                status, body = await http(server.port, "POST", "/v4/p/stress/record?async=true",
                                          orjson.dumps({"tag": tag}), timeout=2.0)
                if status == 202:
                    accepted.append(orjson.loads(body)["run_id"])
                else:
                    refused += 1
            except (OSError, trio.TooSlowError, ValueError, IndexError):
                refused += 1  # the server is down, or the answer never came: not accepted
            await trio.sleep(0.01)
        if round_ < kills:
            server.kill()
            server.start()
    states: dict[str, int] = {}
    finished = trio.current_time() + 60
    pending = list(accepted)
    while pending and trio.current_time() < finished:
        still = []
        for run_id in pending:
            status, body = await http(server.port, "GET", f"/v4/p/stress/runs/{run_id}")
            state = orjson.loads(body).get("status") if status == 200 else "lost"
            if state in ("queued", "running"):
                still.append(run_id)
            else:
                code = orjson.loads(body).get("error", {}).get("code") if state == "failed" else None
                key = "interrupted" if code == "interrupted" else state
                states[key] = states.get(key, 0) + 1
        pending = still
        if pending:
            await trio.sleep(0.2)
    states["still pending"] = len(pending)
    tags = server.ledger.read_text().split() if server.ledger.exists() else []
    twice = len(tags) - len(set(tags))
    return {"accepted": len(accepted), "refused": refused, "states": states, "ran_twice": twice}


SERVER_PORT = 0


def mb(n: float) -> str:
    return f"{n / 1048576:.1f}" if n >= 104858 or n == 0 else f"{n / 1048576:.3f}"


async def main_async(quick: bool) -> str:
    global SERVER_PORT
    seconds = 6.0 if quick else 15.0
    rows = []
    lorises, bodies = (300, 100) if quick else (800, 300)
    phases = [
        ("baseline (no attack)", None, 1),
        (f"slowloris ({lorises} connections)", slowloris(lorises), lorises),
        (f"slow bodies ({bodies} connections)", slow_bodies(bodies), bodies),
        ("stalled streams (20)", stalled_streams(20), 20),
        ("pipelining, never read (10 connections)", pipelining(10, 400), 10),
    ]
    for name, attack, units in phases:
        # A fresh server for each attack: RSS the previous one left in the allocator's
        # pools would hide what this one costs.
        with tempfile.TemporaryDirectory(prefix="runnel-stress-") as tmp:
            server = Server(Path(tmp))
            SERVER_PORT = server.port
            server.start()
            try:
                figures = await (baseline(server, 3.0) if attack is None else under_attack(server, attack, seconds))
            finally:
                server.stop()
        growth = (figures["rss_peak"] - figures["rss_before"]) / units
        rows.append(f"| {name} | {figures['probes']} | {figures['failed']} | {figures['p50_ms']:.1f} | "
                    f"{figures['p99_ms']:.1f} | {mb(figures['rss_before'])} | {mb(figures['rss_peak'])} | "
                    f"{mb(figures['rss_after'])} | {mb(growth)} |")
    with tempfile.TemporaryDirectory(prefix="runnel-stress-") as tmp:
        server = Server(Path(tmp))
        SERVER_PORT = server.port
        server.start()
        try:
            runs = await crash_loop(server, kills=5, seconds_between=1.0 if quick else 3.0)
        finally:
            server.stop()
    states = ", ".join(f"{key} {value}" for key, value in sorted(runs["states"].items()))
    return "\n".join([
        f"### Stress ({'quick' if quick else 'full'}), {time.strftime('%Y-%m-%d')}",
        "",
        "Normal client: `GET /health` every 50 ms during each attack. RSS: the server process's VmRSS; "
        "growth per unit is (peak - before) / the number of stalled streams or connections.",
        "",
        "| attack | probes | failed | p50 ms | p99 ms | RSS before MB | RSS peak MB | RSS after MB "
        "| growth per unit MB |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Crash loop (5 SIGKILLs): {runs['accepted']} runs accepted (202), {runs['refused']} submissions not "
        f"accepted while the server was down; afterwards: {states}; run twice: {runs['ran_twice']}.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter attacks (about 1 minute in all)")
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    report = trio.run(main_async, args.quick)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
