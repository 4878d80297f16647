"""Folding: rows that arrive while every batch slot is busy join a running batch at its next step.

The running batch stops at a step; its unfinished rows resume in a new batch, from their
prompt plus every token they made, together with the rows that waited. A client sees
nothing of it: each stream must equal its solo greedy output, with exact token counts,
stop strings and limits, whichever side of the fold they fall on. One batch slot
(``inter_threads = 1``) throughout, so a waiting row has nowhere else to go.

``FoldAt`` holds a batch at a chosen step until the test has seen the fold asked for, so
that the fold point is known to the token; elsewhere the scheduler's own decision folds,
with every step slowed (``StepProbe(delay=...)``) so that waiting would cost far more than a
re-forward. The prompts are those of test_ct2_scheduler: their greedy outputs have no near-ties,
so a prefix forwarded in one pass continues exactly as when it was decoded step by step.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest

from ct2_reference import (  # noqa: F401 (reference: fixture)
    StepProbe, reference, stream_completion, sync_client, tiny_config)
from runnel.testing import request, wait_until
from runnel_ctranslate2 import scheduler as ct2_scheduler
from test_ct2_scheduler import PROMPTS, boundary_stop, open_stream, read_events, start_tokens


class FoldAt:
    """Holds the first batch that reaches decoding step ``step`` there (before that step's
    token is handed over) until ``release`` is set, so the fold the test waits for meanwhile
    stops the batch right after that token: a row resumes from exactly ``step + 1`` tokens."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.release = threading.Event()
        self.held = threading.Event()

    def install(self, monkeypatch) -> FoldAt:
        inner = ct2_scheduler.Batch.callback  # a StepProbe installed first stays underneath
        hold = self

        def callback(batch, step):
            if step.step == hold.step and not hold.held.is_set():
                hold.held.set()
                assert hold.release.wait(30), "the test never released the batch"
            return inner(batch, step)

        monkeypatch.setattr(ct2_scheduler.Batch, "callback", callback)
        return self


def always_fold(monkeypatch) -> None:
    """The decision always finds a fold worth it (its other bounds still hold)."""
    monkeypatch.setattr(ct2_scheduler.BatchScheduler, "_fold_pays", staticmethod(lambda cost, wait: True))


def held_server(start_server, tiny_dir, monkeypatch, step: int, **config):
    """(server, app, probe, hold): a server whose folds always pay (``always_fold``), its decoding
    steps counted (``StepProbe``), and its first batch to reach ``step`` held there (``FoldAt``)."""
    always_fold(monkeypatch)
    probe = StepProbe().install(monkeypatch)
    hold = FoldAt(step).install(monkeypatch)
    server = start_server(tiny_config(tiny_dir, **config))
    return server, server.server.apps.get("tiny"), probe, hold


def stats(server) -> dict:
    reply = request(server.port, "GET", "/stats")
    assert reply.status == 200
    return reply.json()["apps"]["tiny"]


def folding(server, app) -> bool:
    return server.call_soon(lambda: any(batch.folding for batch in app.scheduler._batches))


def waiting(server, app) -> int:
    return server.call_soon(lambda: sum(not row.done for row in app.scheduler.waiting))


def test_streams_that_join_a_running_batch_each_equal_their_solo_greedy_output(
        start_server, tiny_dir, reference, monkeypatch):
    # The scheduler's own decision: a 300-token row decodes ~3 ms a step, so the rows that
    # arrive after it would wait ~1 s; re-forwarding a few dozen tokens is far cheaper.
    probe = StepProbe(delay=0.003).install(monkeypatch)
    server = start_server(tiny_config(tiny_dir, batch_window_ms=5))
    first, later = PROMPTS[0], PROMPTS[1:4]
    lengths = [300, 40, 25, 60]
    with ThreadPoolExecutor(4) as pool:
        running = pool.submit(stream_completion, server, model="tiny", prompt=first, max_tokens=lengths[0],
                              temperature=0)
        wait_until(lambda: len(probe.steps(start_tokens(reference, first))) == 1
                   and probe.steps(start_tokens(reference, first))[0] >= 20)
        joined = [pool.submit(stream_completion, server, model="tiny", prompt=prompt, max_tokens=n, temperature=0)
                  for prompt, n in zip(PROMPTS[1:4], lengths[1:])]
        results = [running.result(60)] + [future.result(60) for future in joined]

    for prompt, n, (text, reason, usage) in zip([first, *later], lengths, results):
        assert text == reference.greedy_text(prompt, n), prompt  # continuous: nothing lost or repeated
        assert reason == "length"
        assert usage.completion_tokens == n
        assert sum(probe.steps(start_tokens(reference, prompt))) == n  # decoded n steps in all, over its batches
    long_row = probe.steps(start_tokens(reference, first))
    assert len(long_row) >= 2, long_row  # folded at least once: it went on in another batch
    report = stats(server)
    assert report["folds"] >= 1 and report["folded_rows"] >= 1, report
    assert report["rows"] == 4  # a resumed row is admitted once
    # /metrics reads the same counters.
    metrics = request(server.port, "GET", "/metrics").body.decode()
    assert f'runnel_generation_folds_total{{app="tiny"}} {float(report["folds"])}' in metrics
    assert f'runnel_generation_folded_rows_total{{app="tiny"}} {float(report["folded_rows"])}' in metrics
    # At least one later row started beside the long one, long before the long one ended.
    assert any(start_tokens(reference, first) in rows and len(rows) > 1 for rows in probe.batches.values())


