"""Cross-request batching in the CTranslate2 backend, seen from outside and from the step callback.

Each request's output must be exactly what it would be alone (CTranslate2's own greedy
output), whatever else shares its batch; rows end individually (max_tokens, stop strings,
a client going away) while their batch-mates go on. ``StepProbe`` counts the decoding
steps CTranslate2 really made for each row, so a row that is only hidden from the client
but still decoded is caught.
"""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest

from ct2_reference import (  # noqa: F401 (reference: fixture)
    StepProbe, reference, stream_completion, sync_client, tiny_config)
from runnel.testing import connect, request, send_post, wait_until

PROMPTS = [
    "The cat sees",
    "A small dog finds the map",
    "User: What is your name?",
    "Number 7 is",
    "The teacher reads a long story in the park",
    "My friend opens",
]


def start_tokens(reference, prompt: str) -> tuple[str, ...]:
    return tuple(reference.tokenizer.id_to_token(i) for i in reference.prompt_ids(prompt))


def run_concurrently(calls):
    """Run each (fn, kwargs) on its own thread, released together; their results in order."""
    barrier = threading.Barrier(len(calls))

    def one(fn, kwargs):
        barrier.wait(10)
        return fn(**kwargs)

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(one, fn, kwargs) for fn, kwargs in calls]
        return [future.result(120) for future in futures]


# -- 2. concurrent requests share batches and each gets its solo output ---------------------------


def test_concurrent_streams_are_batched_and_each_equals_its_solo_greedy_output(
        start_server, tiny_dir, reference, monkeypatch):
    probe = StepProbe().install(monkeypatch)
    server = start_server(tiny_config(tiny_dir, batch_window_ms=150, max_batch_size=16))
    app = server.server.apps.get("tiny")
    max_tokens = [40, 9, 25, 60, 3, 17]
    calls = [(stream_completion, dict(server=server, model="tiny", prompt=prompt, max_tokens=n, temperature=0))
             for prompt, n in zip(PROMPTS, max_tokens)]
    results = run_concurrently(calls)

    for prompt, n, (text, reason, usage) in zip(PROMPTS, max_tokens, results):
        assert text == reference.greedy_text(prompt, n), prompt
        assert reason == "length"
        assert usage.prompt_tokens == len(reference.prompt_ids(prompt))
        assert usage.completion_tokens == n
        # The row was decoded exactly n steps: ended by its own max_tokens inside a batch
        # whose max_length is the longest row's.
        assert probe.steps(start_tokens(reference, prompt)) == [n], prompt

    stats = server.call_soon(app.stats)
    assert stats["rows"] == len(PROMPTS)
    assert stats["largest_batch"] >= 2
    assert sum(stats["recent_batch_sizes"]) == len(PROMPTS)
    assert stats["batches"] == len(stats["recent_batch_sizes"]) < len(PROMPTS)
    assert max(len(rows) for rows in probe.batches.values()) == stats["largest_batch"]


@pytest.mark.parametrize(("rows", "sizes"), [(9, [4, 5]), (3, [3])])
def test_rows_that_arrive_together_are_divided_over_the_free_slots(start_server, tiny_dir, reference, monkeypatch,
                                                                   rows, sizes):
    # Two slots (inter_threads): nine rows of one window run as batches of 4 and 5, one per
    # thread, not as one batch that leaves the second thread (and core) idle. Three rows stay
    # one batch: the other slot is kept for rows that arrive next (a batch is static).
    probe = StepProbe().install(monkeypatch)
    # A long window: under load a thread of run_concurrently was seen to send 128 ms after the first.
    server = start_server(tiny_config(tiny_dir, batch_window_ms=500, max_batch_size=16, inter_threads=2))
    app = server.server.apps.get("tiny")
    prompts = (PROMPTS * 2)[:rows]
    calls = [(stream_completion, dict(server=server, model="tiny", prompt=prompt, max_tokens=12, temperature=0))
             for prompt in prompts]
    results = run_concurrently(calls)
    for prompt, (text, reason, _) in zip(prompts, results):
        assert text == reference.greedy_text(prompt, 12), prompt
    stats = server.call_soon(app.stats)
    assert sorted(stats["recent_batch_sizes"]) == sizes
    assert sorted(len(rows) for rows in probe.batches.values()) == sizes


