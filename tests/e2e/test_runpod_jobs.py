"""RunPod's job API, /v2/{endpoint_id}/run ... /health, over python function apps.

One module (tests/apps/jobs.py) is served as several apps, one endpoint each,
whose ``[apps.NAME.runpod] handler`` picks the function jobs call. Runs that must be
held are held by a gate file the test creates.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import orjson
import pytest

from runnel.testing import request, wait_until

KEY = "k" * 16


@pytest.fixture
def module():
    return Path(__file__).resolve().parents[1] / "apps" / "jobs.py"


def apps(module, **handlers) -> dict:
    """One python app per endpoint id, each running ``handler`` (a function of tests/apps/jobs.py)."""
    return {name: {"backend": "python", "module": str(module), "runpod": {"handler": handler}}
            for name, handler in handlers.items()}


@pytest.fixture
def jobs(start_server, module):
    return start_server({
        "server": {"runs_path": "", "runs_workers": 4},
        "apps": {**apps(module, jobs="handler", kw="greet", naps="nap", ticks="ticks", soft="soft"),
                 "renamed": {"backend": "python", "module": str(module), "runpod": {"endpoint_id": "ep-123"}},
                 "echo": {"backend": "echo"}},
    })


def post(server, path: str, body=None, headers=()):
    return request(server.port, "POST", path, body=b"" if body is None else orjson.dumps(body), headers=headers)


def run(server, endpoint: str, data, **extra) -> str:
    reply = post(server, f"/v2/{endpoint}/run", {"input": data, **extra})
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["status"] == "IN_QUEUE" and list(body) == ["id", "status"]
    return body["id"]


def status(server, endpoint: str, job_id: str) -> dict:
    reply = request(server.port, "GET", f"/v2/{endpoint}/status/{job_id}")
    assert reply.status == 200, reply.body
    return reply.json()


def settled(server, endpoint: str, job_id: str) -> dict:
    return wait_until(lambda: (body := status(server, endpoint, job_id))["status"] not in ("IN_QUEUE", "IN_PROGRESS")
                      and body, timeout=15)


def calls(server, app: str) -> list:
    return server.server.apps.get(app).module.CALLS


# -- the state machine ---------------------------------------------------------------------------


def test_run_queued_in_progress_completed(start_server, module, tmp_path):
    gate = tmp_path / "gate"
    server = start_server({"server": {"runs_path": "", "runs_workers": 1}, "apps": apps(module, jobs="handler")})
    try:
        first = run(server, "jobs", {"gate": str(gate)})
        second = run(server, "jobs", {"n": 2})
        wait_until(lambda: status(server, "jobs", first)["status"] == "IN_PROGRESS")
        queued = status(server, "jobs", second)
        assert queued["status"] == "IN_QUEUE" and "output" not in queued
        assert queued["executionTime"] == 0
    finally:
        gate.write_text("")
    done = settled(server, "jobs", first)
    assert list(done) == ["id", "status", "output", "delayTime", "executionTime"]
    assert (done["id"], done["status"]) == (first, "COMPLETED")
    assert done["output"] == {"id": first, "input": {"gate": str(gate)}}
    assert type(done["delayTime"]) is int and type(done["executionTime"]) is int and done["executionTime"] >= 0
    assert settled(server, "jobs", second)["output"] == {"id": second, "input": {"n": 2}}
    assert calls(server, "jobs") == [first, second]


def test_runsync_answers_with_the_result(jobs):
    reply = post(jobs, "/v2/jobs/runsync", {"input": "hi"})
    assert reply.status == 200
    body = reply.json()
    assert (body["status"], body["output"]["input"]) == ("COMPLETED", "hi")
    assert body["output"]["id"] == body["id"]


def test_runsync_gives_up_waiting_after_runsync_timeout(start_server, module, tmp_path):
    gate = tmp_path / "gate"
    server = start_server({"server": {"runs_path": "", "runsync_timeout": 0.2}, "apps": apps(module, jobs="handler")})
    try:
        body = post(server, "/v2/jobs/runsync", {"input": {"gate": str(gate)}}).json()
        assert body["status"] in ("IN_QUEUE", "IN_PROGRESS") and "output" not in body
    finally:
        gate.write_text("")
    assert settled(server, "jobs", body["id"])["status"] == "COMPLETED"


def test_runsync_wait_sets_how_long_it_waits(start_server, module, tmp_path):
    """RunPod's ``?wait=`` (ms): 1 s here instead of the configured 90 s; out of range is a 400
    that submits nothing."""
    gate = tmp_path / "gate"
    server = start_server({"server": {"runs_path": "", "runsync_timeout": 90.0}, "apps": apps(module, jobs="handler")})
    try:
        began = time.monotonic()
        body = post(server, "/v2/jobs/runsync?wait=1000", {"input": {"gate": str(gate)}}).json()
        assert body["status"] in ("IN_QUEUE", "IN_PROGRESS") and 0.9 < time.monotonic() - began < 30
    finally:
        gate.write_text("")
    assert settled(server, "jobs", body["id"])["status"] == "COMPLETED"
    for wait in ("999", "300001", "abc", "-5", ""):
        reply = post(server, f"/v2/jobs/runsync?wait={wait}", {"input": "x"})
        assert reply.status == 400 and "wait" in reply.json()["error"], wait
    assert calls(server, "jobs") == [body["id"]]  # the refused ones never became jobs
    assert post(server, "/v2/jobs/runsync?wait=300000", {"input": "quick"}).json()["status"] == "COMPLETED"


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_purge_queue_cancels_the_callers_queued_jobs_and_leaves_the_running_one(start_server, module, tmp_path,
                                                                               request, store):
    gate = tmp_path / "gate"
    runs = {"runs_path": ""} if store == "sqlite" else {"runs": request.getfixturevalue("redis_url")}
    server = start_server({"server": {**runs, "runs_workers": 1}, "apps": apps(module, jobs="handler",
                                                                              other="handler")})
    try:
        running = run(server, "jobs", {"gate": str(gate)})
        wait_until(lambda: status(server, "jobs", running)["status"] == "IN_PROGRESS")
        queued = [run(server, "jobs", {"n": n}) for n in range(3)]
        elsewhere = run(server, "other", {"n": 9})  # another endpoint's job stays queued
        reply = post(server, "/v2/jobs/purge-queue")
        assert reply.status == 200 and reply.json() == {"removed": 3, "status": "completed"}
        assert [status(server, "jobs", job)["status"] for job in queued] == ["CANCELLED"] * 3
        assert status(server, "jobs", running)["status"] == "IN_PROGRESS"
        assert post(server, "/v2/jobs/purge-queue").json() == {"removed": 0, "status": "completed"}
    finally:
        gate.write_text("")
    assert settled(server, "jobs", running)["status"] == "COMPLETED"
    assert settled(server, "other", elsewhere)["status"] == "COMPLETED"
    assert calls(server, "jobs") == [running]  # the purged jobs never ran
    assert post(server, "/v2/nope/purge-queue").status == 404


def test_failed_jobs_carry_the_error(jobs):
    body = settled(jobs, "jobs", run(jobs, "jobs", {"fail": "no GPU today"}))
    assert body["status"] == "FAILED" and "output" not in body
    assert body["error"] == "Function 'handler' failed: ValueError: no GPU today"
    # A dict with "error" fails the job too, as RunPod's SDK has it.
    body = settled(jobs, "soft", run(jobs, "soft", [1]))
    assert (body["status"], body["error"]) == ("FAILED", "bad input: [1]")


def test_handler_job_dict_versus_keyword_input(jobs):
    assert settled(jobs, "kw", run(jobs, "kw", {"name": "Ada", "punctuation": "?"}))["output"] == "Hello, Ada?"
    body = settled(jobs, "kw", run(jobs, "kw", {"name": "Ada", "colour": "red"}))
    assert body["status"] == "FAILED" and "Unexpected argument 'colour'" in body["error"]
    body = settled(jobs, "kw", run(jobs, "kw", "just a string"))
    assert body["status"] == "FAILED" and "must be an object" in body["error"]
    job_id = run(jobs, "ep-123", {"x": [1, 2]})  # endpoint_id differs from the app name; handler = "handler"
    assert settled(jobs, "ep-123", job_id)["output"] == {"id": job_id, "input": {"x": [1, 2]}}
    assert settled(jobs, "naps", run(jobs, "naps", {"seconds": 0}))["output"] == "rested"  # named "event"


def test_cancel_a_queued_job_and_it_never_runs(start_server, module, tmp_path):
    gate = tmp_path / "gate"
    server = start_server({"server": {"runs_path": "", "runs_workers": 1}, "apps": apps(module, jobs="handler")})
    try:
        holder = run(server, "jobs", {"gate": str(gate)})
        wait_until(lambda: status(server, "jobs", holder)["status"] == "IN_PROGRESS")
        victim = run(server, "jobs", {"n": 1})
        reply = post(server, f"/v2/jobs/cancel/{victim}")
        assert reply.status == 200 and reply.json() == {"id": victim, "status": "CANCELLED"}
    finally:
        gate.write_text("")
    after = run(server, "jobs", {"n": 2})  # queued behind the cancelled one: it ran first if anything did
    settled(server, "jobs", after)
    body = status(server, "jobs", victim)
    assert body["status"] == "CANCELLED" and "output" not in body and body["executionTime"] == 0
    assert calls(server, "jobs") == [holder, after]
    # Cancelling a finished job changes nothing.
    assert post(server, f"/v2/jobs/cancel/{after}").json() == {"id": after, "status": "COMPLETED"}


def test_cancel_a_running_async_handler(jobs):
    job_id = run(jobs, "naps", {"seconds": 30})
    wait_until(lambda: status(jobs, "naps", job_id)["status"] == "IN_PROGRESS")
    assert post(jobs, f"/v2/naps/cancel/{job_id}").json() == {"id": job_id, "status": "CANCELLED"}
    assert status(jobs, "naps", job_id)["status"] == "CANCELLED"
    assert jobs.server.apps.get("naps").module.CANCELLED == [job_id]  # the coroutine was cancelled


def test_cancel_a_running_sync_handler_discards_its_result(start_server, module, tmp_path):
    gate = tmp_path / "gate"
    server = start_server({"server": {"runs_path": "", "runs_workers": 1}, "apps": apps(module, jobs="handler")})
    try:
        job_id = run(server, "jobs", {"gate": str(gate)})
        wait_until(lambda: status(server, "jobs", job_id)["status"] == "IN_PROGRESS")
        assert post(server, f"/v2/jobs/cancel/{job_id}").json() == {"id": job_id, "status": "CANCELLED"}
    finally:
        gate.write_text("")  # the thread runs on to its end...
    after = run(server, "jobs", {"n": 1})
    settled(server, "jobs", after)
    wait_until(lambda: calls(server, "jobs") == [job_id, after])
    assert status(server, "jobs", job_id)["status"] == "CANCELLED"  # ...and its result is dropped


def test_execution_timeout_times_the_job_out(jobs):
    job_id = run(jobs, "naps", {"seconds": 30}, policy={"executionTimeout": 200})
    body = settled(jobs, "naps", job_id)
    assert body["status"] == "TIMED_OUT"
    assert "execution timeout of 200 ms" in body["error"]
    assert jobs.server.apps.get("naps").module.CANCELLED == [job_id]


def test_stream_hands_out_each_value_once(jobs, tmp_path):
    gate = tmp_path / "gate"
    try:
        job_id = run(jobs, "ticks", {"n": 3, "gate": str(gate)})
        seen = []

        def pull():
            body = request(jobs.port, "GET", f"/v2/ticks/stream/{job_id}").json()
            seen.extend(item["output"] for item in body["stream"])
            return body

        wait_until(lambda: pull() and len(seen) >= 2)
        assert seen == [0, 1]
        assert pull() == {"status": "IN_PROGRESS", "stream": []}
    finally:
        gate.write_text("")
    assert settled(jobs, "ticks", job_id)["output"] == [0, 1, 2]
    assert pull() == {"status": "COMPLETED", "stream": [{"output": 2}]}
    assert pull() == {"status": "COMPLETED", "stream": []}


def test_health_counts_jobs_and_workers(start_server, module, tmp_path):
    gate = tmp_path / "gate"
    server = start_server({"server": {"runs_path": "", "runs_workers": 1}, "apps": apps(module, jobs="handler")})

    def health():
        reply = request(server.port, "GET", "/v2/jobs/health")
        assert reply.status == 200
        return reply.json()

    assert health() == {"jobs": {"completed": 0, "failed": 0, "inProgress": 0, "inQueue": 0, "retried": 0},
                        "workers": {"idle": 1, "running": 0}}
    try:
        for data in ({"n": 1}, {"n": 2}, {"fail": "x"}):
            settled(server, "jobs", run(server, "jobs", data))
        held = run(server, "jobs", {"gate": str(gate)})
        wait_until(lambda: status(server, "jobs", held)["status"] == "IN_PROGRESS")
        run(server, "jobs", {"n": 3})
        assert health() == {"jobs": {"completed": 2, "failed": 1, "inProgress": 1, "inQueue": 1, "retried": 0},
                            "workers": {"idle": 0, "running": 1}}
    finally:
        gate.write_text("")
    wait_until(lambda: health()["jobs"]["completed"] == 4)
    assert health() == {"jobs": {"completed": 4, "failed": 1, "inProgress": 0, "inQueue": 0, "retried": 0},
                        "workers": {"idle": 1, "running": 0}}


# -- what is refused ------------------------------------------------------------------------------


def test_unknown_jobs_and_endpoints_are_404(jobs):
    for path in ("/v2/jobs/status/nope", "/v2/jobs/stream/nope"):
        reply = request(jobs.port, "GET", path)
        assert reply.status == 404
        assert reply.json() == {"error": "No job 'nope' on this endpoint (unknown, or finished and expired)"}
    assert post(jobs, "/v2/jobs/cancel/nope").status == 404
    other = run(jobs, "kw", {"name": "x"})
    assert request(jobs.port, "GET", f"/v2/jobs/status/{other}").status == 404  # another endpoint's job
    assert request(jobs.port, "GET", f"/v4/p/kw/runs/{other}").status == 404  # jobs are not /v4 runs
    reply = post(jobs, "/v2/nope/run", {"input": {}})
    assert reply.status == 404 and reply.json() == {"error": "No endpoint 'nope'"}
    assert request(jobs.port, "GET", "/v2/nope/health").status == 404
    # A model endpoint takes worker-vllm's inputs (tests/e2e/test_runpod_model_jobs.py): this is none.
    reply = post(jobs, "/v2/echo/run", {"input": {}})
    assert reply.status == 400 and "openai_input" in reply.json()["error"]


def test_bad_submissions_are_400(jobs):
    for body in ({}, [], {"inputs": {}}, {"input": 1, "policy": 5}, {"input": 1, "policy": {"executionTimeout": "9"}},
                 {"input": 1, "policy": {"executionTimeout": 0}}, {"input": 1, "webhook": "http://evil.example/"}):
        reply = post(jobs, "/v2/jobs/run", body)
        assert reply.status == 400, body
        assert list(reply.json()) == ["error"]
    reply = post(jobs, "/v2/renamed/run", {"input": {}})  # the app is renamed to ep-123
    assert reply.status == 404


def test_missing_handler_is_404(start_server, module):
    server = start_server({"server": {"runs_path": ""}, "apps": apps(module, jobs="absent")})
    reply = post(server, "/v2/jobs/run", {"input": {}})
    assert reply.status == 404 and "no function 'absent'" in reply.json()["error"]


def test_job_routes_are_authenticated(start_server, module):
    server = start_server({"server": {"runs_path": ""}, "auth": {"kind": "api_key", "keys": [KEY]},
                           "apps": apps(module, jobs="handler")})
    reply = post(server, "/v2/jobs/run", {"input": 1})
    assert reply.status == 401 and list(reply.json()) == ["error"]
    reply = post(server, "/v2/jobs/runsync", {"input": 1}, headers=[("authorization", f"Bearer {KEY}")])
    assert reply.json()["status"] == "COMPLETED"


def test_a_handler_that_is_not_a_function_name_is_a_config_error(start_server, module):
    from runnel.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        start_server({"apps": apps(module, jobs="not a name")})
    assert caught.value.key == "apps.jobs.runpod.handler" and "must be a function name" in caught.value.message


# -- an app still loading ----------------------------------------------------------------------------

SLOW = '''
import os, time

def setup():
    deadline = time.monotonic() + 30
    while not os.path.exists({gate!r}) and time.monotonic() < deadline:
        time.sleep(0.01)

def handler(job):
    return job["input"]
'''


def test_a_job_sent_while_its_app_loads_runs_once_it_is_ready_without_polling(start_server, tmp_path):
    gate = tmp_path / "loaded"
    module = tmp_path / "slow.py"
    module.write_text(textwrap.dedent(SLOW.format(gate=str(gate))))
    server = start_server({"server": {"runs_path": ""}, "apps": {"slow": {"backend": "python", "module": str(module)}}},
                          ready=False)
    registry = server.server.apps
    asked = []  # apps.get() calls: how a runner polling for the app would ask
    get = registry.get

    def counting_get(name):
        asked.append(name)
        return get(name)

    server.call_soon(setattr, registry, "get", counting_get)
    try:
        job_id = run(server, "slow", {"n": 1})
        assert request(server.port, "GET", "/health").status == 503  # still loading
        before = len(asked)
        time.sleep(0.5)  # a runner polling every 50 ms would have asked about ten times by now
        assert len(asked) == before
        assert status(server, "slow", job_id)["status"] == "IN_QUEUE"
    finally:
        gate.write_text("")
    assert settled(server, "slow", job_id)["output"] == {"n": 1}
