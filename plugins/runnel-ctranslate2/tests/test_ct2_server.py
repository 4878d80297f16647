"""The CTranslate2 backend behind the real server, driven by the openai SDK and raw HTTP.

Every expected text is CTranslate2's own greedy output for the same start tokens, computed
in this process with ``ctranslate2.Generator.generate_batch`` (see ct2_reference.py).
"""

from __future__ import annotations

import contextlib
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

import runnel
import runnel_ctranslate2.apps as ct2_apps
from ct2_reference import (  # noqa: F401 (reference: fixture)
    StepProbe, reference, stream_completion, sync_client, tiny_config)
from runnel.testing import request, wait_until

PROMPT = "The cat sees"
QUESTION = "Where is the station?"


# -- 1. greedy output is CTranslate2's own --------------------------------------------------


def test_greedy_completion_equals_ctranslate2_and_is_deterministic(start_server, tiny_dir, reference):
    server = start_server(tiny_config(tiny_dir))
    prompt_ids = reference.prompt_ids(PROMPT)
    for max_tokens in (1, 7, 24):
        expected = reference.greedy_text(PROMPT, max_tokens)
        assert expected.strip()
        with sync_client(server) as client:
            replies = [client.completions.create(model="tiny", prompt=PROMPT, max_tokens=max_tokens, temperature=0)
                       for _ in range(2)]
        for reply in replies:
            choice = reply.choices[0]
            assert choice.text == expected, max_tokens
            assert choice.finish_reason == "length"  # the random model never picks </s> greedily
            assert reply.usage.prompt_tokens == len(prompt_ids)
            assert reply.usage.completion_tokens == max_tokens
            assert reply.usage.total_tokens == len(prompt_ids) + max_tokens
        text, reason, usage = stream_completion(server, model="tiny", prompt=PROMPT, max_tokens=max_tokens,
                                                temperature=0)
        assert (text, reason) == (expected, "length")
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt_ids), max_tokens)


def test_top_k_1_is_greedy_too(start_server, tiny_dir, reference):
    server = start_server(tiny_config(tiny_dir))
    with sync_client(server) as client:
        reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, extra_body={"top_k": 1})
    assert reply.choices[0].text == reference.greedy_text(PROMPT, 16)


def test_greedy_choices_of_one_request_are_all_the_greedy_output(start_server, tiny_dir, reference):
    server = start_server(tiny_config(tiny_dir))
    with sync_client(server) as client:
        reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, n=3)
    expected = reference.greedy_text(PROMPT, 12)
    assert [choice.text for choice in reply.choices] == [expected] * 3
    assert [choice.index for choice in reply.choices] == [0, 1, 2]
    assert reply.usage.prompt_tokens == len(reference.prompt_ids(PROMPT))
    assert reply.usage.completion_tokens == 36


def test_greedy_chat_equals_ctranslate2(start_server, tiny_dir, reference):
    server = start_server(tiny_config(tiny_dir))
    # The built-in "plain" template: bos, "Role: content" lines, then "Assistant:".
    prompt_ids = reference.tokenizer.encode(f"User: {QUESTION}\nAssistant:", add_bos=True)
    max_tokens = 20
    expected = reference.continuation(prompt_ids, reference.greedy_ids(prompt_ids, max_tokens))
    messages = [{"role": "user", "content": QUESTION}]
    with sync_client(server) as client:
        replies = [client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens,
                                                  temperature=0) for _ in range(2)]
        with client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True) as stream:
            chunks = list(stream)
    for reply in replies:
        assert reply.choices[0].message.content == expected
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.prompt_tokens == len(prompt_ids)
        assert reply.usage.completion_tokens == max_tokens
    streamed = "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)
    assert streamed == expected
    assert [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason] == ["length"]


# -- 4. a full queue answers 429 ------------------------------------------------------------