def test_requests_with_other_sampling_settings_do_not_share_a_batch(start_server, tiny_dir, reference, monkeypatch):
    # CTranslate2 takes sampling settings per batch: a sampled row must not be decoded greedily
    # (nor a greedy row sampled) because it arrived in the same window.
    probe = StepProbe().install(monkeypatch)
    server = start_server(tiny_config(tiny_dir, batch_window_ms=150))
    calls = [(stream_completion, dict(server=server, model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0)),
             (stream_completion, dict(server=server, model="tiny", prompt=PROMPTS[1], max_tokens=20, temperature=0)),
             # ignore_eos: a sampled row may draw </s> (its logit is 0, not -inf) and end early.
             (stream_completion, dict(server=server, model="tiny", prompt=PROMPTS[2], max_tokens=20, temperature=1.0,
                                      top_p=0.9, extra_body={"ignore_eos": True}))]
    results = run_concurrently(calls)
    assert results[0][0] == reference.greedy_text(PROMPTS[0], 20)
    assert results[1][0] == reference.greedy_text(PROMPTS[1], 20)
    assert results[2][2].completion_tokens == 20
    sampled = start_tokens(reference, PROMPTS[2])
    assert probe.batch_of(sampled) == [sampled]


# -- 3. a cancelled row stops within a few steps; its batch-mates finish -------------------------


def open_stream(port: int, prompt: str, max_tokens: int) -> socket.socket:
    sock = connect(port, timeout=30)
    body = orjson.dumps({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                         "stream": True})
    send_post(sock, "/v1/completions", body)
    return sock


def read_events(sock: socket.socket, events: int) -> bytes:
    """Read until ``events`` SSE events that carry text have arrived."""
    data = b""
    while data.count(b'"text":"') - data.count(b'"text":""') < events:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


def test_a_cancelled_row_stops_within_a_few_steps_while_its_batch_mates_finish(
        start_server, tiny_dir, reference, monkeypatch):
    # ~3 ms per decoding step: 400 steps take over a second, so a row that goes on being
    # decoded after its client left cannot hide.
    probe = StepProbe(delay=0.003).install(monkeypatch)
    # The fourth request fills the batch and starts it at once: all four share it.
    server = start_server(tiny_config(tiny_dir, max_batch_size=4, batch_window_ms=5000))
    app = server.server.apps.get("tiny")
    max_tokens = 400
    kept, gone = PROMPTS[:3], PROMPTS[4]

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(stream_completion, server, model="tiny", prompt=prompt, max_tokens=max_tokens,
                               temperature=0) for prompt in kept]
        sock = open_stream(server.port, gone, max_tokens)
        try:
            head = read_events(sock, 3)
            assert head.startswith(b"HTTP/1.1 200 ")
        finally:
            sock.close()  # the client goes away mid-stream
        results = [future.result(120) for future in futures]

    for prompt, (text, reason, usage) in zip(kept, results):
        assert text == reference.greedy_text(prompt, max_tokens), prompt
        assert reason == "length"
        assert usage.completion_tokens == max_tokens
        assert probe.steps(start_tokens(reference, prompt)) == [max_tokens]

    cancelled = start_tokens(reference, gone)
    assert sorted(probe.batch_of(cancelled)) == sorted([cancelled, *(start_tokens(reference, p) for p in kept)])
    steps = probe.steps(cancelled)
    assert len(steps) == 1
    assert 3 <= steps[0] < 100, steps  # stopped within a few steps of the client leaving, not at 400
    assert probe.stopped[next(key for key in probe.stopped if key[1] == cancelled)] == steps[0]
    # Nothing of it is left in the scheduler; the server goes on serving.
    wait_until(lambda: server.call_soon(app.stats)["running_batches"] == 0)
    with sync_client(server) as client:  # n = 4 fills a batch: no wait for the long window
        reply = client.completions.create(model="tiny", prompt=gone, max_tokens=10, temperature=0, n=4)
    assert [choice.text for choice in reply.choices] == [reference.greedy_text(gone, 10)] * 4


