"""The Responses API (/v1/responses) against the built-in model, with the real openai SDK
and raw HTTP: plain, streamed (the exact event sequence), stored, continued, background,
cancelled, kept across a restart, and refused where a field is not served."""

from __future__ import annotations

import time

import openai
import orjson
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from runnel.testing import ServerThread, assert_error, request, server_config, wait_until
from runnel.testing.pytest_plugin import TINY_CONFIG

# The built-in model, and a paced echo app (20 ms a token) for a response still running when cancelled:
# echo answers with the prompt's words, so LONG takes it 6 s.
CONFIG = {"server": {"runs_path": ""},
          "apps": {**TINY_CONFIG["apps"], "slow": {"backend": "echo", "pace_ms": 20}}}
EVENT = TypeAdapter(ResponseStreamEvent)
JSON = ((b"content-type", b"application/json"),)
TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added"]
LONG = " ".join(["word"] * 300)
DONE_EVENTS = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


@pytest.fixture(scope="module")
def server():
    thread = ServerThread(server_config(CONFIG)).start()
    assert thread.wait_ready()
    yield thread
    thread.stop()


_clients: list[openai.OpenAI] = []  # closed after each test (a client left to the GC warns)


@pytest.fixture(autouse=True)
def _close_clients():
    yield
    while _clients:
        _clients.pop().close()


def client(server: ServerThread, api_key: str = "unused") -> openai.OpenAI:
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0)
    _clients.append(sdk)
    return sdk


def post(server: ServerThread, path: str, body: dict):
    return request(server.port, "POST", path, headers=JSON, body=orjson.dumps(body))


def prompt_tokens(server: ServerThread, messages: list[dict]) -> int:
    """The conversation's length through the model's chat template, as /tokenize counts it."""
    reply = post(server, "/tokenize", {"model": "tiny", "messages": messages})
    assert reply.status == 200, reply.body
    return reply.json()["count"]


def test_a_response_answers_with_the_models_text_and_exact_usage(server):
    reply = client(server).responses.create(model="tiny", input="Tell me a story.", temperature=0)
    chat = client(server).chat.completions.create(model="tiny", temperature=0, max_tokens=200,
                                                  messages=[{"role": "user", "content": "Tell me a story."}])
    assert reply.id.startswith("resp_") and reply.object == "response" and reply.model == "tiny"
    assert reply.status == "completed" and reply.incomplete_details is None and reply.error is None
    assert reply.output_text == chat.choices[0].message.content  # the same conversation, the same greedy answer
    [message] = reply.output
    assert (message.type, message.role, message.status) == ("message", "assistant", "completed")
    assert message.id.startswith("msg_") and [part.type for part in message.content] == ["output_text"]
    usage = reply.usage
    assert usage.input_tokens == prompt_tokens(server, [{"role": "user", "content": "Tell me a story."}])
    assert usage.output_tokens == chat.usage.completion_tokens
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0


def test_a_streamed_response_sends_the_typed_events_in_order_and_its_deltas_join_into_the_text(server):
    plain = client(server).responses.create(model="tiny", input="How are you today?", temperature=0)
    events = list(client(server).responses.create(model="tiny", input="How are you today?", temperature=0,
                                                  stream=True))
    types = [event.type for event in events]
    # One delta a push: a token each, or a few when they come faster than they are written.
    deltas = [event for event in events if event.type == "response.output_text.delta"]
    assert deltas
    assert types == TEXT_EVENTS + ["response.output_text.delta"] * len(deltas) + DONE_EVENTS + ["response.completed"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(delta.delta for delta in deltas)
    assert text == plain.output_text
    item_id = events[2].item.id
    assert all(delta.item_id == item_id and delta.output_index == 0 for delta in deltas)
    assert events[-4].text == text and events[-3].part.text == text and events[-2].item.content[0].text == text
    created, final = events[0].response, events[-1].response
    assert created.status == "in_progress" and created.output == []
    assert final.id == created.id and final.status == "completed" and final.output_text == text
    assert final.usage.output_tokens == plain.usage.output_tokens
    assert client(server).responses.retrieve(final.id).output_text == text  # stored before the stream ended


def test_the_stream_on_the_wire_names_each_event_and_ends_without_done(server):
    reply = post(server, "/v1/responses", {"model": "tiny", "input": "Hello!", "stream": True, "store": False})
    assert reply.status == 200 and reply.header(b"content-type") == b"text/event-stream"
    assert reply.body.endswith(b"\n\n")
    types = []
    for block in reply.body[:-2].split(b"\n\n"):
        event, data = block.split(b"\n")
        payload = orjson.loads(data.removeprefix(b"data: "))
        assert event == b"event: " + payload["type"].encode()
        EVENT.validate_python(payload, strict=True)  # every field the SDK's type has, of its type
        types.append(payload["type"])
    assert types[-1] == "response.completed"  # and no data: [DONE] after it


def test_a_response_body_is_the_sdks_response_type_strictly(server):
    reply = post(server, "/v1/responses", {"model": "tiny", "input": "Hello!", "store": False})
    assert reply.status == 200 and reply.header(b"content-type") == b"application/json"
    assert Response.model_validate(reply.json(), strict=True).status == "completed"


def test_instructions_come_first_as_a_system_message(server):
    reply = client(server).responses.create(model="tiny", input="Hello!", instructions="Be brief.", temperature=0)
    assert reply.instructions == "Be brief."
    assert reply.usage.input_tokens == prompt_tokens(
        server, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}])


