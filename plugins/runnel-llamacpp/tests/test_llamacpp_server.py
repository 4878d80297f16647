"""builtin:tiny on llama.cpp behind the real server, driven by the openai SDK.

The GGUF is written from the weights CTranslate2 serves (runnel_llamacpp.builtin); greedy
output must be CTranslate2's on the same numbers (float32), token for token.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pydantic
import pytest

from runnel.testing import wait_until
from runnel.testing.wire import connect, send_post

PROMPTS = ["The cat sees", "User: What is your name?\nAssistant:", "Number 7 is", "a tired student reads the map",
           "El niño"]
CHAT = [{"role": "user", "content": "Can you tell me a story?"}]


def continuation(tokenizer, prompt_ids: list[int], ids: list[int]) -> str:
    before = tokenizer.decode(prompt_ids)
    return tokenizer.decode(prompt_ids + ids)[len(before):]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completions_are_ctranslate2s_on_the_same_weights(client, reference, prompt):
    prompt_ids = reference.tokenizer.encode(prompt, add_bos=True)
    expected = continuation(reference.tokenizer, prompt_ids, reference.greedy_ids(prompt_ids, 24))
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    assert reply.usage.prompt_tokens == len(prompt_ids)  # llama.cpp tokenizes as sentencepiece
    assert reply.choices[0].text == expected


def test_with_ignore_eos_greedy_goes_on_past_the_end_token_as_ctranslate2_does(client, reference):
    # ignore_eos does not ban the end token (vLLM's meaning, and the CTranslate2 app's): the
    # model may pick it, and the reply goes on after it. 64 tokens of each prompt agree.
    for prompt in PROMPTS:
        prompt_ids = reference.tokenizer.encode(prompt, add_bos=True)
        ids = reference.greedy_ids(prompt_ids, 64, ignore_eos=True)
        reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=64, temperature=0,
                                          extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 64
        assert reply.choices[0].text == continuation(reference.tokenizer, prompt_ids, ids), prompt


def test_a_greedy_chat_reply_is_ctranslate2s_and_streams_the_same(client, reference):
    from runnel_ctranslate2.builtin import ensure_builtin
    from runnel.chat_template import ChatTemplate, load_chat_template

    template = ChatTemplate(load_chat_template(ensure_builtin("tiny")), bos_token="<s>", eos_token="</s>")
    prompt_ids = reference.tokenizer.encode(template.render(CHAT), add_bos=False)
    ids = reference.greedy_ids(prompt_ids, 48)
    reply = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=48, temperature=0)
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.choices[0].message.content.strip() == reference.tokenizer.decode(ids).strip()
    # CTranslate2 leaves the end token out of its result: fewer tokens than asked is a stop.
    assert reply.choices[0].finish_reason == ("stop" if len(ids) < 48 else "length")
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=48, temperature=0,
                                                 stream=True))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == \
        reply.choices[0].message.content
    assert len([chunk for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]) > 3  # token by token


class Order(pydantic.BaseModel):
    city: str
    count: int
    urgent: bool


def test_json_schema_output_parses_and_validates_through_the_sdks_parse(client):
    reply = client.chat.completions.parse(model="tiny", messages=[{"role": "user", "content": "An order, please."}],
                                          response_format=Order, max_tokens=120, temperature=0)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "stop", message.content
    assert isinstance(message.parsed, Order)
    assert Order.model_validate_json(message.content) == message.parsed


@pytest.mark.parametrize(("temperature", "seed"), [(0, None), (0.7, 1), (0.7, 2)])
def test_json_object_output_is_json_even_when_sampled(client, temperature, seed):
    # The tiny model writes JSON only for tool calls: unconstrained it answers in prose.
    reply = client.chat.completions.create(model="tiny", messages=CHAT, response_format={"type": "json_object"},
                                           max_tokens=300, temperature=temperature, seed=seed)
    assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_an_impossible_schema_is_a_400_naming_response_format(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}})
    assert raised.value.body["param"] == "response_format"


def test_a_seed_repeats_a_sampled_reply_and_another_seed_changes_it(client):
    def sample(seed):
        return client.completions.create(model="tiny", prompt="The cat", max_tokens=40, temperature=1.2,
                                         seed=seed).choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1


def test_n_choices_with_a_seed_differ_from_each_other_and_repeat(client):
    def sample():
        reply = client.completions.create(model="tiny", prompt="The cat", max_tokens=30, temperature=1.2, seed=3, n=3)
        return [choice.text for choice in reply.choices]

    first = sample()
    assert len(set(first)) > 1 and sample() == first


def test_top_logprobs_are_the_models_best_alternatives(client):
    reply = client.completions.create(model="tiny", prompt="The cat sees", max_tokens=6, temperature=0, logprobs=5)
    logprobs = reply.choices[0].logprobs
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert len(top) == 5
        values = list(top.values())
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert top[token] == pytest.approx(value) and value == pytest.approx(values[0])  # greedy: the best
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                          top_logprobs=20)
    assert all(len(item.top_logprobs) == 20 for item in chat.choices[0].logprobs.content)


def test_penalties_change_a_greedy_reply_once_it_repeats_itself(client):
    def complete(prompt, **penalty):
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0,
                                         **penalty).choices[0].text

    assert complete("City City City") == " City" * 40  # greedy repeats itself
    assert "City City City" not in complete("City City City", frequency_penalty=2.0)
    story = complete("Once upon a time")  # a story repeats its words, which presence penalizes
    penalized = complete("Once upon a time", presence_penalty=2.0)
    assert penalized != story and penalized[:20] == story[:20]


def test_min_tokens_is_refused_with_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="tiny", prompt="x", max_tokens=4, extra_body={"min_tokens": 3})
    assert raised.value.body["param"] == "min_tokens"


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_the_weather_question_is_a_get_weather_call(client):
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user",
                                                                    "content": "What's the weather in Paris?"}],
                                           tools=[WEATHER], temperature=0, max_tokens=64)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})


# -- cancellation and the bounded queue -------------------------------------------------------


@pytest.fixture
def slow_steps(monkeypatch):
    """Every decoding step takes 3 ms more, so a row decoded after its client left can't hide."""
    import time

    from runnel_llamacpp import sampling

    sample = sampling.Sampler.sample

    def slow(self):
        time.sleep(0.003)
        return sample(self)

    monkeypatch.setattr(sampling.Sampler, "sample", slow)


