"""Baseten's async inference API: ``async_predict``, ``/async_request/{id}``, ``async_queue_status``.

A real server with a Truss-style function app (tests/apps/truss.py, ``predict(model_input)``),
a gated function app (tests/apps/gated.py: a ``/v4`` run held on a gate file keeps the one
runner worker busy, so Baseten requests behind it stay QUEUED until the test releases it) and
an echo model app. Results go to a webhook receiver on loopback (test_webhooks.Receiver),
signed ``X-BASETEN-SIGNATURE: v1=<HMAC-SHA256(secret, body)>``. Expiry is driven by an
``X-Request-Deadline`` of 0.3 s (Baseten's own ``max_time_in_queue_seconds`` is 10 s at
least: its stored deadline is checked instead of waited for); no assert depends on timing.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import logging
import sqlite3
import time
from pathlib import Path

import orjson
import pytest
from test_webhooks import Receiver

from runnel.testing import request, wait_until

APPS = Path(__file__).resolve().parents[1] / "apps"
SECRET = "whsec_baseten-test"
CHAT = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 2}


@pytest.fixture
def receiver():
    made = Receiver()
    yield made
    made.close()


@pytest.fixture
def delivered(caplog):
    """``delivered(request_id)``: whether the runner has ended that request's webhook delivery."""
    caplog.set_level(logging.INFO, logger="runnel.webhooks")

    def ended(request_id: str) -> bool:
        return any(request_id in r.getMessage() and ("delivered" in r.getMessage() or "giving up" in r.getMessage())
                   for r in list(caplog.records) if r.name == "runnel.webhooks")

    return ended


def config(tmp_path, **server) -> dict:
    python = {"backend": "python", "functions": {"public": True}}
    return {
        "server": {"runs_path": str(tmp_path / "runs.sqlite3"), "runs_workers": 1, "webhook_secret": SECRET,
                   "webhook_allowed_hosts": ["127.0.0.1"], "webhook_retry_delay": 0.05, **server},
        "apps": {
            "truss": {**python, "module": str(APPS / "truss.py"), "baseten": {"model_id": "truss01"}},
            "lab": {**python, "module": str(APPS / "gated.py"),
                    "baseten": {"model_id": "lab01", "deployment_id": "v1", "function": "quick"}},
            "echo": {"backend": "echo", "baseten": {"model_id": "echo01", "deployment_id": "d1"}},
        },
    }


@pytest.fixture
def server(start_server, tmp_path):
    return start_server(config(tmp_path))


def post(port: int, path: str, body, headers=()):
    return request(port, "POST", path, body=orjson.dumps(body), headers=list(headers))


def submitted(reply) -> str:
    assert reply.status == 201, reply.body
    return reply.json()["request_id"]


def status(port: int, model_id: str, request_id: str) -> dict:
    reply = request(port, "GET", f"/model-{model_id}/async_request/{request_id}")
    assert reply.status == 200, reply.body
    return reply.json()


