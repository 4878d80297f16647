"""Tool calling on /v1/chat/completions, end to end with the openai SDK.

The model is the echo backend given ``tool_parser = "hermes"``: it answers with the last user
message, word by word, so a test writes the exact reply (tool-call markup included) that the
server must parse, streamed token by token or collected. The built-in model's real calls are
tested in plugins/runnel-ctranslate2/tests/test_ct2_tools.py.
"""

from __future__ import annotations

import json

import openai
import pytest

from runnel.testing.wire import connect, read_response, send_post, sse_events

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time",
                                         "parameters": {"type": "object", "properties": {"timezone": {}}}}}
TOOLS = [WEATHER, TIME]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
TWO_CALLS = CALL + ' <tool_call>{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}</tool_call>'


@pytest.fixture
def server(start_server):
    return start_server({"apps": {"echo": {"backend": "echo", "tool_parser": "hermes"}}})


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30) as client:
        yield client


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def calls_of(message) -> list[tuple[str, str]]:
    return [(call.function.name, call.function.arguments) for call in message.tool_calls or ()]


def streamed(client, text: str, **kwargs):
    """(chunks, content, calls, finish_reason) of a streamed reply, joined as a client joins them."""
    chunks = list(client.chat.completions.create(model="echo", messages=ask(text), tools=TOOLS, stream=True,
                                                 **kwargs))
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    calls: dict[int, list] = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or ():
            if delta.id is not None:
                assert delta.index not in calls  # id, type and name come once, first
                assert delta.type == "function" and delta.function.arguments == ""
                calls[delta.index] = [delta.id, delta.function.name, ""]
            else:
                assert delta.function.name is None
                calls[delta.index][2] += delta.function.arguments
    return chunks, content, [(name, arguments) for _, name, arguments in calls.values()], \
        chunks[-1].choices[0].finish_reason


def test_a_call_comes_back_as_tool_calls_with_finish_reason_tool_calls(client):
    reply = client.chat.completions.create(model="echo", messages=ask(CALL), tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert calls_of(choice.message) == [("get_weather", '{"city": "Paris"}')]
    assert choice.message.tool_calls[0].id.startswith("call_") and choice.message.tool_calls[0].type == "function"
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Paris"}


@pytest.mark.parametrize("text", [CALL, TWO_CALLS, "Let me see. " + TWO_CALLS, "No call here, just < text >."])
def test_the_stream_joins_into_exactly_the_collected_reply(client, text):
    collected = client.chat.completions.create(model="echo", messages=ask(text), tools=TOOLS).choices[0]
    chunks, content, calls, finish = streamed(client, text)
    assert content == (collected.message.content or "")
    assert calls == calls_of(collected.message)
    assert finish == collected.finish_reason
    assert "<tool_call>" not in content and "</tool_call>" not in content


def test_the_stream_is_openais_sequence_of_deltas(server):
    """Exact chunks on the wire: role, the call's head, its argument pieces, the finish, [DONE]."""
    with connect(server.port) as sock:
        send_post(sock, "/v1/chat/completions", {"model": "echo", "messages": ask(CALL), "tools": [WEATHER],
                                                  "stream": True})
        events = sse_events(read_response(sock).body)
    assert events[-1] == b"[DONE]"
    deltas = [(json.loads(event)["choices"][0]["delta"], json.loads(event)["choices"][0]["finish_reason"])
              for event in events[:-1]]
    assert deltas[0] == ({"role": "assistant", "content": ""}, None)
    head = deltas[1][0]["tool_calls"][0]
    assert head["index"] == 0 and head["type"] == "function" and head["id"].startswith("call_")
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    pieces = [delta["tool_calls"][0] for delta, _ in deltas[2:-1]]
    assert all(set(piece) == {"index", "function"} and piece["index"] == 0 for piece in pieces)
    assert len(pieces) >= 2  # echo's words: the arguments arrive in pieces, as generated
    assert "".join(piece["function"]["arguments"] for piece in pieces) == '{"city": "Paris"}'
    assert deltas[-1] == ({}, "tool_calls")


def test_parallel_calls_get_their_own_indexes_and_parallel_tool_calls_false_keeps_one(client):
    reply = client.chat.completions.create(model="echo", messages=ask(TWO_CALLS), tools=TOOLS)
    assert calls_of(reply.choices[0].message) == [("get_weather", '{"city": "Paris"}'),
                                                  ("get_time", '{"timezone": "Europe/Paris"}')]
    _, _, calls, _ = streamed(client, TWO_CALLS)
    assert [name for name, _ in calls] == ["get_weather", "get_time"]
    one = client.chat.completions.create(model="echo", messages=ask(TWO_CALLS), tools=TOOLS,
                                         parallel_tool_calls=False)
    assert calls_of(one.choices[0].message) == [("get_weather", '{"city": "Paris"}')]


def test_content_before_a_call_is_content(client):
    reply = client.chat.completions.create(model="echo", messages=ask("Let me check. " + CALL), tools=TOOLS)
    assert reply.choices[0].message.content == "Let me check."
    assert calls_of(reply.choices[0].message) == [("get_weather", '{"city": "Paris"}')]


def test_without_a_call_the_reply_is_plain_content(client):
    reply = client.chat.completions.create(model="echo", messages=ask("It is sunny."), tools=TOOLS)
    assert reply.choices[0].message.content == "It is sunny."
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason == "stop"


def test_tool_choice_none_does_not_parse(client):
    reply = client.chat.completions.create(model="echo", messages=ask(CALL), tools=TOOLS, tool_choice="none")
    assert reply.choices[0].message.content == CALL and reply.choices[0].finish_reason == "stop"


def test_a_named_tool_choice_begins_the_call_for_the_model(client):
    """The model continues after the prefill ('<tool_call>{"name": "get_time", "arguments":'): echo's
    reply is only the rest of the call."""
    rest = ' {"timezone": "Asia/Tokyo"}}</tool_call>'
    choice = {"type": "function", "function": {"name": "get_time"}}
    reply = client.chat.completions.create(model="echo", messages=ask(rest), tools=TOOLS, tool_choice=choice)
    assert calls_of(reply.choices[0].message) == [("get_time", '{"timezone": "Asia/Tokyo"}')]
    _, content, calls, finish = streamed(client, rest, tool_choice=choice)
    assert (content, calls, finish) == ("", [("get_time", '{"timezone": "Asia/Tokyo"}')], "tool_calls")


def test_a_required_call_that_the_model_does_not_make_is_an_error_not_text(client, server):
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="echo", messages=ask("I will not."), tools=TOOLS, tool_choice="required")
    assert caught.value.code == "invalid_tool_call"
    # Streamed, the error is the stream's last event, after the role chunk.
    with connect(server.port) as sock:
        send_post(sock, "/v1/chat/completions", {"model": "echo", "messages": ask("I will not."), "tools": TOOLS,
                                                  "tool_choice": "required", "stream": True})
        events = sse_events(read_response(sock).body)
    assert json.loads(events[-1])["error"]["code"] == "invalid_tool_call"
    assert all(b'"content":"I' not in event for event in events)


