"""The record of a generation and the tap that fills it: nothing per token after the first."""

from __future__ import annotations

import asyncio
import time

from runnel.generation_record import GenerationRecord, RecordingTap
from runnel.metrics import _size_buckets, outcome


class Sink:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_tokens(self, index, text, token_ids, logprobs):
        self.calls.append(("tokens", index, text))

    def on_finish(self, index, reason, completion_tokens):
        self.calls.append(("finish", index, reason, completion_tokens))

    def on_error(self, error):
        self.calls.append(("error", error))


def tap_for(choices: int) -> tuple[Sink, GenerationRecord, RecordingTap]:
    sink = Sink()
    record = GenerationRecord(app=None, started_at=time.perf_counter(), prompt_tokens=3, choices=choices)
    return sink, record, RecordingTap(sink, record)


def test_after_the_first_push_tokens_go_straight_to_the_sink():
    async def main():
        sink, record, tap = tap_for(1)
        assert record.time_to_first_token is None
        tap.on_tokens(0, "a", (1,), None)
        first = record.first_token_at
        assert first > 0 and record.time_to_first_token >= 0
        # The tap is out of the way: its on_tokens now is the sink's own bound method.
        assert tap.on_tokens == sink.on_tokens
        tap.on_tokens(0, "b", (2,), None)
        tap.on_tokens(0, "c", (3,), None)
        assert record.first_token_at == first  # the first push's time, kept
        tap.on_finish(0, "length", 3)
        assert sink.calls == [("tokens", 0, "a"), ("tokens", 0, "b"), ("tokens", 0, "c"), ("finish", 0, "length", 3)]
        assert record.completion_tokens == 3 and record.reasons == ["length"] and record.ended_at >= first
        assert record.inter_token_latency == (record.ended_at - first) / 2
        assert outcome(record, 200) == "length"

    asyncio.run(main())


def test_choices_end_the_record_once_and_failures_and_cuts_have_their_reasons():
    async def main():
        sink, record, tap = tap_for(2)
        tap.on_tokens(1, "a", (1,), None)
        tap.on_finish(1, "stop", 1)
        assert not record.ended_at  # one choice still decoding
        tap.on_finish(0, "length", 4)
        assert record.ended_at and outcome(record, 200) == "length"
        assert record.inter_token_latency == (record.ended_at - record.first_token_at) / (5 / 2 - 1)

        _, failed, tap = tap_for(1)
        tap.on_error(RuntimeError("boom"))
        assert failed.failed and outcome(failed, 500) == "error" and failed.inter_token_latency is None
        _, cut, _ = tap_for(1)
        assert [outcome(cut, status) for status in (429, 499, 503)] == ["rejected", "cancelled", "interrupted"]

    asyncio.run(main())


def test_batch_size_buckets_are_cumulative():
    counts = [0, 3, 1, 0, 2]  # three batches of 1 row, one of 2, two of 4
    buckets, total = _size_buckets(counts)
    assert dict(buckets)["1.0"] == 3 and dict(buckets)["2.0"] == 4 and dict(buckets)["4.0"] == 6
    assert dict(buckets)["+Inf"] == 6 and total == 3 + 2 + 8
    assert _size_buckets([])[0][-1] == ("+Inf", 0)