def by_host(port: int, method: str, path: str, host: str, body=None) -> tuple[int, dict]:
    """A request whose Host header names the model, as Baseten's host names do."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=None if body is None else orjson.dumps(body), headers={"Host": host})
        response = conn.getresponse()
        return response.status, orjson.loads(response.read())
    finally:
        conn.close()


def verify(hook: dict) -> dict:
    """The webhook's payload, after checking Baseten's signature over the whole body."""
    expected = hmac.new(SECRET.encode(), hook["body"], hashlib.sha256).hexdigest()
    assert hook["headers"]["x-baseten-signature"] == f"v1={expected}"
    return orjson.loads(hook["body"])


def stored(path: Path, run_id: str) -> dict:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.row_factory = sqlite3.Row
        return dict(conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone())


# -- results, to the webhook ------------------------------------------------------------------------


def test_a_function_app_predicts_and_the_signed_result_goes_to_the_webhook(server, receiver, delivered):
    reply = post(server.port, "/model-truss01/production/async_predict",
                 {"model_input": {"prompt": "hi"}, "webhook_endpoint": receiver.url("/hook?x=1")})
    request_id = submitted(reply)
    wait_until(lambda: delivered(request_id))
    [hook] = receiver.requests
    assert hook["path"] == "/hook?x=1"
    payload = verify(hook)
    assert set(payload) == {"request_id", "model_id", "deployment_id", "type", "time", "data", "errors"}
    assert (payload["request_id"], payload["model_id"], payload["deployment_id"]) == (request_id, "truss01", "truss")
    assert payload["type"] == "async_request_completed" and payload["time"].endswith("Z")
    assert payload["data"] == {"echo": {"prompt": "hi"}} and payload["errors"] == []
    body = status(server.port, "truss01", request_id)
    assert body["status"] == "SUCCEEDED" and body["webhook_status"] == "SUCCEEDED" and body["errors"] == []
    assert (body["model_id"], body["deployment_id"]) == ("truss01", "truss")
    assert "data" not in body and "output" not in body  # results go only to the webhook, as Baseten's


def test_a_failing_prediction_is_failed_with_its_error_in_the_webhook(server, receiver, delivered):
    request_id = submitted(post(server.port, "/model-truss01/environments/production/async_predict",
                                {"model_input": "fail", "webhook_endpoint": receiver.url()}))
    wait_until(lambda: delivered(request_id))
    payload = verify(receiver.requests[0])
    assert payload["data"] is None
    [error] = payload["errors"]
    assert error["code"] == "MODEL_PREDICT_ERROR" and "asked to fail" in error["message"]
    assert status(server.port, "truss01", request_id)["status"] == "FAILED"


def test_a_model_app_named_by_the_host_header_runs_a_chat_body(server, receiver, delivered):
    host = "model-echo01.api.baseten.co"
    code, body = by_host(server.port, "POST", "/deployment/d1/async_predict", host,
                         {"model_input": CHAT, "webhook_endpoint": receiver.url(), "priority": 2,
                          "inference_retry_config": {"max_attempts": 3, "initial_delay_ms": 0, "max_delay_ms": 5000}})
    assert code == 201, body
    request_id = body["request_id"]
    wait_until(lambda: delivered(request_id))
    payload = verify(receiver.requests[0])
    assert payload["data"]["object"] == "chat.completion" and payload["errors"] == []
    assert (payload["model_id"], payload["deployment_id"]) == ("echo01", "d1")
    code, body = by_host(server.port, "GET", f"/async_request/{request_id}", host)
    assert code == 200 and body["status"] == "SUCCEEDED", body
    # Another model's host does not find it.
    code, body = by_host(server.port, "GET", f"/async_request/{request_id}", "model-truss01.api.baseten.co")
    assert code == 404 and "error" in body


# -- the queue: cancel, expiry, max_time_in_queue_seconds -------------------------------------------


def test_queued_requests_cancel_expire_and_keep_their_queue_deadline(start_server, tmp_path, receiver, delivered):
    server = start_server(config(tmp_path))
    port, gate, path = server.port, tmp_path / "gate", tmp_path / "runs.sqlite3"
    held = request(port, "POST", "/v4/p/lab/hold?async=true", body=orjson.dumps({"gate": str(gate)})).json()["run_id"]
    try:
        wait_until(lambda: request(port, "GET", f"/v4/p/lab/runs/{held}").json()["status"] == "running")
        deployment = "/model-lab01/deployment/v1"
        before = time.time()
        patient = submitted(post(port, f"{deployment}/async_predict",
                                 {"model_input": {"tag": "patient"}, "max_time_in_queue_seconds": 30}))
        default = submitted(post(port, f"{deployment}/async_predict", {"model_input": {"tag": "default"}}))
        doomed = submitted(post(port, f"{deployment}/async_predict", {"model_input": {"tag": "x"}}))
        late = submitted(post(port, f"{deployment}/async_predict",
                              {"model_input": {"tag": "late"}, "webhook_endpoint": receiver.url()},
                              [("X-Request-Deadline", "0.3")]))
        assert before + 30 <= stored(path, patient)["deadline"] <= time.time() + 30
        assert before + 600 <= stored(path, default)["deadline"] <= time.time() + 600  # Baseten's default
        queue = request(port, "GET", f"{deployment}/async_queue_status").json()
        assert set(queue) == {"model_id", "deployment_id", "num_queued_requests", "num_in_progress_requests"}
        assert (queue["model_id"], queue["deployment_id"], queue["num_in_progress_requests"]) == ("lab01", "v1", 0)
        assert queue["num_queued_requests"] >= 3  # "late" may have expired already
        # Cancel a queued request: it never runs.
        reply = request(port, "DELETE", f"/model-lab01/async_request/{doomed}")
        assert reply.status == 200 and reply.json() == {"request_id": doomed, "canceled": True,
                                                         "message": reply.json()["message"]}, reply.body
        assert status(port, "lab01", doomed)["status"] == "CANCELED"
        # Past its queue deadline while the worker is held: EXPIRED, and the webhook says so.
        body = wait_until(lambda: (b := status(port, "lab01", late))["status"] != "QUEUED" and b)
        assert body["status"] == "EXPIRED" and body["errors"][0]["code"] == "REQUEST_EXPIRED", body
        wait_until(lambda: delivered(late))
        payload = verify(receiver.requests[0])
        assert payload["request_id"] == late and payload["data"] is None
        assert payload["errors"][0]["code"] == "REQUEST_EXPIRED"
        assert status(port, "lab01", patient)["status"] == "QUEUED"
    finally:
        gate.write_text("")
    wait_until(lambda: status(port, "lab01", patient)["status"] == "SUCCEEDED")
    assert stored(path, late)["started_at"] is None and stored(path, doomed)["started_at"] is None
    # Only QUEUED requests can be canceled: a finished one answers canceled false.
    reply = request(port, "DELETE", f"/model-lab01/async_request/{patient}")
    assert reply.status == 200 and reply.json()["canceled"] is False and "SUCCEEDED" in reply.json()["message"]
    assert status(port, "lab01", patient)["status"] == "SUCCEEDED"


# -- bad requests, in Baseten's error shape -------------------------------------------------------------


@pytest.mark.parametrize("body, words", [
    ({}, "model_input"),
    ([1], "model_input"),
    ({"model_input": 1, "priority": 3}, "priority"),
    ({"model_input": 1, "priority": "0"}, "priority"),
    ({"model_input": 1, "max_time_in_queue_seconds": 9}, "max_time_in_queue_seconds"),
    ({"model_input": 1, "max_time_in_queue_seconds": 259201}, "max_time_in_queue_seconds"),
    ({"model_input": 1, "max_time_in_queue_seconds": 60.5}, "max_time_in_queue_seconds"),
    ({"model_input": 1, "inference_retry_config": {"max_attempts": 11}}, "max_attempts"),
    ({"model_input": 1, "inference_retry_config": {"initial_delay_ms": -1}}, "initial_delay_ms"),
    ({"model_input": 1, "inference_retry_config": {"max_delay_ms": 60001}}, "max_delay_ms"),
    ({"model_input": 1, "inference_retry_config": {"tries": 2}}, "tries"),
    ({"model_input": 1, "inference_retry_config": 3}, "inference_retry_config"),
    ({"model_input": 1, "webhook_endpoint": "http://example.com/hook"}, "not allowed"),
    ({"model_input": 1, "webhook": "http://127.0.0.1/hook"}, "webhook"),
])
def test_a_bad_body_is_a_400_and_records_nothing(server, body, words):
    reply = post(server.port, "/model-truss01/production/async_predict", body)
    assert reply.status == 400 and set(reply.json()) == {"error"} and words in reply.json()["error"], reply.body


@pytest.mark.parametrize("model_input, words", [
    ({**CHAT, "stream": True}, "stream"),
    ({"messages": "hello"}, "messages"),
    ("hello", "model_input"),
])
def test_a_model_app_checks_its_openai_body_before_queueing(server, model_input, words):
    reply = post(server.port, "/model-echo01/production/async_predict", {"model_input": model_input})
    assert reply.status == 400 and words in reply.json()["error"], reply.body


@pytest.mark.parametrize("path", [
    "/model-nope/production/async_predict",
    "/model-truss01/deployment/nope/async_predict",
    "/model-truss01/development/async_predict",
    "/model-truss01/environments/staging/async_predict",
    "/production/async_predict",  # no model named: neither a path prefix nor a model- host
])
def test_an_unknown_model_or_deployment_is_a_404(server, path):
    reply = post(server.port, path, {"model_input": 1})
    assert reply.status == 404 and set(reply.json()) == {"error"}, reply.body


def test_requests_belong_to_their_submitter(start_server, tmp_path):
    keys = ["first-key-0001", "second-key-002"]
    cfg = config(tmp_path)
    cfg["auth"] = {"kind": "api_key", "keys": keys}
    port = start_server(cfg).port
    first, second = [("authorization", f"Bearer {keys[0]}")], [("authorization", f"Bearer {keys[1]}")]
    request_id = submitted(post(port, "/model-truss01/production/async_predict", {"model_input": 1}, first))
    mine = request(port, "GET", f"/model-truss01/async_request/{request_id}", headers=first)
    assert mine.status == 200, mine.body
    for method in ("GET", "DELETE"):
        theirs = request(port, method, f"/model-truss01/async_request/{request_id}", headers=second)
        assert theirs.status == 404 and set(theirs.json()) == {"error"}, theirs.body


def test_an_idempotency_key_gets_the_same_request(server):
    headers = [("Idempotency-Key", "once")]
    first = submitted(post(server.port, "/model-truss01/production/async_predict", {"model_input": 1}, headers))
    again = submitted(post(server.port, "/model-truss01/production/async_predict", {"model_input": 1}, headers))
    assert again == first
    other = post(server.port, "/model-truss01/production/async_predict", {"model_input": 2}, headers)
    assert other.status == 422 and "error" in other.json()
