"""Function apps (backend "python") behind the Cortex-style /v4 routes, end to end.

A real server serves examples/hello/main.py, modules under tests/apps/ for the
cases the example should not carry (slow setup, endless generators), and an echo
model app; clients are raw h11, raw sockets and the openai SDK.
"""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path

import openai
import orjson
import pytest

import runnel
from runnel.config import ConfigError
from runnel.testing import H11Client, connect, recv_until, request, send_post, wait_until

REPO = Path(__file__).resolve().parents[2]
HELLO = REPO / "examples" / "hello" / "main.py"
APPS = REPO / "tests" / "apps"
RUN_ID = re.compile(r"[0-9a-f]{32}")
SSE = [("accept", "text/event-stream")]
KEY = "k" * 16


def call(port: int, app: str, function: str, body=None, *, headers=(), project: str = "p-test"):
    data = b"" if body is None else body if isinstance(body, bytes) else orjson.dumps(body)
    return request(port, "POST", f"/v4/{project}/{app}/{function}", headers=headers, body=data)


def ok(reply, status: int = 200):
    """The {run_id, run_time_ms, result} body, checked; returns the result."""
    assert reply.status == status, reply.body
    assert reply.header(b"content-type") == b"application/json"
    body = reply.json()
    assert list(body) == ["run_id", "run_time_ms", "result"]
    assert RUN_ID.fullmatch(body["run_id"])
    assert reply.header(b"x-request-id") == body["run_id"].encode()
    assert type(body["run_time_ms"]) is int and body["run_time_ms"] >= 0
    return body["result"]


def failed(reply, status: int, code: str | None = None, param=None) -> dict:
    """An error body: the OpenAI envelope plus the run id (which X-Request-Id carries)."""
    assert reply.status == status, reply.body
    assert reply.header(b"content-type") == b"application/json"
    body = reply.json()
    assert list(body) == ["error", "run_id"]
    assert sorted(body["error"]) == ["code", "message", "param", "type"]
    assert RUN_ID.fullmatch(body["run_id"])
    assert reply.header(b"x-request-id") == body["run_id"].encode()
    if code is not None:
        assert body["error"]["code"] == code
    assert body["error"]["param"] == param
    return body["error"]


def python_app(path, **options) -> dict:
    return {"backend": "python", "module": str(path), **options}


@pytest.fixture
def hello(start_server):
    return start_server({"apps": {"hello": python_app(HELLO), "echo": {"backend": "echo"}}})


def module_of(server, app: str):
    return server.server.apps.get(app).module


# -- calling functions ---------------------------------------------------------------------


def test_sync_function_answers_run_id_time_and_result(hello):
    reply = call(hello.port, "hello", "greet", {"name": "Ada"})
    assert ok(reply) == "Hello, Ada!"
    assert ok(call(hello.port, "hello", "greet", {"name": "Bo", "punctuation": "?"})) == "Hello, Bo?"
    # Every call is a new run; a client's own X-Request-Id does not replace the run id.
    again = call(hello.port, "hello", "greet", {"name": "Ada"}, headers=[("x-request-id", "mine-0001")])
    assert ok(again) == "Hello, Ada!"
    assert again.json()["run_id"] != reply.json()["run_id"]
    # The project id is not checked.
    assert ok(call(hello.port, "hello", "greet", {"name": "Ada"}, project="anything")) == "Hello, Ada!"


def test_async_function(hello):
    assert ok(call(hello.port, "hello", "add", {"a": 1, "b": 2.5})) == {"sum": 3.5}


def test_sync_generator_streams_sse(hello):
    reply = call(hello.port, "hello", "count", {"to": 3}, headers=SSE)
    assert reply.status == 200
    assert reply.header(b"content-type") == b"text/event-stream"
    assert reply.header(b"transfer-encoding") == b"chunked"
    assert RUN_ID.fullmatch(reply.header(b"x-request-id").decode())
    assert reply.body == b'data: {"n":1}\n\ndata: {"n":2}\n\ndata: {"n":3}\n\n'


