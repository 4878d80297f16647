"""The ``runnel`` command: check-config, plugins, and serve as a real subprocess."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import h11
import pytest

from runnel.testing import H11Client, connect, free_port, recv_until, request, wait_until

REPO = Path(__file__).resolve().parents[2]
STUCK = REPO / "tests" / "apps" / "stuck.py"


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNEL_")}
    env.update(extra)
    return env


def runnel(*args, env=None, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "runnel", *map(str, args)],
        capture_output=True, text=True, env=env or clean_env(), cwd=cwd, timeout=60,
    )


def refused(port: int) -> bool:
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=2)
    except ConnectionRefusedError:
        return True
    sock.close()
    return False


def health(port: int):
    try:
        return request(port, "GET", "/health")
    except OSError:
        return None


class Serve:
    """``python -m runnel serve ...`` with its output in a file."""

    def __init__(self, tmp_path: Path, *args, env=None, name="serve"):
        self.log_path = tmp_path / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runnel", "serve", *map(str, args)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env or clean_env(), cwd=tmp_path,
        )

    def wait_healthy(self, port: int):
        """The first 200 from /health: the server listens and every app has loaded (a 503 while
        an app loads is not healthy yet)."""
        def healthy():
            if self.proc.poll() is not None:
                return True
            reply = health(port)
            return reply if reply is not None and reply.status == 200 else None

        reply = wait_until(healthy, timeout=30)
        assert self.proc.poll() is None, self.log
        return reply

    @property
    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def close(self):
        try:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=30)
        finally:
            self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- check-config ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "summary"),
    [("echo.toml", "1 app, auth none"), ("server.toml", "0 apps, auth none"), ("api_keys.toml", "0 apps, auth api_key"),
     ("llamacpp.toml", "1 app, auth none")],
)
def test_check_config_accepts_examples(name, summary):
    path = f"conf/examples/{name}"
    result = runnel("check-config", path)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"{path}: ok ({summary})\n"


def test_check_config_resolves_keys_file_next_to_the_config(tmp_path):
    (tmp_path / "keys.txt").write_text("# keys\ncheck-config-key-1\n")
    config = tmp_path / "runnel.toml"
    config.write_text('[auth]\nkind = "api_key"\nkeys_file = "keys.txt"\n\n[apps.a]\nbackend = "echo"\n'
                      '[apps.b]\nbackend = "echo"\npace_ms = 5\n')
    result = runnel("check-config", config)  # run from the repo root, not tmp_path
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"{config}: ok (2 apps, auth api_key)\n"


BAD_CONFIGS = [
    ("[server]\nprot = 8000\n", "server.prot", "unknown key 'prot' (did you mean 'port'?); valid keys: host, port,"),
    ('[server]\nport = "80"\n', "server.port", "expected an integer, got string '80'"),
    ("[server]\nport = 70000\n", "server.port", "must be between 0 and 65535, got 70000"),
    ("[serve]\nport = 1\n", "serve", "unknown key 'serve' (did you mean 'server'?)"),
    ('[apps.m]\nbackend = "vllm"\n', "apps.m.backend", "unknown backend 'vllm'; installed: "),
    ("[apps.m]\npace_ms = 5\n", "apps.m.backend", "is required"),
    ('[apps.m]\nbackend = "echo"\npace = 5\n', "apps.m.pace", "unknown key 'pace' (did you mean 'pace_ms'?)"),
    ('[apps.m]\nbackend = "echo"\npace_ms = -1\n', "apps.m.pace_ms", "must be >= 0"),
    ('[auth]\nkind = "kerberos"\n', "auth.kind", "unknown auth kind 'kerberos'; installed: api_key, "),
    ('[auth]\nkind = "api_key"\nkeys_file = "missing-keys.txt"\n', "auth.keys_file", "cannot read {dir}/missing-keys.txt: "
     "No such file or directory"),
    # Every per-app surface table refuses typos and wrong types (issue 11).
    ('[apps.m]\nbackend = "echo"\n[apps.m.openai]\nowned = "x"\n', "apps.m.openai.owned",
     "unknown key 'owned' (did you mean 'owned_by'?)"),
    ('[apps.m]\nbackend = "echo"\n[apps.m.openai]\nowned_by = 5\n', "apps.m.openai.owned_by",
     "expected a string, got integer 5"),
    ('[apps.m]\nbackend = "echo"\n[apps.m.runpod]\nendpoint = "x"\n', "apps.m.runpod.endpoint",
     "unknown key 'endpoint' (did you mean 'endpoint_id'?)"),
    ('[apps.m]\nbackend = "echo"\n[apps.m.baseten]\nmodel_id = "x"\nproduct = true\n', "apps.m.baseten.product",
     "unknown key 'product' (did you mean 'production'?)"),
    ('[apps.m]\nbackend = "echo"\n[apps.m.functions]\npublik = true\n', "apps.m.functions.publik",
     "unknown key 'publik' (did you mean 'public'?)"),
    ('[apps.m]\nbackend = "echo"\n[apps.m.functions]\npublic = "yes"\n', "apps.m.functions.public",
     "expected a boolean, got string 'yes'"),
    # A model path that cannot load is refused at check-config (and at start-up: same build()).
    ('[apps.m]\nbackend = "ctranslate2"\nmodel = "no-such-model"\n', "apps.m.model",
     "no such model directory: {dir}/no-such-model"),
    ('[apps.m]\nbackend = "ctranslate2"\nmodel = "."\n', "apps.m.model",
     "not a CTranslate2 model directory: no model.bin in {dir}"),
]


@pytest.mark.parametrize(("text", "key", "message"), BAD_CONFIGS, ids=[case[1] for case in BAD_CONFIGS])
def test_check_config_reports_file_and_key(tmp_path, text, key, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = runnel("check-config", path)
    assert result.returncode == 2
    assert result.stdout == ""
    message = message.format(dir=tmp_path)
    assert result.stderr.startswith(f"runnel: config error: {path}: {key}: {message}"), result.stderr
    assert result.stderr.count("\n") == 1  # one line, no traceback


def test_check_config_unreadable_or_invalid_toml(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[server\nport = 1\n")
    result = runnel("check-config", path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"runnel: config error: {path}: invalid TOML: ")
    missing = tmp_path / "nope.toml"
    result = runnel("check-config", missing)
    assert result.returncode == 2
    assert result.stderr == f"runnel: config error: {missing}: cannot read config file: No such file or directory\n"


# -- plugins --------------------------------------------------------------------------


def test_plugins_lists_builtins_then_installed():
    result = runnel("plugins")
    assert (result.returncode, result.stderr) == (0, "")
    lines = result.stdout.splitlines()
    assert lines[:3] == [
        "runnel.serializers\trunnel (built in)\trunnel_register_serializers",
        "runnel.auth.none\trunnel (built in)\trunnel_register_auth_kinds",
        "runnel.auth.api_key\trunnel (built in)\trunnel_register_auth_kinds",
    ]
    assert "echo\trunnel-echo 0.1.0\trunnel_register_backends, runnel_register_routes" in lines[3:]


# -- serve ----------------------------------------------------------------------------


def stop(serve: Serve, sig=signal.SIGTERM) -> int:
    serve.proc.send_signal(sig)
    return serve.proc.wait(timeout=30)


def test_serve_port_precedence_file_then_env_then_flag(tmp_path):
    file_port, env_port, flag_port = free_port(), free_port(), free_port()
    config = tmp_path / "runnel.toml"
    config.write_text(f'[server]\nport = {file_port}\n\n[apps.echo]\nbackend = "echo"\n')

    with Serve(tmp_path, "--config", config, name="file") as serve:
        assert serve.wait_healthy(file_port).json() == {"status": "ok"}
        assert stop(serve) == 0
        assert f"runnel listening on http://127.0.0.1:{file_port}" in serve.log

    with Serve(tmp_path, "--config", config, env=clean_env(RUNNEL_PORT=str(env_port)), name="env") as serve:
        assert serve.wait_healthy(env_port).json() == {"status": "ok"}
        assert refused(file_port)
        assert stop(serve) == 0
        assert f"runnel listening on http://127.0.0.1:{env_port}" in serve.log

    env = clean_env(RUNNEL_PORT=str(env_port), RUNNEL_CONFIG=str(config), RUNNEL_API_KEYS="serve-env-key-1")
    with Serve(tmp_path, "--port", flag_port, env=env, name="flag") as serve:
        assert serve.wait_healthy(flag_port).json() == {"status": "ok"}
        assert refused(env_port) and refused(file_port)
        # RUNNEL_CONFIG named the file (the echo app is there); RUNNEL_API_KEYS turned auth on.
        body = b'{"prompt": "k", "max_tokens": 1}'
        assert request(flag_port, "POST", "/echo/echo", body=body).status == 401
        reply = request(flag_port, "POST", "/echo/echo", headers=[("authorization", "Bearer serve-env-key-1")],
                        body=body)
        assert reply.json() == {"app": "echo", "text": "k", "tokens": 1}
        assert stop(serve) == 0


def test_serve_bad_env_port_is_config_error(tmp_path):
    result = runnel("serve", env=clean_env(RUNNEL_PORT="eighty"))
    assert result.returncode == 2
    assert result.stderr == "runnel: config error: environment: RUNNEL_PORT: expected an integer, got 'eighty'\n"


def slow_stream_server(tmp_path: Path, grace: float, name: str):
    port = free_port()
    config = tmp_path / f"{name}.toml"
    config.write_text(
        f"[server]\nport = {port}\nshutdown_grace = {grace}\n\n[apps.echo]\nbackend = \"echo\"\npace_ms = 50\n"
    )
    serve = Serve(tmp_path, "--config", config, name=name)
    serve.wait_healthy(port)
    return serve, port


def start_stream(port: int, max_tokens: int) -> tuple[H11Client, bytes]:
    """Start a paced stream and return the client once its first event arrived."""
    client = H11Client(port)
    body = b'{"prompt": "a b c d", "max_tokens": %d, "stream": true}' % max_tokens
    client.send("POST", "/echo/echo", body=body)
    response = client.next_event()
    assert type(response) is h11.Response and response.status_code == 200
    first = client.next_event()
    assert type(first) is h11.Data
    return client, bytes(first.data)


def expected_stream(max_tokens: int) -> bytes:
    words = "a b c d".split()
    out = b""
    for i in range(max_tokens):
        token = words[i % 4] if i == 0 else " " + words[i % 4]
        out += b'data: {"index":%d,"token":"%s"}\n\n' % (i, token.encode())
    return out + b'data: {"done":true,"tokens":%d}\n\n' % max_tokens


def test_sigterm_finishes_in_flight_stream_refuses_new_and_exits_0(tmp_path):
    serve, port = slow_stream_server(tmp_path, grace=30, name="graceful")
    with serve:
        idle = H11Client(port)
        assert idle.request("GET", "/health").status == 200  # now an idle keep-alive connection
        client, data = start_stream(port, 20)
        with client, idle:
            serve.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: refused(port), timeout=10)
            # The idle connection is closed rather than left to its keep-alive timeout.
            assert idle.sock.recv(1) == b""
            while True:
                event = client.next_event()
                if type(event) is h11.EndOfMessage:
                    break
                assert type(event) is h11.Data, event
                data += bytes(event.data)
            assert data == expected_stream(20)
            # ... and then the connection is closed.
            assert client.sock.recv(1) == b""
        assert serve.proc.wait(timeout=30) == 0
        log = serve.log
    assert "SIGTERM: finishing in-flight requests (up to 30.0s)" in log
    assert "runnel stopped" in log
    assert "Traceback" not in log


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_second_signal_during_grace_stops_now(tmp_path, second):
    serve, port = slow_stream_server(tmp_path, grace=60, name=f"forced-{second.name}")
    with serve:
        client, data = start_stream(port, 1000)  # 50 s of tokens, far beyond the test
        with client:
            serve.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: refused(port), timeout=10)
            assert serve.proc.poll() is None  # still in its grace period, streaming
            serve.proc.send_signal(second)
            # Liveness bound only: the grace period is 60 s.
            returncode = serve.proc.wait(timeout=10)
            # The stream was cut short and says so: no final event, but the shutdown error
            # as its last event, then its terminating chunk (before issue 10: neither).
            while True:
                event = client.next_event()
                if type(event) is h11.EndOfMessage:
                    break
                assert type(event) is h11.Data, event
                data += bytes(event.data)
            assert b'"done"' not in data
            assert data.endswith(b'event: error\ndata: {"error":{"message":"Server is shutting down",'
                                 b'"type":"server_error","param":null,"code":"server_shutting_down"}}\n\n'), data[-300:]
        log = serve.log
    assert returncode == 0, log
    assert f"second {second.name}: stopping now" in log
    assert "Traceback" not in log


def test_sigterm_exits_0_past_sync_functions_that_never_return(tmp_path):
    # Threads cannot be stopped: at the end of the grace period the server abandons the
    # calls still in its python app's threads, and the process exits all the same
    # (before issue 10 the interpreter joined those threads at exit: it never did).
    port, grace = free_port(), 1.0
    config = tmp_path / "stuck.toml"
    config.write_text(f'[server]\nport = {port}\nshutdown_grace = {grace}\n\n'
                      f'[apps.stuck]\nbackend = "python"\nmodule = "{STUCK}"\nworkers = 2\n')

    def post(function: str, accept: bytes = b"application/json") -> socket.socket:
        sock = connect(port)
        sock.sendall(b"POST /v4/p/stuck/%b HTTP/1.1\r\nhost: x\r\naccept: %b\r\ncontent-length: 2\r\n\r\n{}"
                     % (function.encode(), accept))
        return sock

    with Serve(tmp_path, "--config", config, name="stuck") as serve:
        serve.wait_healthy(port)
        calls = []
        try:
            calls += [post("hang"), post("hang_stream", b"text/event-stream")]
            # The stream's second next() never returns: both threads are stuck; one more call waits for them.
            assert b"data: first\n\n" in recv_until(calls[1], b"data: first\n\n")
            calls.append(post("hang"))
            wait_until(lambda: request(port, "GET", "/stats").json()["apps"]["stuck"]["pool_calls"] == 3)
            serve.proc.send_signal(signal.SIGTERM)
            returncode = serve.proc.wait(timeout=grace + 10)
        finally:
            for sock in calls:
                sock.close()
        log = serve.log
    assert returncode == 0, log
    assert "runnel stopped" in log
    assert "Traceback" not in log


def test_serve_port_taken_exits_1(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = runnel("serve", "--port", port, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith("runnel: ")
    assert "Traceback" not in result.stderr


# -- a new user's first hour (issue 11) ---------------------------------------------------

HELLO = REPO / "examples" / "hello" / "main.py"


def function_app_config(tmp_path: Path, name: str = "runnel.toml") -> Path:
    config = tmp_path / name
    config.write_text(f'[apps.hello]\nbackend = "python"\nmodule = "{HELLO}"\n\n'
                      '[apps.hello.functions]\npublic = true\n')
    return config


class Reply503:
    status = 503


def submit_run(port: int):
    return request(port, "POST", "/v4/p/hello/greet?async=true", body=b'{"name": "x"}')


def test_two_servers_from_one_directory_both_start_and_take_runs(tmp_path):
    # Each server's run store defaults to its own file in the per-user data directory,
    # never the working directory (tests/conftest.py points XDG_DATA_HOME at a temp dir).
    data_home = tmp_path / "data"
    env = clean_env(XDG_DATA_HOME=str(data_home))
    config = function_app_config(tmp_path)
    ports = free_port(), free_port()
    with Serve(tmp_path, "--config", config, "--port", ports[0], env=env, name="a") as a, \
            Serve(tmp_path, "--config", config, "--port", ports[1], env=env, name="b") as b:
        for serve, port in ((a, ports[0]), (b, ports[1])):
            wait_until(lambda port=port: (health(port) or Reply503).status == 200, timeout=30)  # apps loaded
            reply = submit_run(port)
            assert reply.status == 202, (reply.body, serve.log)
        # Two servers with no config (no apps): no store at all.
        no_config = free_port(), free_port()
        with Serve(tmp_path, "--port", no_config[0], env=env, name="c") as c, \
                Serve(tmp_path, "--port", no_config[1], env=env, name="d") as d:
            c.wait_healthy(no_config[0])
            d.wait_healthy(no_config[1])
    stores = sorted(p.name for p in (data_home / "runnel").glob("*.sqlite3"))
    assert len(stores) == 2 and all(name.startswith("runs-runnel-") for name in stores), stores
    assert not list(tmp_path.glob("*.sqlite3*"))  # nothing in the working directory


def test_a_busy_run_store_names_the_path_the_setting_and_the_variable(tmp_path):
    path = tmp_path / "runs.sqlite3"
    env = clean_env(RUNNEL_RUNS_PATH=str(path))
    config = function_app_config(tmp_path)
    port = free_port()
    with Serve(tmp_path, "--config", config, "--port", port, env=env) as serve:
        wait_until(lambda: (health(port) or Reply503).status == 200, timeout=30)  # apps loaded
        assert submit_run(port).status == 202  # makes (and locks) the file
        result = runnel("serve", "--config", config, "--port", free_port(), env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (f"runnel: config error: environment: RUNNEL_RUNS_PATH: {path} is in use by another "
                             "runnel server; give this one its own run store with [server] runs_path or the "
                             "RUNNEL_RUNS_PATH environment variable\n")


def test_a_short_key_in_the_environment_is_blamed_on_the_variable(tmp_path):
    config = tmp_path / "runnel.toml"
    config.write_text('[apps.echo]\nbackend = "echo"\n')
    result = runnel("check-config", config, env=clean_env(RUNNEL_API_KEYS="good-key-1,short"))
    assert result.returncode == 2
    assert result.stderr == ("runnel: config error: environment: RUNNEL_API_KEYS: "
                             "every API key must be at least 8 characters long\n")


def test_serve_without_a_config_warns_and_says_which_config_serves_the_model(tmp_path):
    port = free_port()
    with Serve(tmp_path, "--port", port) as serve:
        serve.wait_healthy(port)
        wait_until(lambda: "conf/runnel.toml" in serve.log)
        assert "WARNING" in serve.log and "serving no apps" in serve.log and "builtin:tiny" in serve.log


def test_version_and_serve_help():
    result = runnel("--version")
    assert result.returncode == 0 and re.fullmatch(r"runnel \d+\.\d+\.\d+\S*\n", result.stdout), result.stdout
    text = " ".join(runnel("serve", "--help").stdout.split())  # argparse wraps lines
    for option, default in (("--host", "127.0.0.1"), ("--port", "8000"), ("--log-level", "info")):
        assert option in text and f"else {default})" in text
    assert "$RUNNEL_CONFIG" in text and "$RUNNEL_PORT" in text


def test_a_model_directory_without_a_tokenizer_stops_serve_before_it_listens(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.bin").write_bytes(b"")
    config = tmp_path / "runnel.toml"
    port = free_port()
    config.write_text(f'[server]\nport = {port}\n\n[apps.m]\nbackend = "ctranslate2"\nmodel = "model"\n')
    expected = (f"runnel: config error: {config}: apps.m.model: no tokenizer in {model}: expected tokenizer.model "
                "(sentencepiece) or tokenizer.json (Hugging Face tokenizers)\n")
    checked = runnel("check-config", config)
    assert (checked.returncode, checked.stderr) == (2, expected)
    served = runnel("serve", "--config", config, cwd=tmp_path)
    assert (served.returncode, served.stderr) == (2, expected)
    assert refused(port)
