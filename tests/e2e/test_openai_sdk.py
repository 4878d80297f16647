"""The OpenAI-compatible surface, driven end to end by the official ``openai`` SDK.

The echo backend is a deterministic "model": its tokenizer splits text into
words with their leading whitespace (``\\s*\\S+|\\s+``), a chat prompt is the
last user message, and generation echoes the prompt's tokens once and then
stops (or cycles to ``max_tokens`` under ``ignore_eos``). Every expected text
and token count below is computed from that, and every assertion is made on
the objects the SDK parsed.
"""

from __future__ import annotations

import asyncio
import base64
import math
import re
import struct
import sys

import openai
import pytest

from runnel.cli import run
from runnel.testing import wait_until

PIECES = re.compile(r"\s*\S+|\s+")


def pieces(text: str) -> list[str]:
    return PIECES.findall(text)


def count(text: str) -> int:
    return len(pieces(text))


def cycled(prompt: str, tokens: int) -> str:
    """What echo makes when it cycles through the prompt's tokens for ``tokens`` tokens."""
    source = pieces(prompt)
    return "".join(source[i % len(source)] for i in range(tokens))


def user(text) -> list[dict]:
    return [{"role": "user", "content": text}]


def sync_client(server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="test", max_retries=0, timeout=30, **kwargs)


def async_client(server, **kwargs) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="test", max_retries=0, timeout=30, **kwargs)


@pytest.fixture
def client(echo_server):
    with sync_client(echo_server) as client:
        yield client


def stream_chat(client, **kwargs) -> list:
    with client.chat.completions.create(stream=True, **kwargs) as stream:
        return list(stream)


def stream_completion(client, **kwargs) -> list:
    with client.completions.create(stream=True, **kwargs) as stream:
        return list(stream)


def chat_choice_chunks(chunks) -> list:
    return [chunk for chunk in chunks if chunk.choices]


def streamed_text(chunks, index: int = 0) -> str:
    return "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices
                   if choice.index == index)


def cosine(a, b) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


# -- chat: non-streaming ---------------------------------------------------------------


def test_chat_echoes_the_prompt_and_stops(client):
    prompt = "hello there, wide   world"
    reply = client.chat.completions.create(model="echo", messages=user(prompt))
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-") and len(reply.id) > len("chatcmpl-")
    assert reply.model == "echo"
    assert isinstance(reply.created, int) and reply.created > 0
    assert len(reply.choices) == 1
    choice = reply.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == prompt
    assert choice.finish_reason == "stop"
    assert choice.logprobs is None
    assert reply.usage.prompt_tokens == count(prompt) == 4
    assert reply.usage.completion_tokens == count(prompt)
    assert reply.usage.total_tokens == 2 * count(prompt)


@pytest.mark.parametrize("limit", ["max_tokens", "max_completion_tokens"])
def test_chat_token_limit_ends_with_length(client, limit):
    prompt = "one two three four five"
    reply = client.chat.completions.create(model="echo", messages=user(prompt), **{limit: 3})
    choice = reply.choices[0]
    assert choice.message.content == "one two three"
    assert choice.finish_reason == "length"
    assert reply.usage.prompt_tokens == 5
    assert reply.usage.completion_tokens == 3
    assert reply.usage.total_tokens == 8


@pytest.mark.parametrize("limit", ["max_tokens", "max_completion_tokens"])
def test_chat_token_limit_above_the_echo_stops(client, limit):
    # A limit larger than the echo leaves the model's own end: "stop".
    prompt = "one two three"
    reply = client.chat.completions.create(model="echo", messages=user(prompt), **{limit: 50})
    assert reply.choices[0].message.content == prompt
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 3


def test_chat_text_parts_and_a_whole_conversation(client):
    messages = [
        {"role": "system", "content": "You are a parrot."},
        {"role": "user", "content": "first question here"},
        {"role": "assistant", "content": "an earlier answer"},
        {"role": "user", "content": [{"type": "text", "text": "red green"}, {"type": "text", "text": " blue"}]},
    ]
    reply = client.chat.completions.create(model="echo", messages=messages)
    assert reply.choices[0].message.content == "red green blue"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == 3
    assert reply.usage.completion_tokens == 3