def test_a_stop_string_that_spans_the_fold_point_still_stops(start_server, tiny_dir, reference, monkeypatch):
    prompt = PROMPTS[0]
    stop, before, last = boundary_stop(reference, prompt, 200)
    # The stop string straddles tokens last - 1 and last: fold right after token last - 1
    # (decoding step last - 1), so its first half is made before the fold and its end after.
    server, app, probe, hold = held_server(start_server, tiny_dir, monkeypatch, last - 1, batch_window_ms=5)
    deltas: list[str] = []

    def stream_with_stop():
        with sync_client(server) as client:
            stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=200, temperature=0,
                                               stop=[stop], stream=True, stream_options={"include_usage": True})
            with stream:
                chunks = list(stream)
        deltas.extend(choice.text for chunk in chunks for choice in chunk.choices)
        reasons = [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason]
        return "".join(deltas), reasons, next(chunk.usage for chunk in chunks if chunk.usage)

    with ThreadPoolExecutor(2) as pool:
        stopped = pool.submit(stream_with_stop)
        assert hold.held.wait(30)
        other = pool.submit(stream_completion, server, model="tiny", prompt=PROMPTS[1], max_tokens=20, temperature=0)
        wait_until(lambda: folding(server, app))
        hold.release.set()
        text, reasons, usage = stopped.result(60)
        assert other.result(60)[:2] == (reference.greedy_text(PROMPTS[1], 20), "length")

    assert reasons == ["stop"]
    assert text == before
    assert not any(stop in delta for delta in deltas)  # never sent, not even in part across the fold
    assert usage.completion_tokens == last + 1  # the token that completed it counts
    assert stats(server)["folded_rows"] == 1


@pytest.mark.parametrize("room", [True, False], ids=["room", "no room"])
def test_max_tokens_at_and_right_after_the_fold_point_end_with_length(start_server, tiny_dir, reference, monkeypatch,
                                                                      room):
    # Two rows fold after 11 tokens: one whose limit is that very token (it ends, and is not
    # resumed), one whose limit is the next (it resumes for exactly one token). Their prompts
    # are as long (11 tokens): CTranslate2 starts a shorter prompt's output steps earlier.
    # Without room for the waiting row (the row that ends at the fold point still counts as
    # live until it does), the batch runs to its end instead: the same outputs, no fold.
    server, app, probe, hold = held_server(start_server, tiny_dir, monkeypatch,
                                           10, batch_window_ms=200, max_batch_size=3 if room else 2)
    at, after, joining = PROMPTS[2], PROMPTS[4], PROMPTS[3]
    with ThreadPoolExecutor(3) as pool:
        ending = pool.submit(stream_completion, server, model="tiny", prompt=at, max_tokens=11, temperature=0)
        resuming = pool.submit(stream_completion, server, model="tiny", prompt=after, max_tokens=12, temperature=0)
        assert hold.held.wait(30)
        waiting_row = pool.submit(stream_completion, server, model="tiny", prompt=joining, max_tokens=5,
                                  temperature=0)
        if room:
            wait_until(lambda: folding(server, app))
        else:
            wait_until(lambda: waiting(server, app) == 1)
            server.call_soon(app.scheduler._flush)  # the decision, now (not at the end of the 200 ms window)
            assert not folding(server, app)
        hold.release.set()
        results = [ending.result(60), resuming.result(60), waiting_row.result(60)]
    for prompt, n, (text, reason, usage) in zip((at, after, joining), (11, 12, 5), results):
        assert (text, reason, usage.completion_tokens) == (reference.greedy_text(prompt, n), "length", n), prompt
    report = stats(server)
    # Only the row with a token left resumed.
    assert (report["folds"], report["folded_rows"]) == ((1, 1) if room else (0, 0))
    assert probe.steps(start_tokens(reference, after)) == ([11, 1] if room else [12])
    assert probe.steps(start_tokens(reference, at)) == [11]