def test_async_generator_streams_sse(hello):
    reply = call(hello.port, "hello", "spell", {"word": "hey"}, headers=SSE)
    assert reply.status == 200
    assert reply.header(b"content-type") == b"text/event-stream"
    assert reply.body == b"data: h\n\ndata: e\n\ndata: y\n\n"
    # Other stream framings the server knows work the same way.
    lines = call(hello.port, "hello", "spell", {"word": "ok"}, headers=[("accept", "application/x-ndjson")])
    assert lines.header(b"content-type") == b"application/x-ndjson"
    assert lines.body == b'"o"\n"k"\n'


def test_generator_without_sse_is_collected_into_a_list(hello):
    assert ok(call(hello.port, "hello", "count", {"to": 2})) == [{"n": 1}, {"n": 2}]
    assert ok(call(hello.port, "hello", "spell", {"word": "ab"}, headers=[("accept", "application/json")])) == [
        "a", "b"]
    assert ok(call(hello.port, "hello", "count", {"to": 0})) == []


def test_run_id_is_passed_to_a_function_that_declares_it(hello):
    reply = call(hello.port, "hello", "whoami", {"note": "hi"})
    result = ok(reply)
    assert result == {"run_id": reply.json()["run_id"], "note": "hi"}
    # The run id is the server's to give.
    error = failed(call(hello.port, "hello", "whoami", {"run_id": "x" * 32}), 422, "unexpected_argument", "run_id")
    assert "run_id" in error["message"]


def test_empty_body_means_no_arguments(hello):
    assert ok(call(hello.port, "hello", "count")) == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert ok(call(hello.port, "hello", "whoami", b"  \n")) == {"run_id": ANY_RUN_ID, "note": None}


class _AnyRunId:
    def __eq__(self, other) -> bool:
        return isinstance(other, str) and RUN_ID.fullmatch(other) is not None


ANY_RUN_ID = _AnyRunId()


def test_unknown_and_private_functions_and_unknown_apps_are_404(hello):
    for function in ("_helper", "setup", "nope", "asyncio", "annotations"):
        error = failed(call(hello.port, "hello", function, {}), 404, "function_not_found", "function")
        assert function in error["message"]
    error = failed(call(hello.port, "nope", "greet", {"name": "x"}), 404, "app_not_found", "app")
    assert "nope" in error["message"]
    # A model app has exactly one function, run.
    failed(call(hello.port, "echo", "greet", {"name": "x"}), 404, "function_not_found", "function")


def test_missing_and_unexpected_arguments_are_422_naming_them(hello):
    error = failed(call(hello.port, "hello", "greet", {}), 422, "missing_argument", "name")
    assert "'name'" in error["message"] and "greet" in error["message"]
    error = failed(call(hello.port, "hello", "greet", {"name": "a", "colour": "red"}), 422,
                   "unexpected_argument", "colour")
    assert "'colour'" in error["message"]
    # **kwargs takes any extra argument.
    reply = call(hello.port, "hello", "run", {"messages": [{"role": "user", "content": "x"}], "colour": "red"})
    assert ok(reply)["object"] == "chat.completion"


def test_body_must_be_a_json_object(hello):
    for body in (b"[1, 2]", b'"name"', b"null", b"3"):
        error = failed(call(hello.port, "hello", "greet", body), 400, "invalid_body")
        assert "JSON object" in error["message"]
    failed(call(hello.port, "hello", "greet", b"{"), 400, "invalid_json")


def test_exception_is_500_with_message_and_run_id_and_the_server_keeps_serving(hello):
    with H11Client(hello.port) as client:
        reply = client.request("POST", "/v4/p-test/hello/fail", body=b'{"message": "kaboom 42"}')
        error = failed(reply, 500, "function_error")
        assert "kaboom 42" in error["message"] and "ValueError" in error["message"]
        assert error["type"] == "server_error"
        # Same connection, next call.
        assert ok(client.request("POST", "/v4/p-test/hello/greet", body=b'{"name": "still here"}')) == \
            "Hello, still here!"