def test_a_request_cancelled_while_waiting_never_runs_and_frees_its_queue_slot(
        start_server, tiny_dir, reference, monkeypatch):
    probe = StepProbe().install(monkeypatch)
    server = start_server(tiny_config(tiny_dir, max_queue=1, inter_threads=1))
    app = server.server.apps.get("tiny")

    def stats():
        return server.call_soon(app.stats)

    def live_waiting():
        return server.call_soon(lambda: sum(not row.done for row in app.scheduler.waiting))

    def complete(prompt, max_tokens):
        with sync_client(server) as client:
            return client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0)

    probe.gate.clear()  # the first batch holds at its first step
    with ThreadPoolExecutor(2) as pool:
        try:
            running = pool.submit(stream_completion, server, model="tiny", prompt=PROMPTS[0], max_tokens=20,
                                  temperature=0)
            wait_until(lambda: stats()["running_batches"] == 1)
            sock = open_stream(server.port, PROMPTS[1], 20)
            wait_until(lambda: live_waiting() == 1)
            sock.close()  # gives up while still waiting for a batch
            wait_until(lambda: live_waiting() == 0)
            # Its slot is free again: another request is admitted (max_queue = 1), not refused.
            admitted = pool.submit(complete, PROMPTS[2], 8)
            wait_until(lambda: admitted.done() or live_waiting() == 1)
            assert not admitted.done(), admitted.exception()
        finally:
            probe.gate.set()
        assert running.result(60)[:2] == (reference.greedy_text(PROMPTS[0], 20), "length")
        assert admitted.result(60).choices[0].text == reference.greedy_text(PROMPTS[2], 8)
    assert probe.steps(start_tokens(reference, PROMPTS[1])) == []  # never decoded


def test_a_row_still_waiting_at_its_deadline_is_dropped_and_answered_504(
        start_server, tiny_dir, reference, monkeypatch):
    """X-Request-Deadline (runnel.deadlines): the scheduler drops a row whose deadline passed while
    it waited for a batch, fails its generation with the 504, and never decodes it."""
    probe = StepProbe().install(monkeypatch)
    server = start_server(tiny_config(tiny_dir, inter_threads=1))
    app = server.server.apps.get("tiny")

    def live_waiting():
        return server.call_soon(lambda: sum(not row.done for row in app.scheduler.waiting))

    def late(prompt):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0}
        return request(server.port, "POST", "/v1/completions", body=orjson.dumps(body),
                       headers=[("x-request-deadline", "0.3")])

    probe.gate.clear()  # the first batch holds at its first step: the only slot stays busy
    with ThreadPoolExecutor(2) as pool:
        try:
            running = pool.submit(stream_completion, server, model="tiny", prompt=PROMPTS[0], max_tokens=20,
                                  temperature=0)
            wait_until(lambda: server.call_soon(app.stats)["running_batches"] == 1)
            dropped = pool.submit(late, PROMPTS[1])
            wait_until(lambda: live_waiting() == 1)
            time.sleep(0.5)  # its deadline passes while it waits (the held batch cannot end meanwhile)
        finally:
            probe.gate.set()
        reply = dropped.result(60)
        assert reply.status == 504, reply.body
        assert reply.json()["error"]["code"] == "deadline_exceeded"
        assert running.result(60)[:2] == (reference.greedy_text(PROMPTS[0], 20), "length")
    assert probe.steps(start_tokens(reference, PROMPTS[1])) == []  # never decoded
    assert live_waiting() == 0
    assert late(PROMPTS[2]).status == 200  # the queue goes on


# -- 5. stop strings and max_tokens end rows individually within a batch ---------------------------


def boundary_stop(reference, prompt: str, max_tokens: int, first: int = 8) -> tuple[str, str, int]:
    """A stop string from the prompt's solo greedy text that spans a token boundary at or after
    token ``first``: (stop, the text before it, the index of the token that completes it)."""
    prompt_ids = reference.prompt_ids(prompt)
    ids = reference.greedy_ids(prompt_ids, max_tokens)
    texts = [reference.continuation(prompt_ids, ids[:k]) for k in range(len(ids) + 1)]
    full = texts[-1]
    for k in range(first, len(ids) - 1):
        boundary = len(texts[k + 1])  # where token k's text ends and token k+1's begins
        if len(texts[k + 1]) - len(texts[k]) >= 2 and len(texts[k + 2]) - boundary >= 2:
            stop = full[boundary - 2 : boundary + 2]
            if full.find(stop) == boundary - 2 and stop.strip() == stop:
                return stop, full[: boundary - 2], k + 1
    raise AssertionError(f"no stop string found in {full!r}")


