"""A server killed with SIGKILL loses no accepted run.

``python -m runnel serve`` runs as a subprocess with one background worker; the
first run holds that worker (until a gate file appears) while three more wait in
the queue; the server is killed, then started again on the same run store. The
queued runs complete; the interrupted one fails with code ``interrupted``, or runs
again when its app is idempotent.
"""

from __future__ import annotations

import contextlib
import sqlite3
import textwrap
import time
from pathlib import Path

import orjson
import pytest

from runnel.testing import ServeProcess as Serve
from runnel.testing import request, wait_until

GATED = Path(__file__).resolve().parents[1] / "apps" / "gated.py"


def states(path: Path) -> dict[str, str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return dict(conn.execute("SELECT id, state FROM runs"))


@pytest.mark.parametrize("idempotent", [False, True])
def test_sigkill_loses_no_accepted_run(tmp_path, idempotent):
    module = GATED
    store = tmp_path / "runs.sqlite3"
    gate = tmp_path / "gate"
    config = tmp_path / "runnel.toml"
    config.write_text(textwrap.dedent(f"""
        [server]
        runs_path = "{store}"
        runs_workers = 1

        [apps.lab]
        backend = "python"
        module = "{module}"

        [apps.lab.functions]
        public = true
        idempotent = {str(idempotent).lower()}
    """))

    def submit(port: int, function: str, body: dict) -> str:
        reply = request(port, "POST", f"/v4/p/lab/{function}?async=true", body=orjson.dumps(body))
        assert reply.status == 202, reply.body
        return reply.json()["run_id"]

    def status(port: int, run_id: str) -> dict:
        return request(port, "GET", f"/v4/p/lab/runs/{run_id}").json()

    servers = []
    try:
        first = Serve(tmp_path, config, "first")
        servers.append(first)
        wait_until(first.ready, timeout=30)
        held = submit(first.port, "hold", {"gate": str(gate), "tag": "held"})
        queued = [submit(first.port, "quick", {"tag": f"q{n}"}) for n in range(3)]
        wait_until(lambda: status(first.port, held)["status"] == "running")
        first.kill()
        assert states(store) == {held: "running", **dict.fromkeys(queued, "queued")}

        gate.write_text("")  # a re-run of the held run may finish now
        second = Serve(tmp_path, config, "second")
        servers.append(second)
        wait_until(second.ready, timeout=30)
        done = ("succeeded", "failed", "cancelled")
        for n, run_id in enumerate(queued):
            body = wait_until(lambda: (b := status(second.port, run_id))["status"] in done and b, timeout=15)
            assert (body["status"], body["result"]) == ("succeeded", f"q{n}")
        body = wait_until(lambda: (b := status(second.port, held))["status"] in done and b, timeout=15)
        if idempotent:
            assert (body["status"], body["result"]) == ("succeeded", "held")
            with contextlib.closing(sqlite3.connect(store)) as conn:
                assert conn.execute("SELECT attempts FROM runs WHERE id = ?", (held,)).fetchone() == (2,)
        else:
            assert (body["status"], body["status_code"], body["error"]["code"]) == ("failed", 500, "interrupted")
            assert "interrupted" in body["error"]["message"]
    finally:
        gate.write_text("")
        for server in servers:
            server.kill()


# -- claims in a live server -----------------------------------------------------------------------
# A store may be shared: the runs below are claimed by "other runners", written straight
# into the file. The lease is cut to 0.3 s, so claims are renewed every 0.1 s.
LEASE = 0.3


def insert_claimed(path: Path, run_id: str, owner: str, lease_until: float, tag: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("INSERT INTO runs (id, surface, app, function, input, state, attempts, created_at, started_at, "
                     "owner, lease_until) VALUES (?, 'cortex', 'lab', 'quick', ?, 'running', 1, ?, ?, ?, ?)",
                     (run_id, orjson.dumps({"tag": tag}), time.time(), time.time(), owner, lease_until))
        conn.commit()


def lab_server(start_server, tmp_path: Path, *, idempotent: bool = False):
    module = GATED
    store = tmp_path / "runs.sqlite3"
    server = start_server({"server": {"runs_path": str(store), "runs_lease": LEASE}, "apps": {"lab": {
        "backend": "python", "module": str(module), "functions": {"public": True, "idempotent": idempotent}}}})
    return server, store


def run_status(server, run_id: str) -> dict:
    return request(server.port, "GET", f"/v4/p/lab/runs/{run_id}").json()


def settled(server, run_id: str) -> dict:
    done = ("succeeded", "failed", "cancelled")
    return wait_until(lambda: (body := run_status(server, run_id))["status"] in done and body, timeout=15)


@pytest.mark.parametrize("idempotent", [False, True])
def test_a_live_server_takes_back_claims_whose_lease_ran_out(start_server, tmp_path, idempotent):
    server, store = lab_server(start_server, tmp_path, idempotent=idempotent)
    first = request(server.port, "POST", "/v4/p/lab/quick?async=true", body=b'{"tag": "first"}')
    assert settled(server, first.json()["run_id"])["result"] == "first"  # the file exists now
    insert_claimed(store, "dead", "runner-that-died", time.time() - 1, "dead")
    insert_claimed(store, "alive", "runner-still-running", time.time() + 3600, "alive")
    body = settled(server, "dead")
    if idempotent:
        assert (body["status"], body["result"]) == ("succeeded", "dead")
        with contextlib.closing(sqlite3.connect(store)) as conn:
            assert conn.execute("SELECT attempts FROM runs WHERE id = 'dead'").fetchone() == (2,)
    else:
        assert (body["status"], body["status_code"], body["error"]["code"]) == ("failed", 500, "interrupted")
    assert run_status(server, "alive") == {"run_id": "alive", "status": "running"}  # a live claim is left alone


def test_a_run_longer_than_its_lease_keeps_its_claim(start_server, tmp_path):
    server, store = lab_server(start_server, tmp_path)
    gate = tmp_path / "gate"
    try:
        reply = request(server.port, "POST", "/v4/p/lab/hold?async=true",
                        body=orjson.dumps({"gate": str(gate), "tag": "held"}))
        run_id = reply.json()["run_id"]
        wait_until(lambda: run_status(server, run_id)["status"] == "running")
        time.sleep(1.0)  # over three leases: renewed, or taken back as interrupted
    finally:
        gate.write_text("")
    body = settled(server, run_id)
    assert (body["status"], body["result"]) == ("succeeded", "held")
