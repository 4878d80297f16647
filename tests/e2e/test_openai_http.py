"""The OpenAI-compatible API (/v1) over raw HTTP: exact SSE framing, every error's
envelope, errors after a stream started, client disconnects, stop strings, curl."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time

import orjson
import pytest

from runnel import HTTPError, hookimpl
from runnel.testing import (
    H11Client,
    RawResponse,
    assert_error,
    connect,
    read_head,
    read_until_closed,
    request,
    send_post,
    sse_events,
    wait_until,
)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def stream_post(port: int, path: str, body) -> RawResponse:
    """POST and read a whole chunked response, keeping each chunk."""
    with connect(port) as sock:
        send_post(sock, path, body)
        response = read_head(sock)
        assert (response.version, response.status) == (b"HTTP/1.1", 200), response.reader.pending
        response.read_chunks()
        return response


def post(port: int, path: str, body):
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return request(port, "POST", path, headers=[("content-type", "application/json")], body=data)


def assert_sse_response(response: RawResponse) -> list[bytes]:
    assert response.headers[b"content-type"] == b"text/event-stream"
    assert response.headers[b"transfer-encoding"] == b"chunked"
    assert b"content-length" not in response.headers
    assert response.headers[b"cache-control"] == b"no-cache"
    assert response.ended
    # Every chunk is written as whole events, so a client sees each as soon as it is sent.
    assert all(chunk.endswith(b"\n\n") for chunk in response.chunks)
    return sse_events(response.body)


# -- a scripted backend: fails mid-stream, or hangs until cancelled -----------------------------


class Handle:
    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.cancel_calls = 0

    def cancel(self) -> None:
        self.cancel_calls += 1
        self.cancelled.set()


class ScriptedApp:
    """A ModelApp whose generate() follows a script: "fail" pushes two tokens then
    an error; "hang" pushes one token and never finishes unless cancelled; "flood"
    pushes tokens as fast as the loop turns, whatever the client does, until cancelled."""

    owned_by = "tests"
    supported = frozenset()
    context_length = 4096
    default_max_tokens = 16

    def __init__(self, name: str, mode: str) -> None:
        self.model_id = name
        self.mode = mode
        self.handles: list[Handle] = []
        self.started = threading.Event()

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def tokenize(self, text: str) -> list[int]:
        return [ord(ch) for ch in text]

    def chat_prompt(self, messages: list[dict]) -> str:
        return messages[-1]["content"]

    def generate(self, prompt_tokens, params, n, sink):
        if self.mode == "busy":
            raise HTTPError(429, "queue is full", type="rate_limit_error", code="queue_full",
                            headers=((b"retry-after", b"1"),))
        handle = Handle()
        self.handles.append(handle)
        loop = asyncio.get_running_loop()
        if self.mode == "fail":
            def step(i: int) -> None:
                if i < 2:
                    sink.on_tokens(0, ["Hello", " world"][i], (i,), None)
                    loop.call_soon(step, i + 1)
                else:
                    sink.on_error(RuntimeError("boom"))
        elif self.mode == "flood":
            # A model that cannot pause: ~1 KB a token at every turn of the loop, until cancelled.
            piece = "x" * 1000

            def step(i: int) -> None:
                if not handle.cancelled.is_set():
                    sink.on_tokens(0, piece, (i,), None)
                    loop.call_soon(step, i + 1)
        else:
            def step(i: int) -> None:
                if not handle.cancelled.is_set():
                    sink.on_tokens(0, "tick", (i,), None)
                self.started.set()
        loop.call_soon(step, 0)
        return handle


class ScriptedBackends:
    def __init__(self) -> None:
        self.apps: dict[str, ScriptedApp] = {}

    @hookimpl
    def runnel_register_backends(self, register):
        def factory(app_config, table, server):
            mode = table.get("mode", str)
            table.finish()
            app = self.apps[app_config.name] = ScriptedApp(app_config.name, mode)
            return app

        register("scripted", factory)


@pytest.fixture
def scripted(start_server):
    backends = ScriptedBackends()
    config = {"apps": {"echo": {"backend": "echo"},
                       "failing": {"backend": "scripted", "mode": "fail"},
                       "hanging": {"backend": "scripted", "mode": "hang"},
                       "busy": {"backend": "scripted", "mode": "busy"},
                       "flood": {"backend": "scripted", "mode": "flood"}},
              # Only the stream's buffer bound may drop a client here, not the write timeout.
              "server": {"max_stream_buffer_bytes": STREAM_BUFFER, "write_timeout": 120.0}}
    thread = start_server(config, plugins=[backends])
    return thread, backends


STREAM_BUFFER = 256 * 1024


# -- streaming: exact framing --------------------------------------------------------------------


def test_streaming_chat_exact_framing(echo_server):
    response = stream_post(echo_server.port, CHAT, {
        "model": "echo", "messages": [{"role": "user", "content": "hello big world"}], "stream": True})
    payloads = assert_sse_response(response)
    assert payloads[-1] == b"[DONE]"
    events = [orjson.loads(payload) for payload in payloads[:-1]]
    assert len(events) == 5
    first = events[0]
    assert first["id"].startswith("chatcmpl-")
    assert first["object"] == "chat.completion.chunk"
    assert type(first["created"]) is int
    assert first["model"] == "echo"
    for event in events:
        assert list(event) == ["id", "object", "created", "model", "choices"]  # no usage key without include_usage
        assert (event["id"], event["object"], event["created"], event["model"]) == (
            first["id"], first["object"], first["created"], first["model"])
    choices = [event["choices"] for event in events]
    assert choices[0] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None}]
    assert choices[1:4] == [[{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}]
                            for text in ("hello", " big", " world")]
    assert choices[4] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]


def test_streaming_chat_include_usage(echo_server):
    response = stream_post(echo_server.port, CHAT, {
        "model": "echo", "messages": [{"role": "user", "content": "hello big world"}], "stream": True,
        "stream_options": {"include_usage": True}})
    payloads = assert_sse_response(response)
    assert payloads[-1] == b"[DONE]"
    # Every chunk but the last carries "usage":null, as OpenAI sends it.
    for payload in payloads[:-2]:
        assert payload.endswith(b',"usage":null}')
    events = [orjson.loads(payload) for payload in payloads[:-1]]
    assert [event["usage"] for event in events[:-1]] == [None] * 5
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    usage_event = events[-1]
    assert usage_event["choices"] == []
    assert usage_event["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert usage_event["id"] == events[0]["id"]
    assert usage_event["object"] == "chat.completion.chunk"
    assert usage_event["model"] == "echo"


def test_streaming_completions_exact_framing(echo_server):
    response = stream_post(echo_server.port, COMPLETIONS,
                           {"model": "echo", "prompt": "one two three", "stream": True})
    payloads = assert_sse_response(response)
    assert payloads[-1] == b"[DONE]"
    events = [orjson.loads(payload) for payload in payloads[:-1]]
    assert all(event["object"] == "text_completion" and event["id"].startswith("cmpl-") for event in events)
    assert all("usage" not in event for event in events)
    assert [event["choices"] for event in events] == [
        [{"index": 0, "text": "one", "logprobs": None, "finish_reason": None}],
        [{"index": 0, "text": " two", "logprobs": None, "finish_reason": None}],
        [{"index": 0, "text": " three", "logprobs": None, "finish_reason": None}],
        [{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}],
    ]


def test_streaming_completions_include_usage(echo_server):
    response = stream_post(echo_server.port, COMPLETIONS, {
        "model": "echo", "prompt": "one two three", "stream": True, "max_tokens": 2,
        "stream_options": {"include_usage": True}})
    payloads = assert_sse_response(response)
    assert payloads[-1] == b"[DONE]"
    events = [orjson.loads(payload) for payload in payloads[:-1]]
    assert [event["usage"] for event in events[:-1]] == [None] * 3
    assert [event["choices"][0]["text"] for event in events[:-1]] == ["one", " two", ""]
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["choices"] == []
    assert events[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_streaming_chat_several_choices(echo_server):
    response = stream_post(echo_server.port, CHAT, {
        "model": "echo", "messages": [{"role": "user", "content": "hi you"}], "stream": True, "n": 2,
        "stream_options": {"include_usage": True}})
    payloads = assert_sse_response(response)
    assert payloads[-1] == b"[DONE]"
    events = [orjson.loads(payload) for payload in payloads[:-1]]
    *choice_events, usage_event = events
    # Each chunk carries one choice; every choice opens with its role and closes with a finish reason.
    assert all(len(event["choices"]) == 1 for event in choice_events)
    assert [event["choices"][0] for event in choice_events[:2]] == [
        {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        for i in (0, 1)]
    for index in (0, 1):
        mine = [event["choices"][0] for event in choice_events if event["choices"][0]["index"] == index]
        assert "".join(choice["delta"].get("content", "") for choice in mine) == "hi you"
        assert [choice["finish_reason"] for choice in mine][-1] == "stop"
        assert all(choice["finish_reason"] is None for choice in mine[:-1])
    assert usage_event["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}


def test_streaming_completions_several_prompts(echo_server):
    response = stream_post(echo_server.port, COMPLETIONS, {
        "model": "echo", "prompt": ["a b", "c"], "n": 2, "stream": True})
    payloads = assert_sse_response(response)
    assert payloads[-1] == b"[DONE]"
    choices = [orjson.loads(payload)["choices"][0] for payload in payloads[:-1]]
    texts = {index: "".join(c["text"] for c in choices if c["index"] == index) for index in range(4)}
    assert texts == {0: "a b", 1: "a b", 2: "c", 3: "c"}
    finished = [c["index"] for c in choices if c["finish_reason"] == "stop"]
    assert sorted(finished) == [0, 1, 2, 3]


def test_non_streaming_chat_and_completion(echo_server):
    reply = post(echo_server.port, CHAT, {"model": "echo", "messages": [{"role": "user", "content": "hi there"}]})
    assert reply.status == 200
    assert reply.header(b"content-type") == b"application/json"
    body = reply.json()
    assert body["object"] == "chat.completion"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hi there"},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    reply = post(echo_server.port, COMPLETIONS, {"model": "echo", "prompt": "a b c", "max_tokens": 2})
    body = reply.json()
    assert body["object"] == "text_completion"
    assert body["choices"] == [{"index": 0, "text": "a b", "logprobs": None, "finish_reason": "length"}]


# -- errors before the response starts ----------------------------------------------------------

USER = [{"role": "user", "content": "hello"}]

CHAT_ERRORS = [
    # (body, status, param, code)
    pytest.param(b'{"model": "echo", "messages": ', 400, None, "invalid_json", id="invalid-json"),
    pytest.param(b"[1, 2]", 400, None, "invalid_type", id="body-array"),
    pytest.param(b'"text"', 400, None, "invalid_type", id="body-string"),
    pytest.param({"messages": USER, "temperature": "hot"}, 400, "temperature", "invalid_type", id="temperature-type"),
    pytest.param({"messages": USER, "max_tokens": 1.5}, 400, "max_tokens", "invalid_type", id="max-tokens-float"),
    pytest.param({"messages": USER, "stream": "yes"}, 400, "stream", "invalid_type", id="stream-type"),
    pytest.param({"messages": "hello"}, 400, "messages", "invalid_type", id="messages-not-list"),
    pytest.param({"messages": USER, "stop": [1]}, 400, "stop", "invalid_type", id="stop-ints"),
    pytest.param({"messages": USER, "temperature": -0.1}, 400, "temperature", "invalid_value", id="temperature-low"),
    pytest.param({"messages": USER, "temperature": 2.1}, 400, "temperature", "invalid_value", id="temperature-high"),
    pytest.param({"messages": USER, "top_p": 0}, 400, "top_p", "invalid_value", id="top-p-zero"),
    pytest.param({"messages": USER, "top_p": 1.5}, 400, "top_p", "invalid_value", id="top-p-high"),
    pytest.param({"messages": USER, "n": 0}, 400, "n", "invalid_value", id="n-zero"),
    pytest.param({"messages": USER, "max_tokens": 0}, 400, "max_tokens", "invalid_value", id="max-tokens-zero"),
    pytest.param({"messages": USER, "max_completion_tokens": 0}, 400, "max_completion_tokens", "invalid_value",
                 id="max-completion-tokens-zero"),
    pytest.param({"messages": USER, "top_k": 0}, 400, "top_k", "invalid_value", id="top-k-zero"),
    pytest.param({"model": "echo"}, 400, "messages", "missing_required_parameter", id="neither-messages-nor-prompt"),
    pytest.param({"messages": USER, "prompt": "hi"}, 400, "messages", "invalid_value", id="both-messages-and-prompt"),
    pytest.param({"messages": [], "model": "echo"}, 400, "messages", "invalid_value", id="messages-empty"),
    pytest.param({"messages": USER, "top_logprobs": 2}, 400, "top_logprobs", "invalid_value",
                 id="top-logprobs-without-logprobs"),
    pytest.param({"messages": USER, "stream_options": {"include_usage": True}}, 400, "stream_options",
                 "invalid_value", id="stream-options-without-stream"),
    pytest.param({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
        400, "messages[0].content[1]", "unsupported_parameter", id="image-url-part"),
    pytest.param({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]},
                 400, "messages[1].tool_call_id", "missing_required_parameter", id="tool-without-call-id"),
    pytest.param({"messages": [{"role": "user", "content": "a"}, {"role": "function", "content": "b"}]},
                 400, "messages[1].role", "invalid_value", id="role-function"),
    pytest.param({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]},
                 400, "messages[0].tool_calls[0].function.arguments", "invalid_value", id="call-arguments-not-object"),
    pytest.param({"prompt": "a", "tools": [{"type": "function", "function": {"name": "f"}}]},
                 400, "tools", "invalid_value", id="tools-with-raw-prompt"),
    pytest.param({"messages": USER, "tool_choice": "required"}, 400, "tool_choice", "invalid_value",
                 id="tool-choice-without-tools"),
    pytest.param({"messages": USER, "tools": [{"type": "retrieval"}]}, 400, "tools[0]", "invalid_value",
                 id="not-a-function-tool"),
    pytest.param({"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]},
                 400, "tools", "unsupported_parameter", id="tools"),
    pytest.param({"messages": USER, "response_format": {"type": "json_object"}}, 400, "response_format",
                 "unsupported_parameter", id="response-format-json"),
    pytest.param({"messages": USER, "presence_penalty": 0.5}, 400, "presence_penalty", "unsupported_parameter",
                 id="presence-penalty"),
    pytest.param({"messages": USER, "frequency_penalty": -0.5}, 400, "frequency_penalty", "unsupported_parameter",
                 id="frequency-penalty"),
    pytest.param({"messages": USER, "repetition_penalty": 1.1}, 400, "repetition_penalty", "unsupported_parameter",
                 id="repetition-penalty"),
    pytest.param({"model": "nope", "messages": USER}, 404, "model", "model_not_found", id="unknown-model"),
]


@pytest.mark.parametrize(("body", "status", "param", "code"), CHAT_ERRORS)
def test_chat_errors(echo_server, body, status, param, code):
    if isinstance(body, dict) and body.get("model") is None and "messages" in body:
        body = {"model": "echo", **body}
    assert_error(post(echo_server.port, CHAT, body), status, param, code)


@pytest.mark.parametrize(("body", "param", "code"), [
    pytest.param(b"{not json", None, "invalid_json", id="invalid-json"),
    pytest.param(b"null", None, "invalid_type", id="body-null"),
    pytest.param({"model": "echo"}, "prompt", "missing_required_parameter", id="no-prompt"),
    pytest.param({"model": "echo", "prompt": 5}, "prompt", "invalid_type", id="prompt-type"),
    pytest.param({"model": "echo", "prompt": "x", "temperature": 3}, "temperature", "invalid_value", id="temperature"),
    pytest.param({"model": "echo", "prompt": "x", "stream_options": {}}, "stream_options", "invalid_value",
                 id="stream-options-without-stream"),
    pytest.param({"model": "echo", "prompt": "x", "presence_penalty": 1.0}, "presence_penalty",
                 "unsupported_parameter", id="presence-penalty"),
    pytest.param({"model": "echo", "prompt": "x", "best_of": 2}, "best_of", "unsupported_parameter", id="best-of"),
])
def test_completion_errors(echo_server, body, param, code):
    assert_error(post(echo_server.port, COMPLETIONS, body), 400, param, code)


def test_streaming_request_errors_are_plain_json(echo_server):
    # A request refused before any token is an ordinary 400, not an SSE stream.
    reply = post(echo_server.port, CHAT, {"model": "echo", "messages": USER, "stream": True, "top_p": 0})
    assert_error(reply, 400, "top_p", "invalid_value")


def test_context_length_exceeded(start_server):
    thread = start_server({"apps": {"echo": {"backend": "echo", "context_length": 8, "default_max_tokens": 4}}})
    long_prompt = " ".join(f"w{i}" for i in range(20))
    error = assert_error(post(thread.port, CHAT, {"model": "echo", "messages": [{"role": "user", "content": long_prompt}]}),
                         400, "max_tokens", "context_length_exceeded")
    assert "8" in error["message"]
    assert_error(post(thread.port, COMPLETIONS, {"model": "echo", "prompt": "a b c d e", "max_tokens": 4}),
                 400, "max_tokens", "context_length_exceeded")
    # Within the context it is fine, and without max_tokens the default fits what is left.
    reply = post(thread.port, COMPLETIONS, {"model": "echo", "prompt": "a b c d", "max_tokens": 4})
    assert reply.status == 200
    reply = post(thread.port, COMPLETIONS, {"model": "echo", "prompt": "a b c d e f", "ignore_eos": True})
    assert reply.status == 200
    assert reply.json()["usage"] == {"prompt_tokens": 6, "completion_tokens": 2, "total_tokens": 8}


def test_model_routes(start_server):
    thread = start_server({"apps": {"echo": {"backend": "echo", "served_model_name": "org/model"}}})
    port = thread.port
    listing = request(port, "GET", "/v1/models")
    assert listing.status == 200
    assert [card["id"] for card in listing.json()["data"]] == ["org/model"]
    reply = request(port, "GET", "/v1/models/org/model")
    assert reply.status == 200
    card = reply.json()
    assert abs(card.pop("created") - time.time()) < 3600  # a real Unix time, not 0
    assert card == {"id": "org/model", "object": "model", "owned_by": "runnel"}
    assert_error(request(port, "GET", "/v1/models/echo"), 404, "model", "model_not_found")
    assert_error(request(port, "GET", "/v1/models/org/other"), 404, "model", "model_not_found")
    assert_error(request(port, "GET", "/v1/models/unknown"), 404, "model", "model_not_found")
    reply = post(port, CHAT, {"model": "org/model", "messages": [{"role": "user", "content": "slash ok"}]})
    assert reply.status == 200
    assert reply.json()["model"] == "org/model"
    assert reply.json()["choices"][0]["message"]["content"] == "slash ok"
    assert_error(post(port, CHAT, {"model": "echo", "messages": USER}), 404, "model", "model_not_found")


# -- errors after the stream started -------------------------------------------------------------


def test_error_after_stream_started_is_the_last_event(scripted):
    thread, _ = scripted
    for path, body in ((CHAT, {"messages": USER}), (COMPLETIONS, {"prompt": "hello"})):
        response = stream_post(thread.port, path, {"model": "failing", "stream": True, **body})
        payloads = assert_sse_response(response)
        assert b"[DONE]" not in payloads
        *events, last = [orjson.loads(payload) for payload in payloads]
        assert last == {"error": {"message": "Generation failed: boom", "type": "server_error", "param": None,
                                  "code": "generation_failed"}}
        texts = [choice.get("delta", {}).get("content") or choice.get("text")
                 for event in events for choice in event["choices"]]
        assert [text for text in texts if text] == ["Hello", " world"]
        assert all(choice["finish_reason"] is None for event in events for choice in event["choices"])


def test_error_in_non_streaming_generation_is_a_500(scripted):
    thread, _ = scripted
    reply = post(thread.port, CHAT, {"model": "failing", "messages": USER})
    error = assert_error(reply, 500, None, type_="server_error")
    assert "boom" in error["message"]
    # The server is fine afterwards.
    assert post(thread.port, CHAT, {"model": "echo", "messages": USER}).status == 200


def test_a_refused_streaming_request_gets_a_real_error_status(scripted):
    # The backend refuses in generate() (a full queue): the status line must say so,
    # not a 200 whose stream carries the error.
    thread, _ = scripted
    for path, body in ((CHAT, {"messages": USER}), (COMPLETIONS, {"prompt": "hello"})):
        reply = post(thread.port, path, {"model": "busy", "stream": True, **body})
        assert_error(reply, 429, None, code="queue_full", type_="rate_limit_error")
        assert reply.header(b"retry-after") == b"1"


# -- client disconnects -------------------------------------------------------------------------


def test_disconnect_mid_stream_cancels_generation(scripted):
    thread, backends = scripted
    app = backends.apps["hanging"]
    sock = connect(thread.port)
    send_post(sock, CHAT, {"model": "hanging", "messages": USER, "stream": True})
    response = read_head(sock)
    assert (response.version, response.status) == (b"HTTP/1.1", 200)
    assert orjson.loads(sse_events(response.next_chunk())[0])["choices"][0]["delta"]["role"] == "assistant"
    tick = orjson.loads(sse_events(response.next_chunk())[0])
    assert tick["choices"][0]["delta"] == {"content": "tick"}
    handle = app.handles[-1]
    assert not handle.cancelled.is_set()
    sock.close()
    wait_until(handle.cancelled.is_set, timeout=5)
    assert handle.cancel_calls >= 1
    # The server keeps serving.
    assert post(thread.port, CHAT, {"model": "echo", "messages": USER}).json()["choices"][0]["message"]["content"] \
        == "hello"


def test_disconnect_while_waiting_for_non_streaming_reply_cancels_generation(scripted):
    thread, backends = scripted
    app = backends.apps["hanging"]
    for path, body in ((CHAT, {"messages": USER}), (COMPLETIONS, {"prompt": "x"})):
        app.started.clear()
        before = len(app.handles)
        sock = connect(thread.port)
        send_post(sock, path, {"model": "hanging", **body})
        wait_until(lambda: len(app.handles) > before and app.started.is_set())
        handle = app.handles[-1]
        assert not handle.cancelled.is_set()
        sock.close()
        wait_until(handle.cancelled.is_set, timeout=5)
    assert request(thread.port, "GET", "/v1/models").status == 200
    assert post(thread.port, COMPLETIONS, {"model": "echo", "prompt": "still here"}).json()["choices"][0]["text"] \
        == "still here"


def test_disconnect_from_paced_echo_stream(start_server):
    thread = start_server({"apps": {"echo": {"backend": "echo", "pace_ms": 5}}})
    sock = connect(thread.port)
    send_post(sock, COMPLETIONS, {"model": "echo", "prompt": "a b c", "stream": True, "ignore_eos": True,
                                  "max_tokens": 4000})
    response = read_head(sock)
    assert (response.version, response.status) == (b"HTTP/1.1", 200)
    for _ in range(3):
        assert response.next_chunk() is not None
    sock.close()

    def no_generation_tasks() -> bool:
        async def check():
            return not [task for task in asyncio.all_tasks()
                        if getattr(task.get_coro(), "__qualname__", "") == "EchoApp._generate"]

        return thread.call(check())

    wait_until(no_generation_tasks, timeout=5)
    with H11Client(thread.port) as client:
        reply = client.request("POST", COMPLETIONS, body=orjson.dumps({"model": "echo", "prompt": "ok"}))
        assert reply.json()["choices"][0]["text"] == "ok"


# -- back-pressure: a model stream whose client stops reading ---------------------------------------


def test_a_client_that_stops_reading_a_model_stream_costs_at_most_the_bound(scripted):
    thread, backends = scripted
    app = backends.apps["flood"]
    peak = [0]
    sampling = [True]

    def sample(loop) -> None:  # on the server's loop, between the model's pushes
        for connection in list(thread.server.connections):
            peak[0] = max(peak[0], connection.flow.pending_bytes())
        if sampling[0]:
            loop.call_later(0.0005, sample, loop)

    thread.call_soon(lambda: sample(asyncio.get_running_loop()))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # so the server's side backs up fast
    sock.settimeout(10)
    sock.connect(("127.0.0.1", thread.port))
    with sock:
        send_post(sock, CHAT, {"model": "flood", "messages": USER, "stream": True})
        wait_until(lambda: app.handles and app.handles[-1].cancelled.is_set(), timeout=10)  # never reading
        wait_until(lambda: thread.call_soon(lambda: len(thread.server.connections)) == 0)
        sampling[0] = False
        # Far less than the flood would have queued in the 120 s of the write timeout:
        # the bound, plus at most the one event that crossed it.
        assert STREAM_BUFFER < peak[0] <= STREAM_BUFFER + 4096, peak[0]
        received = read_until_closed(sock)
    # The client got the head and the events the kernel held, then the connection closed.
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert len(received) < 16 * 1024 * 1024
    assert post(thread.port, CHAT, {"model": "echo", "messages": USER}).status == 200


# -- stop strings over HTTP ------------------------------------------------------------------------


def test_stop_string_across_tokens_non_streaming(echo_server):
    # Echo's tokens here are "x", " a", " b", " c", " d": the stop spans three of them.
    reply = post(echo_server.port, CHAT, {"model": "echo", "messages": [{"role": "user", "content": "x a b c d"}],
                                          "stop": "a b c"})
    assert reply.status == 200
    choice = reply.json()["choices"][0]
    assert choice["message"]["content"] == "x "
    assert choice["finish_reason"] == "stop"
    reply = post(echo_server.port, COMPLETIONS, {"model": "echo", "prompt": "one two three four",
                                                 "stop": ["four", "o thr"]})
    choice = reply.json()["choices"][0]
    assert choice["text"] == "one tw"
    assert choice["finish_reason"] == "stop"


def test_stop_string_across_tokens_streaming(echo_server):
    response = stream_post(echo_server.port, CHAT, {
        "model": "echo", "messages": [{"role": "user", "content": "x a b c d"}], "stop": ["c d", "a b"],
        "stream": True})
    payloads = assert_sse_response(response)
    assert payloads[-1] == b"[DONE]"
    events = [orjson.loads(payload) for payload in payloads[:-1]]
    contents = [choice["delta"].get("content") for event in events for choice in event["choices"]]
    assert "".join(text for text in contents if text) == "x "
    # No part of the stop string, nor what followed it, went out in any event.
    for text in contents:
        assert not text or ("a" not in text and "b" not in text and "c" not in text and "d" not in text)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"

    response = stream_post(echo_server.port, COMPLETIONS, {
        "model": "echo", "prompt": "one two three four", "stop": "o three", "stream": True})
    payloads = assert_sse_response(response)
    texts = [orjson.loads(payload)["choices"][0]["text"] for payload in payloads[:-1]]
    # " two" could be the start of "o three": its "o" is held back, then dropped with the stop.
    assert texts == ["one", " tw", ""]
    assert b"three" not in response.body
    assert orjson.loads(payloads[-2])["choices"][0]["finish_reason"] == "stop"


def test_held_back_text_is_released_when_no_stop_completes(echo_server):
    response = stream_post(echo_server.port, COMPLETIONS, {
        "model": "echo", "prompt": "alpha beta gam", "stop": "gamma", "stream": True})
    payloads = assert_sse_response(response)
    texts = [orjson.loads(payload)["choices"][0]["text"] for payload in payloads[:-1]]
    assert "".join(texts) == "alpha beta gam"
    reply = post(echo_server.port, COMPLETIONS, {"model": "echo", "prompt": "alpha beta gam", "stop": "gamma"})
    assert reply.json()["choices"][0]["text"] == "alpha beta gam"


# -- curl ---------------------------------------------------------------------------------------


def test_curl_streaming_chat(echo_server):
    body = orjson.dumps({"model": "echo", "messages": [{"role": "user", "content": "curl says hi"}], "stream": True})
    result = subprocess.run(
        ["/usr/bin/curl", "-sN", "--noproxy", "*", "--max-time", "20", "-X", "POST",
         f"{echo_server.url}{CHAT}", "-H", "content-type: application/json", "--data-binary", body],
        capture_output=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(b"data: [DONE]\n\n")
    payloads = sse_events(result.stdout)
    events = [orjson.loads(payload) for payload in payloads[:-1]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(event["choices"][0]["delta"].get("content", "") for event in events) == "curl says hi"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