@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "delete_everything", "arguments": {}}</tool_call>',  # not offered
    '<tool_call>{"name": "get_weather", "arguments": {"town": "Paris"}}</tool_call>',  # no required city
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Pa</tool_call>',  # never closes
])
def test_a_reply_that_claims_a_call_it_does_not_make_is_a_500(client, text):
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="echo", messages=ask(text), tools=TOOLS)
    assert caught.value.code == "invalid_tool_call"


def test_a_conversation_with_calls_and_results_is_accepted(client):
    history = [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18}'},
        {"role": "user", "content": "Thanks!"},
    ]
    reply = client.chat.completions.create(model="echo", messages=history, tools=TOOLS)
    assert reply.choices[0].message.content == "Thanks!"


def test_every_choice_is_parsed_on_its_own(client):
    reply = client.chat.completions.create(model="echo", messages=ask(CALL), tools=TOOLS, n=3)
    assert [calls_of(choice.message) for choice in reply.choices] == [[("get_weather", '{"city": "Paris"}')]] * 3
    chunks = list(client.chat.completions.create(model="echo", messages=ask(CALL), tools=TOOLS, n=2, stream=True))
    finishes = {chunk.choices[0].index: chunk.choices[0].finish_reason for chunk in chunks
                if chunk.choices and chunk.choices[0].finish_reason}
    assert finishes == {0: "tool_calls", 1: "tool_calls"}


def test_a_model_without_a_tool_parser_refuses_tools(echo_server):
    with openai.OpenAI(base_url=echo_server.url + "/v1", api_key="x", max_retries=0) as plain:
        with pytest.raises(openai.BadRequestError) as caught:
            plain.chat.completions.create(model="echo", messages=ask("hi"), tools=TOOLS)
    assert caught.value.param == "tools" and "tool_parser" in caught.value.message


def test_response_format_needs_a_backend_that_can_constrain_output(client):
    for response_format in ({"type": "json_object"},
                            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="echo", messages=ask("{}"), response_format=response_format)
        assert caught.value.param == "response_format" and caught.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="echo", messages=ask("{}"), response_format={"type": "yaml"})
    assert caught.value.param == "response_format" and caught.value.code == "invalid_value"
