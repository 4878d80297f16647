"""Queue deadlines (``X-Request-Deadline: <seconds>``, RunPod's ``policy.ttl``): work still
waiting when its deadline passes is dropped before it reaches the model.

Sync generations: an echo app with one slot (``slots = 1``) and a slow pace keeps a
second request waiting behind the first (40 tokens at 50 ms: at least 2 s) while its
0.3 s deadline passes; it is answered 504 in the surface's own shape and its generator
never starts (echo's ``/stats`` ``started``), while a request without a deadline queued
behind it still runs. The margins are wide (0.3 s against 2 s of work held by sleeps), so
a loaded machine only makes the held work longer.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runnel.testing import request, sse_events, wait_until

GATED = Path(__file__).resolve().parents[1] / "apps" / "gated.py"
HEADER = "X-Request-Deadline"
HELD = {"model": "echo", "prompt": "a b c", "max_tokens": 40, "ignore_eos": True}  # 40 x 50 ms: 2 s at least
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
    """The echo app's one slot busy with a 2 s generation; yields its future."""
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
