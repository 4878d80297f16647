"""Responses API items -> the chat messages an app's template takes (runnel.surfaces.openai.responses_items)."""

from __future__ import annotations

import pytest

from runnel.errors import HTTPError
from runnel.surfaces.openai.responses_items import chat_messages, input_items, message_item, output_as_input


def test_items_become_chat_messages_with_tool_calls_joined_into_one_assistant_turn():
    items = input_items([
        {"role": "developer", "content": "Use tools."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in "},
                                                        {"type": "input_text", "text": "Paris?"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "noon"}]},
    ])
    assert chat_messages("Be brief.", items) == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": {}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
        {"role": "tool", "content": "noon", "tool_call_id": "c2"},
    ]


def test_a_call_after_assistant_text_joins_that_turn():
    items = [{"type": "message", "role": "assistant", "content": "Let me look."},
             {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}]
    assert chat_messages(None, items) == [{"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {}}}]}]


def test_output_items_continue_as_input_items():
    output = [message_item("msg_1", "Hi there.", "completed"),
              {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "f", "arguments": "{}",
               "status": "completed"}]
    assert output_as_input(output) == [{"type": "message", "role": "assistant", "content": "Hi there."},
                                       {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}]


@pytest.mark.parametrize("value, param", [
    (5, "input"),
    ([], "input"),
    (["hi"], "input[0]"),
    ([{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}], "input[0].arguments"),
    ([{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}], "input[0].arguments"),
    ([{"type": "function_call", "name": "f", "arguments": "{}"}], "input[0].call_id"),
    ([{"type": "item_reference", "id": "x"}], "input[0].type"),
    ([{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}], "input[0].content[0]"),
])
def test_a_bad_item_is_a_400_naming_it(value, param):
    with pytest.raises(HTTPError) as raised:
        input_items(value)
    assert raised.value.status == 400 and raised.value.param == param
