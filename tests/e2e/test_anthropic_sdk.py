"""Anthropic's Messages API, driven end to end by the official ``anthropic`` SDK.

Echo answers a chat with the last user message's words (its tokenizer splits text
into words with their leading whitespace), so every text and count below follows;
builtin:tiny is the real model, checked for shape and stop reasons.
"""

from __future__ import annotations

import anthropic
import orjson
import pytest

from runnel.testing import request

TINY = {"apps": {"tiny": {"backend": "ctranslate2", "model": "builtin:tiny", "device": "cpu"}}}


def client(server, **kwargs) -> anthropic.Anthropic:
    kwargs.setdefault("api_key", "test")
    return anthropic.Anthropic(base_url=server.url, max_retries=0, timeout=30, **kwargs)


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
    {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x", "content": "1"}]}]},
    {"foo": 1},
])
def test_tools_and_unknown_fields_refused(echo_server, extra):
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
