"""ResponseOutput (runnel.surfaces.openai.responses_output): a response's output items and
typed events, fed as a generation and a tool-call parser feed them; every event and the
final response validate against the openai SDK's own types, strictly."""

from __future__ import annotations

import asyncio

import orjson
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from runnel.surfaces.openai.responses_output import EVENTS, ResponseOutput
from runnel.surfaces.openai.sinks import Usage

EVENT = TypeAdapter(ResponseStreamEvent)
SKELETON = {"id": "resp_1", "object": "response", "created_at": 1, "status": "in_progress", "background": False,
            "error": None, "incomplete_details": None, "instructions": None, "max_output_tokens": None,
            "model": "m", "output": [], "parallel_tool_calls": True, "previous_response_id": None,
            "temperature": 1.0, "tool_choice": "auto", "tools": [], "top_p": 1.0, "usage": None}


class Stream:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send(self, event) -> None:
        self.frames.append(EVENTS.encode(event))


def run(feed, reason: str = "stop", streamed: bool = True):
    async def main():
        output = ResponseOutput(Usage(7), SKELETON)
        stream = Stream()
        if streamed:
            output.open(stream)
        feed(output)
        output.on_finish(0, reason, 5)
        await output.done
        return output, stream

    output, stream = asyncio.run(main())
    events = []
    for frame in stream.frames:
        name, data = frame.removesuffix(b"\n\n").split(b"\n")
        event = orjson.loads(data.removeprefix(b"data: "))
        assert name == b"event: " + event["type"].encode()
        events.append(EVENT.validate_python(event, strict=True))
    return Response.model_validate(output.response, strict=True), events


def text_then_two_calls(output: ResponseOutput) -> None:
    output.on_tokens(0, " Let", (1,), None)
    output.on_tokens(0, " me see.", (2,), None)
    output.on_tool_call(0, "call_1", "get_weather")
    output.on_tool_arguments(0, '{"city": ')
    output.on_tool_arguments(0, '"Paris"}')
    output.on_tool_call(1, "call_2", "get_time")
    output.on_tool_arguments(1, "{}")


def test_text_then_tool_calls_make_three_items_and_their_events():
    response, events = run(text_then_two_calls)
    assert [event.type for event in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert [getattr(event, "output_index", None) for event in events][2:-1] == [0] * 7 + [1] * 5 + [2] * 4
    assert response.status == "completed" and response.output_text == "Let me see."
    message, weather, time = response.output
    assert (weather.type, weather.call_id, weather.name, weather.arguments, weather.status) == (
        "function_call", "call_1", "get_weather", '{"city": "Paris"}', "completed")
    assert weather.id.startswith("fc_") and time.arguments == "{}"
    assert events[12].arguments == weather.arguments and events[-1].response == response
    assert response.usage.input_tokens == 7 and response.usage.output_tokens == 5
    assert response.usage.total_tokens == 12


def test_not_streamed_the_same_output_and_no_events():
    response, events = run(text_then_two_calls, streamed=False)
    assert events == [] and [item.type for item in response.output] == ["message", "function_call",
                                                                         "function_call"]


def test_no_text_is_one_empty_message_and_a_length_stop_is_incomplete():
    response, events = run(lambda output: output.on_tokens(0, "  ", (1,), None), reason="length")
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "" and response.output[0].status == "incomplete"
    assert [event.type for event in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.incomplete"]
    assert events[-2].item.status == "incomplete"
