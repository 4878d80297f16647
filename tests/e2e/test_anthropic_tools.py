"""Tools on Anthropic's Messages API, end to end with the official ``anthropic`` SDK.

As in test_tool_calls.py, the model is echo with ``tool_parser = "hermes"``: it answers with
the last user message, so a test writes the exact reply the server must parse.
"""

from __future__ import annotations

import anthropic
import pytest

from runnel.testing import request

WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"name": "get_time", "input_schema": {"type": "object", "properties": {"timezone": {"type": "string"}}}}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


@pytest.fixture
def server(start_server):
    return start_server({"apps": {"echo": {"backend": "echo", "tool_parser": "hermes"}}})


@pytest.fixture
def client(server):
    with anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0, timeout=30) as client:
        yield client


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_a_call_is_a_tool_use_block_with_stop_reason_tool_use(client):
    message = client.messages.create(model="echo", max_tokens=100, messages=user("Let me see. " + CALL),
                                     tools=[WEATHER, TIME])
    assert message.stop_reason == "tool_use"
    assert [block.type for block in message.content] == ["text", "tool_use"]
    assert message.content[0].text == "Let me see."
    call = message.content[1]
    assert call.id.startswith("toolu_") and call.name == "get_weather" and call.input == {"city": "Paris"}


def test_the_stream_has_a_block_per_text_and_call_and_joins_into_the_same_message(client):
    text = "Let me see. " + CALL + ' <tool_call>{"name": "get_time", "arguments": {"timezone": "UTC"}}</tool_call>'
    events = list(client.messages.create(model="echo", max_tokens=100, messages=user(text), tools=[WEATHER, TIME],
                                         stream=True))
    kinds = [(event.type, getattr(event, "index", None)) for event in events]
    first = [("message_start", None), ("content_block_start", 0)]
    assert kinds[:2] == first
    starts = [event for event in events if event.type == "content_block_start"]
    assert [(event.index, event.content_block.type) for event in starts] == [(0, "text"), (1, "tool_use"),
                                                                              (2, "tool_use")]
    assert [event.content_block.name for event in starts[1:]] == ["get_weather", "get_time"]
    stops = [event.index for event in events if event.type == "content_block_stop"]
    assert stops == [0, 1, 2]
    inputs = {1: "", 2: ""}
    for event in events:
        if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
            inputs[event.index] += event.delta.partial_json
    assert inputs == {1: '{"city": "Paris"}', 2: '{"timezone": "UTC"}'}
    assert events[-2].type == "message_delta" and events[-2].delta.stop_reason == "tool_use"
    assert events[-1].type == "message_stop"
    # The SDK's own accumulation gives the collected message.
    with client.messages.stream(model="echo", max_tokens=100, messages=user(text), tools=[WEATHER, TIME]) as stream:
        final = stream.get_final_message()
    collected = client.messages.create(model="echo", max_tokens=100, messages=user(text), tools=[WEATHER, TIME])
    assert [block.model_dump(exclude={"id"}) for block in final.content] == \
        [block.model_dump(exclude={"id"}) for block in collected.content]
    assert final.stop_reason == collected.stop_reason == "tool_use"


def test_a_round_trip_with_tool_use_and_tool_result_blocks(client):
    messages = [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 and sunny"},
                                     {"type": "text", "text": "So?"}]},
    ]
    message = client.messages.create(model="echo", max_tokens=20, messages=messages, tools=[WEATHER])
    assert message.content[0].text == "So?" and message.stop_reason == "end_turn"
    counted = client.messages.count_tokens(model="echo", messages=messages, tools=[WEATHER])
    assert counted.input_tokens == message.usage.input_tokens


def test_tool_choice_any_and_tool_force_a_call(client):
    rest = ' {"timezone": "UTC"}}</tool_call>'
    message = client.messages.create(model="echo", max_tokens=50, messages=user(rest), tools=[WEATHER, TIME],
                                     tool_choice={"type": "tool", "name": "get_time"})
    assert [(block.type, block.name, block.input) for block in message.content] == [
        ("tool_use", "get_time", {"timezone": "UTC"})]
    with pytest.raises(anthropic.InternalServerError) as caught:
        client.messages.create(model="echo", max_tokens=50, messages=user("No."), tools=[WEATHER],
                               tool_choice={"type": "any"})
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "api_error"
    plain = client.messages.create(model="echo", max_tokens=50, messages=user(CALL), tools=[WEATHER],
                                   tool_choice={"type": "none"})
    assert plain.content[0].text == CALL


@pytest.mark.parametrize(("body", "named"), [
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0"),
    ({"tools": [{"name": "f"}]}, "tools.0.input_schema"),
    ({"tools": [{"name": "has space", "input_schema": {}}]}, "tools.0.name"),
    ({"tool_choice": {"type": "sometimes"}}, "tool_choice"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "x", "name": "f"}]},
                   {"role": "user", "content": "hi"}]}, "messages.0.content.0"),
])
def test_bad_tools_are_a_400_naming_them(server, body, named):
    import orjson

    reply = request(server.port, "POST", "/v1/messages", headers=[("content-type", "application/json")],
                    body=orjson.dumps({"model": "echo", "max_tokens": 5, "messages": user("hi"), **body}))
    assert reply.status == 400
    error = orjson.loads(reply.body)
    assert error["type"] == "error" and named in error["error"]["message"]
