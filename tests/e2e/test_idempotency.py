"""``Idempotency-Key`` on every route that creates a run: /v4 ``?async=true``, RunPod /run, /runsync.

The same key with the same body, from the same principal to the same route, gets the
same run and the same answer: after a dropped connection, from concurrent duplicates
(one run is made), and after a restart (the key is in the store). The same key with a
different body is a 422; another principal or another route is another scope.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest

from runnel.testing import request, wait_until

REPO = Path(__file__).resolve().parents[2]
JOBS = REPO / "tests" / "apps" / "jobs.py"
KEYS = ["first-key-0001", "second-key-002"]


def config(path: Path) -> dict:
    return {"server": {"runs_path": str(path)}, "auth": {"kind": "api_key", "keys": KEYS},
            "apps": {"jobs": {"backend": "python", "module": str(JOBS), "runpod": {"handler": "greet"}}}}


def headers(idempotency_key: str | None, api_key: str = KEYS[0]) -> list[tuple[str, str]]:
    found = [("authorization", f"Bearer {api_key}")]
    return found if idempotency_key is None else [*found, ("idempotency-key", idempotency_key)]


def v4(port: int, body, key: str | None, api_key: str = KEYS[0]):
    return request(port, "POST", "/v4/p/jobs/greet?async=true", headers=headers(key, api_key), body=orjson.dumps(body))


def v4_run_id(reply) -> str:
    assert reply.status == 202, reply.body
    run_id = reply.json()["run_id"]
    assert list(reply.json()) == ["run_id"] and reply.header(b"x-request-id") == run_id.encode()
    return run_id


def runpod(port: int, route: str, body, key: str | None, api_key: str = KEYS[0]):
    return request(port, "POST", f"/v2/jobs/{route}", headers=headers(key, api_key), body=orjson.dumps(body))


def run_ids(path: Path) -> list[str]:
    """The ids in the store, oldest first; none before the server has made the file and its table
    (read only: never makes the file itself)."""
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        try:
            return [run_id for (run_id,) in conn.execute("SELECT id FROM runs ORDER BY rowid")]
        except sqlite3.OperationalError:  # no table yet: the server is making it
            return []


@pytest.fixture
def path(tmp_path) -> Path:
    return tmp_path / "runs.sqlite3"


@pytest.fixture
def server(start_server, path):
    return start_server(config(path))


def test_a_retry_with_the_key_gets_the_same_run(server, path):
    first = v4_run_id(v4(server.port, {"name": "Ada"}, "order-1"))
    again = v4_run_id(v4(server.port, {"name": "Ada"}, "order-1"))  # same answer, same X-Request-Id
    assert again == first and run_ids(path) == [first]
    wait_until(lambda: request(server.port, "GET", f"/v4/p/jobs/runs/{first}", headers=headers(None))
               .json()["status"] == "succeeded")
    assert v4_run_id(v4(server.port, {"name": "Ada"}, "order-1")) == first  # finished: still the same run
    # Same body without a key, or with another key: new runs.
    assert v4_run_id(v4(server.port, {"name": "Ada"}, None)) != first
    assert v4_run_id(v4(server.port, {"name": "Ada"}, "order-2")) != first
    assert len(run_ids(path)) == 3


def test_a_retry_after_a_dropped_connection_gets_the_run_the_first_try_made(server, path):
    body = orjson.dumps({"name": "Ada"})
    head = (f"POST /v4/p/jobs/greet?async=true HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS[0]}\r\n"
            f"Idempotency-Key: dropped-1\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + body)
        [recorded] = wait_until(lambda: run_ids(path))
        # and the connection drops before the client reads its 202
    assert v4_run_id(v4(server.port, {"name": "Ada"}, "dropped-1")) == recorded
    assert run_ids(path) == [recorded]


def test_concurrent_duplicates_make_one_run(server, path):
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: v4(server.port, {"name": "Ada"}, "burst"), range(16)))
        jobs = list(pool.map(lambda _: runpod(server.port, "run", {"input": {"name": "Bo"}}, "burst"), range(16)))
    assert len({v4_run_id(reply) for reply in replies}) == 1
    assert {(reply.status, reply.json()["status"]) for reply in jobs} == {(200, "IN_QUEUE")}
    assert len({reply.json()["id"] for reply in jobs}) == 1
    assert len(run_ids(path)) == 2  # one per route


def test_the_same_key_with_another_body_is_422(server, path):
    first = v4_run_id(v4(server.port, {"name": "Ada"}, "k-1"))
    reply = v4(server.port, {"name": "Eve"}, "k-1")
    assert reply.status == 422, reply.body
    error = reply.json()
    assert error["error"]["code"] == "idempotency_key_reused" and error["error"]["param"] == "Idempotency-Key"
    assert "different request" in error["error"]["message"]
    reply = runpod(server.port, "run", {"input": {"name": "Ada"}}, "k-2")
    assert reply.status == 200
    reply = runpod(server.port, "run", {"input": {"name": "Ada"}, "policy": {"executionTimeout": 5000}}, "k-2")
    assert reply.status == 422 and list(reply.json()) == ["error"] and "different request" in reply.json()["error"]
    assert len(run_ids(path)) == 2 and run_ids(path)[0] == first


def test_keys_are_scoped_to_the_principal_and_the_route(server, path):
    mine = v4_run_id(v4(server.port, {"name": "Ada"}, "shared"))
    theirs = v4_run_id(v4(server.port, {"name": "Ada"}, "shared", KEYS[1]))
    assert mine != theirs
    queued = runpod(server.port, "run", {"input": {"name": "Ada"}}, "shared").json()["id"]
    synced = runpod(server.port, "runsync", {"input": {"name": "Ada"}}, "shared").json()
    assert len({mine, theirs, queued, synced["id"]}) == 4
    assert synced["status"] == "COMPLETED" and synced["output"] == "Hello, Ada!"
    again = runpod(server.port, "runsync", {"input": {"name": "Ada"}}, "shared").json()
    assert again["id"] == synced["id"] and again["output"] == "Hello, Ada!"
    assert runpod(server.port, "run", {"input": {"name": "Ada"}}, "shared").json() == {"id": queued,
                                                                                       "status": "IN_QUEUE"}
    assert len(run_ids(path)) == 4


def test_after_a_restart_the_key_still_maps_to_its_run(start_server, path):
    server = start_server(config(path))
    first = v4_run_id(v4(server.port, {"name": "Ada"}, "durable"))
    job = runpod(server.port, "run", {"input": {"name": "Ada"}}, "durable").json()["id"]
    server.stop()
    server = start_server(config(path))
    assert v4_run_id(v4(server.port, {"name": "Ada"}, "durable")) == first
    assert runpod(server.port, "run", {"input": {"name": "Ada"}}, "durable").json()["id"] == job
    assert v4(server.port, {"name": "Eve"}, "durable").status == 422
    assert len(run_ids(path)) == 2


@pytest.mark.parametrize("key", ["", " ", "x" * 256, "caf\u00e9"])
def test_a_malformed_key_is_400_and_records_nothing(server, path, key):
    head = f"POST /v4/p/jobs/greet?async=true HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS[0]}\r\n"
    body = b'{"name": "Ada"}'
    raw = (head.encode() + b"Idempotency-Key: " + key.encode() + b"\r\n"
           + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(raw)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400 "), data
    assert b'"invalid_idempotency_key"' in data
    assert run_ids(path) == []