def test_a_client_gone_during_a_fold_is_never_resumed_while_the_others_go_on(
        start_server, tiny_dir, reference, monkeypatch):
    server, app, probe, hold = held_server(start_server, tiny_dir, monkeypatch,
                                           6, batch_window_ms=200, max_batch_size=2)
    kept, gone, joining = PROMPTS[2], PROMPTS[4], PROMPTS[1]  # kept and gone: as long (11 tokens)
    with ThreadPoolExecutor(2) as pool:
        staying = pool.submit(stream_completion, server, model="tiny", prompt=kept, max_tokens=40, temperature=0)
        sock = open_stream(server.port, gone, 40)  # fills the batch (max_batch_size = 2): it starts at once
        try:
            assert read_events(sock, 1).startswith(b"HTTP/1.1 200 ")  # it streams: its tokens arrived
            assert hold.held.wait(30)
            # The client goes away: its row is stopped, which leaves room for the waiting row.
            sock.close()
            wait_until(lambda: server.call_soon(
                lambda: sum(row.done for batch in app.scheduler._batches for row in batch.rows)) == 1)
            late = pool.submit(stream_completion, server, model="tiny", prompt=joining, max_tokens=15, temperature=0)
            wait_until(lambda: folding(server, app))
        finally:
            sock.close()
            hold.release.set()
        assert staying.result(60)[:2] == (reference.greedy_text(kept, 40), "length")
        assert late.result(60)[:2] == (reference.greedy_text(joining, 15), "length")

    steps = probe.steps(start_tokens(reference, gone))
    assert len(steps) == 1 and steps[0] <= 7, steps  # stopped at the held step; never decoded again
    assert sorted(probe.batch_of(start_tokens(reference, joining))) == sorted(
        [start_tokens(reference, kept), start_tokens(reference, joining)])
    assert sum(probe.steps(start_tokens(reference, kept))) == 40
    report = stats(server)
    assert (report["folds"], report["folded_rows"]) == (1, 1)
    wait_until(lambda: server.call_soon(app.stats)["running_batches"] == 0)


def test_a_row_cancelled_while_its_batch_folds_is_dropped(start_server, tiny_dir, reference, monkeypatch):
    # The window between a fold being asked for and the batch returning: a client that leaves
    # then is not resumed, its batch-mate is.
    server, app, probe, hold = held_server(start_server, tiny_dir, monkeypatch,
                                           6, batch_window_ms=200, max_batch_size=3)
    kept, gone, joining = PROMPTS[2], PROMPTS[4], PROMPTS[1]  # kept and gone: as long (11 tokens)
    with ThreadPoolExecutor(2) as pool:
        staying = pool.submit(stream_completion, server, model="tiny", prompt=kept, max_tokens=40, temperature=0)
        sock = open_stream(server.port, gone, 40)
        try:
            assert hold.held.wait(30)
            late = pool.submit(stream_completion, server, model="tiny", prompt=joining, max_tokens=15, temperature=0)
            wait_until(lambda: folding(server, app))
            sock.close()  # gone while the batch is stopping for the fold
            wait_until(lambda: server.call_soon(
                lambda: sum(row.done for batch in app.scheduler._batches for row in batch.rows)) == 1)
        finally:
            sock.close()
            hold.release.set()
        assert staying.result(60)[:2] == (reference.greedy_text(kept, 40), "length")
        assert late.result(60)[:2] == (reference.greedy_text(joining, 15), "length")

    assert len(probe.steps(start_tokens(reference, gone))) == 1  # never resumed
    report = stats(server)
    assert (report["folds"], report["folded_rows"]) == (1, 1)


def test_a_resumed_row_is_not_held_to_the_queue_wait_deadline(start_server, tiny_dir, reference, monkeypatch):
    # X-Request-Deadline drops work still waiting at the deadline; work already running is not
    # affected. A row resumed by a fold passes through the waiting rows again, after its deadline:
    # it must go on, not end in a 504.
    server, app, probe, hold = held_server(start_server, tiny_dir, monkeypatch, 6, batch_window_ms=5)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(stream_completion, server, model="tiny", prompt=PROMPTS[0], max_tokens=30,
                              temperature=0, extra_headers={"x-request-deadline": "0.2"})
        assert hold.held.wait(30)
        time.sleep(0.4)  # its deadline passes while it runs
        joined = pool.submit(stream_completion, server, model="tiny", prompt=PROMPTS[1], max_tokens=10, temperature=0)
        wait_until(lambda: folding(server, app))
        hold.release.set()
        assert running.result(60)[:2] == (reference.greedy_text(PROMPTS[0], 30), "length")
        assert joined.result(60)[:2] == (reference.greedy_text(PROMPTS[1], 10), "length")
    assert stats(server)["folded_rows"] == 1


