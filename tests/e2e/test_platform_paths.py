"""RunPod-style (/v2/{endpoint_id}/openai/v1/...) and Baseten-style (/v1/direct/...)
OpenAI paths over raw HTTP, plus the openai SDK pointed at each."""

from __future__ import annotations

import uuid

import openai
import orjson
import pytest

from runnel.config import ConfigError
from runnel.testing import assert_error, connect, read_response, request, sse_events

JSON_HEADERS = [("content-type", "application/json")]
USER = [{"role": "user", "content": "hello there"}]


def post(port: int, path: str, body):
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return request(port, "POST", path, headers=JSON_HEADERS, body=data)


def read_chunked(port: int, path: str, body) -> tuple[int, dict[bytes, bytes], bytes]:
    """POST over a raw socket and decode a chunked reply by hand, to the 0-length chunk."""
    data = orjson.dumps(body)
    with connect(port) as sock:
        sock.sendall(b"POST %b HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%b" % (path.encode(), len(data), data))
        response = read_response(sock)
        assert response.header(b"transfer-encoding") == b"chunked", response
        return response.status, response.headers, response.body


def chat_path(endpoint: str) -> str:
    return f"/v2/{endpoint}/openai/v1/chat/completions"


def completions_path(endpoint: str) -> str:
    return f"/v2/{endpoint}/openai/v1/completions"


def models_path(endpoint: str) -> str:
    return f"/v2/{endpoint}/openai/v1/models"


# -- RunPod ---------------------------------------------------------------------------------


@pytest.fixture
def runpod(start_server):
    return start_server({"apps": {
        "echo": {"backend": "echo"},
        "custom": {"backend": "echo", "served_model_name": "custom-base", "runpod": {
            "endpoint_id": "abc123", "served_model_name_override": "my-model", "response_role": "narrator"}},
        "lines": {"backend": "echo", "runpod": {"endpoint_id": "jsonl", "raw_openai_output": False}},
    }})


def test_runpod_endpoint_defaults_to_the_app_name(runpod):
    port = runpod.port
    reply = post(port, chat_path("echo"), {"messages": USER})  # no model: the endpoint's own
    assert reply.status == 200
    body = reply.json()
    assert body["model"] == "echo"
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hello there"},
                                "logprobs": None, "finish_reason": "stop"}]
    reply = post(port, chat_path("echo"), {"model": "echo", "messages": USER})
    assert reply.status == 200
    reply = post(port, completions_path("echo"), {"model": "echo", "prompt": "a b c", "max_tokens": 2})
    assert reply.status == 200
    assert reply.json()["choices"][0]["text"] == "a b"
    models = request(port, "GET", models_path("echo"))
    assert models.status == 200
    listing = models.json()
    assert type(listing["data"][0].pop("created")) is int
    assert listing == {"object": "list", "data": [{"id": "echo", "object": "model", "owned_by": "runnel"}]}


def test_runpod_unknown_endpoint_and_wrong_model(runpod):
    port = runpod.port
    for reply in (post(port, chat_path("nope"), {"messages": USER}),
                  post(port, completions_path("nope"), {"prompt": "x"}),
                  request(port, "GET", models_path("nope"))):
        assert_error(reply, 404, None, "endpoint_not_found", type_="not_found_error")
    # "custom" is an app name, not an endpoint id: its endpoint is abc123.
    assert_error(post(port, chat_path("custom"), {"messages": USER}), 404, None, "endpoint_not_found",
                 type_="not_found_error")
    # A model the endpoint does not serve, even one served by another endpoint.
    assert_error(post(port, chat_path("echo"), {"model": "my-model", "messages": USER}), 404, "model",
                 "model_not_found")
    assert_error(post(port, completions_path("abc123"), {"model": "echo", "prompt": "x"}), 404, "model",
                 "model_not_found")
    # With an override, the backend's own name is not the endpoint's model either.
    assert_error(post(port, chat_path("abc123"), {"model": "custom-base", "messages": USER}), 404, "model",
                 "model_not_found")
    # The ordinary OpenAI errors come through the endpoint unchanged.
    assert_error(post(port, chat_path("echo"), {"messages": USER, "top_p": 0}), 400, "top_p", "invalid_value")
    assert_error(post(port, chat_path("echo"), b"[]"), 400, None, "invalid_type")


