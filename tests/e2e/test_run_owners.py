"""Runs belong to the principal that submitted them: everyone else gets a 404, on every run route.

JWT (real tokens, pyjwt): the owner is the token's project and subject together, so a token
for project B naming B in the path, or another subject of the same project, cannot see a run
of project A. API keys: the owner is the key. Both on /v4 run status and on RunPod's
/status, /stream and /cancel (which must not cancel another's job).
"""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import orjson
import pytest

from runnel.testing import request, wait_until

REPO = Path(__file__).resolve().parents[2]
JOBS = REPO / "tests" / "apps" / "jobs.py"
SECRET = "owner-test-secret-0123456789-abcdefgh"


def token(project: str, subject: str) -> list[tuple[str, str]]:
    now = int(time.time())
    encoded = jwt.encode({"sub": subject, "project": project, "iat": now, "exp": now + 300}, SECRET, algorithm="HS256")
    return [("authorization", f"Bearer {encoded}")]


def key(value: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {value}")]


def app() -> dict:
    return {"backend": "python", "module": str(JOBS), "runpod": {"handler": "handler"}}


@pytest.fixture
def jwt_server(start_server):
    return start_server({"server": {"runs_path": ""}, "auth": {"kind": "jwt", "algorithms": ["HS256"], "secret": SECRET},
                         "apps": {"jobs": app()}})


@pytest.fixture
def key_server(start_server):
    return start_server({"server": {"runs_path": ""},
                         "auth": {"kind": "api_key", "keys": ["first-key-0001", "second-key-002"]},
                         "apps": {"jobs": app()}})


def submit_v4(port: int, project: str, headers, body) -> str:
    reply = request(port, "POST", f"/v4/{project}/jobs/greet?async=true", headers=headers, body=orjson.dumps(body))
    assert reply.status == 202, reply.body
    return reply.json()["run_id"]


def v4_status(port: int, project: str, run_id: str, headers):
    return request(port, "GET", f"/v4/{project}/jobs/runs/{run_id}", headers=headers)


def submit_job(port: int, headers, data) -> str:
    reply = request(port, "POST", "/v2/jobs/run", headers=headers, body=orjson.dumps({"input": data}))
    assert reply.status == 200, reply.body
    return reply.json()["id"]


def assert_not_found_v4(reply, run_id: str) -> None:
    assert reply.status == 404, reply.body
    body = reply.json()
    assert body["error"]["code"] == "run_not_found" and body["run_id"] == run_id


def assert_job_routes_hide(port: int, job_id: str, headers) -> None:
    for method, route in (("GET", "status"), ("POST", "status"), ("GET", "stream"), ("POST", "cancel")):
        reply = request(port, method, f"/v2/jobs/{route}/{job_id}", headers=headers)
        assert reply.status == 404, (route, reply.body)
        assert reply.json() == {"error": f"No job {job_id!r} on this endpoint (unknown, or finished and expired)"}


def test_jwt_runs_are_the_project_and_subjects_own(jwt_server, tmp_path):
    port = jwt_server.port
    alice_a = token("pA", "alice")
    run_id = submit_v4(port, "pA", alice_a, {"name": "Ada"})
    done = wait_until(lambda: (body := v4_status(port, "pA", run_id, alice_a).json())["status"] == "succeeded" and body)
    assert done["result"] == "Hello, Ada!"
    # Project B's token, naming B in the path: the run is not there.
    assert_not_found_v4(v4_status(port, "pB", run_id, token("pB", "alice")), run_id)
    # Naming A with B's token is the project check's 403, as before.
    assert v4_status(port, "pA", run_id, token("pB", "alice")).status == 403
    # Another subject of project A: not theirs either.
    assert_not_found_v4(v4_status(port, "pA", run_id, token("pA", "bob")), run_id)
    assert v4_status(port, "pA", run_id, alice_a).status == 200


def test_jwt_jobs_are_bound_to_their_principal(jwt_server, tmp_path):
    port = jwt_server.port
    gate = tmp_path / "gate"
    owner = token("pA", "alice")
    job_id = submit_job(port, owner, {"gate": str(gate)})
    for stranger in (token("pB", "alice"), token("pA", "bob")):
        assert_job_routes_hide(port, job_id, stranger)
    gate.write_text("")
    body = wait_until(lambda: (reply := request(port, "GET", f"/v2/jobs/status/{job_id}", headers=owner).json())
                      ["status"] == "COMPLETED" and reply)
    assert body["output"]["input"] == {"gate": str(gate)}  # the stranger's /cancel cancelled nothing


def test_api_key_runs_and_jobs_are_the_keys_own(key_server, tmp_path):
    port = key_server.port
    first, second = key("first-key-0001"), key("second-key-002")
    run_id = submit_v4(port, "p", first, {"name": "Ada"})
    wait_until(lambda: v4_status(port, "p", run_id, first).json()["status"] == "succeeded")
    assert_not_found_v4(v4_status(port, "p", run_id, second), run_id)
    gate = tmp_path / "gate"
    job_id = submit_job(port, first, {"gate": str(gate)})
    assert_job_routes_hide(port, job_id, second)
    assert request(port, "GET", f"/v2/jobs/status/{job_id}", headers=first).json()["status"] in ("IN_QUEUE",
                                                                                                  "IN_PROGRESS")
    reply = request(port, "POST", f"/v2/jobs/cancel/{job_id}", headers=first)
    assert reply.json()["status"] == "CANCELLED"
    gate.write_text("")