def test_n_choices_and_logprobs_are_right_across_a_fold(start_server, tiny_dir, reference, monkeypatch):
    server, app, probe, hold = held_server(start_server, tiny_dir, monkeypatch, 12, batch_window_ms=5)
    prompt, other = PROMPTS[3], PROMPTS[5]

    def complete(prompt, max_tokens, n):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "n": n,
                "logprobs": 1}
        reply = request(server.port, "POST", "/v1/completions", body=orjson.dumps(body))
        assert reply.status == 200, reply.body
        return reply.json()

    with ThreadPoolExecutor(2) as pool:
        both = pool.submit(complete, prompt, 30, 2)
        assert hold.held.wait(30)
        joined = pool.submit(complete, other, 10, 1)
        wait_until(lambda: folding(server, app))
        hold.release.set()
        replies = [both.result(60), joined.result(60)]
    assert stats(server)["folded_rows"] == 2

    solo = []
    for body in [dict(prompt=prompt, max_tokens=30), dict(prompt=other, max_tokens=10)]:
        with sync_client(server) as client:  # the same requests alone: no fold
            solo.append(client.completions.create(model="tiny", temperature=0, logprobs=1, **body))
    assert stats(server)["folds"] == 1
    for reply, alone, n, max_tokens in zip(replies, solo, (2, 1), (30, 10)):
        assert [choice["index"] for choice in reply["choices"]] == list(range(n))
        assert reply["usage"]["completion_tokens"] == n * max_tokens
        expected = alone.choices[0]
        for choice in reply["choices"]:
            assert choice["text"] == expected.text
            assert choice["logprobs"]["tokens"] == expected.logprobs.tokens
            # The same values up to float rounding (seen: 2e-7): a batch of other rows, and a
            # prefix forwarded in one pass rather than step by step, sum in another order.
            assert choice["logprobs"]["token_logprobs"] == pytest.approx(expected.logprobs.token_logprobs, abs=1e-5)


# The settings a resume would change, as the request's extra body and as CTranslate2's options.
UNFOLDABLE = {
    "min_tokens": ({"min_tokens": 1}, {}),
    "repetition_penalty": ({"repetition_penalty": 1.5, "ignore_eos": True}, {"repetition_penalty": 1.5, "end_token": []}),
    "no_repeat_ngram_size": ({"no_repeat_ngram_size": 2, "ignore_eos": True}, {"no_repeat_ngram_size": 2, "end_token": []}),
}


@pytest.mark.parametrize("case", [*UNFOLDABLE, "fold off"])
def test_no_fold_where_a_resume_would_change_the_output_nor_with_fold_off(start_server, tiny_dir, reference,
                                                                          monkeypatch, case):
    # min_tokens: CTranslate2 applies min_length per batch, so a resumed row past it would
    # still have its end held back. repetition_penalty and no_repeat_ngram_size: CTranslate2
    # applies them to the tokens one call generates, not to its prompt, so a resumed row would
    # forget its earlier tokens (its greedy output then differs from solo a few steps after the
    # fold: the solo comparison below fails if such a batch is folded). fold = false: batches
    # always run to their end.
    server, app, probe, hold = held_server(start_server, tiny_dir, monkeypatch,
                                           6, batch_window_ms=5, **({"fold": False} if case == "fold off" else {}))
    body, options = UNFOLDABLE.get(case, ({}, {}))
    extra = {"extra_body": body} if body else {}
    first, second = PROMPTS[0], PROMPTS[1]
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(stream_completion, server, model="tiny", prompt=first, max_tokens=30, temperature=0,
                              **extra)
        assert hold.held.wait(30)
        later = pool.submit(stream_completion, server, model="tiny", prompt=second, max_tokens=10, temperature=0,
                            **extra)
        wait_until(lambda: waiting(server, app) == 1)
        server.call_soon(app.scheduler._flush)  # the decision, taken again now that the batch has a pace
        assert not folding(server, app)
        hold.release.set()
        assert running.result(60)[:2] == (reference.greedy_text(first, 30, **options), "length")
        assert later.result(60)[:2] == (reference.greedy_text(second, 10, **options), "length")
    assert probe.steps(start_tokens(reference, first)) == [30]
    assert probe.batch_of(start_tokens(reference, second)) == [start_tokens(reference, second)]
    assert stats(server)["folds"] == 0