def test_status_code_in_a_returned_dict_sets_the_status(hello):
    assert ok(call(hello.port, "hello", "create", {"item": "book"}), 201) == {"created": "book"}


def test_setup_runs_once_before_the_first_call(hello):
    module = module_of(hello, "hello")
    assert module.SETUP_CALLS == 1
    # greet uses what setup loaded, so setup ran before the first call.
    assert ok(call(hello.port, "hello", "greet", {"name": "Ada"})) == "Hello, Ada!"
    for _ in range(3):
        ok(call(hello.port, "hello", "count", {"to": 1}))
    assert module.SETUP_CALLS == 1


def test_stats_lists_functions(hello):
    stats = request(hello.port, "GET", "/stats").json()["apps"]["hello"]
    assert stats["state"] == "ready"
    assert stats["functions"] == ["greet", "add", "count", "spell", "whoami", "create", "fail", "run"]
    assert stats["workers"] == 8


# -- loading -------------------------------------------------------------------------------


def test_health_is_503_while_a_slow_setup_runs(start_server, tmp_path, monkeypatch):
    gate = tmp_path / "go"
    monkeypatch.setenv("SLOW_SETUP_GATE", str(gate))
    module = APPS / "slow_setup.py"
    server = start_server({"apps": {"slow": python_app(module, workers=2)}}, ready=False)
    health = request(server.port, "GET", "/health")
    assert health.status == 503
    assert health.json() == {"status": "loading", "apps": {"slow": "loading"}}
    loading = call(server.port, "slow", "ping")
    failed(loading, 503, "app_not_ready")
    assert loading.header(b"retry-after") == b"1"
    gate.write_text("")
    assert server.wait_ready()
    assert request(server.port, "GET", "/health").status == 200
    assert ok(call(server.port, "slow", "ping")) == ["setup"]


def test_a_module_that_fails_to_import_fails_its_app(start_server):
    module = APPS / "import_fails.py"
    server = start_server({"apps": {"broken": python_app(module)}})
    assert request(server.port, "GET", "/health").json() == {"status": "failed", "apps": {"broken": "failed"}}
    failed(call(server.port, "broken", "anything"), 503, "app_not_ready")


def test_an_importable_module_name_is_an_app(start_server):
    server = start_server({"apps": {"js": {"backend": "python", "module": "json", "workers": 1}}})
    assert ok(call(server.port, "js", "dumps", {"obj": [1, "a"]})) == '[1, "a"]'
    assert ok(call(server.port, "js", "loads", {"s": '{"x": 1}'})) == {"x": 1}
    # Classes and names json imports from its submodules are not functions.
    failed(call(server.port, "js", "JSONDecoder", {}), 404, "function_not_found", "function")
    failed(call(server.port, "js", "scanstring", {}), 404, "function_not_found", "function")


def test_config_mistakes_name_the_key(tmp_path):
    cases = [
        ({"backend": "python"}, "apps.f.module: is required"),
        ({"backend": "python", "module": str(tmp_path / "absent.py")}, "apps.f.module: no such file"),
        ({"backend": "python", "module": "not a module"}, "apps.f.module: must be a .py file or an importable"),
        ({"backend": "python", "module": str(HELLO), "workers": 0}, "apps.f.workers: must be between 1 and 1024"),
        ({"backend": "python", "module": str(HELLO), "wokers": 2}, "apps.f.wokers: unknown key 'wokers'"),
        ({"backend": "python", "module": str(HELLO), "functions": {"public": "yes"}},
         "apps.f.functions.public: expected a boolean"),
        ({"backend": "python", "module": str(HELLO), "functions": {"publik": True}},
         "apps.f.functions.publik: unknown key 'publik'"),
    ]
    for table, message in cases:
        with pytest.raises(ConfigError) as caught:
            runnel.Server(runnel.config_from_dict({"apps": {"f": table}})).build()
        assert message in str(caught.value), (table, str(caught.value))


