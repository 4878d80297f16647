"""Queue deadlines (``X-Request-Deadline: <seconds>``, RunPod's ``policy.ttl``): work still
waiting when its deadline passes is dropped before it reaches the model.

Sync generations: an echo app with one slot (``slots = 1``) and a slow pace keeps a
second request waiting behind the first (60 tokens at 50 ms: at least 3 s) while its
0.3 s deadline passes; it is answered 504 in the surface's own shape and its generator
never starts (echo's ``/stats`` ``started``), while a request without a deadline queued
behind it still runs. The margins are wide (0.3 s against 3 s of work held by sleeps), so
a loaded machine only makes the held work longer. Runs (background responses too) wait
behind a run held by a gate file, which nothing but the test releases.

Runs: one runner worker held by tests/apps/gated.py keeps later runs queued; one past its
deadline is timed out with code ``deadline_exceeded`` and never executed (no claim, no
start time in the store), also when its deadline passes while the server is down.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runnel.testing import request, sse_events, wait_until

GATED = Path(__file__).resolve().parents[1] / "apps" / "gated.py"
HEADER = "X-Request-Deadline"
HELD = {"model": "echo", "prompt": "a b c", "max_tokens": 60, "ignore_eos": True}  # 60 x 50 ms: 3 s at least
SLOW_ECHO = {"backend": "echo", "pace_ms": 50, "slots": 1}


def post(port: int, path: str, body, deadline: str | None = None, headers=()):
    extra = [(HEADER, deadline)] if deadline is not None else []
    return request(port, "POST", path, body=orjson.dumps(body), headers=[*extra, *headers])


def echo_stats(port: int) -> dict:
    return request(port, "GET", "/stats").json()["apps"]["echo"]


def samples(port: int) -> dict[tuple[str, frozenset], float]:
    reply = request(port, "GET", "/metrics")
    assert reply.status == 200, reply.body
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(reply.body.decode()) for sample in family.samples}


def generations(port: int, reason: str) -> float:
    return samples(port).get(("runnel_generation_requests_total",
                              frozenset({"app": "echo", "finish_reason": reason}.items())), 0.0)


@pytest.fixture
def slow_echo(start_server):
    return start_server({"apps": {"echo": SLOW_ECHO}})


@contextlib.contextmanager
def slot_held(port: int):
    """The echo app's one slot busy with a 3 s generation; yields its future."""
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(post, port, "/v1/completions", HELD)
        wait_until(lambda: echo_stats(port)["started"] == 1)
        yield pool, first
        assert first.result().status == 200


# -- sync generations ------------------------------------------------------------------------


def test_a_request_still_waiting_at_its_deadline_is_504_and_never_reaches_the_model(slow_echo):
    port = slow_echo.port
    with slot_held(port) as (pool, first):
        late = pool.submit(post, port, "/v1/completions", {**HELD, "max_tokens": 3}, "0.3")
        wait_until(lambda: echo_stats(port)["generating"] == 2)  # admitted, waiting for the slot
        patient = pool.submit(post, port, "/v1/completions", {**HELD, "max_tokens": 3})
        reply = late.result()
        assert reply.status == 504, reply.body
        assert reply.header(b"retry-after") is None  # its client has given up: nothing to retry
        error = reply.json()["error"]
        assert (error["type"], error["code"]) == ("timeout_error", "deadline_exceeded")
        assert "deadline" in error["message"]
        assert patient.result().status == 200  # no deadline: it waited its turn and ran
    # The first and the patient request reached the model; the late one never did.
    assert echo_stats(port)["started"] == 2
    assert generations(port, "expired") == 1 and generations(port, "length") == 2


def test_the_servers_max_queue_wait_is_the_deadline_of_a_request_without_one(start_server):
    # [server] max_queue_wait: a request sending no X-Request-Deadline gets it; one that sends
    # its own (longer) deadline keeps that instead.
    port = start_server({"server": {"max_queue_wait": 0.3}, "apps": {"echo": SLOW_ECHO}}).port
    with slot_held(port) as (pool, first):
        defaulted = pool.submit(post, port, "/v1/completions", {**HELD, "max_tokens": 3})
        wait_until(lambda: echo_stats(port)["generating"] == 2)
        patient = pool.submit(post, port, "/v1/completions", {**HELD, "max_tokens": 3}, "60")
        reply = defaulted.result()
        assert reply.status == 504 and reply.json()["error"]["code"] == "deadline_exceeded", reply.body
        assert "max_queue_wait" in reply.json()["error"]["message"]
        assert patient.result().status == 200
    assert echo_stats(port)["started"] == 2  # the first (started before its 0.3 s passed) and the patient one