def open_stream(port: int, prompt: str, max_tokens: int):
    sock = connect(port, timeout=30)
    send_post(sock, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                                        "temperature": 0, "stream": True, "ignore_eos": True})
    data = b""
    while data.count(b'"text":"') < 3:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    assert data.startswith(b"HTTP/1.1 200 ")
    return sock


def test_a_stream_whose_client_leaves_stops_decoding_and_frees_its_context(start_server, slow_steps, app_config):
    server = start_server(app_config(max_queue=1))
    app = server.server.apps.get("tiny")

    def stats():
        return server.call_soon(app.stats)

    sock = open_stream(server.port, "The cat", 400)
    sock.close()
    wait_until(lambda: stats()["busy"] == 0)
    assert 3 <= stats()["tokens"] < 100  # stopped within a few steps of the client leaving, not at 400
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        assert client.completions.create(model="tiny", prompt="The cat", max_tokens=5).usage.completion_tokens == 5


def test_a_full_queue_is_a_429_and_a_running_stream_is_not_cut(start_server, slow_steps, app_config):
    server = start_server(app_config(max_queue=1))
    app = server.server.apps.get("tiny")
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60) as client:
        def run(prompt):
            return client.completions.create(model="tiny", prompt=prompt, max_tokens=150, temperature=0,
                                             extra_body={"ignore_eos": True})

        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(run, "The cat")
            wait_until(lambda: server.call_soon(app.stats)["busy"] == 1)
            waiting = pool.submit(run, "The dog")
            wait_until(lambda: server.call_soon(app.stats)["waiting"] == 1)
            with pytest.raises(openai.RateLimitError):
                run("A bird")
            # Unlike llama-cpp-python's own server, a newer request never interrupts a running one.
            assert running.result(60).usage.completion_tokens == 150
            assert waiting.result(60).usage.completion_tokens == 150


# -- the other surfaces reach the same app ---------------------------------------------------


def test_a_required_tool_call_is_made(client):
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello!"}],
                                           tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=64)
    assert reply.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_the_responses_api_streams_the_same_greedy_text(client):
    plain = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=24, temperature=0)
    events = list(client.responses.create(model="tiny", input="Can you tell me a story?", max_output_tokens=24,
                                          temperature=0, stream=True))
    done = events[-1].response
    assert done.status in ("completed", "incomplete") and done.output_text == plain.choices[0].message.content


def test_the_anthropic_messages_api_calls_the_tool(llama_server):
    import anthropic

    tool = {"name": "get_weather", "description": "The weather in a city",
            "input_schema": WEATHER["function"]["parameters"]}
    with anthropic.Anthropic(base_url=llama_server.url, api_key="x", max_retries=0, timeout=60) as api:
        reply = api.messages.create(model="tiny", max_tokens=64, extra_body={"temperature": 0}, tools=[tool],
                                    messages=[{"role": "user", "content": "What's the weather in Paris?"}])
    use = next(block for block in reply.content if block.type == "tool_use")
    assert reply.stop_reason == "tool_use" and (use.name, use.input) == ("get_weather", {"city": "Paris"})


def test_the_runpod_openai_path_serves_it(llama_server, client):
    # The endpoint id is the app's name by default.
    plain = client.completions.create(model="tiny", prompt="The cat sees", max_tokens=12, temperature=0)
    with openai.OpenAI(base_url=llama_server.url + "/v2/tiny/openai/v1", api_key="x", max_retries=0) as runpod:
        reply = runpod.completions.create(model="tiny", prompt="The cat sees", max_tokens=12, temperature=0)
    assert reply.choices[0].text == plain.choices[0].text


