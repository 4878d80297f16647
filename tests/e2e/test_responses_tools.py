"""Function tools on /v1/responses, end to end with the openai SDK.

As in test_tool_calls.py, the model is the echo backend given ``tool_parser = "hermes"``: it
answers with the last user message, so a test writes the exact reply (tool-call markup
included) the server must parse into ``function_call`` items, streamed or collected. The
built-in model renders the conversations (its template shows calls and results), and its
own calls are tested last, once it is trained to make them.
"""

from __future__ import annotations

import json

import openai
import orjson
import pytest

from runnel.testing import ServerThread, request, server_config, wait_until
from runnel.testing.pytest_plugin import TINY_CONFIG

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"type": "function", "name": "get_time",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}}}
TOOLS = [WEATHER, TIME]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
TWO_CALLS = CALL + ' <tool_call>{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}</tool_call>'
CALL_EVENTS = ["response.output_item.added", "response.function_call_arguments.delta",
               "response.function_call_arguments.done", "response.output_item.done"]


@pytest.fixture(scope="module")
def server():
    config = {"server": {"runs_path": ""}, "apps": {**TINY_CONFIG["apps"],
                                                   "echo": {"backend": "echo", "tool_parser": "hermes"}}}
    thread = ServerThread(server_config(config)).start()
    assert thread.wait_ready()
    yield thread
    thread.stop()


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30) as client:
        yield client


def calls(response) -> list[tuple[str, str]]:
    return [(item.name, item.arguments) for item in response.output if item.type == "function_call"]


def collapse(types: list[str]) -> list[str]:
    """Event types with runs of one delta type shown once (how many depends on the tokens)."""
    out: list[str] = []
    for kind in types:
        if not (kind.endswith(".delta") and out and out[-1] == kind):
            out.append(kind)
    return out


def test_a_call_is_a_function_call_item(client):
    reply = client.responses.create(model="echo", input=CALL, tools=TOOLS)
    assert reply.status == "completed" and reply.output_text == ""
    [item] = reply.output
    assert (item.type, item.name, item.arguments, item.status) == ("function_call", "get_weather",
                                                                   '{"city": "Paris"}', "completed")
    assert item.id.startswith("fc_") and item.call_id.startswith("call_") and item.id != item.call_id
    assert [tool.name for tool in reply.tools] == ["get_weather", "get_time"] and reply.tools[0].strict is True
    assert reply.tool_choice == "auto"


def test_a_streamed_call_sends_its_argument_pieces_which_join_into_the_arguments(client):
    collected = client.responses.create(model="echo", input="Let me look. " + TWO_CALLS, tools=TOOLS)
    events = list(client.responses.create(model="echo", input="Let me look. " + TWO_CALLS, tools=TOOLS,
                                          stream=True))
    assert collapse([event.type for event in events]) == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        *CALL_EVENTS, *CALL_EVENTS, "response.completed"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    final = events[-1].response
    assert final.output_text == collected.output_text == "Let me look."  # the markup is never text
    assert calls(final) == calls(collected) == [("get_weather", '{"city": "Paris"}'),
                                                ("get_time", '{"timezone": "Europe/Paris"}')]
    for index, item in enumerate(final.output[1:], start=1):
        pieces = [event.delta for event in events
                  if event.type == "response.function_call_arguments.delta" and event.output_index == index]
        [done] = [event for event in events
                  if event.type == "response.function_call_arguments.done" and event.output_index == index]
        assert "".join(pieces) == done.arguments == item.arguments and done.item_id == item.id


def test_a_named_tool_choice_begins_the_call_for_the_model(client):
    rest = ' {"timezone": "Asia/Tokyo"}}</tool_call>'  # echo continues the prefill with only this
    reply = client.responses.create(model="echo", input=rest, tools=TOOLS,
                                    tool_choice={"type": "function", "name": "get_time"})
    assert calls(reply) == [("get_time", '{"timezone": "Asia/Tokyo"}')]
    assert reply.tool_choice.name == "get_time"
    streamed = list(client.responses.create(model="echo", input=rest, tools=TOOLS, stream=True,
                                            tool_choice={"type": "function", "name": "get_time"}))
    assert collapse([event.type for event in streamed]) == ["response.created", "response.in_progress",
                                                            *CALL_EVENTS, "response.completed"]
    assert calls(streamed[-1].response) == calls(reply)


