"""Async-run throughput: runs accepted and completed per second, SQLite against Redis.

    .venv/bin/python benchmarks/runs_throughput.py [--quick] [--runs N] [--clients N] [--out FILE]

For each store, ``runnel serve`` subprocesses (this checkout's) take ``--runs`` async runs
of a trivial function (``POST /v4/p/bench/record?async=true``; it appends its tag to a
ledger file and returns) from ``--clients`` keep-alive clients, spread round-robin over the
servers:

  sqlite           one server, its SQLite file (WAL, synchronous=FULL: a fsync per run)
  redis x1         one server on a local redis-server (AOF, appendfsync everysec)
  redis x3         three servers sharing that Redis

accepted/s: runs answered 202 per second of submitting. completed/s: runs executed per
second from the first submission until the ledger holds all of them (the servers execute
while runs are still being submitted). The servers' CPU (cores busy, from /proc) over the
whole point is reported too; on a 2-core machine the client and Redis share the cores with
them, so the 3-server row measures sharing more than scaling. Needs ``redis-server`` on
PATH (``make redis-server``). Loopback only; nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson

from runnel.testing import H11Client, RedisServer, ServeProcess, wait_until

APP = textwrap.dedent('''
    import os

    def record(ledger: str, tag: str):
        fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (tag + "\\n").encode())
        finally:
            os.close(fd)
        return tag
''')


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def measure(directory: Path, store: str, servers: int, runs: int, clients: int) -> dict:
    directory.mkdir()
    (directory / "bench_app.py").write_text(APP)
    ledger = directory / "ledger"
    config = directory / "runnel.toml"
    config.write_text(textwrap.dedent(f"""
        [server]
        {store}
        runs_workers = 8
        runs_max_queued = {runs * 2}
        access_log = false

        [apps.bench]
        backend = "python"
        module = "{directory / 'bench_app.py'}"
        [apps.bench.functions]
        public = true
    """))
    started = [ServeProcess(directory, config, f"server{n}") for n in range(servers)]
    try:
        for server in started:
            wait_until(server.ready, timeout=30)
        cpu_before = [cpu_seconds(server.pid) for server in started]

        def client(index: int) -> int:
            accepted = 0
            port = started[index % servers].port
            with H11Client(port) as connection:
                for n in range(index, runs, clients):
                    body = orjson.dumps({"ledger": str(ledger), "tag": f"t{n}"})
                    reply = connection.request("POST", "/v4/p/bench/record?async=true", body=body)
                    accepted += reply.status == 202
            return accepted

        began = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            accepted = sum(pool.map(client, range(clients)))
        submitted = time.perf_counter() - began
        wait_until(lambda: lines(ledger) >= accepted, timeout=600, interval=0.01)
        completed = time.perf_counter() - began
        cpu = sum(cpu_seconds(server.pid) - before for server, before in zip(started, cpu_before, strict=True))
    finally:
        for server in started:
            server.kill()
    return {"accepted": accepted, "accepted_per_s": accepted / submitted, "completed_per_s": accepted / completed,
            "server_cpu": cpu / completed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1000 runs instead of 5000")
    parser.add_argument("--runs", type=int)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    runs = args.runs or (1000 if args.quick else 5000)
    rows = []
    with tempfile.TemporaryDirectory(prefix="runnel-runs-bench-") as tmp:
        root = Path(tmp)
        redis = RedisServer(root / "redis", fsync="everysec").start()
        try:
            cases = [("sqlite", f'runs_path = "{root / "runs.sqlite3"}"', 1),
                     ("redis x1", f'runs = "{redis.url(0)}"', 1),
                     ("redis x3", f'runs = "{redis.url(1)}"', 3)]
            for name, store, servers in cases:
                result = measure(root / name.replace(" ", "-"), store, servers, runs, args.clients)
                rows.append((name, result))
                print(f"{name}: {result}", file=sys.stderr)
        finally:
            redis.stop()
    table = [f"{runs} runs of a trivial function, {args.clients} keep-alive clients, "
             f"{os.cpu_count()} cores (servers, client and Redis share them)", "",
             "| store | servers | accepted runs/s | completed runs/s | server CPU (cores) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, result in rows:
        servers = name.rsplit("x", 1)[1] if "x" in name else "1"
        table.append(f"| {name.split()[0]} | {servers} | {result['accepted_per_s']:.0f} | "
                     f"{result['completed_per_s']:.0f} | {result['server_cpu']:.2f} |")
    text = "\n".join(table)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
