"""``runnel serve --workers 2``: a supervisor and two worker processes on one port.

Each test starts the real command as a subprocess with a temporary config and talks
to it over real sockets; ``GET /health`` says which worker (pid) answered.
"""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path

import h11
import orjson
import pytest
from test_cli import Serve, clean_env, expected_stream, refused, runnel

from runnel.testing import H11Client, free_port, request, wait_until

LEDGER_APP = Path(__file__).resolve().parents[1] / "apps" / "ledger.py"


def worker_pid(port: int) -> int | None:
    """The pid of the worker that a new connection reached (None while none answers)."""
    try:
        reply = request(port, "GET", "/health")
    except OSError:
        return None
    return reply.json()["worker"]["pid"] if reply.status == 200 else None


def pids_seen(port: int, want: int, tries: int = 200) -> set[int]:
    """Distinct worker pids over up to ``tries`` new connections, stopping at ``want``."""
    seen: set[int] = set()
    for _ in range(tries):
        pid = worker_pid(port)
        if pid is not None:
            seen.add(pid)
        if len(seen) >= want:
            break
    return seen


def two_workers(port: int, without: int | None = None) -> set[int] | None:
    """Two distinct pids answering on ``port`` (neither ``without``), else None."""
    seen = pids_seen(port, 2, tries=20)
    return seen if len(seen) == 2 and without not in seen else None


class Workers(Serve):
    """``runnel serve --workers 2`` on a free port; stopped with SIGTERM (then killed) at the end."""

    def __init__(self, tmp_path: Path, config: Path, *, env=None, name: str = "workers") -> None:
        self.port = free_port()
        super().__init__(tmp_path, "--config", config, "--port", self.port, "--workers", 2, env=env, name=name)

    def wait_up(self) -> set[int]:
        """Both workers healthy; their pids."""
        self.wait_healthy(self.port)
        return wait_until(lambda: two_workers(self.port), timeout=30)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except Exception:
                pass
        super().close()


def echo_config(tmp_path: Path, extra: str = "") -> Path:
    config = tmp_path / "runnel.toml"
    config.write_text(f'[server]\nshutdown_grace = 30\n{extra}\n[apps.echo]\nbackend = "echo"\npace_ms = 50\n')
    return config


def test_two_workers_serve_one_port_and_a_killed_one_is_started_again(tmp_path):
    with Workers(tmp_path, echo_config(tmp_path)) as serve:
        first = serve.wait_up()
        assert serve.proc.pid not in first  # the supervisor itself serves nothing
        for pid in first:
            assert Path(f"/proc/{pid}/stat").read_text().split()[3] == str(serve.proc.pid)  # its children
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        # The survivor keeps serving meanwhile; the supervisor starts a new worker in its place.
        again = wait_until(lambda: two_workers(serve.port, without=victim), timeout=30)
        assert max(first) in again and len(again - first) == 1
        assert serve.proc.poll() is None
        assert f"pid {victim}) exited with status -9; starting it again" in serve.log
        assert serve.stop() == 0
        assert "Traceback" not in serve.log


def test_sigterm_drains_both_workers_and_their_streams_finish(tmp_path):
    with Workers(tmp_path, echo_config(tmp_path)) as serve:
        pids = serve.wait_up()
        # One stream on each worker: a connection asks /health (which worker?), then streams.
        streams: dict[int, tuple[H11Client, bytes]] = {}
        for _ in range(100):
            client = H11Client(serve.port)
            pid = client.request("GET", "/health").json()["worker"]["pid"]
            if pid in streams:
                client.close()
                continue
            body = b'{"prompt": "a b c d", "max_tokens": 20, "stream": true}'
            client.send("POST", "/echo/echo", body=body)
            assert type(client.next_event()) is h11.Response
            first = client.next_event()
            assert type(first) is h11.Data
            streams[pid] = (client, bytes(first.data))
            if len(streams) == 2:
                break
        assert set(streams) == pids
        serve.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: refused(serve.port), timeout=10)  # neither worker takes new connections
        for client, data in streams.values():
            with client:
                while type(event := client.next_event()) is not h11.EndOfMessage:
                    assert type(event) is h11.Data, event
                    data += bytes(event.data)
                assert data == expected_stream(20)  # every token, after the signal
        assert serve.proc.wait(timeout=30) == 0
        log = serve.log
    assert log.count("SIGTERM: finishing in-flight requests (up to 30.0s)") == 2
    assert log.count("runnel stopped") == 2
    assert "Traceback" not in log and "starting it again" not in log


