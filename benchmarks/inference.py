"""Tokens/s through runnel's HTTP stream against CTranslate2 in-process (the ceiling), and what
the event loop thread spends per token.

    .venv/bin/python benchmarks/inference.py [--model tiny|small|medium|MODEL] [--tokens 128]
                                             [--seconds 8] [--clients 1,16,64] [--repeat 1]

Both sides run the same model with the same settings: greedy decoding, ignore_eos so every
request makes exactly --tokens tokens, inter_threads=2 and intra_threads=1, on the same core
(core 0 when taskset exists; the client runs on core 1). For N clients the ceiling is one
generate_batch of N prompts after another (in a process of its own, with the cheapest step
callback), the best runnel's batching can do; runnel runs with max_batch_size = the most
clients asked for.

Besides tokens/s, each point reads the server's main thread (the event loop's) from /proc over
the window: its CPU time (schedstat), its write syscalls (io: syscw, one per chunk written to a
socket) and its voluntary context switches (status: each is the loop going to sleep in epoll, so
about one per wake-up). From those: **token events per loop-thread CPU second** (SSE chunks
carrying text, as the client counts them), tokens per loop CPU second, microseconds of loop CPU
per token, and tokens per wake-up; and **by CPU**, in-process CPU per token over the server's
(all its threads), the ratio a core of its own would give. ``small`` and ``medium`` are the ~120M and ~400M random
Llama-style models of benchmarks/models.py (built once, cached, int8 on both sides); any other
value is a ``model`` setting runnel takes. Every loop is bounded by --seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmarks.models

from benchmarks.models import CHOICES, model_spec  # noqa: E402

PROMPT = "The cat sees a red ball"
TASKSET = shutil.which("taskset") is not None and (os.cpu_count() or 1) > 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def on_server_core() -> None:
    if TASKSET:
        os.sched_setaffinity(0, {0})


def in_process(model_dir: str, clients: int, tokens: int, seconds: float, compute_type: str | None) -> dict:
    """The ceiling on the server's core, in a process of its own (this script, --ceiling):
    tokens/s and CPU us per token (the process's, over the measured window)."""
    command = [sys.executable, __file__, "--ceiling", model_dir, "--clients", str(clients), "--tokens", str(tokens),
               "--seconds", str(seconds), *(["--compute-type", compute_type] if compute_type else [])]
    done = subprocess.run(command, preexec_fn=on_server_core, capture_output=True, text=True, check=True,
                          timeout=seconds + 120)
    return json.loads(done.stdout.strip().splitlines()[-1])


def ceiling(model_dir: str, clients: int, tokens: int, seconds: float, compute_type: str | None) -> dict:
    """One generate_batch of ``clients`` prompts after another, with the cheapest step callback."""
    import ctranslate2
    from runnel_ctranslate2.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    start_tokens = [tokenizer.id_to_token(i) for i in tokenizer.encode(PROMPT, add_bos=True)]
    generator = ctranslate2.Generator(model_dir, device="cpu", inter_threads=2, intra_threads=1,
                                      compute_type=compute_type or "default")
    options = dict(max_length=tokens, min_length=tokens, sampling_topk=1, include_prompt_in_result=False,
                   end_token=[], callback=lambda step: False)
    generator.generate_batch([start_tokens] * clients, **options)  # warm-up
    made, cpu, start = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - start < seconds:
        results = generator.generate_batch([start_tokens] * clients, **options)
        made += sum(len(result.sequences_ids[0]) for result in results)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    del generator  # before exit: a generator that ran Python callbacks can abort at exit
    return {"tokens_per_s": made / elapsed, "cpu_us_per_token": cpu / made * 1e6}


class LoopThread:
    """The server's main thread (its event loop), read from /proc: CPU ns, write syscalls, sleeps;
    and the CPU ns of all of the server's threads."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.task = f"/proc/{pid}/task/{pid}"

    def read(self) -> tuple[int, int, int, int]:
        with open(f"{self.task}/schedstat") as f:
            cpu_ns = int(f.read().split()[0])
        with open(f"{self.task}/io") as f:
            writes = int(next(line for line in f if line.startswith("syscw:")).split()[1])
        with open(f"{self.task}/status") as f:
            sleeps = int(next(line for line in f if line.startswith("voluntary_ctxt_switches:")).split()[1])
        process_ns = 0
        for task in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{task}/schedstat") as f:
                    process_ns += int(f.read().split()[0])
            except OSError:  # a thread that ended meanwhile
                pass
        return cpu_ns, writes, sleeps, process_ns


async def stream_once(port: int, tokens: int) -> tuple[int, int]:
    """One streamed completion: (tokens by its usage, events that carried text)."""
    body = json.dumps({"model": "bench", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
                 b"connection: close\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))
    data = await asyncio.wait_for(reader.read(), 120)
    writer.close()
    usage = data.rfind(b'"completion_tokens":')
    if b"HTTP/1.1 200" not in data[:20] or usage == -1:
        raise RuntimeError(f"bad response: {data[:300]!r}")
    # Every event but the finish chunk, the usage chunk and [DONE] carries text.
    return int(data[usage + 20 : data.index(b",", usage)]), data.count(b"data: ") - 3


async def through_http(port: int, clients: int, tokens: int, seconds: float, loop_thread: LoopThread) -> dict:
    await stream_once(port, 4)  # warm-up
    made = events = 0
    deadline = time.perf_counter() + seconds

    async def client():
        nonlocal made, events
        while time.perf_counter() < deadline:
            count, carried = await stream_once(port, tokens)
            made += count
            events += carried

    before = loop_thread.read()
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    after = loop_thread.read()
    cpu_ns, writes, sleeps, process_ns = (end - begin for end, begin in zip(after, before, strict=True))
    loop_cpu = cpu_ns / 1e9
    return {"tokens_per_s": made / elapsed, "events_per_token": events / max(made, 1),
            "loop_cpu": loop_cpu / elapsed,  # cores
            "events_per_loop_cpu_s": events / max(loop_cpu, 1e-9), "tokens_per_loop_cpu_s": made / max(loop_cpu, 1e-9),
            "loop_us_per_token": loop_cpu / max(made, 1) * 1e6, "writes_per_token": writes / max(made, 1),
            "tokens_per_wakeup": made / max(sleeps, 1), "cpu_us_per_token": process_ns / 1e3 / max(made, 1)}


def start_server(model: str, port: int, config_dir: str, compute_type: str | None, batch: int) -> subprocess.Popen:
    config = os.path.join(config_dir, "bench.toml")
    with open(config, "w") as f:
        compute = f'compute_type = "{compute_type}"\n' if compute_type else ""
        f.write(f'[server]\nport = {port}\nlog_level = "warning"\n\n[apps.bench]\nbackend = "ctranslate2"\n'
                f'model = "{model}"\nserved_model_name = "bench"\ndevice = "cpu"\n'
                f"inter_threads = 2\nintra_threads = 1\nmax_batch_size = {batch}\nbatch_window_ms = 2\n{compute}")
    server = subprocess.Popen([sys.executable, "-m", "runnel", "serve", "--config", config],
                              preexec_fn=on_server_core)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                if b" 200 " in sock.recv(100):
                    return server
        except OSError:
            pass
        time.sleep(0.1)
    server.kill()
    raise RuntimeError("server did not become ready")


def run_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # a lighter client: more of core 1 left before it becomes the limit
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny", help=f"{' | '.join(CHOICES)}, or a runnel model setting")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", default="1,16", help="comma-separated concurrency levels")
    parser.add_argument("--repeat", type=int, default=1, help="passes; each point reports the median and spread")
    parser.add_argument("--ceiling", metavar="MODEL_DIR", help=argparse.SUPPRESS)  # the in-process child
    parser.add_argument("--compute-type", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ceiling:
        print(json.dumps(ceiling(args.ceiling, int(args.clients), args.tokens, args.seconds, args.compute_type)))
        return
    from runnel_ctranslate2.apps import model_directory

    levels = [int(level) for level in args.clients.split(",")]
    model, compute_type = model_spec(args.model) if args.model in CHOICES else (args.model, None)
    model_dir = model_directory(model)
    if TASKSET:
        os.sched_setaffinity(0, {1})
    runs: dict[int, list[tuple[dict, dict]]] = {clients: [] for clients in levels}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            port = free_port()
            server = start_server(model, port, tmp, compute_type, max(levels))
            try:
                loop = run_loop()
                for clients in levels:
                    served = loop.run_until_complete(
                        through_http(port, clients, args.tokens, args.seconds, LoopThread(server.pid)))
                    best = in_process(model_dir, clients, args.tokens, args.seconds, compute_type)
                    runs[clients].append((served, best))
                    print(f"  c={clients}: runnel {served['tokens_per_s']:.0f} tok/s, in-process "
                          f"{best['tokens_per_s']:.0f}", flush=True)
                loop.close()
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(30)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"model {args.model}, {args.tokens} tokens per request, greedy, CPU 2x1 threads, server and in-process "
          f"on one core; {args.repeat} pass(es), median [min-max]; load average {load}")
    print(f"{'clients':>7} {'runnel tok/s':>22} {'in-process tok/s':>22} {'ratio':>18} {'by CPU':>6} "
          f"{'loop cores':>10} {'events/loop-CPU-s':>18} {'tok/loop-CPU-s':>15} {'loop us/tok':>11} "
          f"{'writes/tok':>10} {'tok/wake':>8}")

    def spread(values: list[float], fmt: str) -> str:
        middle = statistics.median(values)
        return f"{middle:{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]" if len(values) > 1 else f"{middle:{fmt}}"

    for clients in levels:
        points = runs[clients]
        served = [point["tokens_per_s"] for point, _ in points]
        ratios = [point["tokens_per_s"] / best["tokens_per_s"] for point, best in points]
        # CPU per token, in-process over runnel (all its threads): the ratio a core of its own would
        # give, less sensitive than tokens/s to what else runs on the machine.
        by_cpu = statistics.median(best["cpu_us_per_token"] / point["cpu_us_per_token"] for point, best in points)

        median = {key: statistics.median(point[key] for point, _ in points) for key in points[0][0]}
        ceilings = [best["tokens_per_s"] for _, best in points]
        print(f"{clients:>7} {spread(served, '.0f'):>22} {spread(ceilings, '.0f'):>22} {spread(ratios, '.2f'):>18} "
              f"{by_cpu:>6.2f} {median['loop_cpu']:>10.2f} {median['events_per_loop_cpu_s']:>18.0f} "
              f"{median['tokens_per_loop_cpu_s']:>15.0f} {median['loop_us_per_token']:>11.1f} "
              f"{median['writes_per_token']:>10.2f} {median['tokens_per_wakeup']:>8.2f}")


if __name__ == "__main__":
    main()