def test_stop_strings_and_max_tokens_end_rows_individually_within_a_batch(
        start_server, tiny_dir, reference, monkeypatch):
    probe = StepProbe(delay=0.002).install(monkeypatch)
    server = start_server(tiny_config(tiny_dir, max_batch_size=4, batch_window_ms=5000))
    stopped, short, long_a, long_b = PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3]
    stop, before, last_token = boundary_stop(reference, stopped, 300)
    deltas: list[str] = []

    def stream_with_stop():
        with sync_client(server) as client:
            stream = client.completions.create(model="tiny", prompt=stopped, max_tokens=300, temperature=0,
                                               stop=[stop, "no such text anywhere"], stream=True,
                                               stream_options={"include_usage": True})
            with stream:
                chunks = list(stream)
        deltas.extend(choice.text for chunk in chunks for choice in chunk.choices)
        reasons = [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason]
        return "".join(deltas), reasons, next(chunk.usage for chunk in chunks if chunk.usage)

    def complete(prompt, max_tokens):
        with sync_client(server) as client:
            return client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0)

    results = run_concurrently([(stream_with_stop, {}), (complete, dict(prompt=short, max_tokens=5)),
                                (complete, dict(prompt=long_a, max_tokens=60)),
                                (complete, dict(prompt=long_b, max_tokens=60))])

    text, reasons, usage = results[0]
    assert reasons == ["stop"]
    assert text == before
    assert not any(stop in delta for delta in deltas)  # the stop string itself is never sent
    assert last_token <= usage.completion_tokens <= last_token + 1
    rows = [start_tokens(reference, p) for p in (stopped, short, long_a, long_b)]
    assert sorted(probe.batch_of(rows[0])) == sorted(rows)  # all four in one batch
    assert probe.steps(rows[0])[0] < 100  # decoding of that row ended soon after the stop, not at 300

    short_reply = results[1]
    assert short_reply.choices[0].finish_reason == "length"
    assert short_reply.choices[0].text == reference.greedy_text(short, 5)
    assert short_reply.usage.completion_tokens == 5
    assert probe.steps(rows[1]) == [5]

    for prompt, row, reply in zip((long_a, long_b), rows[2:], results[2:]):
        assert reply.choices[0].finish_reason == "length"
        assert reply.choices[0].text == reference.greedy_text(prompt, 60)
        assert reply.usage.completion_tokens == 60
        assert probe.steps(row) == [60]


def test_a_stop_string_in_a_non_streamed_completion(start_server, tiny_dir, reference):
    server = start_server(tiny_config(tiny_dir))
    stop, before, _ = boundary_stop(reference, PROMPTS[4], 200, first=3)
    with sync_client(server) as client:
        reply = client.completions.create(model="tiny", prompt=PROMPTS[4], max_tokens=200, temperature=0, stop=stop)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == before


def test_a_stop_id_inside_min_tokens_does_not_end_the_row(start_server, tiny_dir, reference, monkeypatch):
    # The step callback (CTranslate2's thread) and the row's rules (the loop) must agree: a
    # stop id within the first min_tokens tokens is an ordinary token, so decoding goes on.
    probe = StepProbe().install(monkeypatch)
    server = start_server(tiny_config(tiny_dir))
    prompt = PROMPTS[4]
    prompt_ids = reference.prompt_ids(prompt)
    greedy = reference.greedy_ids(prompt_ids, 40)
    stop_id = greedy[0]
    later = [position for position, token_id in enumerate(greedy) if token_id == stop_id and position >= 3]
    end = later[0] if later else 40  # the first stop id past min_tokens=3 ends it, counted, not sent
    with sync_client(server) as client:
        reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0,
                                          extra_body={"min_tokens": 3, "stop_token_ids": [stop_id]})
    assert reply.choices[0].text == reference.continuation(prompt_ids, greedy[:end])
    assert reply.choices[0].finish_reason == ("stop" if later else "length")
    assert reply.usage.completion_tokens == (end + 1 if later else 40)
    assert probe.steps(start_tokens(reference, prompt)) == [reply.usage.completion_tokens]


def test_the_heap_is_trimmed_once_the_batches_are_over(start_server, tiny_dir, monkeypatch):
    # A burst's freed memory goes back to the OS after it (runnel.memory.IdleTrim), not
    # between batches: the trim runs once the scheduler has had no batch for its idle delay.
    import runnel.memory

    trims = []
    monkeypatch.setattr(runnel.memory, "malloc_trim", lambda pad: trims.append(pad) or 1)
    monkeypatch.setattr(runnel.memory, "IDLE_SECONDS", 0.05)
    server = start_server(tiny_config(tiny_dir))
    with sync_client(server) as client:
        client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=5, temperature=0)
    wait_until(lambda: trims == [0], timeout=10)