def test_runpod_override_name_and_role(runpod):
    port = runpod.port
    models = request(port, "GET", models_path("abc123")).json()
    assert [card["id"] for card in models["data"]] == ["my-model"]
    reply = post(port, chat_path("abc123"), {"model": "my-model", "messages": USER})
    assert reply.status == 200
    body = reply.json()
    assert body["model"] == "my-model"
    assert body["choices"][0]["message"] == {"role": "narrator", "content": "hello there"}
    reply = post(port, completions_path("abc123"), {"prompt": "x y"})
    assert reply.json()["model"] == "my-model"
    assert reply.json()["choices"][0]["text"] == "x y"

    status, headers, raw = read_chunked(port, chat_path("abc123"), {"model": "my-model", "messages": USER,
                                                                   "stream": True})
    assert status == 200
    assert headers[b"content-type"] == b"text/event-stream"
    payloads = sse_events(raw)
    assert payloads[-1] == b"[DONE]"
    events = [orjson.loads(payload) for payload in payloads[:-1]]
    assert all(event["model"] == "my-model" for event in events)
    assert events[0]["choices"][0]["delta"] == {"role": "narrator", "content": ""}
    assert all("role" not in event["choices"][0]["delta"] for event in events[1:])
    assert "".join(event["choices"][0]["delta"].get("content", "") for event in events) == "hello there"


def test_runpod_non_raw_output_streams_json_lines(runpod):
    port = runpod.port
    status, headers, raw = read_chunked(port, chat_path("jsonl"), {"messages": USER, "stream": True,
                                                                  "stream_options": {"include_usage": True}})
    assert status == 200
    assert headers[b"content-type"] != b"text/event-stream"
    assert b"data:" not in raw
    assert b"[DONE]" not in raw
    assert raw.endswith(b"\n") and not raw.endswith(b"\n\n")
    lines = raw[:-1].split(b"\n")
    events = [orjson.loads(line) for line in lines]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [event["choices"][0]["delta"].get("content") for event in events[1:3]] == ["hello", " there"]
    assert events[3]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["choices"] == []
    assert events[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    assert all(event["object"] == "chat.completion.chunk" and event["model"] == "lines" for event in events)

    status, headers, raw = read_chunked(port, completions_path("jsonl"), {"prompt": "p q", "stream": True})
    assert status == 200
    assert b"data:" not in raw and b"[DONE]" not in raw
    events = [orjson.loads(line) for line in raw.splitlines()]
    assert [event["choices"][0]["text"] for event in events] == ["p", " q", ""]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    # Non-streaming answers are ordinary JSON either way.
    reply = post(port, chat_path("jsonl"), {"messages": USER})
    assert reply.json()["choices"][0]["message"]["content"] == "hello there"


def test_runpod_duplicate_endpoint_ids_fail_at_start(start_server):
    config = {"apps": {
        "one": {"backend": "echo", "runpod": {"endpoint_id": "same"}},
        "two": {"backend": "echo", "runpod": {"endpoint_id": "same"}},
    }}
    with pytest.raises(ConfigError) as caught:
        start_server(config)
    assert caught.value.key == "apps.two.runpod.endpoint_id"
    # The default id (the app name) collides too.
    config = {"apps": {
        "one": {"backend": "echo"},
        "two": {"backend": "echo", "runpod": {"endpoint_id": "one"}},
    }}
    with pytest.raises(ConfigError):
        start_server(config)


def test_runpod_unknown_option_is_a_config_error(start_server):
    with pytest.raises(ConfigError) as caught:
        start_server({"apps": {"one": {"backend": "echo", "runpod": {"endpoint": "x"}}}})
    assert "endpoint" in str(caught.value)


def test_runpod_with_openai_sdk(runpod):
    client = openai.OpenAI(base_url=f"{runpod.url}/v2/abc123/openai/v1", api_key="unused", max_retries=0)
    try:
        assert [model.id for model in client.models.list()] == ["my-model"]
        reply = client.chat.completions.create(model="my-model", messages=USER)
        assert reply.model == "my-model"
        assert reply.choices[0].message.role == "narrator"
        assert reply.choices[0].message.content == "hello there"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="other", messages=USER)
    finally:
        client.close()


