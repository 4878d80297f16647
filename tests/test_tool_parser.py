"""runnel.tools: a model's reply -> content and tool calls, the same however it is streamed."""

from __future__ import annotations

import random

import orjson
import pytest

from runnel.errors import HTTPError
from runnel.tools import FORMATS, ToolUse, function_tool

WEATHER = function_tool("get_weather", "The weather in a city", {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}, "tools[0]")
TIME = function_tool("get_time", None, {"type": "object", "properties": {"timezone": {"type": "string"}},
                                         "additionalProperties": False}, "tools[1]")
TOOLS = [WEATHER, TIME]


class Recorder:
    """What a sink sees, as a list of events; joined, the answer."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_text(self, text: str) -> None:
        self.events.append(("text", text))

    def on_tool_call(self, index: int, call_id: str, name: str) -> None:
        self.events.append(("call", index, name))

    def on_tool_arguments(self, index: int, piece: str) -> None:
        self.events.append(("arguments", index, piece))

    def joined(self) -> tuple[str, list[tuple[str, str]]]:
        text = "".join(event[1] for event in self.events if event[0] == "text")
        calls: list[list[str]] = []
        for event in self.events:
            if event[0] == "call":
                assert event[1] == len(calls)
                calls.append([event[2], ""])
            elif event[0] == "arguments":
                calls[event[1]][1] += event[2]
        return text, [(name, arguments) for name, arguments in calls]


def run(reply: str, cuts: list[int], *, parser: str = "hermes", choice: str = "auto", parallel: bool = True,
        reason: str = "stop"):
    use = ToolUse.create(parser, "m", TOOLS, choice, parallel)
    assert use is not None
    recorder = Recorder()
    p = use.parser(recorder)
    last = 0
    for cut in [*cuts, len(reply)]:
        p.feed(reply[last:cut])
        last = cut
    p.finish(reason)
    joined = recorder.joined()
    assert [(call.name, call.arguments) for call in p.calls] == joined[1]
    return joined, recorder.events


def every_cut(reply: str, **kwargs):
    """The reply fed whole, character by character, and cut at random: one answer."""
    whole, _ = run(reply, [], **kwargs)
    single, _ = run(reply, list(range(1, len(reply))), **kwargs)
    assert single == whole
    rng = random.Random(len(reply))
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(reply)), min(len(reply) - 1, rng.randint(1, 8))))
        assert run(reply, cuts, **kwargs)[0] == whole, cuts
    return whole


HERMES_CASES = [
    (' <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
     ("", [("get_weather", '{"city": "Paris"}')])),
    ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "New York"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "America/New_York"}}\n</tool_call>',
     ("Let me look.", [("get_weather", '{"city": "New York"}'), ("get_time", '{"timezone": "America/New_York"}')])),
    # Braces and quotes inside strings do not end the call.
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "a}\\"{b", "n": [1, {"x": "]"}]}}</tool_call>',
     ("", [("get_weather", '{"city": "a}\\"{b", "n": [1, {"x": "]"}]}')])),
    # Keys in another order: not streamable, sent whole (normalised) once complete.
    ('<tool_call>{"arguments": {"city": "Rome"}, "name": "get_weather"}</tool_call>',
     ("", [("get_weather", '{"city":"Rome"}')])),
    # Arguments as a JSON string, as some models write them.
    ('<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>',
     ("", [("get_weather", '{"city":"Oslo"}')])),
    # Plain text, with a "<" that is no opening, keeps its inner whitespace; the ends are trimmed.
    ("  It is 3 < 4 and <tool is a word.  ", ("It is 3 < 4 and <tool is a word.", [])),
    ('Text <tool_call>{"name": "get_time", "arguments": {}}</tool_call> and after.',
     ("Text and after.", [("get_time", "{}")])),
]


@pytest.mark.parametrize(("reply", "expected"), HERMES_CASES)
def test_hermes_replies_give_the_same_content_and_calls_however_they_are_cut(reply, expected):
    assert every_cut(reply) == expected


def test_the_name_comes_before_any_argument_and_arguments_stream_in_pieces():
    reply = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    _, events = run(reply, list(range(1, len(reply))))
    assert events[0] == ("call", 0, "get_weather")
    pieces = [event[2] for event in events[1:]]
    assert all(event[0] == "arguments" for event in events[1:])
    assert len(pieces) > 5 and "".join(pieces) == '{"city": "Paris"}'


def test_no_markup_ever_reaches_the_content():
    reply = 'Sure.<tool_call>{"name": "get_time", "arguments": {"timezone": "UTC"}}</tool_call>'
    for cut in range(1, len(reply)):
        (text, calls), events = run(reply, [cut])
        assert text == "Sure." and "<" not in "".join(e[1] for e in events if e[0] == "text")


@pytest.mark.parametrize(("reply", "expected"), [
    ('{"name": "get_weather", "parameters": {"city": "Lima"}}', ("", [("get_weather", '{"city": "Lima"}')])),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Lima"}}; {"name": "get_time", "parameters": {}}',
     ("", [("get_weather", '{"city": "Lima"}'), ("get_time", "{}")])),
    ("The answer is {not a call}.", ("The answer is {not a call}.", [])),
])
def test_llama3_json(reply, expected):
    assert every_cut(reply, parser="llama3_json") == expected


def test_mistral():
    reply = ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Kyiv"}}, '
             '{"name": "get_time", "arguments": {"timezone": "UTC"}}]')
    assert every_cut(reply, parser="mistral") == ("", [("get_weather", '{"city": "Kyiv"}'),
                                                       ("get_time", '{"timezone": "UTC"}')])


@pytest.mark.parametrize("reply", [
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"</tool_call>',  # never closes
    '<tool_call>not json</tool_call>',
    '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',  # not offered
    '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>',  # lacks the required city
    '<tool_call>{"name": "get_time", "arguments": {"timezone": "UTC", "x": 1}}</tool_call>',  # not allowed
    '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>',
])
def test_a_reply_that_claims_a_call_it_does_not_make_is_an_error(reply):
    with pytest.raises(HTTPError) as caught:
        run(reply, [])
    assert caught.value.status == 500 and caught.value.code == "invalid_tool_call"


def test_a_call_cut_by_max_tokens_is_no_error_but_stays_incomplete():
    (text, calls), _ = run('<tool_call>{"name": "get_weather", "arguments": {"ci', [], reason="length")
    assert calls == [("get_weather", '{"ci')]


def test_forced_calls_are_prefilled_and_a_reply_without_one_is_an_error():
    use = ToolUse.create("hermes", "m", TOOLS, "get_time", True)
    assert use is not None and use.prefill == '<tool_call>{"name": "get_time", "arguments":'
    recorder = Recorder()
    parser = use.parser(recorder)
    assert recorder.events == []  # the name is not certain before the arguments start
    parser.feed(' {"timezone": "UTC"}}</tool_call>')
    parser.finish("stop")
    assert recorder.joined() == ("", [("get_time", '{"timezone": "UTC"}')])
    required = ToolUse.create("hermes", "m", TOOLS, "required", True)
    assert required is not None and required.prefill == "<tool_call>"
    with pytest.raises(HTTPError, match="invalid tool call"):
        run("I would rather not.", [], choice="required")
    assert FORMATS["llama3_json"].prefill(None) == "{"
    assert FORMATS["mistral"].prefill("f") == '[TOOL_CALLS] [{"name": "f", "arguments":'


def test_parallel_tool_calls_false_keeps_the_first_call():
    reply = ('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
             '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>')
    assert every_cut(reply, parallel=False) == ("", [("get_time", "{}")])


def test_tool_use_checks_the_request():
    assert ToolUse.create("hermes", "m", [], None, True) is None
    assert ToolUse.create("hermes", "m", TOOLS, "none", True) is None
    with pytest.raises(HTTPError, match="only allowed when"):
        ToolUse.create("hermes", "m", [], "required", True)
    with pytest.raises(HTTPError, match="no tool named"):
        ToolUse.create("hermes", "m", TOOLS, "nope", True)
    with pytest.raises(HTTPError, match="no tool-call parser") as caught:
        ToolUse.create(None, "m", TOOLS, None, True)
    assert caught.value.param == "tools"
    with pytest.raises(HTTPError, match="named `get_time`"):
        ToolUse.create("hermes", "m", [TIME, TIME], None, True)
    with pytest.raises(HTTPError) as caught:
        function_tool("no spaces allowed", None, None, "tools[3].function")
    assert caught.value.param == "tools[3].function.name"


def test_a_long_call_is_scanned_in_linear_time():
    """A hostile (or just long) reply: each push scans only its own characters."""
    value = "x" * 200_000
    reply = '<tool_call>{"name": "get_weather", "arguments": {"city": %s}}</tool_call>' % orjson.dumps(value).decode()
    cuts = list(range(1, len(reply), 7))
    (_, calls), _ = run(reply, cuts)
    assert calls == [("get_weather", '{"city": "%s"}' % value)]
