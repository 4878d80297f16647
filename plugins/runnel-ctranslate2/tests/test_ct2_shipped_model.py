"""The trained builtin:tiny that ships in the package, served as the default config serves it."""

from __future__ import annotations

import json
from pathlib import Path

import ctranslate2
import openai
import pytest

from runnel_ctranslate2.builtin import TINY_CHAT_TEMPLATE, ensure_builtin
from runnel.chat_template import ChatTemplate
from runnel_ctranslate2.tokenizer import load_tokenizer


CONFIG = {"apps": {"tiny": {"backend": "ctranslate2", "model": "builtin:tiny", "device": "cpu",
                            "intra_threads": 1, "default_max_tokens": 64}}}


def test_the_shipped_model_answers_in_readable_english_and_stops(start_server):
    server = start_server(CONFIG)
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as client:
        chat = client.chat.completions.create(
            model="tiny", temperature=0, messages=[{"role": "user", "content": "What is your name?"}])
        choice = chat.choices[0]
        # The template ends with "Assistant:" and the model writes " My": the space is
        # framing, so the message starts at "My" (streamed or not).
        assert choice.message.content == "My name is Runnel. I am a tiny language model."
        assert choice.finish_reason == "stop"
        stream = client.chat.completions.create(
            model="tiny", temperature=0, stream=True, messages=[{"role": "user", "content": "What is your name?"}])
        with stream:
            assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == choice.message.content
        # A completion continues its prompt, so there the leading space is content.
        completion = client.completions.create(model="tiny", prompt="The cat", temperature=0)
        assert completion.choices[0].text == " likes the garden."
        assert completion.choices[0].finish_reason == "stop"


# Chat prompts of the kinds the model was trained on (greetings, questions, stories).
SHORT_CHATS = [
    "Hello!", "Hi!", "Hello.", "Good morning!", "How are you?", "How are you today?",
    "What is your name?", "Who are you?", "What can you do?", "Can you help me?",
    "Thank you!", "Goodbye.", "What time is it?", "Where do you live?", "Why is the sky blue?",
    "What is a dog?", "What is a cat?", "What is the moon?", "What color is the grass?",
    "Where does the fish live?", "Do you like music?", "How is the weather today?",
    "Tell me a story.", "Can you tell me a story?", "Tell me a short story.",
    "Write a sentence about a dog.",
]
ROLE_MARKERS = ("User:", "Assistant:", "System:")


def _fake_turns(replies: dict) -> dict:
    return {key: reply for key, reply in replies.items() if any(m in reply[0] for m in ROLE_MARKERS)}


def test_the_shipped_model_ends_its_turn_instead_of_writing_the_users(start_server):
    """The model ends each reply with the template's end of turn (</s>), which the server
    stops on: no reply goes on to write a "User: ..." line, and none runs to max_tokens.
    (The model before the end of turn wrote one in about one sampled reply in five.)"""
    server = start_server(CONFIG)
    greedy, sampled = {}, {}
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as client:
        for prompt in SHORT_CHATS:
            messages = [{"role": "user", "content": prompt}]
            chat = client.chat.completions.create(model="tiny", temperature=0, messages=messages)
            greedy[prompt] = (chat.choices[0].message.content, chat.choices[0].finish_reason)
            # At the server's default temperature, seeded so the test is repeatable.
            chat = client.chat.completions.create(model="tiny", n=4, seed=7, messages=messages)
            for choice in chat.choices:
                sampled[prompt, choice.index] = (choice.message.content, choice.finish_reason)
        # A reply in a longer conversation ends its turn the same way.
        chat = client.chat.completions.create(model="tiny", temperature=0, messages=[
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help you today?"},
            {"role": "user", "content": "Tell me a story."}])
        greedy["(second turn)"] = (chat.choices[0].message.content, chat.choices[0].finish_reason)
    assert _fake_turns(greedy) == {}
    # Sampling at temperature 1 can still pick a newline over </s> now and then (1 of these
    # 104 replies); the model without the end of turn wrote a fake turn in 21 of them.
    assert len(_fake_turns(sampled)) <= 2, _fake_turns(sampled)
    assert {prompt: reply for prompt, reply in greedy.items() if reply[1] != "stop"} == {}
    # The end of turn is the eos token: it ends the reply and is never part of its text.
    assert not [reply for reply in greedy.values() if "</s>" in reply[0] or not reply[0].strip()]


# ---------------------------------------------------------------------------------------
# Tool calls, at the CTranslate2 level: the shipped files, prompts rendered by the plain
# template as the server renders a client's tools and messages, greedy decoding.
# ---------------------------------------------------------------------------------------


def _tool(name: str, *params: str) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": f"The demo tool {name}.",
        "parameters": {"type": "object", "properties": {p: {"type": "string"} for p in params},
                       "required": list(params)}}}


WEATHER = _tool("get_weather", "city")
CALCULATE = _tool("calculate", "expression")
GET_TIME = _tool("get_time", "timezone")
DEMO_TOOLS = [WEATHER, CALCULATE, GET_TIME]


@pytest.fixture(scope="module")
def tiny_generate():
    """greedy(prompt text) -> (reply, finish_reason), as the server generates at temperature 0."""
    path = ensure_builtin("tiny")
    assert "models" in Path(path).parts, "the trained model ships in the package"
    tokenizer = load_tokenizer(path)
    generator = ctranslate2.Generator(path, device="cpu", intra_threads=1)

    def greedy(text: str) -> tuple[str, str]:
        tokens = [tokenizer.id_to_token(i) for i in tokenizer.encode(text, add_bos=False)]
        result = generator.generate_batch([tokens], max_length=96, sampling_topk=1,
                                          include_prompt_in_result=False, return_end_token=True)[0]
        ids = result.sequences_ids[0]
        if ids and ids[-1] == tokenizer.eos_id:
            return tokenizer.decode(ids[:-1]), "stop"
        return tokenizer.decode(ids), "length"

    return greedy