def test_chat_developer_role_is_accepted(client):
    messages = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "ok then"}]
    reply = client.chat.completions.create(model="echo", messages=messages)
    assert reply.choices[0].message.content == "ok then"


def test_chat_with_a_raw_prompt_instead_of_messages(client):
    prompt = "raw prompt text"
    reply = client.chat.completions.create(model="echo", messages=openai.omit, extra_body={"prompt": prompt})
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == prompt
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == 3
    assert reply.usage.completion_tokens == 3


def test_chat_n_gives_independent_choices(client):
    prompt = "same for all"
    reply = client.chat.completions.create(model="echo", messages=user(prompt), n=3)
    assert [choice.index for choice in reply.choices] == [0, 1, 2]
    for choice in reply.choices:
        assert choice.message.role == "assistant"
        assert choice.message.content == prompt
        assert choice.finish_reason == "stop"
    # The prompt is counted once; every choice's tokens are counted.
    assert reply.usage.prompt_tokens == 3
    assert reply.usage.completion_tokens == 9
    assert reply.usage.total_tokens == 12


def test_chat_sampling_settings_are_accepted(client):
    prompt = "deterministic all the way"
    for settings in ({"temperature": 0}, {"temperature": 0, "seed": 1234}, {"temperature": 1.5, "top_p": 0.5},
                     {"seed": 7, "extra_body": {"top_k": 5}}):
        reply = client.chat.completions.create(model="echo", messages=user(prompt), **settings)
        assert reply.choices[0].message.content == prompt, settings
        assert reply.choices[0].finish_reason == "stop"


def test_chat_response_format_text_and_user_are_accepted(client):
    reply = client.chat.completions.create(model="echo", messages=user("fine"), response_format={"type": "text"},
                                           user="someone")
    assert reply.choices[0].message.content == "fine"


def test_the_model_may_be_left_out_when_one_model_is_served(client):
    reply = client.chat.completions.create(model=openai.omit, messages=user("who am I"))
    assert reply.model == "echo"
    assert reply.choices[0].message.content == "who am I"


# -- stop strings, stop tokens, ignore_eos, min_tokens ---------------------------------------


STOP_CASES = [
    # (prompt, stop, content): the stop text is never sent; everything before it is.
    ("alpha beta gamma delta", ["ta gam"], "alpha be"),  # spans " beta" | " gamma"
    ("alpha beta gamma delta", "gamma", "alpha beta "),  # a bare string
    ("alpha beta gamma delta", ["delta", "eta g"], "alpha b"),  # the earliest match wins, not the first listed
    ("alpha beta gamma delta", ["a beta gamma d"], "alph"),  # spans four tokens
    ("one two thr", ["three"], "one two thr"),  # held back as a possible stop, then released at the end
    ("one two three", ["zzz"], "one two three"),
]


@pytest.mark.parametrize(("prompt", "stop", "content"), STOP_CASES)
def test_chat_stop_strings(client, prompt, stop, content):
    reply = client.chat.completions.create(model="echo", messages=user(prompt), stop=stop)
    assert reply.choices[0].message.content == content
    assert reply.choices[0].finish_reason == "stop"

    chunks = stream_chat(client, model="echo", messages=user(prompt), stop=stop)
    assert streamed_text(chunks) == content
    reasons = [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason]
    assert reasons == ["stop"]


@pytest.mark.parametrize(("prompt", "stop", "content"), STOP_CASES)
def test_completion_stop_strings(client, prompt, stop, content):
    reply = client.completions.create(model="echo", prompt=prompt, stop=stop)
    assert reply.choices[0].text == content
    assert reply.choices[0].finish_reason == "stop"
    chunks = stream_completion(client, model="echo", prompt=prompt, stop=stop)
    assert "".join(choice.text for chunk in chunks for choice in chunk.choices) == content


def test_stop_string_beats_the_token_limit(client):
    reply = client.chat.completions.create(model="echo", messages=user("a b c d e f"), stop=" c", max_tokens=4)
    assert reply.choices[0].message.content == "a b"
    assert reply.choices[0].finish_reason == "stop"