def test_example_config_checks():
    from runnel.cli import main

    assert main(["check-config", str(REPO / "conf" / "examples" / "functions.toml")]) == 0


# -- streams: errors, disconnects, backpressure -----------------------------------------------

@pytest.fixture
def lab(start_server):
    return start_server({"apps": {"lab": python_app(APPS / "lab.py")}})


def open_stream(port: int, function: str, body: bytes = b"{}") -> tuple[socket.socket, bytes]:
    """POST with Accept: text/event-stream over a raw socket; returns it once the head has come."""
    sock = connect(port)
    send_post(sock, f"/v4/p/lab/{function}", body, headers={"accept": "text/event-stream"})
    data = recv_until(sock, b"data: ")
    assert data.startswith(b"HTTP/1.1 200 ")
    return sock, data


def test_an_exception_mid_stream_ends_it_with_an_error_event(lab):
    reply = call(lab.port, "lab", "broken", {}, headers=SSE)
    assert reply.status == 200
    first, error = reply.body.split(b"\n\n", 1)
    assert first == b"data: 1"
    assert error.startswith(b"event: error\ndata: ") and error.endswith(b"\n\n")
    payload = orjson.loads(error[len(b"event: error\ndata: "):-2])
    assert payload["run_id"] == reply.header(b"x-request-id").decode()
    assert payload["error"]["code"] == "function_error"
    assert "broke mid-stream" in payload["error"]["message"]
    # A value that cannot be framed is an error too.
    reply = call(lab.port, "lab", "unsendable", {}, headers=SSE)
    assert reply.body.startswith(b"event: error\ndata: ")
    # Collected (no SSE), the same failure is a plain 500.
    error = failed(call(lab.port, "lab", "broken", {}), 500, "function_error")
    assert "broke mid-stream" in error["message"]


def test_a_result_that_is_not_json_is_500_naming_its_type(lab):
    error = failed(call(lab.port, "lab", "things"), 500, "result_not_serializable")
    assert "set" in error["message"] and "things" in error["message"]
    error = failed(call(lab.port, "lab", "bad_status"), 500, "invalid_status_code")
    assert "42" in error["message"]


def test_disconnect_cancels_an_async_generator(lab):
    state = module_of(lab, "lab").STATE
    sock, data = open_stream(lab.port, "forever")
    assert b"data: first\n\n" in data
    assert not state["async_closed"]
    sock.close()
    wait_until(lambda: state["async_closed"])
    assert request(lab.port, "GET", "/health").status == 200


def test_disconnect_stops_pulling_a_sync_generator(lab):
    state = module_of(lab, "lab").STATE
    sock, _ = open_stream(lab.port, "sync_forever")
    wait_until(lambda: state["sync_pulled"] >= 3)
    sock.close()
    # Closed (its finally ran), so it will never be pulled again.
    wait_until(lambda: state["sync_closed"])


def test_disconnect_during_a_sync_next_closes_the_generator_after_it(lab, caplog):
    # A generator closed while its next() runs in another thread raises ValueError
    # ("generator already executing") and is left unclosed: the close must wait for it.
    caplog.set_level(logging.ERROR, logger="runnel.functions")
    state = module_of(lab, "lab").STATE
    sock, data = open_stream(lab.port, "sync_slow_pull")
    assert b"data: first\n\n" in recv_until(sock, b"data: first\n\n", data)
    wait_until(lambda: state["slow_pulling"])
    sock.close()  # while that next() sleeps in its thread
    wait_until(lambda: state["slow_closed"])
    assert not state["slow_pulling"]  # closed after the next() ended, not during it
    wait_until(lambda: request(lab.port, "GET", "/stats").json()["apps"]["lab"]["pool_calls"] == 0)
    assert [r.getMessage() for r in caplog.records if r.name == "runnel.functions"] == []


