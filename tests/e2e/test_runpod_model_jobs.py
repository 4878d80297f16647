"""RunPod's job API on model apps (worker-vllm's job inputs), /retry, and /v4 async runs of
model apps: real servers on real sockets, the echo backend (deterministic; ``pace_ms``
slows it down so a job can be watched, cancelled or interrupted) and builtin:tiny."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path

import orjson
import pytest

from runnel.testing import request as http_request
from runnel.testing import wait_until
from runnel.testing.pytest_plugin import TINY_CONFIG

JSON = ((b"content-type", b"application/json"),)
MESSAGES = [{"role": "user", "content": "one two three four five six"}]
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")


def post(server, path: str, body=None):
    return http_request(server.port, "POST", path, headers=JSON, body=b"" if body is None else orjson.dumps(body))


def submit(server, endpoint: str, job_input, **extra) -> str:
    reply = post(server, f"/v2/{endpoint}/run", {"input": job_input, **extra})
    assert reply.status == 200, reply.body
    assert reply.json()["status"] == "IN_QUEUE"
    return reply.json()["id"]


def status(server, endpoint: str, job_id: str) -> dict:
    reply = http_request(server.port, "GET", f"/v2/{endpoint}/status/{job_id}")
    assert reply.status == 200, reply.body
    return reply.json()


def settled(server, endpoint: str, job_id: str, timeout: float = 20) -> dict:
    return wait_until(lambda: (body := status(server, endpoint, job_id))["status"] in FINAL and body,
                      timeout=timeout)


def runsync(server, endpoint: str, job_input) -> dict:
    reply = post(server, f"/v2/{endpoint}/runsync", {"input": job_input})
    assert reply.status == 200, reply.body
    body = reply.json()
    return body if body["status"] in FINAL else settled(server, endpoint, body["id"])


def states(path: Path) -> dict[str, str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return dict(conn.execute("SELECT id, state FROM runs"))


def without_ids(body: dict) -> dict:
    return {key: value for key, value in body.items() if key not in ("id", "created")}


def sse_events(text: str) -> list:
    events = [event.removeprefix("data: ") for event in text.split("\n\n") if event]
    return [event if event == "[DONE]" else orjson.loads(event) for event in events]


def chat_text(chunks: list) -> str:
    return "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"])


@pytest.fixture
def echo(start_server):
    return start_server({
        "server": {"runs_path": "", "runs_workers": 4},
        "apps": {
            "echo": {"backend": "echo"},
            "lines": {"backend": "echo", "runpod": {"raw_openai_output": False}},
            "named": {"backend": "echo", "runpod": {"endpoint_id": "ep-named", "served_model_name_override": "my-model",
                                                    "response_role": "bot"}},
            "slow": {"backend": "echo", "pace_ms": 20},
        },
    })


# -- {"openai_route", "openai_input"} -------------------------------------------------------------


def test_openai_route_not_streamed_is_the_response_in_a_list(echo):
    body = {"messages": MESSAGES, "max_tokens": 8}
    job = runsync(echo, "echo", {"openai_route": "/v1/chat/completions", "openai_input": body})
    live = post(echo, "/v2/echo/openai/v1/chat/completions", body).json()
    assert job["status"] == "COMPLETED" and len(job["output"]) == 1
    assert without_ids(job["output"][0]) == without_ids(live)
    job = runsync(echo, "echo", {"openai_route": "/v1/completions", "openai_input": {"prompt": "a b c"}})
    assert job["output"][0]["object"] == "text_completion" and job["output"][0]["choices"][0]["text"] == "a b c"
    job = runsync(echo, "echo", {"openai_route": "/v1/embeddings", "openai_input": {"input": ["a b"]}})
    assert job["output"][0]["data"][0]["object"] == "embedding"


def test_openai_route_streamed_is_batches_of_sse_growing_1_3_9(echo):
    body = {"messages": MESSAGES, "max_tokens": 40, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    job = runsync(echo, "echo", {"openai_route": "/v1/chat/completions", "openai_input": body})
    assert job["status"] == "COMPLETED"
    batches = job["output"]
    assert all(type(batch) is str for batch in batches)
    sizes = [len(sse_events(batch)) for batch in batches]
    assert sizes[:4] == [1, 3, 9, 27] and sum(sizes) == 1 + 40 + 3  # role, 40 tokens, finish, usage, [DONE]
    events = [event for batch in batches for event in sse_events(batch)]
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 40
    whole = post(echo, "/v1/chat/completions", {**body, "stream": False, "stream_options": None,
                                                "model": "echo"}).json()
    assert chat_text(events[:-1]) == whole["choices"][0]["message"]["content"]


def test_without_raw_openai_output_a_batch_is_a_list_of_chunks(echo):
    body = {"messages": MESSAGES, "max_tokens": 5, "ignore_eos": True, "stream": True}
    job = runsync(echo, "lines", {"openai_route": "/v1/chat/completions", "openai_input": body})
    assert [len(batch) for batch in job["output"]] == [1, 3, 3]  # role, 5 tokens, finish; no [DONE]
    chunks = [chunk for batch in job["output"] for chunk in batch]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chat_text(chunks) == "one two three four five"


def test_the_endpoints_config_names_the_model_and_role(echo):
    body = {"messages": MESSAGES, "max_tokens": 2}
    job = runsync(echo, "ep-named", {"openai_route": "/v1/chat/completions", "openai_input": body})
    answer = job["output"][0]
    assert (answer["model"], answer["choices"][0]["message"]["role"]) == ("my-model", "bot")
    reply = post(echo, "/v2/ep-named/run", {"input": {"openai_input": {**body, "model": "named"}}})
    assert reply.status == 404 and "my-model" in reply.json()["error"]


# -- the legacy {"prompt" | "messages", "sampling_params", "stream"} ------------------------------


def test_legacy_not_streamed_is_one_batch_of_the_whole_text(echo):
    job = runsync(echo, "echo", {"prompt": "a b c", "sampling_params": {"max_tokens": 3}})
    assert job["output"] == [{"choices": [{"tokens": ["a b c"]}], "usage": {"input": 3, "output": 3}}]
    job = runsync(echo, "echo", {"messages": MESSAGES, "sampling_params": {"n": 2}})
    (batch,) = job["output"]
    assert [choice["tokens"] for choice in batch["choices"]] == [["one two three four five six"]] * 2
    # max_tokens is 100 unless given, as worker-vllm's
    job = runsync(echo, "echo", {"prompt": "a", "apply_chat_template": True, "sampling_params": {"ignore_eos": True}})
    assert job["output"][0]["usage"]["output"] == 100


def test_legacy_streamed_is_batches_of_tokens_with_usage_so_far(echo):
    job = runsync(echo, "echo", {"prompt": "a b c d e f g h i j", "stream": True, "max_batch_size": 4,
                                 "min_batch_size": 1, "batch_size_growth_factor": 2,
                                 "sampling_params": {"max_tokens": 10}})
    batches = job["output"]
    assert [len(batch["choices"][0]["tokens"]) for batch in batches] == [1, 2, 4, 3]
    assert [batch["usage"]["output"] for batch in batches] == [1, 3, 7, 10]
    assert batches[-1]["usage"]["input"] == 10
    assert "".join(token for batch in batches for token in batch["choices"][0]["tokens"]) == "a b c d e f g h i j"
    # a growth that is not whole: sizes 1, 1.5 (2 tokens), 2.25 (3), 3.375 (4), ... as worker-vllm's
    job = runsync(echo, "echo", {"prompt": "a b c d e f g h i j", "stream": True, "batch_size_growth_factor": 1.5,
                                 "sampling_params": {"max_tokens": 10}})
    assert [len(batch["choices"][0]["tokens"]) for batch in job["output"]] == [1, 2, 3, 4]


# -- /stream, /cancel, /retry ----------------------------------------------------------------------


def test_stream_shows_the_generated_batches_while_the_job_runs(echo):
    job_id = submit(echo, "slow", {"prompt": "x y z", "stream": True, "max_batch_size": 1,
                                   "sampling_params": {"max_tokens": 40, "ignore_eos": True}})
    seen, counts_while_running = [], []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        body = http_request(echo.port, "GET", f"/v2/slow/stream/{job_id}").json()
        seen += [item["output"] for item in body["stream"]]
        if body["status"] == "IN_PROGRESS":
            counts_while_running.append(len(seen))
        if body["status"] == "COMPLETED":
            break
        time.sleep(0.02)
    # Some came while it ran, handed out once each. (A poll just before the job is recorded
    # COMPLETED may already see all 40: the generation has ended, its status not yet.)
    assert any(0 < count < 40 for count in counts_while_running), counts_while_running
    assert len(seen) == 40 and all(len(batch["choices"][0]["tokens"]) == 1 for batch in seen)
    assert seen == status(echo, "slow", job_id)["output"]


def test_cancel_stops_a_running_generation(echo):
    app = echo.server.apps.get("slow")
    job_id = submit(echo, "slow", {"openai_input": {"messages": MESSAGES, "max_tokens": 2000, "ignore_eos": True,
                                                    "stream": True}})
    wait_until(lambda: http_request(echo.port, "GET", f"/v2/slow/stream/{job_id}").json()["stream"], timeout=10)
    assert app.generating == 1
    reply = post(echo, f"/v2/slow/cancel/{job_id}")
    assert reply.json() == {"id": job_id, "status": "CANCELLED"}
    wait_until(lambda: app.generating == 0, timeout=5)
    assert status(echo, "slow", job_id)["status"] == "CANCELLED"


def test_execution_timeout_stops_a_generation(echo):
    app = echo.server.apps.get("slow")
    job_id = submit(echo, "slow", {"prompt": "a", "stream": True, "sampling_params": {"max_tokens": 2000,
                                                                                        "ignore_eos": True}},
                    policy={"executionTimeout": 300})
    body = settled(echo, "slow", job_id)
    assert body["status"] == "TIMED_OUT" and "300 ms" in body["error"]
    wait_until(lambda: app.generating == 0, timeout=5)


def test_retry_runs_a_failed_model_job_again_under_its_id(start_server):
    server = start_server({"server": {"runs_path": "", "runs_workers": 2},
                           "apps": {"one": {"backend": "echo", "pace_ms": 20, "max_generations": 1}}})
    busy = submit(server, "one", {"prompt": "a", "sampling_params": {"max_tokens": 2000, "ignore_eos": True},
                                  "stream": True})
    wait_until(lambda: server.server.apps.get("one").generating == 1, timeout=10)
    failed = submit(server, "one", {"prompt": "p q", "sampling_params": {"max_tokens": 2}})
    body = settled(server, "one", failed)
    assert body["status"] == "FAILED" and "busy" in body["error"]  # the app's 429
    post(server, f"/v2/one/cancel/{busy}")
    reply = post(server, f"/v2/one/retry/{failed}")
    assert (reply.status, reply.json()) == (200, {"id": failed, "status": "IN_QUEUE"})
    body = settled(server, "one", failed)
    assert (body["status"], body["output"][0]["choices"][0]["tokens"], "error" in body) == \
        ("COMPLETED", ["p q"], False)
    reply = post(server, f"/v2/one/retry/{failed}")  # only FAILED or TIMED_OUT jobs
    assert (reply.status, reply.json()) == (409, {"error": f"Job '{failed}' is COMPLETED: only a FAILED or "
                                                  "TIMED_OUT job can be retried"})
    assert post(server, f"/v2/one/retry/{busy}").status == 409  # cancelled
    assert post(server, "/v2/one/retry/nope").status == 404
    health = http_request(server.port, "GET", "/v2/one/health").json()["jobs"]
    assert (health["completed"], health["retried"]) == (1, 1)


def test_retry_of_a_queued_or_running_job_is_409(start_server):
    server = start_server({"server": {"runs_path": "", "runs_workers": 1},
                           "apps": {"slow": {"backend": "echo", "pace_ms": 20}}})
    held = submit(server, "slow", {"prompt": "a", "stream": True, "sampling_params": {"max_tokens": 2000,
                                                                                       "ignore_eos": True}})
    wait_until(lambda: status(server, "slow", held)["status"] == "IN_PROGRESS", timeout=10)
    queued = submit(server, "slow", {"prompt": "b"})
    for job_id, state in ((held, "IN_PROGRESS"), (queued, "IN_QUEUE")):
        reply = post(server, f"/v2/slow/retry/{job_id}")
        assert (reply.status, reply.json()["error"]) == (409, f"Job '{job_id}' is {state}: only a FAILED or "
                                                         "TIMED_OUT job can be retried")
    post(server, f"/v2/slow/cancel/{held}")
    assert settled(server, "slow", queued)["status"] == "COMPLETED"


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_retry_a_timed_out_function_job(start_server, tmp_path, request, store):
    module = Path(__file__).resolve().parents[1] / "apps" / "jobs.py"
    runs = {"runs_path": ""} if store == "sqlite" else {"runs": request.getfixturevalue("redis_url")}
    server = start_server({"server": runs, "apps": {"jobs": {"backend": "python", "module": str(module)}}})
    gate = tmp_path / "gate"
    job_id = submit(server, "jobs", {"gate": str(gate)}, policy={"executionTimeout": 200})
    assert settled(server, "jobs", job_id)["status"] == "TIMED_OUT"
    gate.write_text("")
    assert post(server, f"/v2/jobs/retry/{job_id}").json() == {"id": job_id, "status": "IN_QUEUE"}
    body = settled(server, "jobs", job_id)
    assert (body["status"], body["output"]) == ("COMPLETED", {"id": job_id, "input": {"gate": str(gate)}})
    assert server.server.apps.get("jobs").module.CALLS.count(job_id) == 2


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("job_input,said", [
    ({}, '"openai_input"'),
    ([], "must be an object"),
    ({"openai_route": "/v1/files", "openai_input": {}}, "'/v1/files' is not supported"),
    ({"openai_route": "/v1/chat/completions"}, '"openai_input" is missing'),
    ({"openai_input": "hi"}, "must be a JSON object"),
    ({"openai_input": {"messages": MESSAGES, "max_tokens": -1}}, "max_tokens"),
    ({"openai_input": {"messages": MESSAGES, "colour": "red"}}, "colour"),
    ({"prompt": "a", "sampling_params": {"temperature": "hot"}}, "temperature"),
    ({"prompt": "a", "sampling_params": 3}, '"sampling_params" must be an object'),
    ({"prompt": "a", "stream": "yes"}, '"stream" must be true or false'),
    ({"prompt": "a", "max_batch_size": -1}, '"max_batch_size" must be an integer'),
    ({"prompt": 5}, "prompt"),
])
def test_input_that_cannot_run_is_refused_at_submit(echo, job_input, said):
    reply = post(echo, "/v2/echo/run", {"input": job_input})
    assert reply.status == 400 and list(reply.json()) == ["error"], reply.body
    assert said in reply.json()["error"]
    assert not any(http_request(echo.port, "GET", "/v2/echo/health").json()["jobs"].values())  # nothing recorded


def test_a_failing_generation_fails_the_job(echo):
    body = runsync(echo, "echo", {"openai_input": {"messages": MESSAGES, "presence_penalty": 0.5}})
    assert body["status"] == "FAILED" and "presence_penalty" in body["error"] and "output" not in body


# -- /v4 async runs of a model app ---------------------------------------------------------------


def test_v4_async_run_of_a_model_app(echo):
    body = {"messages": MESSAGES, "max_tokens": 4}
    reply = post(echo, "/v4/p/echo/run?async=true", body)
    assert reply.status == 202 and list(reply.json()) == ["run_id"]
    run_id = reply.json()["run_id"]
    done = wait_until(lambda: (b := http_request(echo.port, "GET", f"/v4/p/echo/runs/{run_id}").json())["status"]
                      in ("succeeded", "failed") and b, timeout=15)
    sync = post(echo, "/v4/p/echo/run", body).json()
    assert (done["status"], done["status_code"]) == ("succeeded", 200)
    assert without_ids(done["result"]) == without_ids(sync["result"])
    streamed = post(echo, "/v4/p/echo/run?async=true", {**body, "stream": True}).json()["run_id"]
    done = wait_until(lambda: (b := http_request(echo.port, "GET", f"/v4/p/echo/runs/{streamed}").json())["status"]
                      in ("succeeded", "failed") and b, timeout=15)
    assert chat_text(done["result"]) == sync["result"]["choices"][0]["message"]["content"]
    assert http_request(echo.port, "GET", f"/v2/echo/status/{run_id}").status == 404  # not a RunPod job


def test_v4_async_bad_bodies_are_refused_before_anything_is_recorded(start_server, tmp_path):
    path = tmp_path / "runs.sqlite3"
    server = start_server({"server": {"runs_path": str(path)}, "apps": {"echo": {"backend": "echo"}}})
    reply = post(server, "/v4/p/echo/run?async=true", {"messages": MESSAGES, "max_tokens": -1})
    assert (reply.status, reply.json()["error"]["param"]) == (400, "max_tokens")
    reply = post(server, "/v4/p/echo/run?async=true", {"prompt_typo": "x"})
    assert reply.status == 400
    reply = post(server, "/v4/p/echo/other?async=true", {"messages": MESSAGES})
    assert (reply.status, reply.json()["error"]["code"]) == (404, "function_not_found")
    assert not path.exists()


# -- durable: a restart, and several servers on Redis ---------------------------------------------


def test_a_queued_model_job_runs_after_a_restart(start_server, tmp_path):
    config = {"server": {"runs_path": str(tmp_path / "runs.sqlite3"), "runs_workers": 1},
              "apps": {"slow": {"backend": "echo", "pace_ms": 20}}}
    first = start_server(config)
    held = submit(first, "slow", {"prompt": "a", "stream": True, "sampling_params": {"max_tokens": 2000,
                                                                                      "ignore_eos": True}})
    queued = submit(first, "slow", {"messages": MESSAGES, "sampling_params": {"max_tokens": 3}})
    wait_until(lambda: status(first, "slow", held)["status"] == "IN_PROGRESS", timeout=10)
    assert status(first, "slow", queued)["status"] == "IN_QUEUE"
    first.stop()
    second = start_server(config)
    # It runs without being asked for: the store a previous process left is opened at start.
    wait_until(lambda: states(tmp_path / "runs.sqlite3")[queued] == "succeeded", timeout=15)
    body = settled(second, "slow", queued)
    assert body["output"] == [{"choices": [{"tokens": ["one two three"]}], "usage": {"input": body["output"][0][
        "usage"]["input"], "output": 3}}]
    assert settled(second, "slow", held)["status"] == "FAILED"  # interrupted: a model app is not idempotent


def test_on_redis_a_second_server_runs_the_job_the_first_cannot(start_server, redis_url):
    config = {"server": {"runs": redis_url, "runs_workers": 1}, "apps": {"slow": {"backend": "echo", "pace_ms": 20}}}
    first = start_server(config)
    held = submit(first, "slow", {"prompt": "a", "stream": True, "sampling_params": {"max_tokens": 2000,
                                                                                      "ignore_eos": True}})
    wait_until(lambda: status(first, "slow", held)["status"] == "IN_PROGRESS", timeout=10)
    job_id = submit(first, "slow", {"messages": MESSAGES, "stream": True, "sampling_params": {"max_tokens": 3}})
    second = start_server(config)  # the first's one worker is busy: only the second can run it
    body = settled(first, "slow", job_id)
    assert (body["status"], [batch["choices"][0]["tokens"] for batch in body["output"]]) == \
        ("COMPLETED", [["one"], [" two", " three"]])
    assert status(second, "slow", held)["status"] == "IN_PROGRESS"
    assert post(second, f"/v2/slow/cancel/{held}").json()["status"] == "CANCELLED"  # stopped on the first
    wait_until(lambda: first.server.apps.get("slow").generating == 0, timeout=5)


# -- builtin:tiny ----------------------------------------------------------------------------------


def test_builtin_tiny_takes_both_input_shapes(start_server):
    server = start_server({"server": {"runs_path": ""}, **TINY_CONFIG})
    body = {"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "max_tokens": 12,
            "temperature": 0}
    whole = runsync(server, "tiny", {"openai_route": "/v1/chat/completions", "openai_input": body})
    text = whole["output"][0]["choices"][0]["message"]["content"]
    streamed = runsync(server, "tiny", {"openai_route": "/v1/chat/completions",
                                        "openai_input": {**body, "stream": True}})
    events = [event for batch in streamed["output"] for event in sse_events(batch)]
    assert chat_text(events[:-1]) == text
    legacy = runsync(server, "tiny", {"messages": body["messages"], "stream": True,
                                      "sampling_params": {"max_tokens": 12, "temperature": 0}})
    assert "".join(token for batch in legacy["output"] for token in batch["choices"][0]["tokens"]) == text