def test_stop_token_ids(start_server):
    server = start_server({"apps": {"echo": {"backend": "echo"}}})
    prompt = "one two three two one"
    # A fresh app numbers the pieces of the first text it tokenizes in order of first appearance.
    ids = {}
    for piece in pieces(prompt):
        ids.setdefault(piece, len(ids))
    assert ids == {"one": 0, " two": 1, " three": 2, " one": 3}
    with sync_client(server) as client:
        reply = client.chat.completions.create(model="echo", messages=user(prompt),
                                               extra_body={"stop_token_ids": [ids[" three"]]})
        assert reply.choices[0].message.content == "one two"
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage.prompt_tokens == 5

        # The stop token that appears twice stops at its first appearance, in a stream too.
        chunks = stream_chat(client, model="echo", messages=user(prompt), extra_body={"stop_token_ids": [ids[" two"]]})
        assert streamed_text(chunks) == "one"
        assert [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason] == ["stop"]

        # min_tokens keeps a stop token from ending the generation too early.
        reply = client.chat.completions.create(model="echo", messages=user(prompt),
                                               extra_body={"stop_token_ids": [ids[" two"]], "min_tokens": 2})
        assert reply.choices[0].message.content == "one two three"
        assert reply.choices[0].finish_reason == "stop"

        # Ids that never come up change nothing.
        reply = client.completions.create(model="echo", prompt=prompt, extra_body={"stop_token_ids": [9999]})
        assert reply.choices[0].text == prompt
        assert reply.choices[0].finish_reason == "stop"


def test_ignore_eos_cycles_to_max_tokens(client):
    prompt = "a b c"
    reply = client.chat.completions.create(model="echo", messages=user(prompt), max_tokens=7,
                                           extra_body={"ignore_eos": True})
    assert reply.choices[0].message.content == cycled(prompt, 7) == "a b ca b ca"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 7
    assert reply.usage.prompt_tokens == 3

    chunks = stream_chat(client, model="echo", messages=user(prompt), max_tokens=7, extra_body={"ignore_eos": True})
    assert streamed_text(chunks) == cycled(prompt, 7)
    assert chat_choice_chunks(chunks)[-1].choices[0].finish_reason == "length"

    reply = client.completions.create(model="echo", prompt=prompt, max_tokens=5, extra_body={"ignore_eos": True})
    assert reply.choices[0].text == cycled(prompt, 5)
    assert reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize(("prompt", "min_tokens"), [("a b", 1), ("a b", 2), ("a", 1)])
def test_min_tokens_met_by_the_echo_changes_nothing(client, prompt, min_tokens):
    # min_tokens only keeps the end from coming *before* that many tokens: once the
    # echo is out, at least min_tokens tokens are, so the model's end comes as it would anyway.
    reply = client.chat.completions.create(model="echo", messages=user(prompt), max_tokens=8,
                                           extra_body={"min_tokens": min_tokens})
    assert reply.choices[0].message.content == prompt
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == count(prompt)


def test_min_tokens_met_by_the_token_that_completes_a_stop_string(client):
    # " c" is the 3rd token: with min_tokens=3 the stop string ends it right there,
    # exactly as it does without min_tokens.
    plain = client.chat.completions.create(model="echo", messages=user("a b c d"), stop=" c", max_tokens=8)
    reply = client.chat.completions.create(model="echo", messages=user("a b c d"), stop=" c", max_tokens=8,
                                           extra_body={"min_tokens": 3})
    assert plain.choices[0].message.content == reply.choices[0].message.content == "a b"
    assert plain.choices[0].finish_reason == reply.choices[0].finish_reason == "stop"
    assert plain.usage.completion_tokens == 3
    assert reply.usage.completion_tokens == 3


def test_min_tokens(client):
    prompt = "a b"
    # More than the echo: at least min_tokens come, continuing the cycle, within max_tokens.
    reply = client.chat.completions.create(model="echo", messages=user(prompt), max_tokens=8,
                                           extra_body={"min_tokens": 5})
    made = reply.usage.completion_tokens
    assert 5 <= made <= 8
    assert reply.choices[0].message.content == cycled(prompt, made)
    assert reply.choices[0].finish_reason == ("length" if made == 8 else "stop")


