"""Runs shared by several servers through a real Redis (``[server] runs = "redis://..."``).

The servers are ``runnel serve`` subprocesses (``runnel.testing.ServeProcess``), so one
can be SIGKILLed; Redis is a real ``redis-server`` (``runnel.testing.RedisServer``, AOF
with ``appendfsync always``), killed and restarted by one test. Functions append their
tag to a ledger file (tests/apps/ledger.py): a run executed twice, or never, shows there.
"""

from __future__ import annotations

import contextlib
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest

from runnel.testing import RedisServer, ServeProcess, request, wait_until

LEDGER_APP = Path(__file__).resolve().parents[1] / "apps" / "ledger.py"
DONE = ("succeeded", "failed", "cancelled")
LEASE = 1.5  # [server] runs_lease: a killed server's runs are recovered about this long after


def write_config(tmp_path: Path, url: str, *, workers: int = 4, lease: float = LEASE) -> Path:
    config = tmp_path / "runnel.toml"
    config.write_text(textwrap.dedent(f"""
        [server]
        runs = "{url}"
        runs_workers = {workers}
        runs_lease = {lease}

        [apps.lab]
        backend = "python"
        module = "{LEDGER_APP}"
        [apps.lab.functions]
        public = true

        [apps.lingering]
        backend = "python"
        module = "{LEDGER_APP}"
        [apps.lingering.runpod]
        handler = "linger"

        [apps.counting]
        backend = "python"
        module = "{LEDGER_APP}"
        [apps.counting.runpod]
        handler = "count"
    """))
    return config


@contextlib.contextmanager
def servers(tmp_path: Path, config: Path, count: int):
    started = [ServeProcess(tmp_path, config, f"server{n}") for n in range(count)]
    try:
        for server in started:
            wait_until(server.ready, timeout=30)
        yield started
    finally:
        for server in started:
            server.kill()


def submit(port: int, body: dict) -> tuple[int, dict]:
    reply = request(port, "POST", "/v4/p/lab/record?async=true", body=orjson.dumps(body))
    return reply.status, (reply.json() if reply.body else {})


def status(port: int, run_id: str) -> dict:
    return request(port, "GET", f"/v4/p/lab/runs/{run_id}").json()


def ledger_lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def test_three_servers_share_runs_and_a_killed_one_loses_none(tmp_path, redis_url):
    ledger = tmp_path / "ledger"
    with servers(tmp_path, write_config(tmp_path, redis_url), 3) as (first, second, third):
        accepted: dict[str, str] = {}  # tag -> run id
        refused = 0
        for n in range(300):
            if n == 150:
                third.kill()  # mid-way: some of its runs running, others queued behind them
            server = (first, second, third)[n % 3]
            tag = f"t{n}"
            try:
                code, body = submit(server.port, {"ledger": str(ledger), "tag": tag, "hold": 0.02})
            except OSError:  # the killed one: a load balancer would send this to another
                refused += 1
                continue
            assert code == 202, body
            accepted[tag] = body["run_id"]
        assert refused == 50 and len(accepted) == 250

        survivors = (first, second)
        finals: dict[str, dict] = {}

        def all_final() -> bool:
            for n, (tag, run_id) in enumerate(accepted.items()):
                if tag not in finals:
                    body = status(survivors[n % 2].port, run_id)  # any survivor answers for any run
                    if body["status"] in DONE:
                        finals[tag] = body
            return len(finals) == len(accepted)

        wait_until(all_final, timeout=30 + 4 * LEASE, interval=0.2)

    executed: dict[str, list[str]] = {}
    for tag, pid in ledger_lines(ledger):
        executed.setdefault(tag, []).append(pid)
    twice = {tag: pids for tag, pids in executed.items() if len(pids) > 1}
    assert not twice, f"runs executed more than once: {twice}"
    pids = {pids[0] for pids in executed.values()}
    assert {str(first.pid), str(second.pid), str(third.pid)} <= pids  # all three took runs
    interrupted = []
    for tag, body in finals.items():
        if body["status"] == "succeeded":
            assert body["result"] == tag and tag in executed  # ran, once
        else:  # it was running on the killed server: failed, not run again (not idempotent)
            assert (body["status"], body["error"]["code"]) == ("failed", "interrupted"), body
            interrupted.append(tag)
    assert len(interrupted) <= 4  # at most the killed server's runs_workers were running on it


def test_a_cancel_on_one_server_stops_the_run_executing_on_another(tmp_path, redis_url):
    ledger = tmp_path / "ledger"
    with servers(tmp_path, write_config(tmp_path, redis_url), 2) as pair:
        reply = request(pair[0].port, "POST", "/v2/lingering/run",
                        body=orjson.dumps({"input": {"ledger": str(ledger), "tag": "long"}}))
        assert reply.status == 200, reply.body
        job = reply.json()["id"]
        started = wait_until(lambda: ledger_lines(ledger), timeout=10)
        (_, _, pid), = started
        executing = next(server for server in pair if str(server.pid) == pid)
        other = next(server for server in pair if server is not executing)
        took = time.monotonic()
        reply = request(other.port, "POST", f"/v2/lingering/cancel/{job}")
        assert (reply.status, reply.json()) == (200, {"id": job, "status": "CANCELLED"})
        assert time.monotonic() - took < 5  # told at once, not at a lease renewal
        assert ledger_lines(ledger)[1] == ["long", "cancelled", pid]  # stopped where it ran
        for server in pair:
            assert request(server.port, "GET", f"/v2/lingering/status/{job}").json()["status"] == "CANCELLED"