def test_a_slow_reader_holds_the_generator_back(lab):
    state = module_of(lab, "lab").STATE
    sock, _ = open_stream(lab.port, "flood")  # then read nothing
    wait_until(lambda: any(connection.flow.writing_paused for connection in lab.server.connections))
    # The handler waits for the client instead of buffering without end: the loop stays
    # free (this call gets through) and only what fills the buffers was made.
    pulled = lab.call_soon(lambda: state["flood"])
    assert pulled < 1000
    received = 0
    while state["flood"] <= pulled + 2:  # reading lets it go on
        received += len(sock.recv(1 << 20))
    assert received
    sock.close()
    wait_until(lambda: state["flood_closed"])


# -- OpenAI-shaped sub-paths ----------------------------------------------------------------


def test_openai_sub_paths_of_python_functions(lab):
    messages = [{"role": "user", "content": "x"}]
    # A generator asked for no stream: its chunks merged into one completion.
    reply = request(lab.port, "POST", "/v4/p/lab/chunky/chat/completions", body=orjson.dumps({"messages": messages}))
    assert reply.status == 200
    assert RUN_ID.fullmatch(reply.header(b"x-request-id").decode())
    assert reply.json() == {"id": "c-1", "object": "chat.completion", "created": 7, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ab"}, "logprobs": None, "finish_reason": "length"}]}
    # Embeddings: the function's result is the body, for the SDK to read.
    with sdk(lab, "/v4/p/lab/embed") as client:
        response = client.embeddings.create(model="e", input=["abc", "de"], encoding_format="float")
    assert [item.embedding for item in response.data] == [[3.0, 1.0], [2.0, 1.0]]
    assert response.model == "e"
    reply = request(lab.port, "POST", "/v4/p/lab/embed/embedding", body=b'{"input": "abcd"}')
    assert reply.json()["data"][0]["embedding"] == [4.0, 1.0]
    failed(request(lab.port, "POST", "/v4/p/lab/embed/embeddings", body=b"{}"), 422, "missing_argument", "input")



def sdk(server, path: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + path, api_key=kwargs.pop("api_key", "unused"), max_retries=0,
                         timeout=30, **kwargs)


def test_openai_sdk_chat_against_a_python_function(hello):
    messages = [{"role": "user", "content": "hi there"}]
    with sdk(hello, "/v4/p-test/hello/run") as client:
        completion = client.chat.completions.create(model="hello-model", messages=messages)
        assert completion.object == "chat.completion"
        assert completion.model == "hello-model"
        assert completion.choices[0].message.content == "Hello! You said: hi there"
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage.total_tokens == 2 + 5

        with client.chat.completions.create(model="hello-model", messages=messages, stream=True,
                                            stream_options={"include_usage": True}) as stream:
            chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == \
            "Hello! You said: hi there"
        assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "stop"
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 7
        assert len({chunk.id for chunk in chunks}) == 1

        raw = client.chat.completions.with_raw_response.create(model="m", messages=messages)
        assert RUN_ID.fullmatch(raw.headers["x-request-id"])


def test_chat_sub_path_stream_framing_ends_with_done(hello):
    body = {"messages": [{"role": "user", "content": "yo"}], "stream": True}
    reply = request(hello.port, "POST", "/v4/p/hello/run/chat/completions", body=orjson.dumps(body))
    assert reply.status == 200
    assert reply.header(b"content-type") == b"text/event-stream"
    events = reply.body.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    chunks = [orjson.loads(event[len(b"data: "):]) for event in events[:-2]]
    assert [chunk["choices"][0]["delta"].get("content") for chunk in chunks] == ["", "Hello!", " You", " said:",
                                                                                " yo", None]
    # A generator called without "stream" has its chunks merged into one completion.
    reply = request(hello.port, "POST", "/v4/p/hello/count/chat/completions", body=b'{"to": 2}')
    assert reply.json() == [{"n": 1}, {"n": 2}]  # not chunks: as they are
    failed(request(hello.port, "POST", "/v4/p/hello/nope/chat/completions", body=b"{}"), 404,
           "function_not_found", "function")


def test_openai_sdk_chat_against_a_model_app(hello):
    messages = [{"role": "user", "content": "hello there"}]
    with sdk(hello, "/v4/p-test/echo/run") as client:
        completion = client.chat.completions.create(model="echo", messages=messages)
        assert completion.choices[0].message.content == "hello there"
        with client.chat.completions.create(model="echo", messages=messages, stream=True) as stream:
            text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text == "hello there"
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="echo", messages=messages, top_p=0)
        assert caught.value.body["param"] == "top_p"
    # Plain /v4/.../run on a model app: chat completions in the run envelope.
    result = ok(call(hello.port, "echo", "run", {"messages": messages}))
    assert result["object"] == "chat.completion"
    assert result["choices"][0]["message"]["content"] == "hello there"