def test_min_tokens_over_max_tokens_is_rejected(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="echo", messages=user("a b"), max_tokens=2, extra_body={"min_tokens": 3})
    assert caught.value.status_code == 400
    assert caught.value.param == "min_tokens"


# -- chat: streaming ----------------------------------------------------------------------


def test_chat_stream_matches_the_non_streaming_reply(client):
    prompt = "stream me  these words"
    whole = client.chat.completions.create(model="echo", messages=user(prompt))
    chunks = stream_chat(client, model="echo", messages=user(prompt))
    assert chunks, "no chunks"
    ids = {chunk.id for chunk in chunks}
    assert len(ids) == 1 and next(iter(ids)).startswith("chatcmpl-")
    for chunk in chunks:
        assert chunk.object == "chat.completion.chunk"
        assert chunk.model == "echo"
        assert chunk.usage is None
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant"
    assert streamed_text(chunks) == whole.choices[0].message.content == prompt
    choice_chunks = chat_choice_chunks(chunks)
    finishing = [chunk for chunk in choice_chunks if chunk.choices[0].finish_reason is not None]
    assert len(finishing) == 1
    assert finishing[0] is choice_chunks[-1]
    assert finishing[0].choices[0].finish_reason == "stop"
    # Only the first chunk carries the role.
    assert all(chunk.choices[0].delta.role in (None, "assistant") for chunk in choice_chunks)


def test_chat_stream_length(client):
    chunks = stream_chat(client, model="echo", messages=user("one two three four"), max_completion_tokens=2)
    assert streamed_text(chunks) == "one two"
    assert chat_choice_chunks(chunks)[-1].choices[0].finish_reason == "length"


def test_chat_stream_include_usage(client):
    prompt = "count these four tokens"
    chunks = stream_chat(client, model="echo", messages=user(prompt), max_tokens=10,
                         stream_options={"include_usage": True})
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens == 4
    assert last.usage.completion_tokens == 4
    assert last.usage.total_tokens == 8
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert all(chunk.choices for chunk in chunks[:-1])
    assert streamed_text(chunks) == prompt


def test_chat_stream_n(client):
    prompt = "three at once"
    chunks = stream_chat(client, model="echo", messages=user(prompt), n=3, stream_options={"include_usage": True})
    reasons: dict[int, list] = {0: [], 1: [], 2: []}
    last_seen: dict[int, object] = {}
    roles = {}
    for chunk in chunks:
        for choice in chunk.choices:
            assert choice.index in reasons
            if choice.finish_reason is not None:
                reasons[choice.index].append(choice.finish_reason)
            else:
                assert not reasons[choice.index], "a chunk for a choice after its finish_reason"
            if choice.delta.role is not None:
                roles.setdefault(choice.index, choice.delta.role)
            last_seen[choice.index] = choice
    assert reasons == {0: ["stop"], 1: ["stop"], 2: ["stop"]}
    assert roles == {0: "assistant", 1: "assistant", 2: "assistant"}
    for index in range(3):
        assert streamed_text(chunks, index) == prompt
        assert last_seen[index].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == 3
    assert chunks[-1].usage.completion_tokens == 9


def test_chat_logprobs(client):
    prompt = "log me, please"
    reply = client.chat.completions.create(model="echo", messages=user(prompt), logprobs=True, top_logprobs=1)
    content = reply.choices[0].logprobs.content
    assert [item.token for item in content] == pieces(prompt)
    for item in content:
        assert item.logprob == 0.0
        assert item.bytes == list(item.token.encode())
        assert len(item.top_logprobs) == 1
        assert item.top_logprobs[0].token == item.token
        assert item.top_logprobs[0].logprob == 0.0
        assert item.top_logprobs[0].bytes == list(item.token.encode())

    reply = client.chat.completions.create(model="echo", messages=user("héllo wörld"), logprobs=True)
    content = reply.choices[0].logprobs.content
    assert [item.token for item in content] == ["héllo", " wörld"]
    assert content[0].bytes == list("héllo".encode())
    assert all(item.top_logprobs == [] for item in content)