# -- Baseten -------------------------------------------------------------------------------------

DIRECT = "/v1/direct/chat/completions"


@pytest.fixture
def baseten(start_server):
    return start_server({"apps": {
        "prod": {"backend": "echo", "served_model_name": "prod-model",
                 "baseten": {"model_id": "abcd1234", "deployment_id": "dep1", "production": True}},
        "canary": {"backend": "echo", "served_model_name": "canary-model",
                   "baseten": {"model_id": "abcd1234", "deployment_id": "dep2", "production": False}},
        "solo": {"backend": "echo", "baseten": {"model_id": "zz99"}},
        "plain": {"backend": "echo"},
    }})


def direct(port: int, target, **body):
    return post(port, DIRECT, {"messages": USER, "baseten": target, **body})


def assert_uuid(value: str) -> None:
    assert len(value) == 36
    assert str(uuid.UUID(value)) == value


def test_baseten_routes_by_model_and_deployment(baseten):
    port = baseten.port
    # No deployment: the production one.
    reply = direct(port, {"model_id": "abcd1234"})
    assert reply.status == 200
    body = reply.json()
    assert body["model"] == "prod-model"
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello there"}
    assert_uuid(body["id"])
    # Both deployments of the same model, by deployment id.
    assert direct(port, {"model_id": "abcd1234", "deployment_id": "dep1"}).json()["model"] == "prod-model"
    assert direct(port, {"model_id": "abcd1234", "deployment_id": "dep2"}).json()["model"] == "canary-model"
    # A lone deployment is production by default, and its id defaults to the app's name.
    assert direct(port, {"model_id": "zz99"}).json()["model"] == "solo"
    assert direct(port, {"model_id": "zz99", "deployment_id": "solo"}).json()["model"] == "solo"
    # The body's "model" does not choose the app here.
    assert direct(port, {"model_id": "zz99"}, model="prod-model").json()["model"] == "solo"
    # Each answer has a fresh id.
    ids = {direct(port, {"model_id": "abcd1234"}).json()["id"] for _ in range(3)}
    assert len(ids) == 3


def test_baseten_errors(baseten):
    port = baseten.port
    assert_error(post(port, DIRECT, {"messages": USER}), 400, "baseten", "missing_required_parameter")
    assert_error(direct(port, "abcd1234"), 400, "baseten", "missing_required_parameter")
    assert_error(direct(port, {"deployment_id": "dep1"}), 400, "baseten", "missing_required_parameter")
    assert_error(direct(port, {"model_id": 5}), 400, "baseten", "missing_required_parameter")
    assert_error(post(port, DIRECT, b"[1]"), 400, "baseten", "missing_required_parameter")
    assert_error(direct(port, {"model_id": "abcd1234", "deployment_id": 7}), 400, "baseten.deployment_id",
                 "invalid_type")
    assert_error(direct(port, {"model_id": "unknown"}), 404, "baseten", "model_not_found")
    assert_error(direct(port, {"model_id": "abcd1234", "deployment_id": "dep3"}), 404, "baseten",
                 "model_not_found")
    # A deployment id belongs to its model: dep1 is not a deployment of zz99.
    assert_error(direct(port, {"model_id": "zz99", "deployment_id": "dep1"}), 404, "baseten", "model_not_found")
    # An app without a [baseten] table is not reachable here.
    assert_error(direct(port, {"model_id": "plain"}), 404, "baseten", "model_not_found")
    # Ordinary request errors still name their parameter.
    assert_error(direct(port, {"model_id": "abcd1234"}, temperature=5), 400, "temperature", "invalid_value")