def test_embeddings_sub_path_for_a_model_app(hello):
    with sdk(hello, "/v4/p-test/echo/run") as client:
        response = client.embeddings.create(model="echo", input=["red apple", "green apple"])
    assert [item.index for item in response.data] == [0, 1]
    assert all(len(item.embedding) == 64 for item in response.data)
    assert response.model == "echo"
    singular = request(hello.port, "POST", "/v4/p-test/echo/anything/embedding",
                       body=orjson.dumps({"input": "red apple"}))
    assert singular.status == 200
    # The SDK asks for base64 (float32): the same vector, to float32 precision.
    assert singular.json()["data"][0]["embedding"] == pytest.approx(response.data[0].embedding, abs=1e-6)


# -- authentication ---------------------------------------------------------------------------


def test_a_public_app_skips_auth_while_others_need_a_key(start_server):
    server = start_server({
        "auth": {"kind": "api_key", "keys": [KEY]},
        "apps": {
            "hello": python_app(HELLO, functions={"public": True}),
            "private": python_app(HELLO, functions={"public": False}),
            "echo": {"backend": "echo"},
        },
    })
    port = server.port
    bearer = [("authorization", f"Bearer {KEY}")]
    assert ok(call(port, "hello", "greet", {"name": "anyone"})) == "Hello, anyone!"
    assert ok(call(port, "hello", "greet", {"name": "x"}, headers=[("authorization", "Bearer wrong")])) == \
        "Hello, x!"
    for app, function, body in (("private", "greet", {"name": "x"}), ("echo", "run", {"messages": []}),
                                ("unknown", "greet", {})):
        reply = call(port, app, function, body)
        error = failed(reply, 401, "invalid_api_key")
        assert error["type"] == "authentication_error"
        assert reply.header(b"www-authenticate") == b'Bearer realm="runnel"'
    failed(call(port, "private", "greet", {"name": "x"}, headers=[("authorization", "Bearer wrong-key-1")]), 401)
    assert ok(call(port, "private", "greet", {"name": "x"}, headers=bearer)) == "Hello, x!"
    failed(call(port, "unknown", "greet", {}, headers=bearer), 404, "app_not_found", "app")
    messages = [{"role": "user", "content": "hi"}]
    with sdk(server, "/v4/p/echo/run", api_key=KEY) as client:
        assert client.chat.completions.create(model="echo", messages=messages).choices[0].message.content == "hi"
    with sdk(server, "/v4/p/echo/run") as client, pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="echo", messages=messages)
    with sdk(server, "/v4/p/hello/run") as client:
        assert client.chat.completions.create(model="m", messages=messages).choices[0].message.content == \
            "Hello! You said: hi"