def test_chat_stream_logprobs(client):
    prompt = "log me, please"
    chunks = stream_chat(client, model="echo", messages=user(prompt), logprobs=True, top_logprobs=1)
    tokens = [item.token for chunk in chunks for choice in chunk.choices if choice.logprobs and choice.logprobs.content
              for item in choice.logprobs.content]
    assert tokens == pieces(prompt)


def test_top_logprobs_without_logprobs_is_rejected(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="echo", messages=user("x"), top_logprobs=2)
    assert caught.value.param == "top_logprobs"


# -- completions ------------------------------------------------------------------------


def test_completion_single_prompt(client):
    prompt = "complete this text"
    reply = client.completions.create(model="echo", prompt=prompt)
    assert reply.object == "text_completion"
    assert reply.id.startswith("cmpl-")
    assert reply.model == "echo"
    assert len(reply.choices) == 1
    assert reply.choices[0].index == 0
    assert reply.choices[0].text == prompt
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].logprobs is None
    assert reply.usage.prompt_tokens == 3
    assert reply.usage.completion_tokens == 3
    assert reply.usage.total_tokens == 6


def test_completion_length(client):
    reply = client.completions.create(model="echo", prompt="one two three four", max_tokens=2)
    assert reply.choices[0].text == "one two"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 2


def test_completion_several_prompts_and_n(client):
    prompts = ["first prompt", "the second one here", "third"]
    reply = client.completions.create(model="echo", prompt=prompts, n=2)
    assert len(reply.choices) == 6
    for choice in reply.choices:
        prompt = prompts[choice.index // 2]
        assert choice.text == prompt
        assert choice.finish_reason == "stop"
    assert sorted(choice.index for choice in reply.choices) == list(range(6))
    assert reply.usage.prompt_tokens == sum(count(p) for p in prompts)
    assert reply.usage.completion_tokens == 2 * sum(count(p) for p in prompts)
    assert reply.usage.total_tokens == 3 * sum(count(p) for p in prompts)


def test_completion_list_of_one_prompt(client):
    reply = client.completions.create(model="echo", prompt=["only one"], max_tokens=1)
    assert [(c.index, c.text, c.finish_reason) for c in reply.choices] == [(0, "only", "length")]


def test_completion_echo(client):
    prompt = "say it twice"
    reply = client.completions.create(model="echo", prompt=prompt, echo=True)
    assert reply.choices[0].text == prompt + prompt
    assert reply.usage.completion_tokens == 3

    reply = client.completions.create(model="echo", prompt=["a b", "c"], echo=True, n=2, max_tokens=1)
    assert [c.text for c in sorted(reply.choices, key=lambda c: c.index)] == ["a ba", "a ba", "cc", "cc"]

    chunks = stream_completion(client, model="echo", prompt=prompt, echo=True)
    assert "".join(c.text for chunk in chunks for c in chunk.choices) == prompt + prompt


def test_completion_logprobs(client):
    prompt = "tokens with offsets"
    reply = client.completions.create(model="echo", prompt=prompt, logprobs=1)
    logprobs = reply.choices[0].logprobs
    assert logprobs.tokens == pieces(prompt)
    assert logprobs.token_logprobs == [0.0] * count(prompt)
    offsets, at = [], 0
    for piece in pieces(prompt):
        offsets.append(at)
        at += len(piece)
    assert logprobs.text_offset == offsets
    assert logprobs.top_logprobs == [{piece: 0.0} for piece in pieces(prompt)]

    # With the prompt echoed, every offset still points at its token in the returned text.
    reply = client.completions.create(model="echo", prompt=prompt, logprobs=0, echo=True)
    choice = reply.choices[0]
    for token, offset in zip(choice.logprobs.tokens, choice.logprobs.text_offset):
        assert choice.text[offset:offset + len(token)] == token


def test_completion_stream(client):
    prompts = ["streamed completion text", "second"]
    chunks = stream_completion(client, model="echo", prompt=prompts, n=2, max_tokens=2,
                               stream_options={"include_usage": True})
    for chunk in chunks:
        assert chunk.object == "text_completion"
        assert chunk.id.startswith("cmpl-")
    assert len({chunk.id for chunk in chunks}) == 1
    texts = {i: "" for i in range(4)}
    reasons = {i: [] for i in range(4)}
    for chunk in chunks:
        for choice in chunk.choices:
            assert not reasons[choice.index]
            texts[choice.index] += choice.text
            if choice.finish_reason:
                reasons[choice.index].append(choice.finish_reason)
    assert texts == {0: "streamed completion", 1: "streamed completion", 2: "second", 3: "second"}
    assert reasons == {0: ["length"], 1: ["length"], 2: ["stop"], 3: ["stop"]}
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == 4
    assert chunks[-1].usage.completion_tokens == 6
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_completion_stream_logprobs(client):
    prompt = "offsets across chunks"
    chunks = stream_completion(client, model="echo", prompt=prompt, logprobs=1)
    tokens, offsets = [], []
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                offsets += choice.logprobs.text_offset
    assert tokens == pieces(prompt)
    assert offsets == [0, len("offsets"), len("offsets across")]


# -- models ---------------------------------------------------------------------------------


def test_models_list_and_retrieve(client):
    models = list(client.models.list())
    assert [model.id for model in models] == ["echo"]
    assert models[0].object == "model"
    assert models[0].owned_by == "runnel"
    assert isinstance(models[0].created, int)
    model = client.models.retrieve("echo")
    assert model.id == "echo"
    assert model.object == "model"
    assert model.owned_by == "runnel"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"


def test_owned_by_and_served_model_name_are_configurable(start_server):
    server = start_server({"apps": {"echo": {"backend": "echo", "served_model_name": "acme/echo-1",
                                             "openai": {"owned_by": "acme"}}}})
    with sync_client(server) as client:
        models = list(client.models.list())
        assert [(m.id, m.owned_by) for m in models] == [("acme/echo-1", "acme")]
        # The SDK percent-encodes the slash in the path.
        model = client.models.retrieve("acme/echo-1")
        assert (model.id, model.owned_by) == ("acme/echo-1", "acme")
        reply = client.chat.completions.create(model="acme/echo-1", messages=user("named model"))
        assert reply.model == "acme/echo-1"
        assert reply.choices[0].message.content == "named model"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="echo", messages=user("by app name"))