@contextlib.contextmanager
def full_queue(server, probe, reference):
    """One batch running (held at its first step by the probe's gate) and one request waiting:
    with ``max_queue = 1`` and one batch slot, the queue is full inside the block."""
    app = server.server.apps.get("tiny")

    def stats():
        return server.call_soon(app.stats)

    probe.gate.clear()
    pool = ThreadPoolExecutor(2)
    running = waiting = None
    try:
        running = pool.submit(stream_completion, server, model="tiny", prompt=PROMPT, max_tokens=30, temperature=0)
        wait_until(lambda: stats()["running_batches"] == 1 and stats()["waiting"] == 0)
        waiting = pool.submit(stream_completion, server, model="tiny", prompt="A small dog", max_tokens=10,
                              temperature=0)
        wait_until(lambda: stats()["waiting"] == 1)
        yield
    finally:
        probe.gate.set()
        results = [future.result(60) for future in (running, waiting) if future is not None]
        pool.shutdown()
    # Refusing others did not disturb the two that were admitted.
    assert [result[:2] for result in results] == [(reference.greedy_text(PROMPT, 30), "length"),
                                                  (reference.greedy_text("A small dog", 10), "length")]
    # With the queue drained, requests are admitted again.
    with sync_client(server) as client:
        reply = client.completions.create(model="tiny", prompt="My friend", max_tokens=5, temperature=0)
    assert reply.choices[0].text == reference.greedy_text("My friend", 5)


def assert_queue_full(error: openai.RateLimitError) -> None:
    assert error.status_code == 429
    retry_after = error.response.headers.get("retry-after")
    assert retry_after is not None and retry_after.strip().isdigit() and int(retry_after) >= 1
    body = error.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["type"] == "rate_limit_error"


def test_a_full_queue_answers_429_with_retry_after(start_server, tiny_dir, reference, monkeypatch):
    probe = StepProbe().install(monkeypatch)
    server = start_server(tiny_config(tiny_dir, max_queue=1, inter_threads=1))
    with full_queue(server, probe, reference):
        with sync_client(server, timeout=10) as client:
            with pytest.raises(openai.RateLimitError) as caught:
                client.completions.create(model="tiny", prompt="My friend", max_tokens=5, temperature=0)
            assert_queue_full(caught.value)
            with pytest.raises(openai.RateLimitError) as caught:
                client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}],
                                               max_tokens=5, temperature=0)
            assert_queue_full(caught.value)
        reply = request(server.port, "POST", "/v1/completions", headers=[("content-type", "application/json")],
                        body=b'{"model": "tiny", "prompt": "hi", "max_tokens": 3}')
        assert reply.status == 429
        assert reply.header(b"content-type").startswith(b"application/json")
        assert reply.json()["error"]["code"] == "queue_full"


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_a_full_queue_answers_429_to_a_streamed_request_too(start_server, tiny_dir, reference, monkeypatch, chat):
    # A streamed request is refused the same way: with a 429 status line, not a 200 whose
    # event stream carries the error (the client could not see a status or retry-after).
    probe = StepProbe().install(monkeypatch)
    server = start_server(tiny_config(tiny_dir, max_queue=1, inter_threads=1))
    with full_queue(server, probe, reference):
        with sync_client(server, timeout=10) as client, pytest.raises(openai.RateLimitError) as caught:
            if chat:
                stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}],
                                                        max_tokens=5, temperature=0, stream=True)
            else:
                stream = client.completions.create(model="tiny", prompt="My friend", max_tokens=5, temperature=0,
                                                   stream=True)
            stream.close()  # only reached when the server wrongly started a 200 stream
        assert_queue_full(caught.value)


# -- 7. config errors name the key ------------------------------------------------------------


@pytest.mark.parametrize(("options", "key"), [
    ({"modle": "x"}, "apps.tiny.modle"),
    ({"device": "tpu"}, "apps.tiny.device"),
    ({"compute_type": "int3"}, "apps.tiny.compute_type"),
    ({"task": "embedd"}, "apps.tiny.task"),
    ({"task": "generation"}, "apps.tiny.task"),
    ({"intra_threads": -1}, "apps.tiny.intra_threads"),
    ({"max_queue": 0}, "apps.tiny.max_queue"),
    ({"batch_window_ms": -1}, "apps.tiny.batch_window_ms"),
    ({"max_batch_size": "8"}, "apps.tiny.max_batch_size"),
    ({"device": 1}, "apps.tiny.device"),
    # Generation settings mean nothing to an encoder: a typo-like unknown key there.
    ({"task": "embed", "batch_window_ms": 5}, "apps.tiny.batch_window_ms"),
])
def test_config_errors_name_the_key(start_server, tiny_dir, options, key):
    with pytest.raises(runnel.ConfigError) as caught:
        start_server(tiny_config(tiny_dir, **options))
    assert caught.value.key == key
    assert key in str(caught.value)


