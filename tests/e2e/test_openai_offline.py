"""OpenAI bodies executed without an HTTP exchange (runnel.surfaces.openai.offline), on a real
server's loop with the built-in model: the same answer a live request gets, errors in the
same shape, and a streamed body's chunks joining into the non-streamed reply."""

from __future__ import annotations

import orjson
import pytest

from runnel.surfaces.openai import OpenAIAPI
from runnel.surfaces.openai.offline import call, stream
from runnel.testing import ServerThread, request, server_config
from runnel.testing.pytest_plugin import TINY_CONFIG

JSON = ((b"content-type", b"application/json"),)
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "max_tokens": 24, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    thread = ServerThread(server_config(TINY_CONFIG)).start()
    assert thread.wait_ready()
    yield thread
    thread.stop()


def offline(server, route, body):
    async def go():
        return await call(OpenAIAPI.of(server.server), route, body)
    return server.call(go())


def without_ids(body: dict) -> dict:
    return {key: value for key, value in body.items() if key not in ("id", "created")}


@pytest.mark.parametrize("route,body", [
    ("/v1/chat/completions", CHAT),
    ("/v1/completions", {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}),
])
def test_a_body_gets_what_the_live_request_gets(server, route, body):
    status, answer = offline(server, route, body)
    live = request(server.port, "POST", route, headers=JSON, body=orjson.dumps(body))
    assert status == live.status == 200
    assert without_ids(answer) == without_ids(live.json())
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("route,body,param,status", [
    ("/v1/chat/completions", {**CHAT, "max_tokens": -1}, "max_tokens", 400),
    ("/v1/chat/completions", {**CHAT, "model": "nope"}, "model", 404),
    ("/v1/files", CHAT, "url", 400),
])
def test_a_bad_body_is_answered_as_a_live_request_is(server, route, body, param, status):
    got, answer = offline(server, route, body)
    assert got == status and answer["error"]["param"] == param
    if route != "/v1/files":
        live = request(server.port, "POST", route, headers=JSON, body=orjson.dumps(body))
        assert live.status == status and live.json() == answer


def test_streamed_chunks_join_into_the_whole_reply(server):
    _, whole = offline(server, "/v1/chat/completions", CHAT)

    async def chunks():
        return [orjson.loads(orjson.dumps(chunk)) async for chunk in
                stream(OpenAIAPI.of(server.server), "/v1/chat/completions", {**CHAT, "stream": True})]
    got = server.call(chunks())
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in got)
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in got if chunk["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert got[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    # answered whole by call(): the chunks as a list (cut where the tokens happened to arrive
    # together, so compared by what they join into)
    status, listed = offline(server, "/v1/chat/completions", {**CHAT, "stream": True})
    listed = orjson.loads(orjson.dumps(listed))
    assert status == 200 and all(chunk["object"] == "chat.completion.chunk" for chunk in listed)
    assert "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in listed if chunk["choices"]) == text


def test_a_stream_refused_before_its_first_chunk_raises_its_error(server):
    from runnel.errors import HTTPError

    async def first():
        chunks = stream(OpenAIAPI.of(server.server), "/v1/chat/completions", {**CHAT, "stream": True, "n": 0})
        with pytest.raises(HTTPError) as caught:
            async for _ in chunks:
                pass
        return caught.value
    error = server.call(first())
    assert error.status == 400 and error.param == "n"


def test_closing_a_stream_stops_its_generation(server):
    async def partial():
        chunks = stream(OpenAIAPI.of(server.server), "/v1/completions",
                        {"model": "tiny", "prompt": "a", "max_tokens": 400, "stream": True, "ignore_eos": True})
        async for _ in chunks:
            break
        await chunks.aclose()
        return chunks._task
    task = server.call(partial())
    assert task.done() and task.cancelled()


def generation_samples(server) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    reply = request(server.port, "GET", "/metrics")
    assert reply.status == 200, reply.body
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(reply.body.decode()) for sample in family.samples
            if sample.name.startswith("runnel_generation_")}


def test_an_offline_generation_is_counted_in_the_generation_metrics(server):
    # Runs, batch lines and resumable streams generate without an HTTP request of their own:
    # the metrics count them as they count a live request's generation.
    requests = ("runnel_generation_requests_total", (("app", "tiny"), ("finish_reason", "length")))
    tokens = ("runnel_generation_generated_tokens_total", (("app", "tiny"),))
    ttft = ("runnel_generation_time_to_first_token_seconds_count", (("app", "tiny"),))
    before = generation_samples(server)
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 7, "ignore_eos": True}
    assert offline(server, "/v1/completions", body)[0] == 200

    async def streamed():
        return [chunk async for chunk in stream(OpenAIAPI.of(server.server), "/v1/completions",
                                                 {**body, "stream": True})]
    server.call(streamed())
    after = generation_samples(server)
    assert after[requests] - before.get(requests, 0) == 2
    assert after[tokens] - before.get(tokens, 0) == 14
    assert after[ttft] - before.get(ttft, 0) == 2