def test_a_loading_model_is_not_listed_and_answers_503(start_server):
    server = start_server({"apps": {"echo": {"backend": "echo"}, "slow": {"backend": "echo", "load_seconds": 2}}},
                          ready=False)
    with sync_client(server) as client:
        wait_until(lambda: [m.id for m in client.models.list()] == ["echo"])
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="slow", messages=user("too early"))
        assert caught.value.status_code == 503
        assert caught.value.code == "model_not_ready"
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(model="slow", prompt="too early")
        assert caught.value.status_code == 503
        # The ready one is served meanwhile.
        assert client.completions.create(model="echo", prompt="on time").choices[0].text == "on time"

        assert server.wait_ready()
        assert sorted(m.id for m in client.models.list()) == ["echo", "slow"]
        reply = client.chat.completions.create(model="slow", messages=user("now ready"))
        assert reply.choices[0].message.content == "now ready"


# -- embeddings -------------------------------------------------------------------------------


def test_embeddings_single_and_list(client):
    one = client.embeddings.create(model="echo", input="the cat sat on the mat", encoding_format="float")
    assert one.object == "list"
    assert one.model == "echo"
    assert len(one.data) == 1
    assert one.data[0].object == "embedding"
    assert one.data[0].index == 0
    vector = one.data[0].embedding
    assert len(vector) == 64
    assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-6)
    assert one.usage.prompt_tokens == 6
    assert one.usage.total_tokens == 6

    texts = ["the cat sat on the mat", "the cat sat on a mat", "quantum chromodynamics binds quarks"]
    many = client.embeddings.create(model="echo", input=texts, encoding_format="float")
    assert [item.index for item in many.data] == [0, 1, 2]
    assert many.usage.prompt_tokens == sum(count(t) for t in texts)
    assert many.data[0].embedding == vector  # same text, same vector
    cat, cat2, quarks = (item.embedding for item in many.data)
    assert cosine(cat, cat2) > cosine(cat, quarks)
    assert cosine(cat, cat2) > cosine(cat2, quarks)
    assert cosine(cat, cat2) > 0.5


