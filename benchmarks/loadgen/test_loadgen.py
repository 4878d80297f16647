"""Tests of the load generator: the sans-IO parts exactly, the client against small
trio servers in the same process that misbehave on purpose.

    .venv/bin/python -m pytest benchmarks/loadgen -q
"""

from __future__ import annotations

import math
from functools import partial

import orjson
import pytest
import trio

from runnel.testing import free_port

from .client import LoadSpec, Workload, load, parse_url, run_load
from .report import format_table
from .sse import SSEParser, StreamTokens, count_tokens
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
])
def test_load_spec_bounds(kwargs):
    with pytest.raises(ValueError):
        LoadSpec(**kwargs)


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
    await stream.send_all(framed(b"data: " + chunk(delta={}, finish_reason="length") + b"\n\ndata: [DONE]\n\n") + b"0\r\n\r\n")
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
