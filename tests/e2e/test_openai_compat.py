"""Compatibility gaps found with real clients (issue 12, section 4), driven by the openai SDK:
token-id inputs, against the echo backend (its ids are handed out as words are first
seen) and the built-in CTranslate2 model (a fixed vocabulary)."""

from __future__ import annotations

from pathlib import Path

import openai
import orjson
import pytest

from runnel.testing import request

APPS = Path(__file__).resolve().parents[1] / "apps"


def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="test", max_retries=0, timeout=60)


@pytest.fixture
def client(echo_server):
    with sdk(echo_server) as client:
        yield client


# -- token-id inputs ----------------------------------------------------------------------
def test_completion_prompt_as_token_ids_matches_the_text_prompt(client):
    text = client.completions.create(model="echo", prompt="alpha beta gamma", echo=True)
    # The echo model's first ids are handed out in order: a fresh server's words are 0, 1, 2.
    ids = client.completions.create(model="echo", prompt=[0, 1, 2], echo=True)
    assert ids.choices[0].text == text.choices[0].text == "alpha beta gammaalpha beta gamma"
    assert ids.usage.prompt_tokens == 3 and ids.usage.completion_tokens == 3


def test_completion_prompt_as_lists_of_token_ids(client):
    client.completions.create(model="echo", prompt="one two three")  # ids 0, 1, 2
    reply = client.completions.create(model="echo", prompt=[[0, 1], [2]], n=2)
    texts = sorted((choice.index, choice.text) for choice in reply.choices)
    assert texts == [(0, "one two"), (1, "one two"), (2, " three"), (3, " three")]
    assert reply.usage.prompt_tokens == 3


@pytest.mark.parametrize("prompt", [[-1], [10**6], [[0], [10**6]]])
def test_completion_token_ids_not_in_the_vocabulary_are_refused(client, prompt):
    client.completions.create(model="echo", prompt="one two three")
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="echo", prompt=prompt)
    assert raised.value.body["param"] == "prompt"


@pytest.mark.parametrize("prompt", [[], [[]], [[0], "text"], [0.5], [True]])
def test_completion_malformed_token_prompts_are_refused(client, prompt):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="echo", prompt=prompt)
    assert raised.value.body["param"] == "prompt"


def test_embeddings_of_token_ids_equal_those_of_their_text(client):
    texts = client.embeddings.create(model="echo", input=["red green", "blue"])
    ids = client.embeddings.create(model="echo", input=[[0, 1], [2]])  # the words above, as first seen
    assert [item.embedding for item in ids.data] == [item.embedding for item in texts.data]
    single = client.embeddings.create(model="echo", input=[0, 1])
    assert single.data[0].embedding == texts.data[0].embedding
    with pytest.raises(openai.BadRequestError) as raised:
        client.embeddings.create(model="echo", input=[[0, 99999]])
    assert raised.value.body["param"] == "input"


def test_tiny_completion_from_token_ids(tiny_server):
    with sdk(tiny_server) as client:
        text = client.completions.create(model="tiny", prompt="The cat", max_tokens=5, temperature=0)
        prompt_ids = [int(token) for token in _tokenize(tiny_server, "The cat")]
        ids = client.completions.create(model="tiny", prompt=prompt_ids, max_tokens=5, temperature=0)
        assert ids.choices[0].text == text.choices[0].text
        assert ids.usage.prompt_tokens == text.usage.prompt_tokens
        echoed = client.completions.create(model="tiny", prompt=prompt_ids, max_tokens=1, echo=True)
        assert echoed.choices[0].text.startswith("The cat")
        with pytest.raises(openai.BadRequestError) as raised:
            client.completions.create(model="tiny", prompt=[prompt_ids[0], 10**7], max_tokens=1)
        assert raised.value.body["param"] == "prompt" and "vocabulary" in raised.value.body["message"]


def _tokenize(server, text: str) -> list[int]:
    app = server.server.apps.get("tiny")
    return app.tokenize(text)


# -- unknown request fields -----------------------------------------------------------------
USER = [{"role": "user", "content": "hello there"}]


@pytest.mark.parametrize("call", [
    lambda c, extra: c.chat.completions.create(model="echo", messages=USER, extra_body=extra),
    lambda c, extra: c.completions.create(model="echo", prompt="hello", extra_body=extra),
    lambda c, extra: c.embeddings.create(model="echo", input="hello", extra_body=extra),
], ids=["chat", "completions", "embeddings"])
def test_an_unknown_field_is_a_400_naming_it(client, call):
    with pytest.raises(openai.BadRequestError) as raised:
        call(client, {"foo": 1})
    assert raised.value.body["param"] == "foo"
    assert raised.value.body["code"] == "unknown_parameter"
    assert raised.value.body["type"] == "invalid_request_error"