def test_embeddings_base64(client):
    texts = ["the cat sat on the mat", "something else entirely"]
    floats = client.embeddings.create(model="echo", input=texts, encoding_format="float")
    # Asked for explicitly, base64 comes back as the string: little-endian float32s.
    encoded = client.embeddings.create(model="echo", input=texts, encoding_format="base64")
    for f, b in zip(floats.data, encoded.data):
        assert isinstance(b.embedding, str)
        raw = base64.b64decode(b.embedding)
        decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
        assert len(decoded) == len(f.embedding)
        for x, y in zip(decoded, f.embedding):
            assert math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-7)
    assert encoded.usage.prompt_tokens == floats.usage.prompt_tokens
    # Left to the SDK, it asks for base64 and decodes it to floats itself.
    default = client.embeddings.create(model="echo", input=texts)
    for f, d in zip(floats.data, default.data):
        assert isinstance(d.embedding, list)
        for x, y in zip(d.embedding, f.embedding):
            assert math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-7)


def test_embeddings_errors(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="echo", input="x", dimensions=8)
    assert caught.value.param == "dimensions"
    assert caught.value.code == "unsupported_parameter"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "param", "code"),
    [
        ({"temperature": -1}, "temperature", "invalid_value"),
        ({"temperature": 2.5}, "temperature", "invalid_value"),
        ({"top_p": 0}, "top_p", "invalid_value"),
        ({"n": 0}, "n", "invalid_value"),
        ({"max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"max_completion_tokens": 0}, "max_completion_tokens", "invalid_value"),
        ({"presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter"),
        ({"frequency_penalty": 0.5}, "frequency_penalty", "unsupported_parameter"),
        ({"presence_penalty": 3}, "presence_penalty", "invalid_value"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
         "tools", "unsupported_parameter"),
        ({"logit_bias": {"1": 5}}, "logit_bias", "unsupported_parameter"),
        ({"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
    ],
)
def test_chat_bad_requests(client, kwargs, param, code):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="echo", messages=user("hello"), **kwargs)
    error = caught.value
    assert error.status_code == 400
    assert error.param == param
    assert error.code == code
    assert error.type == "invalid_request_error"
    assert isinstance(error.body, dict)
    assert error.body["param"] == param
    assert error.body["code"] == code
    assert error.body["message"]


def test_bad_messages(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="echo", messages=[])
    assert caught.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="echo", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]}])
    assert caught.value.code == "unsupported_parameter"
    assert caught.value.param == "messages[0].content[0]"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="echo", messages=[{"role": "function", "content": "x", "name": "f"}])
    assert caught.value.param == "messages[0].role"


def test_completion_bad_requests(client):
    for kwargs, param in (({"best_of": 2}, "best_of"), ({"suffix": "end"}, "suffix"), ({"logprobs": 6}, "logprobs"),
                          ({"n": 129}, "n")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="echo", prompt="x", **kwargs)
        assert caught.value.param == param, kwargs


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-nonexistent", messages=user("hi"))
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-nonexistent", prompt="hi")


def test_context_length_exceeded(start_server):
    server = start_server({"apps": {"echo": {"backend": "echo", "context_length": 8, "default_max_tokens": 4}}})
    with sync_client(server) as client:
        prompt = "one two three four five"  # 5 tokens
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="echo", messages=user(prompt), max_tokens=4)
        assert caught.value.code == "context_length_exceeded"
        assert caught.value.param == "max_tokens"
        assert "8" in caught.value.body["message"]
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="echo", prompt=["a", prompt], max_tokens=4)
        assert caught.value.code == "context_length_exceeded"
        # Exactly at the limit is fine; without max_tokens the room left is used.
        reply = client.chat.completions.create(model="echo", messages=user(prompt), max_tokens=3)
        assert reply.choices[0].message.content == "one two three"
        assert reply.choices[0].finish_reason == "length"
        reply = client.chat.completions.create(model="echo", messages=user(prompt), extra_body={"ignore_eos": True})
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.completion_tokens == 3
        assert reply.usage.total_tokens == 8


