"""Anthropic's Messages API, driven end to end by the official ``anthropic`` SDK.

Echo answers a chat with the last user message's words (its tokenizer splits text
into words with their leading whitespace), so every text and count below follows;
builtin:tiny is the real model, checked for shape and stop reasons.
"""

from __future__ import annotations

import anthropic
import orjson
import pytest

from runnel.testing import connect, parse_all, read_until_closed, recv_until, request, send_post

TINY = {"apps": {"tiny": {"backend": "ctranslate2", "model": "builtin:tiny", "device": "cpu"}}}


_open_clients: list[anthropic.Anthropic] = []


@pytest.fixture(autouse=True)
def _close_clients():
    yield
    while _open_clients:
        _open_clients.pop().close()


def client(server, **kwargs) -> anthropic.Anthropic:
    kwargs.setdefault("api_key", "test")
    api = anthropic.Anthropic(base_url=server.url, max_retries=0, timeout=30, **kwargs)
    _open_clients.append(api)  # closed after the test, so no socket is left to the GC
    return api


def post(server, body: dict):
    return request(server.port, "POST", "/v1/messages", headers=[("content-type", "application/json")],
                   body=orjson.dumps(body))


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_message_not_streamed(echo_server):
    message = client(echo_server).messages.create(model="echo", max_tokens=50, messages=user("one two three"),
                                                  system="Be brief.")
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "one two three"
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.model == "echo"
    assert message.usage.output_tokens == 3 and message.usage.input_tokens > 0


def test_text_blocks_and_consecutive_turns_combined(echo_server):
    messages = [{"role": "user", "content": [{"type": "text", "text": "alpha"}, {"type": "text", "text": " beta"}]}]
    message = client(echo_server).messages.create(model="echo", max_tokens=50, messages=messages)
    assert message.content[0].text == "alpha beta"


def test_streamed_event_sequence(echo_server):
    api = client(echo_server)
    events = list(api.messages.create(model="echo", max_tokens=50, messages=user("one two three"), stream=True))
    deltas = [event for event in events if event.type == "content_block_delta"]
    # The SDK drops the ping event (test_raw_stream_has_event_lines sees it on the wire).
    assert [event.type for event in events] == ["message_start", "content_block_start"] + [
        "content_block_delta"] * len(deltas) + ["content_block_stop", "message_delta", "message_stop"]
    assert deltas and "".join(event.delta.text for event in deltas) == "one two three"
    assert events[0].message.usage.input_tokens > 0
    assert events[-2].delta.stop_reason == "end_turn" and events[-2].usage.output_tokens == 3
    with api.messages.stream(model="echo", max_tokens=50, messages=user("one two three")) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == "one two three" and final.stop_reason == "end_turn"


def test_raw_stream_has_event_lines(echo_server):
    reply = post(echo_server, {"model": "echo", "max_tokens": 5, "stream": True, "messages": user("hi there")})
    assert reply.status == 200
    frames = reply.body.decode().strip().split("\n\n")
    names = [frame.split("\n")[0] for frame in frames]
    assert names == ["event: message_start", "event: content_block_start", "event: ping",
                     "event: content_block_delta", "event: content_block_delta", "event: content_block_stop", "event: message_delta",
                     "event: message_stop"]


def test_stop_sequence(echo_server):
    message = client(echo_server).messages.create(model="echo", max_tokens=50, messages=user("one two three four"),
                                                  stop_sequences=["zzz", "three"])
    assert message.content[0].text == "one two "  # the stop sequence is not sent; what precedes it is
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "three"


def test_max_tokens_stop_reason(echo_server):
    message = client(echo_server).messages.create(model="echo", max_tokens=2, messages=user("one two three four"))
    assert message.content[0].text == "one two"
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 2


def test_count_tokens(echo_server):
    counted = client(echo_server).messages.count_tokens(model="echo", messages=user("one two three"))
    message = client(echo_server).messages.create(model="echo", max_tokens=5, messages=user("one two three"))
    assert counted.input_tokens == message.usage.input_tokens > 0