def test_good_config_values_are_accepted(start_server, tiny_dir):
    # The values the errors above are measured against: these build and serve.
    server = start_server(tiny_config(tiny_dir, compute_type="float32", device="cpu", max_queue=4,
                                      batch_window_ms=1, max_batch_size=8, default_max_tokens=5))
    with sync_client(server) as client:
        reply = client.completions.create(model="tiny", prompt=PROMPT, temperature=0)
    assert reply.usage.completion_tokens == 5  # default_max_tokens


# -- 8. lifecycle -----------------------------------------------------------------------------


def test_model_is_listed_only_when_ready_and_released_on_stop(start_server, tiny_dir, reference, monkeypatch):
    release = threading.Event()
    load = ct2_apps.model_directory

    def slow_model_directory(model):
        release.wait(30)
        return load(model)

    monkeypatch.setattr(ct2_apps, "model_directory", slow_model_directory)
    server = start_server(tiny_config(tiny_dir), ready=False)
    try:
        health = request(server.port, "GET", "/health")
        assert health.status == 503
        assert health.json()["status"] == "loading"
        with sync_client(server) as client:
            assert [model.id for model in client.models.list()] == []
            with pytest.raises(openai.APIStatusError) as caught:
                client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
        assert caught.value.status_code == 503
        assert caught.value.response.headers.get("retry-after")
    finally:
        release.set()
    assert server.wait_ready()

    assert request(server.port, "GET", "/health").status == 200
    with sync_client(server) as client:
        models = client.models.list().data
        assert [(model.id, model.object) for model in models] == [("tiny", "model")]
        assert client.models.retrieve("tiny").id == "tiny"
        reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    assert reply.choices[0].text == reference.greedy_text(PROMPT, 4)

    app = server.server.apps.get("tiny")
    assert app.generator is not None
    scheduler = app.scheduler
    server.stop()
    assert app.generator is None  # released on stop, not left to the garbage collector
    # Nor kept alive by the scheduler: a generator that ran Python callbacks and is
    # still alive at exit aborts the process (seen with streams cut before SIGTERM).
    assert app.scheduler is None and scheduler.generator is None
    assert server.server.apps.get("tiny") is None


def test_a_model_that_fails_to_load_is_never_listed(start_server, tmp_path, tiny_dir):
    # A directory that looks like a model (an empty dir is refused at start-up) but does not load.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.bin").write_bytes(b"not a model")
    for tokenizer in ("tokenizer.model", "tokenizer.json"):
        if (tiny_dir / tokenizer).is_file():
            shutil.copy(tiny_dir / tokenizer, broken / tokenizer)
    server = start_server(tiny_config(broken), ready=False)
    assert server.wait_ready() is False
    health = request(server.port, "GET", "/health")
    assert health.status == 503
    assert health.json()["status"] == "failed"
    with sync_client(server) as client:
        assert [model.id for model in client.models.list()] == []


def test_no_repeat_ngram_size_is_applied_as_ctranslate2_applies_it(start_server, tiny_dir, reference):
    # The random model repeats itself greedily; with no_repeat_ngram_size the server's
    # answer must be CTranslate2's own answer under the same setting, and differ from plain greedy.
    server = start_server(tiny_config(tiny_dir))
    prompt_ids = reference.prompt_ids(PROMPT)
    start = [reference.tokenizer.id_to_token(i) for i in prompt_ids]
    expected = reference.generator.generate_batch(
        [start], max_length=40, sampling_topk=1, include_prompt_in_result=False, no_repeat_ngram_size=2)
    expected_text = reference.continuation(prompt_ids, expected[0].sequences_ids[0])
    with sync_client(server) as client:
        reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0,
                                          extra_body={"no_repeat_ngram_size": 2})
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4,
                                      extra_body={"no_repeat_ngram_size": -1})
    assert reply.choices[0].text == expected_text
    assert expected_text != reference.greedy_text(PROMPT, 40)
    assert info.value.body["param"] == "no_repeat_ngram_size"
