"""Tokens/s through runnel's HTTP stream against CTranslate2 in-process (the ceiling).

    .venv/bin/python benchmarks/inference.py [--model tiny|small|medium|MODEL] [--tokens 128] [--seconds 10]

Both sides run the same model with the same settings: greedy decoding,
ignore_eos so every request makes exactly --tokens tokens, inter_threads=2 and
intra_threads=1 (this machine has 2 cores). For 1 client the ceiling is one
generate_batch of one prompt after another; for 16 clients it is one
generate_batch of all 16 prompts, which is the best runnel's batching can do.
The server runs in its own process (pinned to core 0 when taskset exists), the
client here (pinned to core 1). Every loop is bounded by --seconds. ``small`` and ``medium``
are the ~120M and ~400M random Llama-style models of benchmarks/models.py (built once,
cached, int8 on both sides); any other value is a ``model`` setting runnel takes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks.models

from benchmarks.models import CHOICES, model_spec  # noqa: E402

PROMPT = "The cat sees a red ball"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def in_process(model_dir: str, clients: int, tokens: int, seconds: float, compute_type: str | None) -> float:
    import ctranslate2

    from runnel_ctranslate2.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    start_tokens = [tokenizer.id_to_token(i) for i in tokenizer.encode(PROMPT, add_bos=True)]
    generator = ctranslate2.Generator(model_dir, device="cpu", inter_threads=2, intra_threads=1,
                                      compute_type=compute_type or "default")
    options = dict(max_length=tokens, min_length=tokens, sampling_topk=1, include_prompt_in_result=False,
                   end_token=[])
    # The server streams through a callback; so does the ceiling, with the cheapest one.
    options["callback"] = lambda step: False
    generator.generate_batch([start_tokens], max_length=4)  # warm-up
    made, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        results = generator.generate_batch([start_tokens] * clients, **options)
        made += sum(len(result.sequences_ids[0]) for result in results)
    elapsed = time.perf_counter() - start
    del generator
    return made / elapsed


async def stream_once(port: int, tokens: int) -> int:
    body = json.dumps({"model": "bench", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
                 b"connection: close\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))
    data = await reader.read()
    writer.close()
    usage = data.rfind(b'"completion_tokens":')
    if b"HTTP/1.1 200" not in data[:20] or usage == -1:
        raise RuntimeError(f"bad response: {data[:300]!r}")
    return int(data[usage + 20 : data.index(b",", usage)])


async def through_http(port: int, clients: int, tokens: int, seconds: float) -> float:
    await stream_once(port, 4)  # warm-up
    made = 0
    deadline = time.perf_counter() + seconds

    async def client():
        nonlocal made
        while time.perf_counter() < deadline:
            count = await stream_once(port, tokens)  # not `made += await ...`: that reads `made` before awaiting
            made += count

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return made / (time.perf_counter() - start)


def start_server(model: str, port: int, config_dir: str, compute_type: str | None) -> subprocess.Popen:
    config = os.path.join(config_dir, "bench.toml")
    with open(config, "w") as f:
        compute = f'compute_type = "{compute_type}"\n' if compute_type else ""
        f.write(f'[server]\nport = {port}\nlog_level = "warning"\n\n[apps.bench]\nbackend = "ctranslate2"\n'
                f'model = "{model}"\nserved_model_name = "bench"\ndevice = "cpu"\ninter_threads = 2\nintra_threads = 1\n'
                f"max_batch_size = 16\nbatch_window_ms = 2\n{compute}")
    command = [sys.executable, "-m", "runnel", "serve", "--config", config]
    if shutil.which("taskset"):
        command = ["taskset", "-c", "0", *command]
    server = subprocess.Popen(command)
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny", help=f"{' | '.join(CHOICES)}, or a runnel model setting")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    from runnel_ctranslate2.apps import model_directory

    model, compute_type = model_spec(args.model) if args.model in CHOICES else (args.model, None)
    model_dir = model_directory(model)
    if shutil.which("taskset"):
        os.sched_setaffinity(0, {1})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = start_server(model, port, tmp, compute_type)
        try:
            for clients in (1, 16):
                ceiling = in_process(model_dir, clients, args.tokens, args.seconds, compute_type)
                served = asyncio.run(through_http(port, clients, args.tokens, args.seconds))
                rows.append((clients, served, ceiling))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
    print(f"model {args.model}, {args.tokens} tokens per request, greedy, CPU 2x1 threads")
    print(f"{'clients':>8} {'runnel tok/s':>14} {'in-process tok/s':>18} {'ratio':>7}")
    for clients, served, ceiling in rows:
        print(f"{clients:>8} {served:>14.0f} {ceiling:>18.0f} {served / ceiling:>7.2f}")
    single = rows[0][1]
    print(f"16 clients vs single-stream aggregate: {rows[1][1] / single:.2f}x")


if __name__ == "__main__":
    main()
