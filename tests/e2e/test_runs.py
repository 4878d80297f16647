"""Async runs on the /v4 routes: ``?async=true`` -> 202, then ``GET .../runs/{run_id}``.

A real server serves examples/hello/main.py (and tests/apps/gated.py
where a run must be held); the run store is a SQLite file in tmp_path, read by the
tests too, or in memory.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from pathlib import Path
from urllib.parse import quote

import orjson
import pytest

from runnel.config import ConfigError
from runnel.testing import request, wait_until

REPO = Path(__file__).resolve().parents[2]
HELLO = REPO / "examples" / "hello" / "main.py"
RUN_ID = re.compile(r"[0-9a-f]{32}")
DONE = ("succeeded", "failed", "cancelled")
KEY = "k" * 16

def hello_app(**functions) -> dict:
    return {"backend": "python", "module": str(HELLO), "functions": {"public": True, **functions}}


def submit(port: int, app: str, function: str, body=None, *, query: str = "async=true", headers=()):
    data = b"" if body is None else orjson.dumps(body)
    return request(port, "POST", f"/v4/p-test/{app}/{function}?{query}", headers=headers, body=data)


def accepted(reply) -> str:
    assert reply.status == 202, reply.body
    assert reply.header(b"content-type") == b"application/json"
    body = reply.json()
    assert list(body) == ["run_id"] and RUN_ID.fullmatch(body["run_id"])
    assert reply.header(b"x-request-id") == body["run_id"].encode()
    return body["run_id"]


def status(port: int, app: str, run_id: str, headers=()):
    return request(port, "GET", f"/v4/p-test/{app}/runs/{run_id}", headers=headers)


def finished(port: int, app: str, run_id: str, timeout: float = 10) -> dict:
    def done():
        reply = status(port, app, run_id)
        assert reply.status == 200, reply.body
        body = reply.json()
        return body if body["status"] in DONE else None

    return wait_until(done, timeout)


def rows(path: Path) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute("SELECT id, app, function, state FROM runs ORDER BY rowid").fetchall()


@pytest.fixture
def hello(start_server):
    return start_server({"server": {"runs_path": ""}, "apps": {"hello": hello_app(), "echo": {"backend": "echo"}}})


# -- results --------------------------------------------------------------------------------


def test_sync_function_runs_in_the_background(hello):
    run_id = accepted(submit(hello.port, "hello", "greet", {"name": "Ada"}))
    body = finished(hello.port, "hello", run_id)
    assert list(body) == ["run_id", "status", "status_code", "run_time_ms", "result"]
    assert body["run_id"] == run_id and body["status"] == "succeeded" and body["status_code"] == 200
    assert type(body["run_time_ms"]) is int and body["run_time_ms"] >= 0
    assert body["result"] == "Hello, Ada!"


def test_async_function_and_status_code(hello):
    assert finished(hello.port, "hello", accepted(submit(hello.port, "hello", "add", {"a": 1, "b": 2.5})))[
        "result"] == {"sum": 3.5}
    body = finished(hello.port, "hello", accepted(submit(hello.port, "hello", "create", {"item": "book"})))
    assert (body["status_code"], body["result"]) == (201, {"created": "book"})


def test_generators_are_collected_into_a_list(hello):
    assert finished(hello.port, "hello", accepted(submit(hello.port, "hello", "count", {"to": 3})))[
        "result"] == [{"n": 1}, {"n": 2}, {"n": 3}]
    accept_sse = [("accept", "text/event-stream")]  # async runs never stream
    run_id = accepted(submit(hello.port, "hello", "spell", {"word": "hey"}, headers=accept_sse))
    assert finished(hello.port, "hello", run_id)["result"] == ["h", "e", "y"]


def test_a_failing_function_is_failed_with_the_error_body(hello):
    run_id = accepted(submit(hello.port, "hello", "fail", {"message": "kaboom 42"}))
    body = finished(hello.port, "hello", run_id)
    assert body == {"run_id": run_id, "status": "failed", "status_code": 500, "error": {
        "message": "Function 'fail' failed: ValueError: kaboom 42", "type": "server_error", "param": None,
        "code": "function_error"}}


def test_webhook_endpoint_implies_async_and_async_false_is_a_sync_call(start_server):
    server = start_server({"server": {"runs_path": "", "webhook_allowed_hosts": ["127.0.0.1"]},
                           "apps": {"hello": hello_app()}})
    reply = submit(server.port, "hello", "greet", {"name": "Bo"}, query="webhookEndpoint=http://127.0.0.1:9/x")
    assert finished(server.port, "hello", accepted(reply))["result"] == "Hello, Bo!"
    sync = submit(server.port, "hello", "greet", {"name": "Bo"}, query="async=false")
    assert sync.status == 200 and sync.json()["result"] == "Hello, Bo!"


# -- refused at submit time ---------------------------------------------------------------------


@pytest.mark.parametrize("function, body, status, code", [
    ("nope", {}, 404, "function_not_found"),
    ("_helper", {"name": "x"}, 404, "function_not_found"),
    ("greet", {}, 422, "missing_argument"),
    ("greet", {"name": "x", "colour": "red"}, 422, "unexpected_argument"),
])
def test_bad_calls_are_refused_before_anything_is_recorded(start_server, tmp_path, function, body, status, code):
    path = tmp_path / "runs.sqlite3"
    server = start_server({"server": {"runs_path": str(path)}, "apps": {"hello": hello_app()}})
    reply = submit(server.port, "hello", function, body)
    assert reply.status == status and reply.json()["error"]["code"] == code
    assert not path.exists()  # the store is created on first use: nothing was recorded


def test_bad_async_flags_and_model_apps(hello):
    reply = submit(hello.port, "hello", "greet", {"name": "x"}, query="async=maybe")
    assert (reply.status, reply.json()["error"]["code"]) == (400, "invalid_async")
    reply = submit(hello.port, "hello", "greet", {"name": "x"}, query="async=false&webhookEndpoint=http://a/")
    assert (reply.status, reply.json()["error"]["param"]) == (400, "webhookEndpoint")
    # A model app's async run is its chat function "run" (tests/e2e/test_runpod_model_jobs.py); no other.
    reply = submit(hello.port, "echo", "other", {"messages": [{"role": "user", "content": "hi"}]})
    assert (reply.status, reply.json()["error"]["code"]) == (404, "function_not_found")
    reply = request(hello.port, "POST", "/v4/p/hello/run/chat/completions?async=true", body=b"{}")
    assert (reply.status, reply.json()["error"]["code"]) == (400, "async_not_supported")


def test_webhook_host_not_allowed_is_400_and_nothing_is_recorded(start_server, tmp_path):
    path = tmp_path / "runs.sqlite3"
    server = start_server({"server": {"runs_path": str(path), "webhook_allowed_hosts": ["hooks.example"]},
                           "apps": {"hello": hello_app()}})
    first = accepted(submit(server.port, "hello", "greet", {"name": "x"}))
    for url in ("http://evil.example/hook", "http://hooks.example.evil/x", "ftp://hooks.example/x",
                "http://user@evil.example/x", "not a url"):
        query = f"async=true&webhookEndpoint={quote(url, safe='')}"
        reply = submit(server.port, "hello", "greet", {"name": "x"}, query=query)
        assert reply.status == 400, url
        error = reply.json()["error"]
        assert (error["code"], error["param"]) == ("webhook_not_allowed", "webhookEndpoint")
    assert [row[0] for row in rows(path)] == [first]


# -- durability, lookups, expiry -----------------------------------------------------------------


def test_202_comes_after_the_run_is_in_the_sqlite_file(start_server, tmp_path):
    path = tmp_path / "runs.sqlite3"
    server = start_server({"server": {"runs_path": str(path)}, "apps": {"hello": hello_app()}})
    for n in range(5):
        run_id = accepted(submit(server.port, "hello", "greet", {"name": f"n{n}"}))
        # Read straight from the file, in another connection, right after the 202.
        assert (run_id, "hello", "greet") in [row[:3] for row in rows(path)]
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert finished(server.port, "hello", run_id)["result"] == "Hello, n4!"


def test_unknown_run_and_other_apps_runs_are_404(start_server):
    server = start_server({"server": {"runs_path": ""}, "apps": {"hello": hello_app(), "other": hello_app()}})
    run_id = accepted(submit(server.port, "hello", "greet", {"name": "x"}))
    finished(server.port, "hello", run_id)
    for app, unknown in (("hello", "0" * 32), ("other", run_id), ("hello", "not-a-run")):
        reply = status(server.port, app, unknown)
        assert reply.status == 404
        body = reply.json()
        assert body["run_id"] == unknown
        assert (body["error"]["code"], body["error"]["param"]) == ("run_not_found", "run_id")


def test_finished_runs_expire_after_the_retention_and_are_purged(start_server, tmp_path):
    path = tmp_path / "runs.sqlite3"
    server = start_server({"server": {"runs_path": str(path), "runs_retention": 0.5}, "apps": {"hello": hello_app()}})
    run_id = accepted(submit(server.port, "hello", "greet", {"name": "x"}))
    assert finished(server.port, "hello", run_id)["status"] == "succeeded"
    wait_until(lambda: status(server.port, "hello", run_id).status == 404)
    wait_until(lambda: rows(path) == [])  # the periodic purge deleted the row


def test_runs_workers_bounds_the_runs_running_at_once(start_server, tmp_path):
    module = REPO / "tests" / "apps" / "gated.py"
    gate = tmp_path / "gate"
    server = start_server({"server": {"runs_path": "", "runs_workers": 1},
                           "apps": {"g": {"backend": "python", "module": str(module), "functions": {"public": True}}}})
    try:
        first = accepted(submit(server.port, "g", "hold", {"gate": str(gate), "tag": "first"}))
        second = accepted(submit(server.port, "g", "hold", {"gate": str(gate), "tag": "second"}))
        wait_until(lambda: status(server.port, "g", first).json()["status"] == "running")
        assert status(server.port, "g", second).json() == {"run_id": second, "status": "queued"}
    finally:
        gate.write_text("")
    assert finished(server.port, "g", first)["result"] == "first"
    assert finished(server.port, "g", second)["result"] == "second"


def test_run_status_needs_credentials_unless_the_app_is_public(start_server):
    server = start_server({"server": {"runs_path": ""}, "auth": {"kind": "api_key", "keys": [KEY]},
                           "apps": {"hello": {"backend": "python", "module": str(HELLO)}}})
    auth = [("authorization", f"Bearer {KEY}")]
    assert submit(server.port, "hello", "greet", {"name": "x"}).status == 401
    run_id = accepted(submit(server.port, "hello", "greet", {"name": "x"}, headers=auth))
    assert status(server.port, "hello", run_id).status == 401
    wait_until(lambda: status(server.port, "hello", run_id, headers=auth).json()["status"] == "succeeded")


def test_a_bare_async_flag_means_true(hello):
    assert finished(hello.port, "hello", accepted(submit(hello.port, "hello", "greet", {"name": "x"}, query="async")))[
        "result"] == "Hello, x!"


def test_one_server_per_run_store(start_server, tmp_path):
    path = tmp_path / "runs.sqlite3"
    config = {"server": {"runs_path": str(path)}, "apps": {"hello": hello_app()}}
    server = start_server(config)
    accepted(submit(server.port, "hello", "greet", {"name": "x"}))  # creates (and locks) the file
    with pytest.raises(ConfigError) as caught:
        start_server(config)
    assert caught.value.key == "server.runs_path" and "in use by another runnel server" in caught.value.message
    # The error says how to give the second server its own store.
    assert str(path) in caught.value.message and "RUNNEL_RUNS_PATH" in caught.value.message
    # A server with no app that takes runs opens no store: it starts on the same path.
    assert start_server({"server": {"runs_path": str(path)}, "apps": {"echo": {"backend": "echo"}}}).port
    with pytest.raises(ConfigError) as caught:
        start_server({"server": {"runs_path": str(tmp_path / "absent" / "runs.sqlite3")}, "apps": {"hello": hello_app()}})
    assert caught.value.key == "server.runs_path" and "no such directory" in caught.value.message


def test_a_server_that_fails_to_start_lets_go_of_its_run_store(start_server, tmp_path):
    path = tmp_path / "runs.sqlite3"
    config = {"server": {"runs_path": str(path)}, "apps": {"hello": hello_app()}}
    first = start_server(config)
    finished(first.port, "hello", accepted(submit(first.port, "hello", "greet", {"name": "x"})))  # makes the file
    first.stop()
    taken = start_server({"server": {"runs_path": ""}})
    with pytest.raises(OSError):  # opens (and locks) the store, then cannot listen
        start_server({**config, "server": {**config["server"], "port": taken.port}})
    again = start_server(config)
    assert finished(again.port, "hello", accepted(submit(again.port, "hello", "greet", {"name": "y"})))[
        "result"] == "Hello, y!"