def test_a_deadline_already_past_is_refused_at_once(slow_echo):
    port = slow_echo.port
    with slot_held(port) as (_, first):
        reply = post(port, "/v1/chat/completions", {"model": "echo", "messages": [{"role": "user", "content": "hi"}]},
                     "0")
        assert reply.status == 504 and reply.json()["error"]["code"] == "deadline_exceeded", reply.body
        assert not first.done()  # answered while the slot was still busy: it did not wait for it
    assert echo_stats(port)["started"] == 1
    assert generations(port, "expired") == 1


def test_the_anthropic_surface_answers_in_its_own_shape(slow_echo):
    port = slow_echo.port
    body = {"model": "echo", "max_tokens": 3, "messages": [{"role": "user", "content": "hi there"}]}
    with slot_held(port) as (pool, _):
        late = pool.submit(post, port, "/v1/messages", body, "0.3")
        reply = late.result()
    assert reply.status == 504, reply.body
    assert reply.json() == {"type": "error", "error": {"type": "timeout_error", "message": reply.json()["error"]
                                                       ["message"]}}
    bad = post(port, "/v1/messages", body, "soon")
    assert bad.status == 400 and bad.json()["error"]["type"] == "invalid_request_error", bad.body
    assert HEADER in bad.json()["error"]["message"]
    assert echo_stats(port)["started"] == 1


def test_a_stream_waiting_at_its_deadline_ends_with_the_error_event(slow_echo):
    port = slow_echo.port
    with slot_held(port) as (pool, _):
        reply = pool.submit(post, port, "/v1/completions", {**HELD, "stream": True}, "0.3").result()
    # The stream's head went out when the request was admitted; the drop is its last event.
    assert reply.status == 200
    events = list(sse_events(reply.body))
    assert orjson.loads(events[-1])["error"]["code"] == "deadline_exceeded", events
    assert echo_stats(port)["started"] == 1


@pytest.mark.parametrize("value", ["abc", "-1", "1e3", "inf", "nan", "", "604801", "1.5s", "0x10", "1.1234567"])
def test_a_bad_deadline_is_a_400_naming_the_header(echo_server, value):
    body = {"model": "echo", "prompt": "hello", "max_tokens": 2}
    reply = post(echo_server.port, "/v1/completions", body, value)
    assert reply.status == 400, (value, reply.body)
    error = reply.json()["error"]
    assert (error["param"], error["code"]) == (HEADER, "invalid_deadline")


def test_a_generous_deadline_changes_nothing(echo_server):
    body = {"model": "echo", "prompt": "hello world", "max_tokens": 2}
    for value in ("30", "2.5", "604800"):
        reply = post(echo_server.port, "/v1/completions", body, value)
        assert reply.status == 200 and reply.json()["choices"][0]["text"] == "hello world", reply.body
    twice = request(echo_server.port, "POST", "/v1/completions", body=orjson.dumps(body),
                    headers=[(HEADER, "5"), (HEADER, "6")])
    assert twice.status == 400 and twice.json()["error"]["param"] == HEADER


@pytest.fixture
def every_surface(start_server):
    return start_server({"server": {"runs_path": ""},  # /v1/responses stores its answers: in memory here
                         "apps": {"echo": {**SLOW_ECHO, "baseten": {"model_id": "abcd1234"}}}})


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": "echo", **CHAT}),
    ("/v1/completions", {"model": "echo", "prompt": "hi", "max_tokens": 2}),
    ("/v1/responses", {"model": "echo", "input": "hi", "max_output_tokens": 2}),
    ("/v2/echo/openai/v1/chat/completions", {"model": "echo", **CHAT}),
    ("/v1/direct/chat/completions", {"model": "baseten/abcd1234", **CHAT}),
    ("/v4/p-test/echo/run", {"model": "echo", **CHAT}),
    ("/v4/p-test/echo/run/chat/completions", {"model": "echo", **CHAT}),
])
def test_every_generating_surface_takes_the_deadline(every_surface, path, body):
    port = every_surface.port
    expired = post(port, path, body, "0")
    assert expired.status == 504, expired.body
    assert expired.json()["error"]["code"] == "deadline_exceeded"
    assert post(port, path, body, "oops").status == 400
    assert post(port, path, body, "60").status == 200
    assert echo_stats(port)["started"] == 1