def test_workers_share_the_run_store_and_run_each_accepted_run_once(tmp_path):
    store, ledger, gate = tmp_path / "runs.sqlite3", tmp_path / "ledger", tmp_path / "gate"
    config = tmp_path / "runnel.toml"
    config.write_text(textwrap.dedent(f"""
        [server]
        runs_path = "{store}"
        runs_workers = 4

        [apps.lab]
        backend = "python"
        module = "{LEDGER_APP}"

        [apps.lab.functions]
        public = true
    """))
    with Workers(tmp_path, config) as serve:
        serve.wait_up()
        # Held runs fill both workers (4 running each) and their queues; then all go at once.
        runs = {}
        for n in range(60):
            reply = request(serve.port, "POST", "/v4/p/lab/append?async=true",
                            body=orjson.dumps({"ledger": str(ledger), "tag": f"r{n}", "gate": str(gate)}))
            assert reply.status == 202, reply.body
            runs[reply.json()["run_id"]] = f"r{n}"
        gate.write_text("")

        def status(run_id: str) -> dict:  # from whichever worker a new connection reaches
            return request(serve.port, "GET", f"/v4/p/lab/runs/{run_id}").json()

        for run_id, tag in runs.items():
            body = wait_until(lambda run_id=run_id: (b := status(run_id))["status"] != "queued" and
                              b["status"] != "running" and b, timeout=30)
            assert (body["status"], body["result"]) == ("succeeded", tag)
        assert serve.stop() == 0
    lines = [line.split() for line in ledger.read_text().splitlines()]
    tags = [tag for tag, _ in lines]
    assert sorted(tags) == sorted(runs.values())  # each exactly once
    assert len({pid for _, pid in lines}) == 2  # and both workers ran some


def test_runs_in_memory_cannot_be_shared_by_workers(tmp_path):
    config = tmp_path / "runnel.toml"
    config.write_text(f'[server]\nruns_path = ""\n\n[apps.lab]\nbackend = "python"\nmodule = "{LEDGER_APP}"\n')
    result = runnel("serve", "--config", config, "--port", free_port(), "--workers", 2, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (f"runnel: config error: {config}: server.runs_path: runs kept in memory (\"\") "
                             "cannot be shared by several workers; give them a file\n")


def test_a_second_supervisor_on_the_same_run_store_is_refused(tmp_path):
    store = tmp_path / "runs.sqlite3"
    config = tmp_path / "runnel.toml"
    config.write_text(f'[apps.lab]\nbackend = "python"\nmodule = "{LEDGER_APP}"\n')
    env = clean_env(RUNNEL_RUNS_PATH=str(store))
    with Workers(tmp_path, config, env=env) as serve:
        serve.wait_up()
        reply = request(serve.port, "POST", "/v4/p/lab/append?async=true",
                        body=orjson.dumps({"ledger": str(tmp_path / "ledger"), "tag": "t"}))
        assert reply.status == 202  # the file exists now: a single server would lock it when it starts
        result = runnel("serve", "--config", config, "--port", free_port(), "--workers", 2, env=env, cwd=tmp_path)
        assert result.returncode == 2 and "is in use by another runnel server" in result.stderr
        # Nor does a single server take it from the workers.
        result = runnel("serve", "--config", config, "--port", free_port(), env=env, cwd=tmp_path)
        assert result.returncode == 2 and "is in use by another runnel server" in result.stderr
        assert serve.stop() == 0


@pytest.mark.parametrize("where", ["flag", "variable"])
def test_a_port_in_use_stops_the_supervisor_before_any_worker_starts(tmp_path, where):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        if where == "flag":
            result = runnel("serve", "--port", port, "--workers", 2, cwd=tmp_path)
        else:
            result = runnel("serve", "--port", port, env=clean_env(RUNNEL_WORKERS="2"), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith("runnel: ") and "in use" in result.stderr
    assert "worker" not in result.stderr.lower()


def test_metrics_are_summed_over_the_workers(tmp_path):
    """A scrape reaches one worker; its counters are every worker's (prometheus_client's
    multiprocess files), and the live gauges are summed (or, for readiness, the minimum)."""
    from test_metrics import Scrape

    with Workers(tmp_path, echo_config(tmp_path, "metrics_public = true")) as serve:
        serve.wait_up()

        def health_count(scrape: Scrape) -> float:
            return scrape.value("runnel_http_requests_total", route="/health", method="GET", status="2xx")

        def agreed() -> float | None:
            """The count four scrapes agree on (whichever workers answer: one sum), else None. A
            request is counted once its response is sent: a worker may still be counting the
            last /health when the next scrape reads its file, so the counts settle first."""
            counts = {health_count(Scrape(serve.port)) for _ in range(4)}
            return counts.pop() if len(counts) == 1 else None

        health = wait_until(agreed, timeout=10)
        assert health > 0
        pids = [worker_pid(serve.port) for _ in range(30)]
        assert len(set(pids)) == 2  # both workers served some of the 30
        wait_until(lambda: health_count(Scrape(serve.port)) == health + 30, timeout=10)
        for _ in range(6):
            after = Scrape(serve.port)
            assert after.value("runnel_http_requests_total", route="/health", method="GET", status="2xx") == \
                health + 30
            assert after.value("runnel_app_ready", app="echo") == 1.0
            assert after.value("runnel_http_connections_open") >= 1  # this scrape's own connection
        assert serve.stop() == 0