def test_openai_bookkeeping_fields_are_accepted(client):
    reply = client.chat.completions.create(
        model="echo", messages=USER, user="u1", metadata={"k": "v"}, store=False, service_tier="auto",
        parallel_tool_calls=True, stream=True, stream_options={"include_usage": True},
        extra_body={"safety_identifier": "s", "prompt_cache_key": "p"})
    assert "".join(chunk.choices[0].delta.content or "" for chunk in reply if chunk.choices) == "hello there"
    text = client.completions.create(model="echo", prompt="hi", user="u1", echo=False, best_of=1, suffix="")
    assert text.choices[0].text == "hi"


def test_ignore_unknown_fields_accepts_vendor_extras(start_server):
    server = start_server({"server": {"ignore_unknown_fields": True}, "apps": {"echo": {"backend": "echo"}}})
    with sdk(server) as client:
        extra = {"foo": 1, "chat_template_kwargs": {"x": 1}}
        reply = client.chat.completions.create(model="echo", messages=USER, extra_body=extra)
        assert reply.choices[0].message.content == "hello there"
        assert client.embeddings.create(model="echo", input="hi", extra_body=extra).data
        # Known fields are still checked.
        with pytest.raises(openai.BadRequestError) as raised:
            client.completions.create(model="echo", prompt="hi", temperature="hot", extra_body=extra)
        assert raised.value.body["param"] == "temperature"


def test_baseten_field_is_known_on_the_bridge_only(start_server):
    server = start_server({"apps": {"echo": {"backend": "echo", "baseten": {"model_id": "m1"}}}})
    bridge = openai.OpenAI(base_url=server.url + "/v1/direct", api_key="test", max_retries=0, timeout=30)
    with bridge, sdk(server) as client:
        reply = bridge.chat.completions.create(model="x", messages=USER, extra_body={"baseten": {"model_id": "m1"}})
        assert reply.choices[0].message.content == "hello there"
        with pytest.raises(openai.BadRequestError) as raised:
            bridge.chat.completions.create(model="x", messages=USER,
                                           extra_body={"baseten": {"model_id": "m1"}, "foo": 1})
        assert raised.value.body["param"] == "foo"
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(model="echo", messages=USER, extra_body={"baseten": {"model_id": "m1"}})
        assert raised.value.body["param"] == "baseten"


# -- /tokenize and /detokenize ----------------------------------------------------------------
def post(port: int, path: str, body: dict):
    return request(port, "POST", path, headers=[("content-type", "application/json")], body=orjson.dumps(body))


def test_tokenize_and_detokenize_round_trip_on_echo(echo_server):
    port = echo_server.port
    reply = post(port, "/tokenize", {"model": "echo", "prompt": "one two one"})
    assert reply.status == 200
    assert reply.json() == {"count": 3, "max_model_len": 4096, "tokens": [0, 1, 2]}
    assert post(port, "/detokenize", {"model": "echo", "tokens": [2, 0]}).json() == {"prompt": " oneone"}
    chat = post(port, "/tokenize", {"messages": [{"role": "user", "content": "two"}]}).json()  # echo's template
    assert chat["tokens"] == [3] and chat["count"] == 1
    with sdk(echo_server) as client:  # the ids /tokenize hands out are the ones completions take
        assert client.completions.create(model="echo", prompt=[0, 1]).choices[0].text == "one two"


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {"model": "echo"}, "prompt"),
    ("/tokenize", {"model": "echo", "prompt": 5}, "prompt"),
    ("/tokenize", {"model": "echo", "prompt": "a", "foo": 1}, "foo"),
    ("/detokenize", {"model": "echo"}, "tokens"),
    ("/detokenize", {"model": "echo", "tokens": ["a"]}, "tokens"),
    ("/detokenize", {"model": "echo", "tokens": [12345]}, "tokens"),
    ("/detokenize", {"model": "nope", "tokens": [0]}, "model"),
])
def test_tokenize_mistakes_name_the_parameter(echo_server, path, body, param):
    reply = post(echo_server.port, path, body)
    assert reply.status in (400, 404)
    assert reply.json()["error"]["param"] == param


def test_tokenize_and_detokenize_on_the_builtin_model(tiny_server):
    reply = post(tiny_server.port, "/tokenize", {"model": "tiny", "prompt": "The cat sat."}).json()
    app = tiny_server.server.apps.get("tiny")
    assert reply["tokens"] == app.tokenize("The cat sat.") and reply["count"] == len(reply["tokens"])
    assert reply["max_model_len"] == app.context_length
    text = post(tiny_server.port, "/detokenize", {"model": "tiny", "tokens": reply["tokens"]}).json()["prompt"]
    assert text.endswith("The cat sat.")
    too_big = post(tiny_server.port, "/detokenize", {"model": "tiny", "tokens": [app.vocab_size]})
    assert too_big.status == 400 and "vocabulary" in too_big.json()["error"]["message"]