def test_the_access_log_shows_the_expired_request(start_server, caplog):
    import json
    import logging

    server = start_server({"server": {"access_log": "json"}, "apps": {"echo": SLOW_ECHO}})
    caplog.set_level(logging.INFO, logger="runnel.access")
    reply = post(server.port, "/v1/completions", {**HELD, "max_tokens": 1}, "0", headers=[("x-request-id", "late-1")])
    assert reply.status == 504
    wait_until(lambda: any("late-1" in record.getMessage() for record in caplog.records))
    fields = json.loads(next(record.getMessage() for record in caplog.records if "late-1" in record.getMessage()))
    assert (fields["status"], fields["app"], fields["finish_reason"]) == (504, "echo", "expired")


# -- runs ---------------------------------------------------------------------------------------


def gated(**options) -> dict:
    return {"backend": "python", "module": str(GATED), "functions": {"public": True}, **options}


def submit(port: int, function: str, body: dict, deadline: str | None = None):
    return post(port, f"/v4/p-test/lab/{function}?async=true", body, deadline)


def run_status(port: int, run_id: str) -> dict:
    return request(port, "GET", f"/v4/p-test/lab/runs/{run_id}").json()


def stored(path: Path, run_id: str) -> dict:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.row_factory = sqlite3.Row
        return dict(conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone())


def accepted(reply) -> str:
    assert reply.status == 202, reply.body
    return reply.json()["run_id"]


def test_a_queued_run_past_its_deadline_is_timed_out_and_never_run(start_server, tmp_path):
    path, gate = tmp_path / "runs.sqlite3", tmp_path / "gate"
    server = start_server({"server": {"runs_path": str(path), "runs_workers": 1}, "apps": {"lab": gated()}})
    port = server.port
    try:
        held = accepted(submit(port, "hold", {"gate": str(gate), "tag": "held"}))
        wait_until(lambda: run_status(port, held)["status"] == "running")
        late = accepted(submit(port, "quick", {"tag": "late"}, "0.3"))
        patient = accepted(submit(port, "quick", {"tag": "patient"}))
        # The sweep expires it while the only worker is still held: it does not wait for one.
        body = wait_until(lambda: (b := run_status(port, late))["status"] != "queued" and b)
        assert run_status(port, held)["status"] == "running"
    finally:
        gate.write_text("")
    assert body["status"] == "failed" and body["status_code"] == 504, body
    assert body["error"]["code"] == "deadline_exceeded"
    row = stored(path, late)
    assert (row["state"], row["attempts"], row["started_at"]) == ("timed_out", 0, None)
    assert row["deadline"] is not None
    assert wait_until(lambda: (b := run_status(port, patient))["status"] == "succeeded" and b)["result"] == "patient"
    metrics = samples(port)
    assert metrics[("runnel_runs_finished_total", frozenset({"app": "lab", "state": "timed_out"}.items()))] == 1


def test_a_run_whose_deadline_passes_while_the_server_is_down_never_runs(start_server, tmp_path):
    path, gate = tmp_path / "runs.sqlite3", tmp_path / "gate"
    config = {"server": {"runs_path": str(path), "runs_workers": 1}, "apps": {"lab": gated()}}
    first = start_server(config)
    try:
        held = accepted(submit(first.port, "hold", {"gate": str(gate), "tag": "held"}))
        wait_until(lambda: run_status(first.port, held)["status"] == "running")
        late = accepted(submit(first.port, "quick", {"tag": "late"}, "1"))
        assert stored(path, late)["state"] == "queued"
        first.stop()
        assert stored(path, late)["state"] == "queued"  # recorded with its deadline, across the stop
        wait_until(lambda: time.time() > stored(path, late)["deadline"], timeout=5)
        second = start_server(config)
        body = wait_until(lambda: (b := run_status(second.port, late))["status"] != "queued" and b)
    finally:
        gate.write_text("")
    assert (body["status"], body["error"]["code"]) == ("failed", "deadline_exceeded"), body
    row = stored(path, late)
    assert (row["state"], row["attempts"], row["started_at"]) == ("timed_out", 0, None)


def test_an_async_submit_whose_deadline_is_past_or_bad_records_nothing(start_server, tmp_path):
    path = tmp_path / "runs.sqlite3"
    server = start_server({"server": {"runs_path": str(path)}, "apps": {"lab": gated()}})
    reply = submit(server.port, "quick", {"tag": "x"}, "0")
    assert reply.status == 504 and reply.json()["error"]["code"] == "deadline_exceeded", reply.body
    reply = submit(server.port, "quick", {"tag": "x"}, "later")
    assert reply.status == 400 and reply.json()["error"]["param"] == HEADER, reply.body
    assert not path.exists() or not sqlite3.connect(path).execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    ok = accepted(submit(server.port, "quick", {"tag": "x"}, "60"))
    assert wait_until(lambda: (b := run_status(server.port, ok))["status"] == "succeeded" and b)["result"] == "x"


