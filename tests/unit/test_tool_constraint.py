"""A forced tool call as a constraint for backends that decode by grammar (ToolUse.constraint)."""

from __future__ import annotations

import json

from runnel.generation import SamplingParams
from runnel.tools import FORMATS
from runnel.tools.use import ToolUse, function_tool

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = function_tool("get_weather", None, CITY, "tools[0]")
TIME = function_tool("get_time", None, {"type": "object"}, "tools[1]")


def use(parser: str, choice: str) -> ToolUse:
    tool_use = ToolUse.create(parser, "m", [WEATHER, TIME], choice, True)
    assert tool_use is not None
    return tool_use


def test_a_named_call_is_its_arguments_then_what_closes_the_object_and_the_call():
    for parser, suffix in (("hermes", "}</tool_call>"), ("mistral", "}]"), ("llama3_json", "}")):
        tool_use = use(parser, "get_weather")
        assert tool_use.constraint == {"schema": CITY, "suffix": suffix}, parser
        # The prefill and the constrained rest make one call the format's parser reads.
        text = tool_use.prefill + ' {"city": "Paris"}' + suffix
        if parser == "llama3_json":
            text = text.removeprefix("<|python_tag|>")
        assert json.loads(text[text.index("{"):len(text) - len(suffix) + 1]) == {
            "name": "get_weather", FORMATS[parser].arguments_key: {"city": "Paris"}}


def test_a_required_call_is_one_of_the_tools_as_a_whole_object():
    constraint = use("hermes", "required").constraint
    assert constraint is not None and constraint["suffix"] == "</tool_call>"
    names = [option["properties"]["name"]["const"] for option in constraint["schema"]["anyOf"]]
    assert names == ["get_weather", "get_time"]
    assert constraint["schema"]["anyOf"][0]["properties"]["arguments"] == CITY
    assert use("mistral", "required").constraint["suffix"] == "]"


def test_no_constraint_without_a_forced_call_or_where_the_prefill_leaves_no_whole_value():
    assert use("hermes", "auto").constraint is None
    assert use("llama3_json", "required").constraint is None  # its prefill is "{"


def test_only_a_backend_that_lists_tool_call_is_given_one():
    class Grammar:
        supported = frozenset({"tool_call"})

    class Plain:
        supported = frozenset({"temperature"})

    tool_use = use("hermes", "get_weather")
    for app, expected in ((Plain(), None), (Grammar(), tool_use.constraint)):
        params = SamplingParams()
        tool_use.constrain(params, app)
        assert params.tool_call == expected