# -- platform paths: RunPod embeddings, Cerebrium-style models and completions ---------------------------
def test_runpod_paths_serve_embeddings(start_server):
    server = start_server({"apps": {"echo": {"backend": "echo", "runpod": {"endpoint_id": "ep1"}}}})
    with openai.OpenAI(base_url=server.url + "/v2/ep1/openai/v1", api_key="x", max_retries=0, timeout=30) as client:
        reply = client.embeddings.create(model="echo", input=["red green", "blue"])
        with sdk(server) as plain:
            direct = plain.embeddings.create(model="echo", input=["red green", "blue"])
        assert [item.embedding for item in reply.data] == [item.embedding for item in direct.data]
        assert [model.id for model in client.models.list()] == ["echo"]
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="other", input="x")


def test_function_base_url_serves_models_and_completions(start_server):
    server = start_server({"apps": {"echo": {"backend": "echo"}}})
    base = server.url + "/v4/p-123/echo/run"
    with openai.OpenAI(base_url=base, api_key="x", max_retries=0, timeout=30) as client:
        assert [model.id for model in client.models.list()] == ["echo"]
        reply = client.completions.create(model="echo", prompt="one two three", max_tokens=2)
        assert reply.choices[0].text == "one two" and reply.choices[0].finish_reason == "length"
        streamed = client.completions.create(model="echo", prompt="one two", stream=True)
        assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == "one two"
    unknown = request(server.port, "GET", "/v4/p-123/nope/run/models")
    assert unknown.status == 404 and unknown.json()["error"]["param"] == "app"


def test_function_completions_of_a_python_app(start_server):
    server = start_server({"apps": {"fn": {"backend": "python", "module": str(APPS / "lab.py")}}})
    with openai.OpenAI(base_url=server.url + "/v4/p/fn/complete", api_key="x", max_retries=0, timeout=30) as client:
        assert client.models.list().data == []
        reply = client.completions.create(model="m", prompt="hi")
        assert reply.choices[0].text == "hi!"


# -- CORS -------------------------------------------------------------------------------------------
APP_ORIGIN = "https://app.example.com"
CORS_CONFIG = {"server": {"cors_allow_origins": [APP_ORIGIN]}, "auth": {"kind": "api_key", "keys": ["key-0123456789"]},
               "apps": {"echo": {"backend": "echo"}}}


def test_cors_preflight_for_any_route_before_auth(start_server):
    server = start_server(CORS_CONFIG)
    for path in ("/v1/chat/completions", "/v4/p/echo/run/models", "/no/such/route"):
        reply = request(server.port, "OPTIONS", path, headers=[
            ("origin", APP_ORIGIN), ("access-control-request-method", "POST"),
            ("access-control-request-headers", "authorization, content-type")])
        assert reply.status == 204, path
        head = reply.headers
        assert head[b"access-control-allow-origin"] == APP_ORIGIN.encode()
        assert head[b"access-control-allow-methods"] == b"POST"
        assert head[b"access-control-allow-headers"] == b"authorization, content-type"
        assert head[b"vary"] == b"origin" and b"access-control-max-age" in head
    # Another origin gets no preflight: routing answers as without CORS, with no CORS headers.
    other = request(server.port, "OPTIONS", "/v1/chat/completions", headers=[
        ("origin", "https://evil.example"), ("access-control-request-method", "POST")])
    assert other.status == 405 and b"access-control-allow-origin" not in other.headers


def test_cors_headers_on_answers_errors_and_streams(start_server):
    server = start_server(CORS_CONFIG)
    auth = [("authorization", "Bearer key-0123456789"), ("content-type", "application/json")]
    body = orjson.dumps({"model": "echo", "messages": USER, "stream": True})
    streamed = request(server.port, "POST", "/v1/chat/completions", headers=[("origin", APP_ORIGIN), *auth], body=body)
    assert streamed.status == 200 and b"[DONE]" in streamed.body
    head = streamed.headers
    assert head[b"access-control-allow-origin"] == APP_ORIGIN.encode()
    assert b"x-request-id" in head[b"access-control-expose-headers"]
    refused = request(server.port, "GET", "/v1/models", headers=[("origin", APP_ORIGIN)])  # no key: 401
    assert refused.status == 401 and refused.headers[b"access-control-allow-origin"] == APP_ORIGIN.encode()
    other = request(server.port, "GET", "/v1/models", headers=[("origin", "https://evil.example"), *auth])
    assert other.status == 200 and b"access-control-allow-origin" not in other.headers


def test_cors_is_off_by_default(echo_server):
    preflight = request(echo_server.port, "OPTIONS", "/v1/models", headers=[
        ("origin", APP_ORIGIN), ("access-control-request-method", "GET")])
    assert preflight.status == 405 and b"access-control-allow-origin" not in preflight.headers
    plain = request(echo_server.port, "GET", "/v1/models", headers=[("origin", APP_ORIGIN)])
    assert plain.status == 200 and b"access-control-allow-origin" not in plain.headers


def test_cors_any_origin(start_server):
    server = start_server({"server": {"cors_allow_origins": ["*"]}, "apps": {"echo": {"backend": "echo"}}})
    reply = request(server.port, "GET", "/v1/models", headers=[("origin", "https://anywhere.example")])
    assert reply.headers[b"access-control-allow-origin"] == b"*"