@pytest.fixture(scope="module")
def render():
    template = ChatTemplate(TINY_CHAT_TEMPLATE, bos_token="<s>", eos_token="</s>")
    return template.render


def _ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def _round_trip(question: str, name: str, arguments: dict, result: dict) -> list[dict]:
    return [{"role": "user", "content": question},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": json.dumps(result)}]


def _call(name: str, **arguments: str) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


@pytest.mark.parametrize("question, tools, call", [
    ("What's the weather in Paris?", [WEATHER], _call("get_weather", city="Paris")),
    ("What's the weather in Paris?", DEMO_TOOLS, _call("get_weather", city="Paris")),
    ("What time is it in Tokyo?", DEMO_TOOLS, _call("get_time", timezone="Asia/Tokyo")),
    ("What time is it in New York?", [GET_TIME, WEATHER], _call("get_time", timezone="America/New_York")),
])
def test_the_shipped_model_calls_the_tool_that_answers_the_question(tiny_generate, render, question, tools, call):
    reply, finish = tiny_generate(render(_ask(question), tools=tools))
    # The call is the whole turn, in the Hermes format, then the end of turn.
    assert (reply.strip(), finish) == (call, "stop")


@pytest.mark.parametrize("messages, tools, answer", [
    (_round_trip("What's the weather in Paris?", "get_weather", {"city": "Paris"},
                 {"city": "Paris", "temperature": 18, "condition": "sunny"}), [WEATHER],
     "It is sunny and 18 degrees in Paris."),
    (_round_trip("What time is it in Tokyo?", "get_time", {"timezone": "Asia/Tokyo"},
                 {"timezone": "Asia/Tokyo", "time": "14:05"}), DEMO_TOOLS, "It is 14:05 in Asia/Tokyo."),
])
def test_the_shipped_model_answers_with_the_tool_result(tiny_generate, render, messages, tools, answer):
    reply, finish = tiny_generate(render(messages, tools=tools))
    assert (reply.strip(), finish) == (answer, "stop")


@pytest.mark.parametrize("question", ["Hello!", "What is a dog?", "What is your name?"])
def test_the_shipped_model_calls_no_tool_when_none_fits(tiny_generate, render, question):
    reply, finish = tiny_generate(render(_ask(question), tools=DEMO_TOOLS))
    assert "<tool_call>" not in reply and finish == "stop"
    assert reply == tiny_generate(render(_ask(question)))[0]  # as if no tools were offered


@pytest.mark.parametrize("question, answer", [
    ("What's the weather in Paris?", "Today the weather is"),
    ("What is 5 + 3?", "I do not know"),
    ("What time is it in Tokyo?", "I do not"),
])
def test_the_shipped_model_calls_nothing_when_no_tools_are_offered(tiny_generate, render, question, answer):
    reply, finish = tiny_generate(render(_ask(question)))
    assert "tool_call" not in reply and answer in reply and finish == "stop"


@pytest.mark.parametrize("question", ["What's the weather in Paris?", "Hello!", "What is a dog?"])
def test_a_forced_call_continues_into_a_valid_call(tiny_generate, render, question):
    """tool_choice "required": the server writes "<tool_call>" and the model goes on."""
    reply, finish = tiny_generate(render(_ask(question), tools=DEMO_TOOLS) + " <tool_call>")
    assert finish == "stop" and reply.endswith("</tool_call>"), reply
    call = json.loads(reply.removesuffix("</tool_call>"))
    offered = {tool["function"]["name"]: tool["function"]["parameters"]["properties"] for tool in DEMO_TOOLS}
    assert set(call) == {"name", "arguments"} and call["name"] in offered
    assert set(call["arguments"]) == set(offered[call["name"]])
    if question.startswith("What's the weather"):
        assert call == {"name": "get_weather", "arguments": {"city": "Paris"}}


def test_a_call_forced_to_a_named_function_gets_its_arguments(tiny_generate, render):
    """A named tool_choice: the server writes the call up to its arguments."""
    prefix = '<tool_call>{"name": "get_time", "arguments":'
    reply, finish = tiny_generate(render(_ask("What time is it in Tokyo?"), tools=DEMO_TOOLS) + " " + prefix)
    # (The space after "arguments":" is the model's; a decoded reply may start without it.)
    assert (reply.lstrip(), finish) == ('{"timezone": "Asia/Tokyo"}}</tool_call>', "stop")
    # Named even where the question does not fit it: still a well-formed call.
    reply, finish = tiny_generate(render(_ask("What's the weather in Paris?"), tools=DEMO_TOOLS) + " " + prefix)
    assert finish == "stop" and reply.endswith("}}</tool_call>"), reply
    assert set(json.loads(reply.removesuffix("}</tool_call>"))) == {"timezone"}


def test_the_shipped_model_calls_once_per_city(tiny_generate, render):
    reply, finish = tiny_generate(render(_ask("What is the weather in Paris and in Rome?"), tools=[WEATHER]))
    assert (reply.strip(), finish) == (_call("get_weather", city="Paris") + _call("get_weather", city="Rome"), "stop")