def test_max_output_tokens_makes_an_incomplete_response(server):
    reply = client(server).responses.create(model="tiny", input="Tell me a story.", max_output_tokens=3,
                                            temperature=0)
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert reply.usage.output_tokens == 3 and reply.max_output_tokens == 3
    assert reply.output[0].status == "incomplete" and reply.output_text
    events = list(client(server).responses.create(model="tiny", input="Tell me a story.", max_output_tokens=3,
                                                  temperature=0, stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == reply.output_text
    assert events[-2].item.status == "incomplete"


def test_a_stored_response_is_retrieved_then_deleted(server):
    sdk = client(server)
    reply = sdk.responses.create(model="tiny", input="What is a dog?")
    assert reply.store is True
    again = sdk.responses.retrieve(reply.id)
    assert again.model_dump() == reply.model_dump()
    deleted = request(server.port, "DELETE", f"/v1/responses/{reply.id}")
    assert deleted.status == 200 and deleted.json() == {"id": reply.id, "object": "response.deleted",
                                                        "deleted": True}
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(reply.id)
    assert_error(request(server.port, "GET", f"/v1/responses/{reply.id}"), 404, None)
    assert_error(request(server.port, "DELETE", f"/v1/responses/{reply.id}"), 404, None)


def test_previous_response_id_continues_the_conversation(server):
    sdk = client(server)
    first = sdk.responses.create(model="tiny", input="Hello!", instructions="Be kind.", temperature=0)
    second = sdk.responses.create(model="tiny", input="What is a dog?", previous_response_id=first.id,
                                  temperature=0)
    assert second.status == "completed" and second.previous_response_id == first.id
    # The first response's input and output come first; its instructions do not.
    conversation = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": first.output_text},
                    {"role": "user", "content": "What is a dog?"}]
    assert second.usage.input_tokens == prompt_tokens(server, conversation)
    assert second.usage.input_tokens > first.usage.input_tokens
    third = sdk.responses.create(model="tiny", input="Thank you!", previous_response_id=second.id, temperature=0)
    conversation += [{"role": "assistant", "content": second.output_text}, {"role": "user", "content": "Thank you!"}]
    assert third.usage.input_tokens == prompt_tokens(server, conversation)


def test_an_unstored_response_cannot_be_retrieved_or_continued(server):
    sdk = client(server)
    reply = sdk.responses.create(model="tiny", input="Hello!", store=False)
    assert reply.status == "completed" and reply.store is False
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(reply.id)
    error = assert_error(post(server, "/v1/responses", {"model": "tiny", "input": "Hi", "previous_response_id":
                                                         reply.id}), 400, "previous_response_id")
    assert reply.id in error["message"]


def test_a_background_response_is_queued_then_completes(server):
    sdk = client(server)
    reply = sdk.responses.create(model="tiny", input="Tell me a story.", background=True, temperature=0)
    assert reply.status in ("queued", "in_progress") and reply.background is True and reply.output == []
    done = wait_until(lambda: (r := sdk.responses.retrieve(reply.id)).status not in ("queued", "in_progress") and r,
                      timeout=30, interval=0.05)
    assert done.status == "completed" and done.id == reply.id and done.background is True
    plain = sdk.responses.create(model="tiny", input="Tell me a story.", temperature=0)
    assert done.output_text == plain.output_text and done.usage.model_dump() == plain.usage.model_dump()


def test_a_background_response_can_be_cancelled(server):
    sdk = client(server)
    reply = sdk.responses.create(model="slow", input=LONG, max_output_tokens=1000, background=True)
    wait_until(lambda: sdk.responses.retrieve(reply.id).status == "in_progress", timeout=10)
    started = time.monotonic()
    cancelled = sdk.responses.cancel(reply.id)
    assert cancelled.status == "cancelled" and time.monotonic() - started < 3  # not 300 tokens at 20 ms
    assert sdk.responses.retrieve(reply.id).status == "cancelled"
    assert sdk.responses.cancel(reply.id).status == "cancelled"  # again: as it is
    foreground = sdk.responses.create(model="tiny", input="Hello!")
    assert_error(post(server, f"/v1/responses/{foreground.id}/cancel", {}), 400, None)


@pytest.mark.parametrize("body, param, code", [
    ({"foo": 1}, "foo", "unknown_parameter"),
    ({"reasoning": {"effort": "low"}}, "reasoning", "unsupported_parameter"),
    ({"include": ["reasoning.encrypted_content"]}, "include", "unsupported_parameter"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {}}}}, "text.format",
     "unsupported_parameter"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]", "unsupported_parameter"),
    ({"tools": [{"type": "function", "name": "no spaces"}]}, "tools[0].name", "invalid_value"),
    ({"tool_choice": {"type": "web_search"}}, "tool_choice", "unsupported_parameter"),
    ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
    ({"truncation": "auto"}, "truncation", "unsupported_parameter"),
    ({"input": [{"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0]", "unsupported_parameter"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role", "invalid_value"),
    ({"input": None}, "input", "missing_required_parameter"),
    ({"temperature": 3}, "temperature", "invalid_value"),
    ({"max_output_tokens": 0}, "max_output_tokens", "invalid_value"),
    ({"max_output_tokens": 100_000}, "max_output_tokens", "context_length_exceeded"),
    ({"background": True, "store": False}, "background", "invalid_value"),
    ({"model": "nope"}, "model", "model_not_found"),
])
def test_a_field_not_served_is_a_400_naming_it(server, body, param, code):
    reply = post(server, "/v1/responses", {"model": "tiny", "input": "Hello!", **body})
    error = assert_error(reply, 404 if code == "model_not_found" else 400, param, code)
    with pytest.raises(openai.APIStatusError) as raised:  # and the SDK sees it as OpenAI's error
        client(server).responses.create(model="tiny", input="Hello!", extra_body=body)
    assert raised.value.body == error


def test_bookkeeping_fields_are_accepted(server):
    reply = client(server).responses.create(model="tiny", input=[{"role": "user", "content": "Hello!"}],
                                            metadata={"k": "v"}, user="someone", parallel_tool_calls=True,
                                            text={"format": {"type": "text"}}, include=[], truncation="disabled")
    assert reply.status == "completed" and reply.metadata == {"k": "v"} and reply.user == "someone"


def test_a_stored_response_survives_a_restart(tmp_path):
    config = server_config({**TINY_CONFIG, "server": {"runs_path": str(tmp_path / "runs.sqlite3")}})
    first = ServerThread(config).start()
    try:
        assert first.wait_ready()
        reply = client(first).responses.create(model="tiny", input="Hello!")
    finally:
        first.stop()
    second = ServerThread(config).start()
    try:
        assert second.wait_ready()
        sdk = client(second)
        assert sdk.responses.retrieve(reply.id).model_dump() == reply.model_dump()
        follow = sdk.responses.create(model="tiny", input="What is a dog?", previous_response_id=reply.id)
        assert follow.usage.input_tokens > reply.usage.input_tokens
    finally:
        second.stop()


def test_a_response_is_its_callers_only(start_server):
    keys = ["caller-key-0001", "caller-key-0002"]
    other = start_server({"server": {"runs_path": ""}, "auth": {"kind": "api_key", "keys": keys},
                          "apps": {"echo": {"backend": "echo"}}})
    mine, theirs = client(other, keys[0]), client(other, keys[1])
    reply = mine.responses.create(model="echo", input="hello there")
    assert mine.responses.retrieve(reply.id).id == reply.id
    for call in (theirs.responses.retrieve, theirs.responses.delete, theirs.responses.cancel):
        with pytest.raises(openai.NotFoundError):
            call(reply.id)
    with pytest.raises(openai.BadRequestError) as raised:
        theirs.responses.create(model="echo", input="hi", previous_response_id=reply.id)
    assert raised.value.body["param"] == "previous_response_id"
    assert mine.responses.retrieve(reply.id).status == "completed"  # still there


def test_a_background_response_running_when_the_server_stopped_reads_failed_after_a_restart(start_server, tmp_path):
    config = {"server": {"runs_path": str(tmp_path / "runs.sqlite3")},
              "apps": {"slow": {"backend": "echo", "pace_ms": 20}}}
    first = start_server(config)
    reply = client(first).responses.create(model="slow", input=LONG, max_output_tokens=1000, background=True)
    wait_until(lambda: client(first).responses.retrieve(reply.id).status == "in_progress", timeout=10)
    first.stop()
    second = start_server(config)
    again = client(second).responses.retrieve(reply.id)  # opens the store, and recovers what was left in it
    assert again.status == "failed" and "interrupted" in again.error.message
