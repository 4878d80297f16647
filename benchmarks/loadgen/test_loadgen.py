"""Tests of the load generator: the sans-IO parts exactly, the client against small
trio servers in the same process that misbehave on purpose.

    .venv/bin/python -m pytest benchmarks/loadgen -q
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
import zipfile
from functools import partial
from pathlib import Path

import orjson
import pytest
import trio

from runnel.testing import free_port

from . import __main__ as cli
from .client import ARRIVAL_SEED, LoadSpec, Workload, arrival_offsets, load, parse_url, run_load
from .dataset import WORDS, Lengths, Sample, fixed, load_sharegpt, synthetic
from .metrics import meets, parse_slos, request_metrics
from .report import format_table
from .sse import SSEParser, StreamTokens, TokenWindow, count_tokens, parse_event, usage_counts
from .stats import percentile, summarize

# -- sans IO ----------------------------------------------------------------------

STREAM = (
    b": a comment\r\n"
    b"event: message\r\ndata: one\r\n\r\n"
    b"data: two\ndata:  three\n\n"  # two lines; only one space is removed
    b"id: 7\n\n"  # no data: not dispatched
    b"data\rdata: four\r\r"
    b"data: [DONE]\n\n"
)
EVENTS = [b"one", b"two\n three", b"\nfour", b"[DONE]"]


def test_sse_whole_and_split_at_every_byte():
    assert SSEParser().feed(STREAM) == EVENTS
    for cut in range(len(STREAM) + 1):
        parser = SSEParser()
        assert parser.feed(STREAM[:cut]) + parser.feed(STREAM[cut:]) == EVENTS, cut
    parser = SSEParser()
    assert [e for i in range(len(STREAM)) for e in parser.feed(STREAM[i : i + 1])] == EVENTS


def test_sse_incomplete_event_is_held():
    parser = SSEParser()
    assert parser.feed(b"data: a\n") == []
    assert parser.feed(b"\n") == [b"a"]


def chunk(**choice):
    return orjson.dumps({"object": "chat.completion.chunk", "choices": [{"index": 0, **choice}]})


def test_count_tokens():
    assert count_tokens(chunk(delta={"role": "assistant", "content": ""})) == 0
    assert count_tokens(chunk(delta={"content": " word"})) == 1
    assert count_tokens(chunk(delta={}, finish_reason="length")) == 0
    assert count_tokens(chunk(text="legacy")) == 1  # completions
    assert count_tokens(b'{"choices":[{"delta":{"content":"a"}},{"delta":{"content":"b"}}]}') == 2
    assert count_tokens(b'{"choices":[],"usage":{"completion_tokens":9}}') == 0
    assert count_tokens(b'{"error":{"message":"boom"}}') == -1
    assert count_tokens(b"plain text") == 1
    assert count_tokens(b'{"value": 3}') == 1
    assert count_tokens(b"{not json") == 1


def test_stream_tokens_times():
    tokens = StreamTokens()
    role = b"data: " + chunk(delta={"role": "assistant", "content": ""}) + b"\n\n"
    word = b"data: " + chunk(delta={"content": "w"}) + b"\n\n"
    tokens.feed(role + word[:10], 1_000_000)
    tokens.feed(word[10:] + word, 3_000_000)  # two tokens in one read
    tokens.feed(word + b"data: [DONE]\n\n" + word, 4_500_000)  # nothing counts after [DONE]
    assert (tokens.tokens, tokens.first, tokens.last) == (3, 3_000_000, 4_500_000)
    assert tokens.gaps == [0.0, 1.5] and tokens.done and not tokens.error
    tokens.feed(b'data: {"error": {"message": "late"}}\n\n', 5_000_000)
    assert not tokens.error  # after [DONE]


def test_percentile_linear_as_numpy():
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 50) == 2.5
    assert math.isclose(percentile(values, 90), 3.7)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile([5.0], 99) == 5.0
    assert summarize([]) == {"p50": None, "p90": None, "p99": None, "mean": None, "max": None}
    assert summarize(range(1, 101)) == {"p50": 50.5, "p90": 90.1, "p99": 99.01, "mean": 50.5, "max": 100}


@pytest.mark.parametrize("url", [
    "http://10.0.0.1/x", "http://example.com/", "https://127.0.0.1/", "http://0.0.0.0:80/",
    "http://[::ffff:127.0.0.1]/", "http://user:pw@127.0.0.1/", "http:///nohost",
])
def test_only_loopback(url):
    with pytest.raises(ValueError):
        Workload(url)


def test_loopback_urls():
    assert parse_url("http://localhost:8000/a?b=1") == ("127.0.0.1", 8000, "/a?b=1", "localhost:8000")
    assert parse_url("http://[::1]:9/") == ("::1", 9, "/", "[::1]:9")
    assert parse_url("http://127.0.0.1") == ("127.0.0.1", 80, "/", "127.0.0.1")


def test_openai_helpers():
    w = Workload.openai_chat("http://127.0.0.1:8000", "m", "hi", 8, True, ignore_eos=True)
    assert (w.url, w.method, w.stream) == ("http://127.0.0.1:8000/v1/chat/completions", "POST", True)
    assert orjson.loads(w.body) == {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                    "max_tokens": 8, "stream": True, "ignore_eos": True}
    w = Workload.openai_completion("http://127.0.0.1:8000/v4/p/app/run/", "m", "hi", 8, False)
    assert w.url == "http://127.0.0.1:8000/v4/p/app/run/completions" and not w.stream


@pytest.mark.parametrize("kwargs", [
    {}, {"concurrency": 1, "rate": 1.0}, {"concurrency": 0}, {"rate": 0.0}, {"rate": math.inf},
    {"concurrency": 1, "duration": math.inf}, {"concurrency": 1, "max_requests": 0},
    {"concurrency": 1, "warmup": -1.0}, {"concurrency": 1, "timeout": 0.0},
    {"rate": 1.0, "burstiness": 0.0}, {"rate": 1.0, "burstiness": math.nan},
    {"concurrency": 1, "goodput": {"latency": 5.0}}, {"concurrency": 1, "goodput": {"ttft": 0.0}},
])
def test_load_spec_bounds(kwargs):
    with pytest.raises(ValueError):
        LoadSpec(**kwargs)


# -- metric definitions on a synthetic token timeline (vllm bench serve's) ------------------

MS = 1_000_000  # ns


def sse_event(obj) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def test_metric_definitions_on_a_synthetic_timeline():
    # Due at 0; a role chunk at 5 ms, a token at 10, two in one read at 14, one at 20, then the
    # usage chunk and [DONE] at 22 ms, which is when the answer ends.
    tokens = StreamTokens()
    tokens.feed(sse_event({"choices": [{"delta": {"role": "assistant", "content": ""}}]}), 5 * MS)
    tokens.feed(sse_event({"choices": [{"delta": {"content": "a"}}]}), 10 * MS)
    tokens.feed(sse_event({"choices": [{"delta": {"content": "b"}}]}) * 2, 14 * MS)
    tokens.feed(sse_event({"choices": [{"delta": {"content": "c"}}]}), 20 * MS)
    tokens.feed(sse_event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}})
                + b"data: [DONE]\n\n", 22 * MS)
    assert (tokens.tokens, tokens.reported, tokens.output_tokens, tokens.prompt_tokens) == (4, 4, 4, 3)
    assert tokens.gaps == pytest.approx([4.0, 0.0, 6.0], abs=1e-9)  # ITL: every gap, 0 within a read
    ttft, tpot, e2el = request_metrics(0, tokens.first, 22 * MS, tokens.output_tokens)
    assert ttft == pytest.approx(10.0, abs=1e-9)  # to the first token, not the role chunk
    assert tpot == pytest.approx((22 - 10) / (4 - 1), abs=1e-9)  # (E2EL - TTFT) / (tokens - 1) = 4 ms
    assert e2el == pytest.approx(22.0, abs=1e-9)
    # The server's usage is the output token count when it differs from the pieces read
    # (several tokens in one event): 7 tokens make TPOT 12 / 6.
    assert request_metrics(0, 10 * MS, 22 * MS, 7)[1] == pytest.approx(2.0, abs=1e-9)
    assert request_metrics(0, 10 * MS, 22 * MS, 1) == (pytest.approx(10.0), None, pytest.approx(22.0))
    assert request_metrics(3 * MS, 0, 22 * MS, 5) == (None, None, pytest.approx(19.0))  # not streamed


def test_parse_event_reads_usage():
    usage = {"completion_tokens": 9, "prompt_tokens": 4}
    assert parse_event(orjson.dumps({"choices": [], "usage": usage})) == (0, usage)
    assert parse_event(b'{"choices":[{"text":"x"}],"usage":{"completion_tokens":2}}') == (1, {"completion_tokens": 2})
    assert parse_event(b'{"choices":[],"usage":null}') == (0, None)
    assert parse_event(b'{"value": 1, "usage": {"completion_tokens": 3}}') == (1, None)  # not an OpenAI chunk
    assert usage_counts(usage) == (9, 4)
    assert usage_counts({"completion_tokens": "9", "prompt_tokens": -1}) == (None, None)
    assert usage_counts({}) == (None, None)


def test_goodput_slos():
    assert parse_slos(None) is None
    assert parse_slos(["ttft:500", "TPOT:50", "e2el:2e3"]) == {"ttft": 500.0, "tpot": 50.0, "e2el": 2000.0}
    for bad in (["ttft"], ["itl:5"], ["ttft:x"], ["ttft:-1"], ["ttft:0"], ["ttft:inf"], ["ttft:1", "ttft:2"]):
        with pytest.raises(ValueError):
            parse_slos(bad)
    slos = {"ttft": 100.0, "tpot": 10.0}
    assert meets(slos, 100.0, 10.0, 5000.0)  # bounds are inclusive; e2el has none here
    assert not meets(slos, 100.1, 1.0, 200.0)
    assert not meets(slos, 50.0, 10.5, 200.0)
    assert meets(slos, 50.0, None, 200.0)  # one token: TPOT counts as 0, as vLLM does
    assert not meets({"ttft": 100.0}, None, None, 150.0)  # not streamed: the first token came at the end
    assert meets({"e2el": 150.0}, 10.0, 1.0, 150.0) and not meets({"e2el": 150.0}, 10.0, 1.0, 150.5)


# -- throughput by token arrival time -------------------------------------------------------------

def test_tokens_count_when_they_arrive_in_the_window():
    window = TokenWindow(start=10 * MS)
    early, late = StreamTokens(window), StreamTokens(window)
    word = sse_event({"choices": [{"text": "w"}]})
    early.feed(word * 3, 4 * MS)  # before the window: not counted
    early.feed(word * 2, 12 * MS)
    late.feed(word, 15 * MS)  # a request whose end never comes (cut) still counts
    assert (window.tokens, early.windowed, late.windowed) == (3, 2, 1)
    # early's usage says 10 tokens for its 5 pieces: its window share (2 of 5) scales with it.
    early.feed(sse_event({"choices": [], "usage": {"completion_tokens": 10}}), 16 * MS)
    window.settle(early.tokens, early.windowed, early.reported, 16 * MS)
    assert window.tokens == pytest.approx(3 + (10 - 5) * 2 / 5)
    window.settle(3, 3, None, 20 * MS)  # no usage: nothing to correct
    window.settle(3, 3, 3, 20 * MS)
    assert window.tokens == pytest.approx(5.0)
    window.settle(0, 0, 6, 9 * MS)  # not streamed, ended before the window
    window.settle(0, 0, 6, 30 * MS)  # not streamed, ended inside it
    assert window.tokens == pytest.approx(11.0)


# -- lengths and datasets (seeded) -----------------------------------------------------------------

def test_length_distributions():
    assert Lengths.parse("128") == Lengths(128, 128) and str(Lengths.parse("128")) == "128"
    assert Lengths.parse("64-256") == Lengths.parse("64:256") == Lengths(64, 256)
    for bad in ("", "0", "x", "9-3", "-5", "1-2-3"):
        with pytest.raises(ValueError):
            Lengths.parse(bad)
    rng = random.Random(7)
    draws = [Lengths(3, 6).draw(rng) for _ in range(2000)]
    assert set(draws) == {3, 4, 5, 6}  # uniform, both ends included
    assert sum(draws) / len(draws) == pytest.approx(4.5, abs=0.1)
    assert {Lengths(5, 5).draw(rng) for _ in range(10)} == {5}


def test_synthetic_prompts_are_seeded():
    samples = synthetic(50, Lengths(4, 12), Lengths(16, 32), seed=3)
    assert samples == synthetic(50, Lengths(4, 12), Lengths(16, 32), seed=3)
    assert samples != synthetic(50, Lengths(4, 12), Lengths(16, 32), seed=4)
    assert all(4 <= len(s.prompt.split()) <= 12 and 16 <= s.output_tokens <= 32 for s in samples)
    assert all(word in WORDS for s in samples for word in s.prompt.split())
    assert len({s.prompt for s in samples}) == 50  # distinct prompts: no cache serves them all
    assert [len(s.prompt.split()) for s in synthetic(3, Lengths(8, 8), Lengths(2, 2))] == [8, 8, 8]
    assert fixed("hi", Lengths(9, 9), 100) == [Sample("hi", 9)]
    assert {s.output_tokens for s in fixed("hi", Lengths(1, 3), 100, seed=1)} == {1, 2, 3}


def test_sharegpt_dataset(tmp_path):
    records = [
        {"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "x" * 40}]},
        {"conversations": [{"role": "system", "content": "s"}, {"role": "user", "content": "Q2"},
                           {"role": "assistant", "content": "abc"}]},
        {"prompt": "Q3", "output_tokens": 7},
        {"conversations": [{"from": "gpt", "value": "no question"}]},  # no prompt: skipped
        ["not", "a", "record"],
    ]
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(r) for r in records) + b"\n\n")
    samples = load_sharegpt(path, 6, seed=1)
    assert sorted(set(samples), key=lambda s: s.prompt) == [Sample("Q1", 10), Sample("Q2", 1), Sample("Q3", 7)]
    assert samples[:3] == samples[3:]  # cycled in a seeded shuffle
    assert samples == load_sharegpt(path, 6, seed=1)
    assert {s.output_tokens for s in load_sharegpt(path, 30, seed=2, output_lengths=Lengths(5, 5))} == {5}
    as_array = tmp_path / "data.json"
    as_array.write_bytes(orjson.dumps(records))  # ShareGPT's own file is one JSON array
    assert set(load_sharegpt(as_array, 3, seed=1)) == set(samples)
    (tmp_path / "bad.jsonl").write_bytes(b'{"prompt": "a", "output_tokens": 1}\n{oops\n')
    with pytest.raises(ValueError, match="line 2"):
        load_sharegpt(tmp_path / "bad.jsonl", 1)
    (tmp_path / "empty.jsonl").write_bytes(b'{"conversations": []}\n')
    with pytest.raises(ValueError, match="no record"):
        load_sharegpt(tmp_path / "empty.jsonl", 1)
    (tmp_path / "nolen.jsonl").write_bytes(b'{"prompt": "a"}\n')
    with pytest.raises(ValueError, match="output length"):
        load_sharegpt(tmp_path / "nolen.jsonl", 1)


def test_openai_workload_from_samples():
    samples = [Sample("one two", 3), Sample("three", 5)]
    w = Workload.openai("http://127.0.0.1:8000", "m", samples, api_key="k", ignore_eos=True)
    assert w.url == "http://127.0.0.1:8000/v1/completions" and w.stream
    assert [orjson.loads(b) for b in w.bodies] == [
        {"model": "m", "prompt": "one two", "max_tokens": 3, "stream": True,
         "stream_options": {"include_usage": True}, "ignore_eos": True},
        {"model": "m", "prompt": "three", "max_tokens": 5, "stream": True,
         "stream_options": {"include_usage": True}, "ignore_eos": True},
    ]
    assert ("authorization", "Bearer k") in w.headers
    chat = Workload.openai("http://127.0.0.1:8000/v1/", "m", samples[:1], chat=True, stream=False)
    assert chat.url == "http://127.0.0.1:8000/v1/chat/completions"
    assert orjson.loads(chat.bodies[0]) == {"model": "m", "messages": [{"role": "user", "content": "one two"}],
                                            "max_tokens": 3, "stream": False}
    with pytest.raises(ValueError):
        Workload.openai("http://10.1.2.3:8000", "m", samples)
    remote = Workload.openai("http://10.1.2.3:8000", "m", samples, allow_remote=True)
    assert parse_url(remote.url, allow_remote=True) == ("10.1.2.3", 8000, "/v1/completions", "10.1.2.3:8000")
    assert parse_url("http://example.com/x", allow_remote=True)[0] == "example.com"


def test_command_line(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    w, spec = cli.build(cli.parse_args([
        "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--endpoint", "chat", "--input-len", "4-8",
        "--output-len", "32", "--num-prompts", "20", "--seed", "5", "--ignore-eos", "--request-rate", "3.5",
        "--burstiness", "0.5", "--goodput", "ttft:500", "tpot:50", "--api-key", "sk", "--header", "x-a: b"]))
    assert w.url == "http://127.0.0.1:9/v1/chat/completions" and w.stream and len(w.bodies) == 20
    assert all(orjson.loads(b)["max_tokens"] == 32 for b in w.bodies)
    assert ("authorization", "Bearer sk") in w.headers and ("x-a", "b") in w.headers
    assert (spec.rate, spec.concurrency, spec.burstiness) == (3.5, None, 0.5)
    assert spec.goodput == {"ttft": 500.0, "tpot": 50.0}
    # The original forms are unchanged: one body, streamed only when asked.
    w, spec = cli.build(cli.parse_args(["http://127.0.0.1:9", "--openai-completion", "m", "--max-tokens", "8"]))
    assert orjson.loads(w.body) == {"model": "m", "prompt": "Hello", "max_tokens": 8, "stream": False}
    assert w.bodies is None and spec.concurrency == 1
    w, _ = cli.build(cli.parse_args(["http://127.0.0.1:9/health", "-c", "2"]))
    assert (w.method, w.body, w.stream) == ("GET", None, False)
    for argv in (["--base-url", "http://10.0.0.1:9", "--model", "m"], ["--model", "m"],
                 ["http://127.0.0.1:9", "--base-url", "http://127.0.0.1:9", "--model", "m"],
                 ["--base-url", "http://127.0.0.1:9", "--model", "m", "--num-prompts", "0"]):
        with pytest.raises(ValueError):
            cli.build(cli.parse_args(argv))
    w, _ = cli.build(cli.parse_args(["--base-url", "http://10.0.0.1:9", "--allow-remote", "--model", "m"]))
    assert w.allow_remote and w.url == "http://10.0.0.1:9/v1/completions"
    assert cli.main(["--base-url", "http://127.0.0.1:9", "--model", "m", "--dataset",
                     str(tmp_path / "missing.jsonl")]) == 2


# -- open-loop arrival times ----------------------------------------------------------------------

def test_arrival_offsets_are_seeded_and_shaped():
    rng = random.Random(ARRIVAL_SEED)  # Poisson: the pattern the client has always offered
    expected, at = [], 0.0
    for _ in range(5):
        at += rng.expovariate(20.0)
        expected.append(at)
    offsets = arrival_offsets(20.0)
    assert [next(offsets) for _ in range(5)] == expected

    def gaps(burstiness, n=20_000):
        times = arrival_offsets(50.0, burstiness, seed=1)
        points = [next(times) for _ in range(n)]
        return [b - a for a, b in zip([0.0, *points[:-1]], points, strict=True)]

    for burstiness in (1.0, 0.25, 4.0):  # the mean gap is 1 / rate whatever the shape
        assert sum(gaps(burstiness)) / 20_000 == pytest.approx(1 / 50.0, rel=0.05)

    def cv(values):
        mean = sum(values) / len(values)
        return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) / mean

    # Gamma of shape k has a coefficient of variation 1 / sqrt(k): 1 for Poisson.
    assert cv(gaps(1.0)) == pytest.approx(1.0, rel=0.05)
    assert cv(gaps(0.25)) == pytest.approx(2.0, rel=0.1)
    assert cv(gaps(4.0)) == pytest.approx(0.5, rel=0.05)


# -- against small servers -----------------------------------------------------------

JSON = b'{"ok":true}'
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(JSON), JSON)


def sse_head():
    return b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def framed(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def serve(behaviour, stream):
    """Answer each request head on ``stream`` as ``behaviour`` says."""
    buffer = b""
    try:
        while True:
            while b"\r\n\r\n" not in buffer:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buffer) < length:
                buffer += await stream.receive_some(65536)
            buffer = buffer[length:]
            if not await behaviour(stream):
                return
    finally:
        await stream.aclose()


async def ok(stream):
    await stream.send_all(OK)
    return True


async def close_after(stream):  # says so
    await stream.send_all(OK.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1))
    return False


async def silent_close(stream):  # keep-alive answer, then the connection is closed anyway
    await stream.send_all(OK)
    return False


async def error_500(stream):
    await stream.send_all(b"HTTP/1.1 500 Oops\r\ncontent-length: 0\r\n\r\n")
    return True


async def garbage(stream):
    await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
    return False


async def hang(stream):
    await trio.sleep_forever()


async def truncate(stream):
    await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort")
    return False


TOKENS = 8


async def sse(stream):
    await stream.send_all(sse_head() + framed(b"data: " + chunk(delta={"role": "assistant", "content": ""}) + b"\n\n"))
    for _ in range(TOKENS):
        await trio.sleep(0.004)
        await stream.send_all(framed(b"data: " + chunk(delta={"content": " w"}) + b"\n\n"))
    await stream.send_all(framed(b"data: " + chunk(delta={}, finish_reason="length") + b"\n\ndata: [DONE]\n\n")
                          + b"0\r\n\r\n")
    return True


async def sse_error(stream):
    await stream.send_all(sse_head() + framed(b'data: {"error":{"message":"boom"}}\n\n') + b"0\r\n\r\n")
    return True


async def run_against(behaviour, workload_kwargs=None, **spec):
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), partial(serve, behaviour), 0)
        port = listeners[0].socket.getsockname()[1]
        spec = {"concurrency": 2, "duration": 0.3, "warmup": 0.05, "timeout": 2.0, **spec}
        report = await load(Workload(f"http://127.0.0.1:{port}/x", **(workload_kwargs or {})), LoadSpec(**spec))
        nursery.cancel_scope.cancel()
    format_table(report)  # renders whatever the report holds
    return report


def run(behaviour, workload_kwargs=None, **spec):
    return trio.run(lambda: run_against(behaviour, workload_kwargs, **spec))


def test_closed_loop_keep_alive():
    r = run(ok)
    assert r["errors"] == {} and r["requests"] > 50
    assert r["latency_ms"]["p50"] <= r["latency_ms"]["p99"] <= r["latency_ms"]["max"]
    assert "ttft_ms" not in r and r["tokens"] == 0
    assert r["bytes_received"] >= r["requests"] * len(OK)
    assert r["duration_s"] == pytest.approx(0.3, abs=0.05)


@pytest.mark.parametrize("behaviour", [close_after, silent_close])
def test_reconnects_when_the_server_closes(behaviour):
    r = run(behaviour)
    assert r["errors"] == {} and r["requests"] > 20


@pytest.mark.parametrize("behaviour, kind", [
    (error_500, "status_500"), (garbage, "protocol"), (truncate, "closed"),
])
def test_error_kinds(behaviour, kind):
    r = run(behaviour)
    assert r["requests"] == 0 and list(r["errors"]) == [kind] and r["errors"][kind] > 10


def test_timeout():
    r = run(hang, timeout=0.05, duration=0.2)
    assert r["requests"] == 0 and r["errors"]["timeout"] >= 4


def test_connect_refused():
    port = free_port()  # a port nobody listens on
    r = run_load(Workload(f"http://127.0.0.1:{port}/"), LoadSpec(concurrency=1, duration=0.1, warmup=0))
    assert r["requests"] == 0 and r["errors"]["connect"] >= 1


def test_max_requests_is_exact():
    r = run(ok, max_requests=37, duration=5)
    assert r["sent"] == 37
    assert r["requests"] >= 37 - 3 - 2  # the warmup's tenth, and what ended inside it
    assert r["duration_s"] < 5


def test_stream_tokens_ttft_itl():
    r = run(sse, {"stream": True}, duration=0.4)
    assert r["errors"] == {} and r["requests"] >= 4
    assert r["tokens"] == TOKENS * r["requests"]
    assert r["ttft_ms"]["p50"] < r["latency_ms"]["p50"]
    assert r["ttft_ms"]["max"] <= r["latency_ms"]["max"]
    assert 3.5 <= r["itl_ms"]["p50"] < 30


@pytest.mark.parametrize("behaviour, kind", [(sse_error, "stream_error"), (ok, "not_sse")])
def test_stream_errors(behaviour, kind):
    r = run(behaviour, {"stream": True})
    assert r["requests"] == 0 and list(r["errors"]) == [kind]


def test_open_loop_rate():
    r = run(ok, concurrency=None, rate=400.0, duration=0.5, warmup=0.1)
    assert r["errors"] == {}
    assert 120 <= r["requests"] <= 330  # Poisson: 200 expected
    assert r["in_flight_at_end"] <= 5


def test_open_loop_drops_past_the_cap(monkeypatch):
    from . import client

    monkeypatch.setattr(client, "IN_FLIGHT_CAP", 3)
    r = run(hang, concurrency=None, rate=200.0, duration=0.3, warmup=0)
    assert r["errors"]["dropped"] > 20 and r["in_flight_at_end"] == 3


def test_goodput_in_a_run():
    r = run(sse, {"stream": True}, duration=0.3, goodput={"ttft": 10_000.0, "tpot": 10_000.0})
    assert r["requests"] >= 2 and r["goodput"]["requests"] == r["requests"]
    assert r["goodput"]["requests_per_s"] == r["requests_per_s"]
    assert r["tpot_ms"]["p50"] > 0 and r["tpot_ms"]["max"] <= r["latency_ms"]["max"]
    r = run(sse, {"stream": True}, duration=0.3, goodput={"ttft": 10_000.0, "tpot": 0.001})
    assert r["requests"] >= 2 and r["goodput"] == {"slo_ms": {"ttft": 10_000.0, "tpot": 0.001},
                                                   "requests": 0, "requests_per_s": 0.0}
    assert "goodput" not in run(ok)


SLOW_TOKENS = 40


async def slow_sse(stream):  # 40 tokens 50 ms apart: no answer ends inside a 0.5 s window
    await stream.send_all(sse_head())
    for _ in range(SLOW_TOKENS):
        await stream.send_all(framed(b"data: " + chunk(delta={"content": " w"}) + b"\n\n"))
        await trio.sleep(0.05)
    await stream.send_all(framed(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    return True


def test_throughput_by_arrival_time_counts_unfinished_requests():
    r = run(slow_sse, {"stream": True}, concurrency=2, duration=0.5, warmup=0.1)
    assert r["requests"] == 0 and r["completed_tokens_per_s"] == 0.0 and r["in_flight_at_end"] == 2
    # Two streams of 20 tokens/s: ~40 tokens/s arrive in the window (at most 2 x 11 in 0.5 s).
    assert 10 <= r["tokens_per_s"] <= 2 * 11 / 0.5


def test_each_body_in_turn():
    seen = []

    async def record(stream):
        buffer = b""
        while b"}" not in buffer:
            buffer += await stream.receive_some(65536)
        seen.append(orjson.loads(buffer.split(b"\r\n\r\n", 1)[1]))
        await stream.send_all(OK)
        await stream.aclose()

    async def main():
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), record, 0)
            port = listeners[0].socket.getsockname()[1]
            samples = synthetic(3, Lengths(2, 6), Lengths(1, 9), seed=2)
            workload = Workload.openai(f"http://127.0.0.1:{port}", "m", samples, stream=False)
            report = await load(workload, LoadSpec(concurrency=1, max_requests=7, duration=5, warmup=0))
            nursery.cancel_scope.cancel()
        return samples, report

    samples, report = trio.run(main)
    assert report["requests"] == 7 and report["workload"]["bodies"] == 3
    assert [(b["prompt"], b["max_tokens"]) for b in seen] == [(s.prompt, s.output_tokens) for s in samples * 3][:7]


def test_open_loop_sends_on_schedule_without_waiting_for_answers():
    arrived = []

    async def note_and_hang(stream):
        arrived.append(trio.current_time())
        await trio.sleep_forever()

    async def main():
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"),
                                            partial(serve, note_and_hang), 0)
            port = listeners[0].socket.getsockname()[1]
            before = trio.current_time()
            report = await load(Workload(f"http://127.0.0.1:{port}/x"),
                                LoadSpec(rate=40.0, duration=0.5, warmup=0.0, timeout=5.0))
            nursery.cancel_scope.cancel()
        return before, report

    before, report = trio.run(main)
    schedule = []
    for offset in arrival_offsets(40.0):
        if offset >= 0.5:
            break
        schedule.append(offset)
    # Arrivals were sent while none had been answered (a closed loop would have sent one), none
    # before its time and (generously: the machine is shared) not far after it; a stall near the
    # window's end may cut the last ones.
    assert len(schedule) // 2 <= len(arrived) <= len(schedule) and len(schedule) >= 10
    assert report["in_flight_at_end"] == report["sent"] >= len(arrived)
    for due, came in zip(schedule, sorted(arrived), strict=False):
        assert before + due - 0.001 <= came <= before + due + 0.5


# -- the installable distribution ------------------------------------------------------------------

HERE = Path(__file__).resolve().parent


def test_builds_as_runnel_loadgen_without_runnel(tmp_path):
    """``pip install ./benchmarks/loadgen`` gives ``runnel_loadgen`` and the ``runnel-loadgen`` command,
    which import nothing of runnel's. Built from a copy (a build leaves build/ behind)."""
    source = tmp_path / "source"
    source.mkdir()
    for path in HERE.iterdir():
        if path.suffix in (".py", ".toml", ".md"):
            (source / path.name).write_bytes(path.read_bytes())
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("runnel_loadgen-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "runnel-loadgen = runnel_loadgen.__main__:main" in archive.read(entry_points).decode()
        archive.extractall(site)
    assert {"runnel_loadgen/client.py", "runnel_loadgen/__main__.py", "runnel_loadgen/dataset.py"} <= set(names)
    check = ("import sys, runnel_loadgen, runnel_loadgen.__main__, runnel_loadgen.ceiling; "
             "assert not [m for m in sys.modules if m.split('.')[0] in ('runnel', 'benchmarks')], sys.modules; "
             "print(runnel_loadgen.Workload.__module__)")
    done = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env={"PYTHONPATH": str(site)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "runnel_loadgen.client", done.stderr[-2000:]
    helped = subprocess.run([sys.executable, "-m", "runnel_loadgen", "--help"], cwd=tmp_path,
                            env={"PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--base-url" in helped.stdout and "--goodput" in helped.stdout


# -- end to end: a real runnel server with builtin:tiny ----------------------------------------

def test_against_runnel_with_builtin_tiny(tiny_server):
    base = f"http://127.0.0.1:{tiny_server.port}"
    samples = synthetic(6, Lengths(4, 12), Lengths(6, 6), seed=1)
    workload = Workload.openai(base, "tiny", samples, ignore_eos=True, temperature=0)
    spec = LoadSpec(concurrency=2, duration=20.0, warmup=0.0, max_requests=10, timeout=20.0,
                    goodput={"ttft": 60_000.0, "tpot": 60_000.0})
    r = run_load(workload, spec)
    assert r["errors"] == {} and r["requests"] == 10 and r["sent"] == 10
    assert r["tokens"] == 6 * 10  # runnel's usage: ignore_eos makes exactly max_tokens
    assert r["input_tokens"] >= sum(len(s.prompt.split()) for s in samples)  # a word is a token or more
    assert r["token_events"] <= r["tokens"]  # several tokens may share an event
    assert r["goodput"]["requests"] == 10
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "latency_ms"):
        assert r[key]["p50"] is not None and r[key]["p50"] >= 0
    assert r["ttft_ms"]["max"] <= r["latency_ms"]["max"]
    # Every token arrived inside the window here (no warmup; the run ends with the last answer).
    assert r["tokens_per_s"] == pytest.approx(r["completed_tokens_per_s"], rel=0.01)
    chat = Workload.openai(base, "tiny", samples[:2], chat=True, ignore_eos=True)
    r = run_load(chat, LoadSpec(rate=20.0, duration=20.0, warmup=0.0, max_requests=4, timeout=20.0))
    assert r["errors"] == {} and r["requests"] == 4 and r["tokens"] == 24 and r["mode"] == "open"