def test_errors_in_anthropics_shape(echo_server):
    api = client(echo_server)
    with pytest.raises(anthropic.BadRequestError) as bad:
        api.messages.create(model="echo", max_tokens=0, messages=user("hi"))
    assert bad.value.body["type"] == "error" and bad.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in bad.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        api.messages.create(model="echo", max_tokens=5, messages=user("hi"), extra_body={"temperature": 1.5})
    with pytest.raises(anthropic.NotFoundError) as missing:
        api.messages.create(model="nope", max_tokens=5, messages=user("hi"))
    assert missing.value.body["error"]["type"] == "not_found_error"
    reply = post(echo_server, {"model": "echo", "messages": user("hi")})
    assert reply.status == 400
    assert orjson.loads(reply.body) == {"type": "error", "error": {"type": "invalid_request_error",
                                                       "message": "max_tokens: Field required"}}


@pytest.mark.parametrize("extra", [
    {"tools": [{"name": "get_weather", "input_schema": {"type": "object"}}]},
    {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x"}}]}]},
    {"foo": 1},
])
def test_tools_without_a_parser_other_blocks_and_unknown_fields_refused(echo_server, extra):
    body = {"model": "echo", "max_tokens": 5, "messages": user("hi"), **extra}
    reply = post(echo_server, body)
    assert reply.status == 400
    error = orjson.loads(reply.body)
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert ("tools" if "tools" in extra else "messages.0.content.0" if "messages" in extra else "foo") in \
        error["error"]["message"]


def test_auth_x_api_key(start_server):
    server = start_server({**TINY_OFF, "auth": {"kind": "api_key", "keys": ["anthropic-key-01"]}})
    ok = client(server, api_key="anthropic-key-01").messages.create(model="echo", max_tokens=5, messages=user("hi"))
    assert ok.content[0].text == "hi"
    with pytest.raises(anthropic.AuthenticationError) as denied:
        client(server, api_key="wrong-key-0001").messages.create(model="echo", max_tokens=5, messages=user("hi"))
    assert denied.value.status_code == 401
    assert denied.value.body["type"] == "error" and denied.value.body["error"]["type"] == "authentication_error"


TINY_OFF = {"apps": {"echo": {"backend": "echo"}}}


def test_builtin_tiny(start_server):
    server = start_server(TINY)
    api = client(server)
    message = api.messages.create(model="tiny", max_tokens=40, messages=user("Hello! Who are you?"), extra_body={"temperature": 0})
    assert message.content[0].text and message.stop_reason in ("end_turn", "max_tokens")
    short = api.messages.create(model="tiny", max_tokens=1, messages=user("Hello! Who are you?"), extra_body={"temperature": 0})
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 1
    with api.messages.stream(model="tiny", max_tokens=40, messages=user("Hello! Who are you?"), extra_body={"temperature": 0}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == message.content[0].text


def test_error_mid_stream_is_anthropics_error_event(start_server):
    server = start_server({"apps": {"echo": {"backend": "echo", "pace_ms": 20.0}}})
    body = orjson.dumps({"model": "echo", "messages": user("word " * 500), "max_tokens": 500, "stream": True})
    with connect(server.port) as sock:
        send_post(sock, "/v1/messages", body)
        first = recv_until(sock, b"event: content_block_delta")
        server.stop(grace=0.2)
        raw = first + read_until_closed(sock)
    [response] = parse_all(raw)
    assert response.wire_body.endswith(b"\r\n0\r\n\r\n")  # ended, not cut
    last = response.body[:-2].split(b"\n\n")[-1]
    assert last.startswith(b"event: error\ndata: "), last
    assert orjson.loads(last[len(b"event: error\ndata: "):]) == {
        "type": "error", "error": {"type": "overloaded_error", "message": "Server is shutting down"}}
    assert b"message_stop" not in response.body