def test_a_generators_values_stream_from_any_server(tmp_path, redis_url):
    with servers(tmp_path, write_config(tmp_path, redis_url), 2) as pair:
        reply = request(pair[0].port, "POST", "/v2/counting/run", body=orjson.dumps({"input": {"n": 40}}))
        job = reply.json()["id"]
        seen: dict[int, list] = {server.port: [] for server in pair}  # each server keeps its own cursor
        while_running: dict[int, list] = {server.port: [] for server in pair}
        completed: set[int] = set()

        def streamed_all() -> bool:
            for server in pair:
                if server.port in completed:
                    continue
                body = request(server.port, "GET", f"/v2/counting/stream/{job}").json()
                values = [chunk["output"] for chunk in body["stream"]]
                seen[server.port] += values
                if body["status"] == "IN_PROGRESS":
                    while_running[server.port] += values
                elif body["status"] == "COMPLETED":
                    completed.add(server.port)
            return len(completed) == len(pair)

        wait_until(streamed_all, timeout=20, interval=0.05)
        for server in pair:  # the one executing it, and the other, reading from Redis
            assert seen[server.port] == list(range(40))
            assert while_running[server.port], "no values were streamed while the job ran"


def test_a_retry_on_another_server_finds_the_run_and_runsync_wakes_on_any_finish(tmp_path, redis_url):
    ledger = tmp_path / "ledger"
    with servers(tmp_path, write_config(tmp_path, redis_url, workers=1), 2) as pair:
        body = orjson.dumps({"ledger": str(ledger), "tag": "once"})
        key = ("Idempotency-Key", "order-66")
        first, retry = (request(server.port, "POST", "/v4/p/lab/record?async=true", headers=[key], body=body)
                        for server in pair)
        assert (first.status, retry.status) == (202, 202)
        assert first.json()["run_id"] == retry.json()["run_id"]  # the key is shared: one run
        # A long run holds one server's only worker: the job below runs on the other, and the
        # server waiting for it hears it finish.
        request(pair[0].port, "POST", "/v2/lingering/run",
                body=orjson.dumps({"input": {"ledger": str(tmp_path / "long"), "tag": "long"}}))
        wait_until(lambda: ledger_lines(tmp_path / "long"), timeout=10)
        took = time.monotonic()
        for server in pair:
            reply = request(server.port, "POST", "/v2/counting/runsync", body=orjson.dumps({"input": {"n": 3}}))
            assert reply.json()["status"] == "COMPLETED" and reply.json()["output"] == [0, 1, 2]
        assert time.monotonic() - took < 10  # woken by the finish, not by runsync_timeout (90 s)
    assert [tag for tag, _ in ledger_lines(ledger)] == ["once"]


@pytest.fixture
def own_redis(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def test_redis_down_is_503_with_retry_after_and_no_accepted_run_is_lost(tmp_path, own_redis):
    ledger = tmp_path / "ledger"
    # A long lease: runs executing while Redis is down record their outcome once it is back.
    with servers(tmp_path, write_config(tmp_path, own_redis.url(), lease=10), 2) as pair:
        accepted: list[str] = []
        outages: list[tuple[int, bytes | None]] = []

        def load(n: int) -> None:
            server = pair[n % 2]
            reply = request(server.port, "POST", "/v4/p/lab/record?async=true",
                            body=orjson.dumps({"ledger": str(ledger), "tag": f"t{n}", "hold": 0.01}))
            if reply.status == 202:
                accepted.append(reply.json()["run_id"])
            else:
                outages.append((reply.status, reply.header(b"retry-after")))

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(load, range(60)))
            own_redis.kill()
            took = time.monotonic()
            list(pool.map(load, range(60, 80)))
            assert time.monotonic() - took < 20  # refused at once, not hung
            # Status of a run, and sync calls, while Redis is down.
            reply = request(pair[0].port, "GET", f"/v4/p/lab/runs/{accepted[0]}")
            assert (reply.status, reply.header(b"retry-after")) == (503, b"2"), reply.body
            assert reply.json()["error"]["code"] == "run_store_unreachable"
            reply = request(pair[1].port, "POST", "/v4/p/lab/record",
                            body=orjson.dumps({"ledger": str(tmp_path / "sync"), "tag": "sync"}))
            assert (reply.status, reply.json()["result"]) == (200, "sync")
            own_redis.start()
            wait_until(lambda: submit(pair[0].port, {"ledger": str(tmp_path / "after"), "tag": "x"})[0] == 202,
                       timeout=15, interval=0.2)
            list(pool.map(load, range(80, 120)))

        assert outages and set(outages) == {(503, b"2")}, outages
        assert len(accepted) == 120 - len(outages)

        def all_succeeded() -> bool:
            return all(status(pair[n % 2].port, run_id)["status"] == "succeeded" for n, run_id in enumerate(accepted))

        wait_until(all_succeeded, timeout=30 + 4 * LEASE, interval=0.3)
    tags = [tag for tag, _ in ledger_lines(ledger)]
    assert len(tags) == len(set(tags)) == len(accepted)
