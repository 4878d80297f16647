"""Streams at once: the llama.cpp app (one context, or a pool of two) next to the CTranslate2 app.

    .venv/bin/python plugins/runnel-llamacpp/scripts/measure_streams.py [--seconds 5] [--tokens 64]

Each server serves builtin:tiny (the same weights: CTranslate2 int8, llama.cpp the F32
GGUF written from them) in its own process on 2 threads in all; benchmarks.loadgen (its
own trio/h11 client) sends greedy completion streams with ignore_eos from 1, 4 and 16
closed-loop clients, and reports tokens/s, TTFT and ITL. Loopback only, bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SERVERS = {
    "ctranslate2 (int8, 2 inter x 1 intra)": 'backend = "ctranslate2"\ndevice = "cpu"\ninter_threads = 2\n'
                                              'intra_threads = 1\nmax_batch_size = 16\n',
    "llamacpp, 1 context x 2 threads": 'backend = "llamacpp"\nparallel = 1\nthreads = 2\n',
    "llamacpp, 2 contexts x 1 thread": 'backend = "llamacpp"\nparallel = 2\nthreads = 1\n',
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(table: str, port: int, directory: str) -> subprocess.Popen:
    config = Path(directory) / "measure.toml"
    config.write_text(f'[server]\nport = {port}\nlog_level = "warning"\n\n[apps.tiny]\nmodel = "builtin:tiny"\n'
                      f"{table}")
    server = subprocess.Popen([sys.executable, "-m", "runnel", "serve", "--config", str(config)])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                if b" 200 " in sock.recv(100):
                    return server
        except OSError:
            pass
        time.sleep(0.2)
    server.kill()
    raise RuntimeError("server did not become ready")


def load(port: int, clients: int, tokens: int, seconds: float, directory: str) -> dict:
    out = Path(directory) / "report.json"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.loadgen", f"http://127.0.0.1:{port}", "--openai-completion", "tiny",
         "--prompt", "The cat sees a red ball", "--max-tokens", str(tokens), "--ignore-eos", "--temperature", "0",
         "--stream", "-c", str(clients), "-d", str(seconds), "--warmup", "1", "--json", str(out), "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=seconds + 120, check=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    print(f"builtin:tiny, {args.tokens}-token greedy streams, {os.cpu_count()} cores, {args.seconds:.0f} s each")
    print(f"{'server':<40} {'streams':>7} {'tok/s':>8} {'TTFT p50 ms':>12} {'ITL p50 ms':>11} {'ITL p99 ms':>11}")
    with tempfile.TemporaryDirectory() as directory:
        for name, table in SERVERS.items():
            port = free_port()
            server = start(table, port, directory)
            try:
                for clients in (1, 4, 16):
                    report = load(port, clients, args.tokens, args.seconds, directory)
                    ttft, itl = report.get("ttft_ms") or {}, report.get("itl_ms") or {}
                    print(f"{name:<40} {clients:>7} {report['tokens_per_s']:>8.0f} {ttft.get('p50', 0):>12.1f} "
                          f"{itl.get('p50', 0):>11.2f} {itl.get('p99', 0):>11.2f}", flush=True)
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(30)


if __name__ == "__main__":
    main()
