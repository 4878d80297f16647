"""Every queue of the function endpoints is bounded: overload is a prompt 429 with Retry-After.

- A python app's thread pool: ``[apps.NAME] workers`` calls run, ``max_queue`` more wait,
  one more is refused at once (the /v4 envelope plus the run id) while the server goes on
  serving; the calls it holds still finish.
- Async runs (/v4 ``?async=true``, RunPod ``/run`` and ``/runsync``): past ``[server]
  runs_max_queued`` queued runs a new run is refused, in each surface's own error shape;
  the count is the store's, so it holds across a restart; accepted runs all still run.

The calls are held by tests/apps/gated.py until the test creates its gate file.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson

from runnel.testing import connect, request, wait_until

GATED = Path(__file__).resolve().parents[1] / "apps" / "gated.py"


def gated_app(**options) -> dict:
    return {"backend": "python", "module": str(GATED), "functions": {"public": True}, **options}


def post(port: int, path: str, body) -> object:
    return request(port, "POST", path, body=orjson.dumps(body))


def pool_calls(port: int, app: str) -> int:
    reply = request(port, "GET", "/stats")
    assert reply.status == 200, reply.body
    return reply.json()["apps"][app]["pool_calls"]


def timed(fn, *args):
    started = time.perf_counter()
    reply = fn(*args)
    return reply, time.perf_counter() - started


def states(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [state for (state,) in conn.execute("SELECT state FROM runs ORDER BY rowid")]


# -- a python app's thread pool --------------------------------------------------------------


def test_sync_calls_past_max_queue_get_429_at_once_and_held_calls_finish(start_server, tmp_path):
    gate = tmp_path / "gate"
    server = start_server({"apps": {"gated": gated_app(workers=2, max_queue=3)}})
    hold = {"gate": str(gate), "tag": "held"}
    with ThreadPoolExecutor(5) as pool:
        held = [pool.submit(post, server.port, "/v4/p/gated/hold", hold) for _ in range(5)]
        wait_until(lambda: pool_calls(server.port, "gated") == 5)  # 2 running, 3 waiting
        for function, body in (("hold", hold), ("quick", {"tag": "x"})):  # one pool: any sync function
            reply, elapsed = timed(post, server.port, f"/v4/p/gated/{function}", body)
            assert reply.status == 429, reply.body
            assert elapsed < 5, elapsed  # not queued behind the held calls (they hold for 30 s)
            assert reply.header(b"retry-after") == b"1"
            error = reply.json()
            assert error["error"]["code"] == "queue_full" and error["error"]["type"] == "rate_limit_error"
            assert "busy" in error["error"]["message"]
            assert error["run_id"] == reply.header(b"x-request-id").decode()
        assert request(server.port, "GET", "/health").status == 200  # the server goes on serving
        assert not any(future.done() for future in held)
        gate.write_text("")
        assert [future.result().json()["result"] for future in held] == ["held"] * 5
    wait_until(lambda: pool_calls(server.port, "gated") == 0)
    reply = post(server.port, "/v4/p/gated/quick", {"tag": "again"})
    assert (reply.status, reply.json()["result"]) == (200, "again")


def test_a_caller_that_leaves_frees_its_slot_only_once_no_thread_holds_its_call(start_server, tmp_path):
    gate = tmp_path / "gate"
    server = start_server({"apps": {"gated": gated_app(workers=1, max_queue=1)}})

    def leave_after_sending(body: dict) -> socket.socket:
        data = orjson.dumps(body)
        sock = connect(server.port)
        sock.sendall(b"POST /v4/p/gated/hold HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%b" % (len(data), data))
        return sock

    running = leave_after_sending({"gate": str(gate), "tag": "running"})
    wait_until(lambda: pool_calls(server.port, "gated") == 1)
    waiting = leave_after_sending({"gate": str(gate), "tag": "waiting"})
    wait_until(lambda: pool_calls(server.port, "gated") == 2)
    waiting.close()  # its call had no thread yet: it is never run, and its slot is free at once
    wait_until(lambda: pool_calls(server.port, "gated") == 1)
    running.close()  # its call goes on in its thread, which it still holds
    time.sleep(0.3)
    assert pool_calls(server.port, "gated") == 1
    gate.write_text("")
    wait_until(lambda: pool_calls(server.port, "gated") == 0)


def test_max_queue_is_validated(start_server):
    import pytest

    from runnel.config import ConfigError

    with pytest.raises(ConfigError, match="apps.gated.max_queue: must be between 0 and 1000000, got -1"):
        start_server({"apps": {"gated": gated_app(max_queue=-1)}})


# -- async runs ---------------------------------------------------------------------------------


def test_runs_past_runs_max_queued_get_429_on_every_route_and_the_bound_survives_a_restart(start_server, tmp_path):
    path = tmp_path / "runs.sqlite3"
    gate = tmp_path / "gate"
    config = {
        "server": {"runs_path": str(path), "runs_workers": 1, "runs_max_queued": 2},
        # idempotent: the run the restart interrupts is queued again, so the queue is full again after it
        "apps": {"gated": gated_app(runpod={"handler": "hold"}, functions={"public": True, "idempotent": True})},
    }
    hold = {"gate": str(gate), "tag": "held"}
    server = start_server(config)
    accepted = []
    for _ in range(3):  # one running, two queued
        reply = post(server.port, "/v4/p/gated/hold?async=true", hold)
        assert reply.status == 202, reply.body
        accepted.append(reply.json()["run_id"])
    wait_until(lambda: states(path) == ["running", "queued", "queued"])

    def assert_full(port: int) -> None:
        reply, elapsed = timed(post, port, "/v4/p/gated/hold?async=true", hold)
        assert reply.status == 429 and elapsed < 5, (reply.body, elapsed)  # the held runs hold for 30 s
        assert reply.header(b"retry-after") == b"5"
        error = reply.json()
        assert error["error"]["code"] == "queue_full" and error["run_id"] == reply.header(b"x-request-id").decode()
        for route in ("run", "runsync"):  # RunPod's shape: {"error": message}
            reply, elapsed = timed(post, port, f"/v2/gated/{route}", {"input": hold})
            assert reply.status == 429 and elapsed < 5, (reply.body, elapsed)
            assert reply.header(b"retry-after") == b"5"
            assert list(reply.json()) == ["error"] and "queued" in reply.json()["error"]
        assert request(port, "GET", "/health").status == 200
        assert len(states(path)) == 3  # nothing recorded for the refused ones

    assert_full(server.port)
    server.stop()
    server = start_server(config)  # the count is the store's: still full
    wait_until(lambda: sorted(states(path)) == ["queued", "queued", "running"])  # the first is run again
    assert_full(server.port)
    gate.write_text("")
    wait_until(lambda: states(path) == ["succeeded"] * 3)
    for run_id in accepted:  # every accepted run ran
        body = request(server.port, "GET", f"/v4/p/gated/runs/{run_id}").json()
        assert (body["status"], body["result"]) == ("succeeded", "held")
    reply = post(server.port, "/v2/gated/runsync", {"input": {"gate": str(gate), "tag": "after"}})
    assert (reply.status, reply.json()["output"]) == (200, "after")


def test_runs_max_queued_is_validated(start_server):
    import pytest

    from runnel.config import ConfigError

    with pytest.raises(ConfigError, match="server.runs_max_queued: must be between 1 and 100000000, got 0"):
        start_server({"server": {"runs_max_queued": 0}})


# -- echo's generations -------------------------------------------------------------------------


def test_echo_generations_past_max_generations_get_429_and_n_that_never_fits_is_400(start_server):
    server = start_server({"apps": {"echo": {"backend": "echo", "pace_ms": 20, "max_generations": 2}}})

    def complete(n: int = 1, max_tokens: int = 50):
        body = {"model": "echo", "prompt": "a b c", "max_tokens": max_tokens, "ignore_eos": True, "n": n}
        return post(server.port, "/v1/completions", body)

    def generating() -> int:
        return request(server.port, "GET", "/stats").json()["apps"]["echo"]["generating"]

    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(complete) for _ in range(2)]  # 50 tokens at 20 ms: a second each
        wait_until(lambda: generating() == 2)
        reply, elapsed = timed(complete)
        assert reply.status == 429 and elapsed < 0.5, (reply.body, elapsed)
        assert reply.header(b"retry-after") == b"1"
        assert reply.json()["error"]["code"] == "queue_full" and reply.json()["error"]["type"] == "rate_limit_error"
        assert [future.result().status for future in held] == [200, 200]
    wait_until(lambda: generating() == 0)
    reply = complete(n=3, max_tokens=1)  # could never fit: a 400, not a 429 to retry forever
    assert reply.status == 400, reply.body
    assert (reply.json()["error"]["param"], reply.json()["error"]["code"]) == ("n", "too_many_choices")
    assert complete(n=2, max_tokens=1).status == 200
    # Two prompts x n=2 is four choices: never fits either, refused before any generation starts.
    body = {"model": "echo", "prompt": ["a", "b"], "max_tokens": 1, "n": 2}
    reply = post(server.port, "/v1/completions", body)
    assert reply.status == 400 and reply.json()["error"]["code"] == "too_many_choices", reply.body
    assert generating() == 0