# -- the async client ------------------------------------------------------------------------


def test_async_chat(echo_server):
    async def main():
        async with async_client(echo_server) as client:
            reply = await client.chat.completions.create(model="echo", messages=user("async hello world"))
            assert reply.choices[0].message.content == "async hello world"
            assert reply.choices[0].finish_reason == "stop"
            assert reply.usage.prompt_tokens == 3
            assert reply.usage.completion_tokens == 3

            stream = await client.chat.completions.create(model="echo", messages=user("async stream here"),
                                                          stream=True, stream_options={"include_usage": True})
            async with stream:
                chunks = [chunk async for chunk in stream]
            assert chunks[0].choices[0].delta.role == "assistant"
            assert streamed_text(chunks) == "async stream here"
            assert chat_choice_chunks(chunks)[-1].choices[0].finish_reason == "stop"
            assert chunks[-1].usage.total_tokens == 6

            completion = await client.completions.create(model="echo", prompt="async completion", max_tokens=1)
            assert completion.choices[0].text == "async"
            assert completion.choices[0].finish_reason == "length"

            embedding = await client.embeddings.create(model="echo", input="async embed")
            assert len(embedding.data[0].embedding) == 64

            with pytest.raises(openai.BadRequestError):
                await client.chat.completions.create(model="echo", messages=user("x"), temperature=-1)

    run(main())


def test_async_concurrent_requests(echo_server):
    async def one(client, i):
        prompt = " ".join(f"word{i}-{j}" for j in range(i + 1))
        if i % 2:
            reply = await client.chat.completions.create(model="echo", messages=user(prompt))
            return prompt, reply.choices[0].message.content
        stream = await client.chat.completions.create(model="echo", messages=user(prompt), stream=True)
        async with stream:
            return prompt, streamed_text([chunk async for chunk in stream])

    async def main():
        async with async_client(echo_server) as client:
            return await asyncio.gather(*(one(client, i) for i in range(12)))

    for prompt, content in run(main()):
        assert content == prompt


def generating(server) -> int:
    """How many echo generations are running on the server's loop."""
    async def tasks():
        return sum("_generate" in repr(task.get_coro()) for task in asyncio.all_tasks())

    return server.call(tasks())


PACED = {"apps": {"echo": {"backend": "echo", "pace_ms": 5}}}
# 4000 paced tokens take 20 s: the client leaves long before.
ENDLESS = dict(model="echo", messages=user("on and on"), max_tokens=4000, extra_body={"ignore_eos": True})


def test_closing_a_stream_early_cancels_the_generation(start_server):
    server = start_server(PACED)
    with sync_client(server) as client:
        with client.chat.completions.create(stream=True, **ENDLESS) as stream:
            received = []
            for chunk in stream:
                received.append(chunk)
                if len(received) == 4:
                    break
        assert streamed_text(received) == cycled("on and on", 3)
        wait_until(lambda: generating(server) == 0, timeout=3)
        reply = client.chat.completions.create(model="echo", messages=user("still serving"))
        assert reply.choices[0].message.content == "still serving"


def test_a_client_that_gives_up_waiting_cancels_the_generation(start_server):
    server = start_server(PACED)
    with sync_client(server) as client:
        with pytest.raises(openai.APITimeoutError):
            client.with_options(timeout=0.3).chat.completions.create(**ENDLESS)
        wait_until(lambda: generating(server) == 0, timeout=3)


def test_base64_embeddings_need_no_numpy(start_server, monkeypatch):
    # Neither runnel nor runnel-echo depends on numpy, and base64 is what the SDK asks for by default.
    monkeypatch.setitem(sys.modules, "numpy", None)  # as if it were not installed
    server = start_server({"apps": {"echo": {"backend": "echo"}}})
    with sync_client(server) as client:
        floats = client.embeddings.create(model="echo", input="no numpy here", encoding_format="float")
        default = client.embeddings.create(model="echo", input="no numpy here")
    for x, y in zip(default.data[0].embedding, floats.data[0].embedding, strict=True):
        assert math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-7)
