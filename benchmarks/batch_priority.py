"""The Batch API against live traffic, on the built-in model (builtin:tiny).

    .venv/bin/python benchmarks/batch_priority.py [--quick] [--lines N] [--clients N] [--out FILE]

One ``runnel serve`` subprocess (this checkout's) with ``tiny`` and ``batch_concurrency = 2``:

  live alone       --clients closed-loop clients, each sending streamed chat requests one
                   after another: TTFT (time to the first token's event) p50 / p99
  live + batch     the same, while a batch runs (10 x --lines lines: it runs all along, and is
                   cancelled after): TTFT p50 / p99, and the batch's lines/s meanwhile
  live + as live   the same, while 2 more clients send the batch's lines as live requests
                   (the same extra work, without the batch's lower priority)
  live alone again the first phase again (the machine may have changed meanwhile)
  batch alone      a batch of --lines lines, from create to completed: lines/s
  as live, c=2     the same lines sent as live requests by 2 clients (what batch_concurrency
                   allows a batch): lines/s
  as live, c=8     and by 8 clients (what a client that does not wait for its turn gets)

Each phase is bounded (by count, and by --seconds). Loopback only; not a pass/fail test.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
from openai import OpenAI

from runnel.testing import ServeProcess, wait_until

PROMPTS = ["Tell me a story.", "What is a dog?", "How are you today?", "What is the weather like?"]


def chat_body(n: int) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": PROMPTS[n % len(PROMPTS)]}],
            "max_tokens": 32, "temperature": 0}


def ttft(client: OpenAI, n: int) -> float:
    """Seconds from sending a streamed chat request to its first chunk carrying a token."""
    started = time.perf_counter()
    first = None
    body = chat_body(n)
    for chunk in client.chat.completions.create(model=body["model"], messages=body["messages"],
                                                max_tokens=body["max_tokens"], temperature=0, stream=True):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
    return first if first is not None else time.perf_counter() - started


def live_load(client: OpenAI, clients: int, seconds: float) -> list[float]:
    times: list[float] = []
    deadline = time.monotonic() + seconds

    def one_client(index: int) -> None:
        n = index
        while time.monotonic() < deadline:
            times.append(ttft(client, n))
            n += clients

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one_client, range(clients)))
    return times


def percentiles(times: list[float]) -> str:
    if len(times) < 2:
        return "n/a"
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"{statistics.median(ordered) * 1000:.0f} ms / {p99 * 1000:.0f} ms ({len(ordered)} requests)"


def batch_input(lines: int) -> bytes:
    return b"".join(orjson.dumps({"custom_id": f"r{n}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": chat_body(n)}) + b"\n" for n in range(lines))


def start_batch(client: OpenAI, lines: int) -> str:
    uploaded = client.files.create(file=("bench.jsonl", io.BytesIO(batch_input(lines))), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                 completion_window="24h").id


def as_live(client: OpenAI, lines: int, clients: int, seconds: float) -> float:
    """Lines/s for ``lines`` chat requests sent by ``clients`` closed-loop clients."""
    counter = iter(range(lines))
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    done = [0]

    def one_client(_: int) -> None:
        while time.monotonic() < deadline:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            body = chat_body(n)
            client.chat.completions.create(model=body["model"], messages=body["messages"],
                                           max_tokens=body["max_tokens"], temperature=0)
            with lock:
                done[0] += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one_client, range(clients)))
    return done[0] / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer lines, shorter phases")
    parser.add_argument("--lines", type=int, default=None, help="lines per batch (default 300; quick 100)")
    parser.add_argument("--clients", type=int, default=4, help="live clients in the TTFT phases")
    parser.add_argument("--seconds", type=float, default=None, help="longest phase (default 60; quick 20)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    lines = args.lines or (100 if args.quick else 300)
    seconds = args.seconds or (20.0 if args.quick else 60.0)
    report: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        report.append(text)

    with tempfile.TemporaryDirectory(prefix="runnel-batch-bench-") as scratch:
        directory = Path(scratch)
        config = directory / "runnel.toml"
        config.write_text(textwrap.dedent(f"""
            [server]
            runs_path = "{directory / 'runs.sqlite3'}"
            batch_concurrency = 2
            access_log = false

            [apps.tiny]
            backend = "ctranslate2"
            model = "builtin:tiny"
        """))
        server = ServeProcess(directory, config, "server")
        try:
            wait_until(server.ready, timeout=120)
            client = OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)
            live_load(client, args.clients, 3.0)  # warm up
            say(f"# batch_priority: {lines} lines a batch, {args.clients} live clients, tiny, batch_concurrency 2")

            say(f"live alone        TTFT p50 / p99: {percentiles(live_load(client, args.clients, 10.0))}")

            # A batch larger than the window can finish, so it runs all along; cancelled after.
            batch_id = start_batch(client, lines * 10)
            wait_until(lambda: client.batches.retrieve(batch_id).status == "in_progress", timeout=30)
            before = client.batches.retrieve(batch_id).request_counts.completed
            started = time.perf_counter()
            times = live_load(client, args.clients, 10.0)
            during = client.batches.retrieve(batch_id)
            done = during.request_counts.completed - before
            say(f"live + batch      TTFT p50 / p99: {percentiles(times)}; batch meanwhile: {done} lines, "
                f"{done / (time.perf_counter() - started):.1f} lines/s (status {during.status})")
            if during.status == "in_progress":
                client.batches.cancel(batch_id)
            wait_until(lambda: client.batches.retrieve(batch_id).status in ("cancelled", "completed"), timeout=60)
            with ThreadPoolExecutor(1) as pool:  # the same extra work, sent as live requests (no priority)
                rival = pool.submit(as_live, client, lines * 10, 2, 10.0)
                times = live_load(client, args.clients, 10.0)
                say(f"live + as live    TTFT p50 / p99: {percentiles(times)}; the 2 extra clients: "
                    f"{rival.result():.1f} lines/s")
            say(f"live alone again  TTFT p50 / p99: {percentiles(live_load(client, args.clients, 10.0))}")

            started = time.perf_counter()
            batch_id = start_batch(client, lines)
            batch = wait_until(lambda: (b := client.batches.retrieve(batch_id)).status in (
                "completed", "failed") and b, timeout=seconds * 3, interval=0.05)
            elapsed = time.perf_counter() - started
            say(f"batch alone       {batch.request_counts.completed / elapsed:.1f} lines/s "
                f"({batch.request_counts.completed} lines in {elapsed:.1f} s, status {batch.status})")
            for clients in (2, 8):
                say(f"as live, c={clients}      {as_live(client, lines, clients, seconds):.1f} lines/s")
        finally:
            server.kill()
    if args.out is not None:
        args.out.write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    sys.exit(main())