def test_a_background_response_still_queued_at_its_deadline_fails_unrun(start_server, tmp_path):
    gate = tmp_path / "gate"
    server = start_server({"server": {"runs_path": "", "runs_workers": 1},
                           "apps": {"echo": SLOW_ECHO, "lab": gated()}})
    port = server.port

    def create(text: str, deadline: str | None = None) -> str:
        body = {"model": "echo", "input": text, "max_output_tokens": 8, "background": True}
        reply = post(port, "/v1/responses", body, deadline)
        assert reply.status == 200 and reply.json()["status"] == "queued", reply.body
        return reply.json()["id"]

    def read(response_id: str) -> dict:
        return request(port, "GET", f"/v1/responses/{response_id}").json()

    try:
        held = accepted(submit(port, "hold", {"gate": str(gate), "tag": "held"}))  # the runner's one worker
        wait_until(lambda: run_status(port, held)["status"] == "running")
        late = create("too late", "0.3")
        patient = create("in good time")
        body = wait_until(lambda: (b := read(late))["status"] != "queued" and b)
        assert read(patient)["status"] == "queued"  # expired by the sweep, not when the worker came free
    finally:
        gate.write_text("")
    assert body["status"] == "failed" and "deadline" in body["error"]["message"], body
    assert wait_until(lambda: (b := read(patient))["status"] == "completed" and b)["output"]
    assert echo_stats(port)["started"] == 1  # the patient response alone reached the model


def test_runpod_ttl_and_deadline(start_server, tmp_path):
    path, gate = tmp_path / "runs.sqlite3", tmp_path / "gate"
    server = start_server({"server": {"runs_path": str(path), "runs_workers": 1},
                           "apps": {"lab": {**gated(), "runpod": {"handler": "quick"}}}})
    port = server.port
    for policy, param in [({"ttl": 9999}, "policy.ttl"), ({"ttl": 7 * 24 * 3600 * 1000 + 1}, "policy.ttl"),
                          ({"ttl": "10s"}, "policy.ttl"), ({"lowPriority": "yes"}, "policy.lowPriority")]:
        reply = post(port, "/v2/lab/run", {"input": {"tag": "x"}, "policy": policy})
        assert reply.status == 400 and param in reply.json()["error"], (policy, reply.body)
    try:
        held = accepted(submit(port, "hold", {"gate": str(gate), "tag": "held"}))
        wait_until(lambda: run_status(port, held)["status"] == "running")
        before = time.time()
        reply = post(port, "/v2/lab/run", {"input": {"tag": "ttl"}, "policy": {"ttl": 10_000, "lowPriority": True}})
        assert reply.status == 200 and reply.json()["status"] == "IN_QUEUE", reply.body
        ttl_job = reply.json()["id"]
        assert before + 10 <= stored(path, ttl_job)["deadline"] <= time.time() + 10  # RunPod's: from submission
        late = post(port, "/v2/lab/run", {"input": {"tag": "late"}, "policy": {"ttl": 60_000}}, "0.3").json()["id"]
        job = wait_until(lambda: (b := request(port, "GET", f"/v2/lab/status/{late}").json())["status"] != "IN_QUEUE"
                         and b)
        assert job["status"] == "TIMED_OUT" and "deadline" in job["error"] and job["executionTime"] == 0, job
    finally:
        gate.write_text("")
    ttl_status = wait_until(lambda: (b := request(port, "GET", f"/v2/lab/status/{ttl_job}").json())["status"]
                            == "COMPLETED" and b)
    assert ttl_status["output"] == "ttl"  # claimed within its ttl: it ran
    assert stored(path, late)["started_at"] is None


@pytest.fixture(params=["sqlite", "redis"])
def any_store(request, tmp_path):
    """A fresh store of each kind: a SQLite file, and Redis (a real redis-server)."""
    from runnel.runs.sqlite import SQLiteRunStore

    if request.param == "sqlite":
        return lambda: SQLiteRunStore(str(tmp_path / "runs.sqlite3"))
    from runnel.runs.redis import RedisRunStore

    url = request.getfixturevalue("redis_url")
    return lambda: RedisRunStore(url, retention=60)