def test_tool_choice_none_leaves_the_markup_as_text(client):
    reply = client.responses.create(model="echo", input=CALL, tools=TOOLS, tool_choice="none")
    assert reply.output_text == CALL and calls(reply) == []


def test_a_call_the_model_does_not_make_is_an_error_not_text(client, server):
    bad = '<tool_call>{"name": "delete_everything", "arguments": {}}</tool_call>'
    with pytest.raises(openai.InternalServerError) as caught:
        client.responses.create(model="echo", input=bad, tools=TOOLS)
    assert caught.value.code == "invalid_tool_call"
    events = list(client.responses.create(model="echo", input=bad, tools=TOOLS, stream=True))
    assert [event.type for event in events] == ["response.created", "response.in_progress", "response.failed"]
    assert "invalid tool call" in events[-1].response.error.message
    with pytest.raises(openai.InternalServerError):
        client.responses.create(model="echo", input="I will not.", tools=TOOLS, tool_choice="required")


def test_a_round_trip_through_stored_responses(client):
    first = client.responses.create(model="echo", input=CALL, tools=TOOLS)
    [call] = first.output
    answer = client.responses.create(model="echo", previous_response_id=first.id, tools=TOOLS, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"temperature": 18})},
        {"role": "user", "content": "It is 18 degrees in Paris."}])
    assert answer.output_text == "It is 18 degrees in Paris." and calls(answer) == []
    background = client.responses.create(model="echo", input=TWO_CALLS, tools=TOOLS, background=True)
    background = wait_until(lambda: (r := client.responses.retrieve(background.id)).status == "completed" and r,
                            timeout=30, interval=0.02)
    assert [name for name, _ in calls(background)] == ["get_weather", "get_time"]


def test_calls_and_their_results_reach_the_template_as_the_chat_surface_sends_them(client, server):
    """The same conversation, as Responses items and as chat messages, is the same prompt."""
    items = [{"role": "user", "content": "What's the weather in Paris?"},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": '{"temperature": 18}'},
             {"role": "user", "content": "Thanks!"}]
    messages = [{"role": "user", "content": "What's the weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18}'},
                {"role": "user", "content": "Thanks!"}]
    chat_tools = [{"type": "function", "function": {key: value for key, value in tool.items() if key != "type"}}
                  for tool in TOOLS]
    response = client.responses.create(model="tiny", input=items, tools=TOOLS, instructions="Be brief.",
                                       max_output_tokens=1, tool_choice="none")
    chat = request(server.port, "POST", "/v1/chat/completions", headers=((b"content-type", b"application/json"),),
                   body=orjson.dumps({"model": "tiny", "max_tokens": 1, "tools": chat_tools, "tool_choice": "none",
                                      "messages": [{"role": "system", "content": "Be brief."}, *messages]}))
    assert chat.status == 200, chat.body
    assert response.usage.input_tokens == chat.json()["usage"]["prompt_tokens"]


def test_the_built_in_model_calls_get_weather_and_answers_with_the_result(client):
    first = client.responses.create(model="tiny", input="What's the weather in Paris?", tools=[WEATHER],
                                    temperature=0)
    [call] = first.output
    assert (call.type, call.name, json.loads(call.arguments)) == ("function_call", "get_weather", {"city": "Paris"})
    answer = client.responses.create(model="tiny", previous_response_id=first.id, tools=[WEATHER], temperature=0,
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": json.dumps({"city": "Paris", "temperature": 18,
                                                                   "condition": "sunny"})}])
    assert answer.status == "completed" and "18" in answer.output_text