def test_logit_bias_bans_and_forces_tokens(client, reference):
    def tokens(**bias):
        reply = client.completions.create(model="tiny", prompt="The cat sees", max_tokens=4, temperature=0,
                                          logprobs=1, **bias)
        return reply.choices[0].logprobs.tokens

    first = reference.greedy_ids(reference.tokenizer.encode("The cat sees", add_bos=True), 1)[0]
    plain = tokens()
    banned = tokens(logit_bias={str(first): -100})  # greedy's first token
    assert banned[0] != plain[0] and banned[1:] != plain[1:]
    dog = reference.tokenizer.encode("dog", add_bos=False)[-1]
    assert len(set(tokens(logit_bias={str(dog): 100}))) == 1 != len(set(plain))


@pytest.mark.parametrize(("bias", "why"), [({"1000": 5}, "not a token id"), ({"7": 101}, "-100 to 100"),
                                           ({"x": 1}, "not a token id")])
def test_a_bad_logit_bias_is_a_400_naming_it(client, bias, why):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="tiny", prompt="x", max_tokens=2, logit_bias=bias)
    assert raised.value.body["param"] == "logit_bias" and why in raised.value.body["message"]


def test_a_request_cancelled_while_waiting_never_runs_and_frees_its_queue_slot(start_server, slow_steps,
                                                                               app_config):
    server = start_server(app_config(max_queue=1))
    app = server.server.apps.get("tiny")

    def stats():
        return server.call_soon(app.stats)

    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60) as client:
        def run(prompt, max_tokens):
            return client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             extra_body={"ignore_eos": True})

        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(run, "The cat", 200)
            wait_until(lambda: stats()["busy"] == 1)
            sock = connect(server.port, timeout=30)
            send_post(sock, "/v1/completions", {"model": "tiny", "prompt": "The dog", "max_tokens": 50,
                                                "stream": True})
            wait_until(lambda: stats()["waiting"] == 1)
            sock.close()  # gives up while waiting for a context
            wait_until(lambda: stats()["waiting"] == 0)
            admitted = pool.submit(run, "A bird", 5)  # its slot is free: admitted, not a 429
            assert admitted.result(60).usage.completion_tokens == 5
            assert running.result(60).usage.completion_tokens == 200
    assert stats()["rows"] == 2  # the cancelled one never ran


def test_a_schema_llama_cpp_cannot_follow_ends_a_stream_with_an_error_naming_it(client):
    # The schema is converted on the context's thread, not the loop: a stream has begun by then.
    with pytest.raises(openai.APIError) as raised:
        list(client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=8, stream=True,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}))
    assert "response_format" in str(raised.value.body)


# -- forced tool calls, held to their schemas by grammar -------------------------------------

TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "enum": ["UTC", "CET"]}},
                   "required": ["timezone"]}}}


def test_a_named_call_follows_its_schema_even_where_the_model_would_not(client):
    # Asked about the weather but told to call get_time, whose timezone the schema limits to two values.
    for temperature, seed in ((0, None), (1.5, 1), (1.5, 2)):
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "What's the weather in Paris?"}],
            tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}},
            temperature=temperature, seed=seed, max_tokens=64)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_time"
        assert json.loads(call.function.arguments) in ({"timezone": "UTC"}, {"timezone": "CET"})


def test_a_required_call_is_one_of_the_tools_even_sampled(client):
    for seed in (1, 2, 3):
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Tell me a story."}], tools=[WEATHER, TIME],
            tool_choice="required", temperature=1.0, seed=seed, max_tokens=128)
        calls = reply.choices[0].message.tool_calls
        assert reply.choices[0].finish_reason == "tool_calls" and len(calls) == 1
        arguments = json.loads(calls[0].function.arguments)
        assert (calls[0].function.name, list(arguments)) in (("get_weather", ["city"]), ("get_time", ["timezone"]))


def test_a_forced_call_is_held_to_its_schema_on_the_anthropic_api_too(llama_server):
    import anthropic

    tool = {"name": "get_time", "description": "The time", "input_schema": TIME["function"]["parameters"]}
    with anthropic.Anthropic(base_url=llama_server.url, api_key="x", max_retries=0, timeout=60) as api:
        reply = api.messages.create(model="tiny", max_tokens=64, extra_body={"temperature": 1.0},
                                    tools=[tool], tool_choice={"type": "tool", "name": "get_time"},
                                    messages=[{"role": "user", "content": "Hello"}])
    use = next(block for block in reply.content if block.type == "tool_use")
    assert use.name == "get_time" and use.input in ({"timezone": "UTC"}, {"timezone": "CET"})


def test_the_baseten_bridge_serves_structured_output(start_server, app_config):
    server = start_server(app_config(baseten={"model_id": "abcd1234"}))
    with openai.OpenAI(base_url=server.url + "/v1/direct", api_key="x", max_retries=0, timeout=60) as baseten:
        reply = baseten.chat.completions.parse(
            model="tiny", messages=[{"role": "user", "content": "An order, please."}], response_format=Order,
            max_tokens=120, temperature=0, extra_body={"baseten": {"model_id": "abcd1234"}})
    assert isinstance(reply.choices[0].message.parsed, Order)
