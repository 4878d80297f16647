"""GET /metrics after real requests: every counter and histogram moved by exactly what was sent.

The scrapes are parsed with prometheus_client's own parser (what a Prometheus server
reads); each test takes a scrape before and after its requests and compares the two, so
a metric that counts twice, misses a request, or counts per token instead of per
request fails. The /metrics request of the first scrape is itself counted by the
second: it is finished (reported) before its last byte reaches the client.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runnel.testing import connect, recv_until, request, send_post, sse_events, wait_until
from runnel.testing.pytest_plugin import TINY_CONFIG

GATED = Path(__file__).resolve().parents[1] / "apps" / "gated.py"


class Scrape:
    """One /metrics answer, parsed: sample values by (name, labels)."""

    def __init__(self, port: int, headers=()) -> None:
        reply = request(port, "GET", "/metrics", headers=headers)
        assert reply.status == 200, reply.body
        assert reply.header(b"content-type").startswith(b"text/plain; version=0.0.4")
        self.text = reply.body.decode()
        self.samples: dict[tuple[str, frozenset], float] = {}
        for family in text_string_to_metric_families(self.text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}


def moved(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


def post(port: int, path: str, body, headers=()):
    return request(port, "POST", path, body=orjson.dumps(body), headers=[("content-type", "application/json"),
                                                                           *headers])


def stream(port: int, path: str, body) -> list[dict]:
    reply = post(port, path, {**body, "stream": True})
    assert reply.status == 200, reply.body
    return [json.loads(event) for event in sse_events(reply.body) if event != b"[DONE]"]


HTTP = "runnel_http_requests_total"
GEN = "runnel_generation_requests_total"


def test_json_and_streamed_generations_and_errors_are_counted_exactly(start_server):
    server = start_server({"apps": {"echo": {"backend": "echo"}}})
    port = server.port
    before = Scrape(port)
    prompt_tokens = generated = 0
    for prompt, max_tokens in (("one two three", 2), ("a b c d e", 3)):  # JSON
        reply = post(port, "/v1/completions", {"model": "echo", "prompt": prompt, "max_tokens": max_tokens})
        assert reply.status == 200, reply.body
        prompt_tokens += reply.json()["usage"]["prompt_tokens"]
        generated += reply.json()["usage"]["completion_tokens"]
    chunks = stream(port, "/v1/chat/completions", {"model": "echo", "max_tokens": 4, "stream_options":
                                                   {"include_usage": True},
                                                   "messages": [{"role": "user", "content": "x y z w v"}]})
    prompt_tokens += chunks[-1]["usage"]["prompt_tokens"]
    generated += chunks[-1]["usage"]["completion_tokens"]
    assert request(port, "GET", "/no/such/path").status == 404
    assert post(port, "/v1/completions", {"model": "nope", "prompt": "x"}).status == 404
    after = Scrape(port)

    assert moved(before, after, HTTP, route="/v1/completions", method="POST", status="2xx") == 2
    assert moved(before, after, HTTP, route="/v1/completions", method="POST", status="4xx") == 1
    assert moved(before, after, HTTP, route="/v1/chat/completions", method="POST", status="2xx") == 1
    assert moved(before, after, HTTP, route="unmatched", method="GET", status="4xx") == 1
    assert moved(before, after, HTTP, route="/metrics", method="GET", status="2xx") == 1
    duration = "runnel_http_request_duration_seconds_count"
    assert moved(before, after, duration, route="/v1/completions", method="POST") == 3
    assert moved(before, after, duration, route="/v1/chat/completions", method="POST") == 1
    # Whole responses are counted in bytes, streams are not.
    assert moved(before, after, "runnel_http_response_bytes_total", route="/v1/chat/completions") == 0
    assert moved(before, after, "runnel_http_response_bytes_total", route="/v1/completions") > 0

    assert moved(before, after, GEN, app="echo", finish_reason="length") == 3
    assert moved(before, after, "runnel_generation_prompt_tokens_total", app="echo") == prompt_tokens
    assert moved(before, after, "runnel_generation_generated_tokens_total", app="echo") == generated == 2 + 3 + 4
    for histogram in ("time_to_first_token", "e2e_latency", "inter_token_latency"):
        assert moved(before, after, f"runnel_generation_{histogram}_seconds_count", app="echo") == 3
    # The histogram's buckets add up: +Inf holds every observation.
    assert moved(before, after, "runnel_generation_time_to_first_token_seconds_bucket", app="echo", le="+Inf") == 3
    ttft = moved(before, after, "runnel_generation_time_to_first_token_seconds_sum", app="echo")
    e2e = moved(before, after, "runnel_generation_e2e_latency_seconds_sum", app="echo")
    assert 0 < ttft <= e2e < 5  # both perf_counter (runnel.generation_record)
    assert after.value("runnel_app_ready", app="echo") == 1
    assert after.value("runnel_http_connections_open") >= 1  # the scrape's own
    assert after.value("runnel_http_requests_in_flight") == 1  # the scrape itself
    # The process and platform collectors.
    assert {"process_cpu_seconds_total", "python_info"} <= after.names()


def test_a_429_and_a_client_that_leaves_are_counted_by_their_reason(start_server):
    server = start_server({"apps": {"echo": {"backend": "echo", "pace_ms": 20, "max_generations": 1}}})
    port = server.port
    before = Scrape(port)
    body = {"model": "echo", "prompt": "a b c", "max_tokens": 200, "ignore_eos": True, "stream": True}
    sock = connect(port)
    try:
        send_post(sock, "/v1/completions", body)
        recv_until(sock, b'"text"')  # generating: the only slot is taken
        assert post(port, "/v1/completions", {**body, "stream": False}).status == 429
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    finally:
        sock.close()  # gone mid-stream
    wait_until(lambda: Scrape(port).value(GEN, app="echo", finish_reason="cancelled") == 1)
    after = Scrape(port)
    assert moved(before, after, GEN, app="echo", finish_reason="rejected") == 1
    assert moved(before, after, GEN, app="echo", finish_reason="cancelled") == 1
    assert moved(before, after, HTTP, route="/v1/completions", method="POST", status="4xx") == 2  # the 429, a 499
    # Neither ended: no end-to-end latency; the one that streamed had its first token.
    assert moved(before, after, "runnel_generation_e2e_latency_seconds_count", app="echo") == 0
    assert moved(before, after, "runnel_generation_time_to_first_token_seconds_count", app="echo") == 1
    # The 429 computed nothing: only the admitted one's prompt is counted.
    assert moved(before, after, "runnel_generation_prompt_tokens_total", app="echo") == 3


def test_an_async_run_and_its_webhook_refusal_are_counted(start_server, tmp_path):
    gate = tmp_path / "gate"
    gate.write_text("")
    config = {"server": {"runs_path": ""},
              "apps": {"gated": {"backend": "python", "module": str(GATED), "functions": {"public": True}}}}
    server = start_server(config)
    port = server.port
    before = Scrape(port)
    reply = post(port, "/v4/p/gated/hold?async=true", {"gate": str(gate), "tag": "t"})
    assert reply.status == 202, reply.body
    run_id = reply.json()["run_id"]
    wait_until(lambda: request(port, "GET", f"/v4/p/gated/runs/{run_id}").json()["status"] == "succeeded")
    after = Scrape(port)
    assert moved(before, after, "runnel_runs_accepted_total", app="gated") == 1
    assert moved(before, after, "runnel_runs_finished_total", app="gated", state="succeeded") == 1
    assert moved(before, after, "runnel_run_duration_seconds_count", app="gated") == 1
    assert moved(before, after, HTTP, route="/v4/{project_id}/{app}/{function}", method="POST", status="2xx") == 1
    assert after.value("runnel_runs_queued") == 0 and after.value("runnel_runs_running") == 0
    assert "runnel_webhook_deliveries_total" not in after.names()  # no webhook asked for


def test_tiny_model_generation_and_its_batches(start_server):
    server = start_server(TINY_CONFIG)
    port = server.port
    before = Scrape(port)
    chunks = stream(port, "/v1/completions", {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 12,
                                              "temperature": 0, "ignore_eos": True,
                                              "stream_options": {"include_usage": True}})
    reply = post(port, "/v1/completions", {"model": "tiny", "prompt": "A dog", "max_tokens": 6, "n": 2,
                                           "temperature": 0, "ignore_eos": True})
    assert reply.status == 200, reply.body
    after = Scrape(port)
    generated = chunks[-1]["usage"]["completion_tokens"] + reply.json()["usage"]["completion_tokens"]
    assert generated == 12 + 12
    assert moved(before, after, "runnel_generation_generated_tokens_total", app="tiny") == generated
    assert moved(before, after, GEN, app="tiny", finish_reason="length") == 2
    for histogram in ("time_to_first_token", "e2e_latency", "inter_token_latency"):
        assert moved(before, after, f"runnel_generation_{histogram}_seconds_count", app="tiny") == 2
    itl = moved(before, after, "runnel_generation_inter_token_latency_seconds_sum", app="tiny")
    assert 0 < itl < 2
    # Two batches: one row, then two (n=2): the histogram of rows per batch, read at scrape time.
    assert moved(before, after, "runnel_generation_batch_size_rows_count", app="tiny") == 2
    assert moved(before, after, "runnel_generation_batch_size_rows_sum", app="tiny") == 3
    assert moved(before, after, "runnel_generation_batch_size_rows_bucket", app="tiny", le="1.0") == 1
    assert moved(before, after, "runnel_generation_batch_size_rows_bucket", app="tiny", le="2.0") == 2
    assert after.value("runnel_generation_waiting_rows", app="tiny") == 0
    assert after.value("runnel_generation_running_rows", app="tiny") == 0
    # /stats reads the same counters.
    stats = request(port, "GET", "/stats").json()["apps"]["tiny"]
    assert stats["batches"] == after.value("runnel_generation_batch_size_rows_count", app="tiny")


def test_metrics_need_auth_unless_public(start_server):
    keyed = {"auth": {"kind": "api_key", "keys": ["sekrit-key"]}, "apps": {"echo": {"backend": "echo"}}}
    server = start_server(keyed)
    assert request(server.port, "GET", "/metrics").status == 401
    Scrape(server.port, headers=[("authorization", "Bearer sekrit-key")])
    public = start_server({**keyed, "server": {"metrics_public": True}})
    assert "runnel_http_requests_total" in Scrape(public.port).text


def test_livez_and_readyz_while_loading_serving_and_draining(start_server):
    server = start_server({"server": {"shutdown_drain_delay": 30},
                           "apps": {"echo": {"backend": "echo", "load_seconds": 0.5}}}, ready=False)
    port = server.port
    assert request(port, "GET", "/livez").status == 200  # independent of the models
    assert request(port, "GET", "/readyz").status == 503
    server.wait_ready()
    assert request(port, "GET", "/readyz").status == 200
    stopping = server.call_soon(lambda: __import__("asyncio").ensure_future(server.server.stop(grace=1)))
    wait_until(lambda: request(port, "GET", "/readyz").status == 503)
    reply = request(port, "GET", "/readyz")
    assert reply.json() == {"status": "draining"}
    # Still serving while draining: /health as it always was, and real work.
    assert request(port, "GET", "/health").status == 200
    assert request(port, "GET", "/livez").status == 200
    assert post(port, "/v1/completions", {"model": "echo", "prompt": "a", "max_tokens": 1}).status == 200
    server.call_soon(server.server.force_stop)
    wait_until(stopping.done)


def test_json_access_log_has_the_request_id_the_principal_and_the_generation(start_server, caplog):
    keyed = {"auth": {"kind": "api_key", "keys": ["sekrit-key"]}, "server": {"access_log": "json"},
             "apps": {"echo": {"backend": "echo"}}}
    server = start_server(keyed)
    caplog.set_level(logging.INFO, logger="runnel.access")
    auth = ("authorization", "Bearer sekrit-key")
    reply = post(server.port, "/v1/completions?key=in-the-query", {"model": "echo", "prompt": "a b", "max_tokens": 2},
                 headers=[auth, ("x-request-id", "req-42")])
    assert reply.status == 200
    wait_until(lambda: any("req-42" in record.getMessage() for record in caplog.records))
    line = next(record.getMessage() for record in caplog.records if "req-42" in record.getMessage())
    assert "sekrit" not in line and "in-the-query" not in line  # never a credential, never the query
    fields = json.loads(line)
    assert fields["request_id"] == "req-42" and fields["principal"].startswith("key:")
    assert (fields["method"], fields["route"], fields["status"]) == ("POST", "/v1/completions", 200)
    assert fields["bytes"] > len(reply.body)  # the head and the body
    assert (fields["app"], fields["prompt_tokens"], fields["completion_tokens"]) == ("echo", 2, 2)
    # duration_ms is the loop's clock (uvloop's ticks in milliseconds), ttft_ms perf_counter's.
    assert fields["finish_reason"] == "length" and 0 < fields["ttft_ms"] <= fields["duration_ms"] + 2
    assert set(fields) >= {"time", "duration_ms", "client"}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus package) not installed")
def test_promtool_accepts_the_exposition(start_server):
    server = start_server({"apps": {"echo": {"backend": "echo"}}})
    post(server.port, "/v1/completions", {"model": "echo", "prompt": "a b", "max_tokens": 2})
    text = Scrape(server.port).text
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