def test_baseten_streaming(baseten):
    status, headers, raw = read_chunked(baseten.port, DIRECT, {
        "messages": USER, "stream": True, "baseten": {"model_id": "abcd1234", "deployment_id": "dep2"}})
    assert status == 200
    assert headers[b"content-type"] == b"text/event-stream"
    payloads = sse_events(raw)
    assert payloads[-1] == b"[DONE]"
    events = [orjson.loads(payload) for payload in payloads[:-1]]
    assert len({event["id"] for event in events}) == 1
    assert_uuid(events[0]["id"])
    assert all(event["model"] == "canary-model" for event in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(event["choices"][0]["delta"].get("content", "") for event in events) == "hello there"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_baseten_with_openai_sdk(baseten):
    client = openai.OpenAI(base_url=f"{baseten.url}/v1/direct", api_key="unused", max_retries=0)
    try:
        reply = client.chat.completions.create(
            model="abcd1234", messages=USER, extra_body={"baseten": {"model_id": "abcd1234", "deployment_id": "dep2"}})
        assert reply.model == "canary-model"
        assert reply.choices[0].message.content == "hello there"
        assert_uuid(reply.id)
        reply = client.chat.completions.create(model="abcd1234", messages=USER,
                                               extra_body={"baseten": {"model_id": "abcd1234"}})
        assert reply.model == "prod-model"
        chunks = list(client.chat.completions.create(
            model="abcd1234", messages=USER, stream=True, extra_body={"baseten": {"model_id": "zz99"}}))
        assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == "hello there"
        assert {chunk.model for chunk in chunks} == {"solo"}
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="abcd1234", messages=USER)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="abcd1234", messages=USER, extra_body={"baseten": {"model_id": "no"}})
    finally:
        client.close()


def test_baseten_two_production_deployments_fail_at_start(start_server):
    config = {"apps": {
        "a": {"backend": "echo", "baseten": {"model_id": "m", "deployment_id": "d1", "production": True}},
        "b": {"backend": "echo", "baseten": {"model_id": "m", "deployment_id": "d2", "production": True}},
    }}
    with pytest.raises(ConfigError) as caught:
        start_server(config)
    assert caught.value.key == "apps.b.baseten.production"


def test_baseten_model_id_is_required(start_server):
    with pytest.raises(ConfigError) as caught:
        start_server({"apps": {"a": {"backend": "echo", "baseten": {"deployment_id": "d1"}}}})
    assert "model_id" in str(caught.value)


def test_baseten_duplicate_deployment_fails_at_start(start_server):
    # Two apps claiming the same (model_id, deployment_id) would leave one unreachable by
    # its deployment id (while it may still be the production one): refused like RunPod's
    # duplicate endpoint ids.
    config = {"apps": {
        "a": {"backend": "echo", "baseten": {"model_id": "m", "deployment_id": "d"}},
        "b": {"backend": "echo", "baseten": {"model_id": "m", "deployment_id": "d"}},
    }}
    with pytest.raises(ConfigError) as caught:
        start_server(config)
    assert caught.value.key == "apps.b.baseten.deployment_id"


def test_baseten_model_shape_picks_model_and_deployment(baseten):
    with openai.OpenAI(base_url=baseten.url + "/v1/direct", api_key="x", max_retries=0, timeout=30) as client:
        assert client.chat.completions.create(model="baseten/abcd1234", messages=USER).model == "prod-model"
        reply = client.chat.completions.create(model="baseten/abcd1234/dep2", messages=USER)
        assert reply.model == "canary-model" and reply.choices[0].message.content == "hello there"
        assert len(reply.id) == 36 and reply.id.count("-") == 4  # a bare UUID
        # The body's baseten field, where given, is what picks.
        assert client.chat.completions.create(model="baseten/abcd1234/dep2", messages=USER, extra_body={
            "baseten": {"model_id": "abcd1234", "deployment_id": "dep1"}}).model == "prod-model"
        text = client.completions.create(model="baseten/abcd1234/dep2", prompt="one two", max_tokens=1)
        assert text.choices[0].text == "one" and text.model == "canary-model"
        assert len(text.id) == 36
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="baseten/abcd1234/dep9", messages=USER)
        assert missing.value.body["param"] == "model"
        for bad in ("baseten/", "baseten/a/b/c"):
            with pytest.raises(openai.BadRequestError) as raised:
                client.chat.completions.create(model=bad, messages=USER)
            assert raised.value.body["param"] == "model"
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(model="prod-model", messages=USER)
        assert raised.value.body["param"] == "baseten"