def test_a_store_expires_queued_runs_past_their_deadline_once(any_store):
    import asyncio

    from runnel.generation import deadline_exceeded
    from runnel.runs.store import Run

    async def main():
        store = any_store()
        await store.open(create=True)
        try:
            now = time.time()
            runs = {name: Run(id=name, surface="cortex", app="lab", function="quick", input={}, created_at=now,
                              deadline=deadline)
                    for name, deadline in (("past", now - 1), ("future", now + 60), ("none", None),
                                           ("claimed", now - 1))}
            for run in runs.values():
                await store.insert(run)
            assert await store.claim("claimed", "owner-1", 30) is not None
            first = await store.expire(time.time(), deadline_exceeded())
            again = await store.expire(time.time(), deadline_exceeded())
            states = {name: (await store.get(name)).state for name in runs}
            queued = await store.queued()
            expired = await store.get("past")
            return first, again, states, queued, expired
        finally:
            await store.close()

    first, again, states, queued, expired = asyncio.run(main())
    assert first == ["past"] and again == []
    assert states == {"past": "timed_out", "future": "queued", "none": "queued", "claimed": "running"}
    assert sorted(queued) == ["future", "none"]
    assert (expired.error["status"], expired.error["code"]) == (504, "deadline_exceeded")
    assert expired.finished_at is not None and expired.started_at is None and expired.attempts == 0


def test_an_older_sqlite_file_gains_the_deadline_column(tmp_path):
    import asyncio

    from runnel.runs.sqlite import SQLiteRunStore

    path = tmp_path / "old.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE runs (id TEXT PRIMARY KEY, surface TEXT NOT NULL, app TEXT NOT NULL, "
                     "function TEXT NOT NULL, input BLOB NOT NULL, state TEXT NOT NULL, webhook TEXT, "
                     "timeout_ms INTEGER, output BLOB, error BLOB, streamed INTEGER NOT NULL DEFAULT 0, "
                     "attempts INTEGER NOT NULL DEFAULT 0, webhook_pending INTEGER NOT NULL DEFAULT 0, "
                     "created_at REAL NOT NULL, started_at REAL, finished_at REAL, run_time_ms INTEGER, "
                     "owner TEXT, lease_until REAL, principal TEXT NOT NULL DEFAULT 'anonymous', "
                     "idempotency_key TEXT, request_hash TEXT)")
        conn.execute("INSERT INTO runs (id, surface, app, function, input, state, created_at) "
                     "VALUES ('old', 'cortex', 'lab', 'quick', '{}', 'queued', 1)")
        conn.commit()

    async def main():
        store = SQLiteRunStore(str(path))
        assert await store.open(create=False)
        try:
            return await store.get("old"), await store.expire(time.time(), _error())
        finally:
            await store.close()

    def _error():
        from runnel.generation import deadline_exceeded
        return deadline_exceeded()

    run, expired = asyncio.run(main())
    assert run.deadline is None and run.state == "queued" and expired == []


def test_on_redis_a_queued_run_past_its_deadline_is_timed_out_for_every_server(start_server, redis_url, tmp_path):
    gate = tmp_path / "gate"
    config = {"server": {"runs": redis_url, "runs_workers": 1}, "apps": {"lab": gated()}}
    first, second = start_server(config), start_server(config)
    try:
        # Hold both servers' one worker, so that the next run stays queued on Redis.
        held = [accepted(submit(server.port, "hold", {"gate": str(gate), "tag": "held"}))
                for server in (first, second)]
        wait_until(lambda: all(run_status(first.port, run_id)["status"] == "running" for run_id in held))
        late = accepted(submit(first.port, "quick", {"tag": "late"}, "0.3"))
        body = wait_until(lambda: (b := run_status(second.port, late))["status"] != "queued" and b)
        assert all(run_status(first.port, run_id)["status"] == "running" for run_id in held)
    finally:
        gate.write_text("")
    assert (body["status"], body["status_code"], body["error"]["code"]) == ("failed", 504, "deadline_exceeded")
    assert run_status(first.port, late) == body
    wait_until(lambda: all(run_status(first.port, run_id)["status"] == "succeeded" for run_id in held))
    run = redis_run(redis_url, late)
    assert (run.state, run.attempts, run.started_at) == ("timed_out", 0, None)  # never claimed, never run


def redis_run(url: str, run_id: str):
    import asyncio

    from runnel.runs.redis import RedisRunStore

    async def main():
        store = RedisRunStore(url, retention=60)
        await store.open(create=False)
        try:
            return await store.get(run_id)
        finally:
            await store.close()

    return asyncio.run(main())
