"""runnel against its peers, side by side in one run, reported as ratios.

    python benchmarks/run.py [--quick] [--scenario http|inference|scale|all] [--model tiny|small|medium]
                             [--out benchmarks/results]

Scenarios (benchmarks/README.md says what each measures and shows the latest results):
  http       GET /v1/models (small JSON) and an SSE stream of N events written as fast as
             possible: runnel, a bare h11+uvloop loop, uvicorn (h11, httptools) with a raw
             ASGI app, Starlette and FastAPI, and granian when it is installed.
  inference  one CTranslate2 model (--model: builtin:tiny, or the ~120M / ~400M random
             Llama-style models of benchmarks/models.py, int8): runnel, a plain FastAPI +
             sse-starlette server, llama.cpp (runnel's app and llama-cpp-python's server, the
             same weights as GGUF) and CTranslate2 in-process (no HTTP) at 1, 4, 16 and 64
             streams. Reports inference.md for tiny, inference-MODEL.md for the others.
  scale      RSS and CPU per idle keep-alive connection and per open stream at 1000 of each.

Each server runs in its own process pinned to one core, the load client here on another;
servers are started one at a time, warmed up, loaded, and stopped (SIGTERM, then SIGKILL)
before the next. Everything is on 127.0.0.1, on ports the OS picks, and every loop is
bounded. The peers and the load client need benchmarks/.venv-peers (``make bench`` makes
it); when that exists this script re-runs itself with its Python.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "benchmarks" / "peers"
VENV = ROOT / "benchmarks" / ".venv-peers"
PY = sys.executable

QUICK = {"concurrency": (1, 16, 64), "duration": 1.0, "warmup": 0.3, "sse_events": 100,
         "streams": (1, 4, 16, 64), "stream_duration": 2.5, "tokens": 64, "connections": 1000, "settle": 1.0}
FULL = {"concurrency": (1, 4, 16, 64, 256), "duration": 5.0, "warmup": 1.0, "sse_events": 100,
        "streams": (1, 4, 16, 64), "stream_duration": 6.0, "tokens": 128, "connections": 1000, "settle": 3.0}

PROMPT = "The cat sees a red ball"
BATCH_WINDOW_MS = 2.0
RUNNEL_SERVER = """[server]
host = "127.0.0.1"
log_level = "warning"
keepalive_timeout = 600.0   # the scale scenario holds idle connections
shutdown_grace = 1.0
"""
SERVER_CORE = CLIENT_CORE = None
NOTES: list[str] = []  # what went wrong around the measurements of the current scenario


# -- processes ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _on_server_core() -> None:
    if SERVER_CORE is not None:
        os.sched_setaffinity(0, {SERVER_CORE})


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (granian serves from a child process)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], ()))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (all threads)
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += int(next(line for line in f if line.startswith("VmRSS:")).split()[1])
        except (OSError, StopIteration, ValueError):
            pass
    return total


def request(port: int, method: str, path: str, body: bytes = b"", timeout: float = 10.0) -> tuple[int, bytes]:
    """One request on a fresh connection (Connection: close); (status, raw body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"%s %s HTTP/1.1\r\nhost: bench\r\nconnection: close\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%b" % (method.encode(), path.encode(), len(body), body))
        data, deadline = b"", time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.1 (\d{3})", head)
    return (int(match.group(1)) if match else 0), rest


class Server:
    """A server process: started on a free port pinned to the server core, ready when
    ``ready`` answers 200, stopped with SIGTERM to its process group, SIGKILL after 10 s."""

    def __init__(self, name: str, command: list[str], ready: str = "/v1/models") -> None:
        self.name, self.command, self.ready = name, command, ready
        self.proc: subprocess.Popen | None = None
        self.pids: list[int] = []

    def __enter__(self) -> Server:
        self.port = free_port()
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([*self.command, "--port", str(self.port)], cwd=ROOT, start_new_session=True,
                                     preexec_fn=_on_server_core, stdout=subprocess.DEVNULL, stderr=self.stderr)
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready: "
                                       f"{self.stderr_tail()!r}")
                try:
                    if request(self.port, "GET", self.ready, timeout=2)[0] == 200:
                        time.sleep(0.2)  # granian's worker, uvicorn's lifespan: let the tree settle
                        self.pids = process_tree(self.proc.pid)
                        return self
                except OSError:
                    pass
                time.sleep(0.1)
            raise RuntimeError(f"{self.name} was not ready within 90 s")
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def stderr_tail(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-400:].decode(errors="replace").strip()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        except ProcessLookupError:
            pass
        if self.proc.returncode not in (0, -signal.SIGTERM):
            NOTES.append(f"{self.name} exited with status {self.proc.returncode} after SIGTERM: "
                         f"{self.stderr_tail()!r}")
            print(f"  {NOTES[-1]}", flush=True)


def runnel_command(tmp: str, name: str, apps: str) -> list[str]:
    config = Path(tmp) / f"runnel-{name}.toml"
    config.write_text(RUNNEL_SERVER + apps)
    return [PY, "-m", "runnel", "serve", "--config", str(config)]


def peer(script: str, *args: str) -> list[str]:
    return [PY, str(PEERS / script), *args]


def llama_cpp_server(gguf: str, alias: str, threads: int = 2) -> Server:
    """llama-cpp-python's own server on ``threads`` threads: what its users run. One context;
    ``--interrupt_requests False`` so a new request never cuts a running stream short."""
    return Server("llama-cpp-python server", [PY, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", alias,
                                              "--n_threads", str(threads), "--n_threads_batch", str(threads),
                                              "--interrupt_requests", "False"])


def without_eos(model_dir: str) -> dict:
    """Request fields that make llama-cpp-python's server run to max_tokens: it has no
    ignore_eos, so the end token is biased away instead (llama.cpp's logit_bias)."""
    from runnel_ctranslate2.tokenizer import load_tokenizer

    return {"logit_bias": {str(load_tokenizer(model_dir).eos_id): -100}}


def check_tokens(server: Server, body: dict, tokens: int) -> None:
    """One unstreamed completion must make exactly ``tokens`` tokens (by the server's usage):
    unstreamed, because llama-cpp-python's streams carry no usage."""
    status, raw = request(server.port, "POST", "/v1/completions", json.dumps({**body, "stream": False}).encode(),
                          timeout=120)
    usage = re.findall(rb'"completion_tokens": ?(\d+)', raw)
    if status != 200 or not usage or int(usage[-1]) != tokens:
        raise RuntimeError(f"{server.name}: a request did not make {tokens} tokens: {status} {raw[-300:]!r}")


def load(server: Server, workload, concurrency: int, duration: float, warmup: float) -> dict:
    """One closed-loop run, with the server's CPU use over it (all its threads and children)."""
    from benchmarks.loadgen import LoadSpec, run_load

    cpu, start = cpu_seconds(server.pids), time.perf_counter()
    result = run_load(workload, LoadSpec(concurrency=concurrency, duration=duration, warmup=warmup, timeout=30.0,
                                             max_requests=2_000_000))
    wall = time.perf_counter() - start
    result["concurrency"] = concurrency
    result["server_cpu"] = round((cpu_seconds(server.pids) - cpu) / wall, 3)  # cores busy, 1.0 = one core
    result["client_cpu"] = round(result["client_cpu_s"] / max(result["wall_s"], 1e-9), 3)
    return result


def run_points(server: Server, workload, levels, duration: float, warmup: float) -> list[dict]:
    load(server, workload, min(levels[-1], 16), max(warmup, 0.3), 0.0)  # warm the server up
    points = []
    for concurrency in levels:
        points.append(load(server, workload, concurrency, duration, warmup))
        point = points[-1]
        print(f"  {server.name:32} c={concurrency:<4} {point['requests_per_s']:>10.0f} req/s  "
              f"p50 {point['latency_ms']['p50'] or 0:8.2f} ms  server cpu {point['server_cpu']:.2f}  "
              f"client cpu {point['client_cpu']:.2f}  errors {sum(point['errors'].values())}", flush=True)
        if not point["requests"]:
            NOTES.append(f"{server.name} c={concurrency}: no answer ended in the {duration:g} s window "
                         f"({point['in_flight_at_end']} in flight at its end)")
    return points


def median_points(passes: list[list[dict]], key: str) -> list[dict]:
    """Per concurrency, the point of the pass with the median ``key``; ``runs`` keeps every
    pass's value, so the spread shows in the JSON and the tables."""
    merged = []
    for same in zip(*passes):
        ordered = sorted(same, key=lambda point: point[key])
        merged.append({**ordered[(len(ordered) - 1) // 2], "runs": [point[key] for point in same]})
    return merged


# -- scenario 1: HTTP core --------------------------------------------------------------------
def http_servers(tmp: str) -> tuple[list[Server], dict[str, str]]:
    runnel = runnel_command(tmp, "http", '[apps.echo]\nbackend = "echo"\npace_ms = 0\n')
    servers = [Server("runnel", runnel), Server("bare h11+uvloop", peer("bare_h11.py"))]
    for http in ("h11", "httptools"):
        servers += [Server(f"uvicorn({http}) raw ASGI", peer("raw_asgi.py", "--http", http)),
                    Server(f"uvicorn({http})+Starlette", peer("starlette_app.py", "--http", http)),
                    Server(f"uvicorn({http})+FastAPI", peer("fastapi_app.py", "--http", http))]
    skipped = {}
    if importlib.util.find_spec("granian"):
        servers += [Server("granian raw ASGI", peer("raw_asgi.py", "--server", "granian")),
                    Server("granian+FastAPI", peer("fastapi_app.py", "--server", "granian"))]
    else:
        skipped["granian"] = "not installed (pip install granian failed or was not run)"
    return servers, skipped


def scenario_http(settings: dict, tmp: str) -> dict:
    from benchmarks.loadgen import Workload

    events = settings["sse_events"]
    body = json.dumps({"prompt": "hello from runnel", "max_tokens": events, "stream": True}).encode()
    servers, skipped = http_servers(tmp)
    passes: dict[str, list[dict]] = {}
    for _ in range(settings["repeat"]):  # each pass starts every server in turn
        for server in servers:
            try:
                with server:
                    base = f"http://127.0.0.1:{server.port}"
                    passes.setdefault(server.name, []).append({
                        "json": run_points(server, Workload(f"{base}/v1/models"), settings["concurrency"],
                                           settings["duration"], settings["warmup"]),
                        "sse": run_points(server, Workload(f"{base}/echo/echo", method="POST", body=body,
                                                           stream=True),
                                          settings["concurrency"], settings["duration"], settings["warmup"]),
                    })
            except RuntimeError as error:
                skipped[server.name] = str(error)
                print(f"  {server.name}: skipped: {error}", flush=True)
    results = {name: {"json": median_points([run["json"] for run in runs], "requests_per_s"),
                      "sse": median_points([run["sse"] for run in runs], "tokens_per_s")}
               for name, runs in passes.items() if name not in skipped}
    for name, workloads in results.items():
        for workload, points in workloads.items():
            for point in points:  # every SSE answer must carry all its events (N tokens + the "done" event)
                expected = events + 1 if workload == "sse" else 0
                if point["errors"] or point["tokens"] != expected * point["requests"]:
                    NOTES.append(f"{name} {workload} c={point['concurrency']}: errors {point['errors']}, "
                                 f"{point['tokens']} events for {point['requests']} answers")
    return {"servers": results, "skipped": skipped, "sse_events": events,
            "targets": http_targets(results)}


def peak(points: list[dict], key: str = "requests_per_s") -> dict:
    return max(points, key=lambda point: point[key])


def efficiency(point: dict) -> float:
    """Requests per second of one core's worth of server CPU: what the server would do if the
    client were not the limit."""
    return point["requests_per_s"] / max(point["server_cpu"], 1e-9)


def ratio_target(name: str, ours: dict | None, theirs: dict | None, need: float, key: str) -> dict:
    a, b = (peak(ours, key) if ours else None), (peak(theirs, key) if theirs else None)
    if a is None or b is None or not b[key] or not a["server_cpu"] or not b["server_cpu"]:
        return {"name": name, "need": need, "ratio": None, "met": None, "note": "not measured"}
    ratio = a[key] / b[key]
    note = []
    if max(a["client_cpu"], b["client_cpu"]) > 0.9:
        note.append("client near 100% of its core: throughput ratios are compressed towards 1")
    return {"name": name, "need": need, "ours": a[key], "theirs": b[key], "ratio": round(ratio, 3),
            "met": ratio >= need, "margin": round(ratio / need - 1, 3),
            "cpu_ratio": round(efficiency(a) / efficiency(b), 3), "note": "; ".join(note)}


def http_targets(results: dict) -> list[dict]:
    def points(server: str, workload: str):
        return results.get(server, {}).get(workload)

    runnel = points("runnel", "json")
    return [
        ratio_target("small JSON: runnel / bare h11+uvloop", runnel, points("bare h11+uvloop", "json"), 0.9,
                     "requests_per_s"),
        ratio_target("small JSON: runnel / uvicorn(h11)+FastAPI", runnel, points("uvicorn(h11)+FastAPI", "json"),
                     2.5, "requests_per_s"),
        ratio_target("small JSON: runnel / uvicorn(httptools)+FastAPI", runnel,
                     points("uvicorn(httptools)+FastAPI", "json"), 1.0, "requests_per_s"),
        ratio_target("SSE events/s: runnel / uvicorn(httptools)+FastAPI+sse-starlette", points("runnel", "sse"),
                     points("uvicorn(httptools)+FastAPI", "sse"), 2.5, "tokens_per_s"),
    ]


# -- scenario 2: inference -----------------------------------------------------------------------
def scenario_inference(settings: dict, tmp: str) -> dict:
    from benchmarks.loadgen import Workload
    from benchmarks.models import gguf_path, model_spec
    from runnel_ctranslate2.apps import model_directory

    name = settings["model"]
    model, compute_type = model_spec(name)
    model_dir = model_directory(model)
    compute = ["--compute-type", compute_type] if compute_type else []
    tokens, levels = settings["tokens"], settings["streams"]
    duration, warmup = settings["stream_duration"], settings["warmup"]
    apps = (f'[apps.tiny]\nbackend = "ctranslate2"\nmodel = "{model}"\nserved_model_name = "tiny"\n'
            'device = "cpu"\ninter_threads = 2\nintra_threads = 1\n'
            f"max_batch_size = {max(levels)}\nbatch_window_ms = {BATCH_WINDOW_MS}\n"
            + (f'compute_type = "{compute_type}"\n' if compute_type else ""))
    skipped: dict[str, str] = {}
    # The llama.cpp app serves the same weights (builtin:tiny's GGUF, written from them) on the same
    # two threads: two contexts of one thread each. llama-cpp-python's own server is the peer its
    # users would otherwise run: one context on two threads, never interrupting a running stream.
    servers = [Server("runnel", runnel_command(tmp, "inference", apps), ready="/health"),
               Server("FastAPI+CTranslate2", peer("fastapi_ct2.py", "--model-dir", model_dir, *compute))]
    extra: dict[str, dict] = {}  # a server's request fields in place of ignore_eos and include_usage
    try:
        gguf = gguf_path(name)
        llama_apps = (f'[apps.tiny]\nbackend = "llamacpp"\nmodel = "{gguf}"\nserved_model_name = "tiny"\n'
                      "parallel = 2\nthreads = 1\n")
        servers.append(Server("runnel llama.cpp", runnel_command(tmp, "inference-llamacpp", llama_apps),
                              ready="/health"))
        servers.append(llama_cpp_server(gguf, "tiny"))
        extra["llama-cpp-python server"] = without_eos(model_dir)
    except ImportError as error:
        skipped["runnel llama.cpp"] = skipped["llama-cpp-python server"] = f"not installed: {error}"
    passes: dict[str, list[list[dict]]] = {}
    for _ in range(settings["repeat"]):  # each pass starts every server in turn
        for server in servers:
            try:
                with server:
                    fields = extra.get(server.name, {"ignore_eos": True})
                    check_tokens(server, {"model": "tiny", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
                                          **fields}, tokens)
                    # Streams ask for usage where the server reports it (not llama-cpp-python's: its
                    # extra fields replace these), so that an event carrying several tokens counts them all.
                    usage = {} if server.name in extra else {"stream_options": {"include_usage": True}}
                    workload = Workload.openai_completion(f"http://127.0.0.1:{server.port}", "tiny", PROMPT,
                                                          tokens, True, temperature=0, **fields, **usage)
                    points = run_points(server, workload, levels, duration, warmup)
            except RuntimeError as error:
                skipped[server.name] = str(error)
                print(f"  {server.name}: skipped: {error}", flush=True)
                continue
            for point in points:
                # tokens_per_s is the load client's: tokens counted when they arrive in the window (a
                # stream's usage chunk gives its count: a server may put several tokens in one event).
                point["token_events_per_s"] = round(point.get("token_events", 0) / point["duration_s"], 2)
                if point["errors"]:
                    NOTES.append(f"{server.name} c={point['concurrency']}: errors {point['errors']}")
            passes.setdefault(server.name, []).append(points)
        ceiling = []
        for clients in levels:
            command = peer("ct2_in_process.py", "--model-dir", model_dir, "--clients", str(clients), "--tokens",
                           str(tokens), "--seconds", str(duration), "--warmup", str(warmup), "--prompt", PROMPT,
                           *compute)
            done = subprocess.run(command, cwd=ROOT, preexec_fn=_on_server_core, capture_output=True, text=True,
                                  timeout=duration + warmup + 60)
            if done.returncode != 0:
                skipped["in-process CTranslate2"] = done.stderr[-300:]
                break
            ceiling.append({**json.loads(done.stdout.strip().splitlines()[-1]), "concurrency": clients})
            print(f"  {'in-process CTranslate2':32} c={clients:<4} {ceiling[-1]['tokens_per_s']:>10.0f} tok/s  "
                  f"ttft p50 {ceiling[-1]['ttft_ms']['p50']:.2f} ms", flush=True)
        passes.setdefault("in-process CTranslate2", []).append(ceiling)
    results = {name: median_points(runs, "tokens_per_s") for name, runs in passes.items() if name not in skipped}
    return {"servers": results, "skipped": skipped, "tokens": tokens, "prompt": PROMPT, "model": model_label(name),
            "batch_window_ms": BATCH_WINDOW_MS, "targets": inference_targets(results)}


def model_label(name: str) -> str:
    from benchmarks.models import SHAPES, parameters

    if name == "tiny":
        return "`builtin:tiny`"
    shape = SHAPES[name]
    return (f"`{name}` (~{parameters(name) / 1e6:.0f}M-parameter random Llama-style: d_model {shape['d_model']}, "
            f"{shape['layers']} layers, {shape['heads']} heads, FFN {shape['ffn']}; int8)")


def inference_targets(results: dict) -> list[dict]:
    def at(server: str, clients: int) -> dict | None:
        return next((p for p in results.get(server, []) if p["concurrency"] == clients), None)

    def ratio(name, a, b, need):
        if a is None or b is None or not b["tokens_per_s"]:
            return {"name": name, "need": need, "ratio": None, "met": None, "note": "missing"}
        value = a["tokens_per_s"] / b["tokens_per_s"]
        return {"name": name, "need": need, "ours": a["tokens_per_s"], "theirs": b["tokens_per_s"],
                "ratio": round(value, 3), "met": value >= need, "margin": round(value / need - 1, 3), "note": ""}

    runnel1, runnel16 = at("runnel", 1), at("runnel", 16)
    targets = [
        ratio("1 stream tokens/s: runnel / in-process", runnel1, at("in-process CTranslate2", 1), 0.95),
        ratio("16 streams tokens/s: runnel / runnel 1 stream", runnel16, runnel1, 3.0),
        ratio("16 streams tokens/s: runnel / FastAPI+CTranslate2", runnel16, at("FastAPI+CTranslate2", 16), 3.0),
    ]
    ceiling = at("in-process CTranslate2", 1)
    if runnel1 and ceiling and runnel1["ttft_ms"]["p50"] is not None:
        ours, limit = runnel1["ttft_ms"]["p50"], ceiling["ttft_ms"]["p50"] + 2.0 + BATCH_WINDOW_MS
        targets.append({"name": f"TTFT p50, 1 stream: runnel <= in-process + 2 ms + {BATCH_WINDOW_MS:g} ms window",
                        "need": round(limit, 3), "unit": "ms", "ours": ours, "theirs": ceiling["ttft_ms"]["p50"],
                        "ratio": None, "met": ours <= limit, "margin": round(limit - ours, 3), "note": "ms"})
    return targets


# -- scenario 3: cost of scale ------------------------------------------------------------------
def read_head(sock: socket.socket, buffer: bytes = b"") -> tuple[bytes, bytes]:
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return head, rest


def open_idle(port: int, count: int) -> list[socket.socket]:
    """``count`` keep-alive connections, each having done one GET /v1/models."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        socks.append(sock)
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nhost: bench\r\n\r\n")
        head, rest = read_head(sock)
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        for _ in range(100):
            if len(rest) >= length:
                break
            rest += sock.recv(65536)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"bad answer: {head[:100]!r}")
    return socks


def still_open(socks: list[socket.socket]) -> int:
    """How many connections the server has not closed (a closed one reads EOF at once)."""
    alive = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            alive += sock.recv(1) != b""
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
        sock.setblocking(True)
    return alive


def scenario_scale(settings: dict, tmp: str) -> dict:
    from benchmarks.loadgen import Workload

    count, settle = settings["connections"], settings["settle"]
    apps = '[apps.echo]\nbackend = "echo"\npace_ms = 0\n\n[apps.slow]\nbackend = "echo"\npace_ms = 1000\n'
    servers = [(Server("runnel", runnel_command(tmp, "scale", apps)), "/echo/slow"),
               (Server("bare h11+uvloop", peer("bare_h11.py")), None),
               (Server("uvicorn(httptools)+FastAPI", peer("fastapi_app.py")), None),
               (Server("uvicorn(h11)+FastAPI", peer("fastapi_app.py", "--http", "h11")), None)]
    results = {}
    for server, stream_path in servers:
        socks = []
        try:
            with server:
                load(server, Workload(f"http://127.0.0.1:{server.port}/v1/models"), 8, 0.5, 0.0)  # warm up
                time.sleep(0.5)
                base = rss_kb(server.pids)
                socks = open_idle(server.port, count)
                time.sleep(0.5)
                idle = rss_kb(server.pids)
                cpu = cpu_seconds(server.pids)
                time.sleep(settle)
                row = {"connections": count, "rss_base_kb": base, "rss_idle_kb": idle,
                       "kb_per_idle_connection": round((idle - base) / count, 2),
                       "idle_cpu": round((cpu_seconds(server.pids) - cpu) / settle, 4),
                       "still_open": still_open(socks)}
                if stream_path:
                    # 60 tokens at one a second outlive the measurement; the echo app builds its
                    # list of tokens up front, so a longer stream would be measuring that list.
                    body = json.dumps({"prompt": "hello", "max_tokens": 60, "stream": True}).encode()
                    for sock in socks:
                        sock.sendall(b"POST %s HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
                                     b"content-length: %d\r\n\r\n%b" % (stream_path.encode(), len(body), body))
                    streaming = sum(read_head(sock)[0].startswith(b"HTTP/1.1 200") for sock in socks)
                    time.sleep(1.5)  # past the first event of every stream (pace 1 s)
                    streams = rss_kb(server.pids)
                    cpu = cpu_seconds(server.pids)
                    time.sleep(settle)
                    row.update(streams=streaming, rss_streams_kb=streams, stream_pace_ms=1000,
                               kb_per_stream_over_idle=round((streams - idle) / count, 2),
                               kb_per_stream=round((streams - base) / count, 2),
                               stream_cpu=round((cpu_seconds(server.pids) - cpu) / settle, 4))
                results[server.name] = row
                print(f"  {server.name:32} {row}", flush=True)
        except (RuntimeError, OSError) as error:
            results[server.name] = {"error": str(error)}
            print(f"  {server.name}: {error}", flush=True)
        finally:
            for sock in socks:
                sock.close()
    runnel = results.get("runnel", {})
    targets = [
        {"name": "RSS per idle keep-alive connection (runnel)", "need": 30.0, "unit": "KB",
         "ours": runnel.get("kb_per_idle_connection")},
        {"name": "RSS per open stream, its connection included (runnel)", "need": 100.0, "unit": "KB",
         "ours": runnel.get("kb_per_stream")},
    ]
    for target in targets:
        ours = target["ours"]
        target.update(ratio=None, met=None if ours is None else ours <= target["need"],
                      margin=None if ours is None else round(target["need"] - ours, 2), note="KB")
    return {"servers": results, "connections": count, "targets": targets}


# -- reports --------------------------------------------------------------------------------------
def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    versions = {}
    for name in ("runnel", "h11", "uvloop", "uvicorn", "httptools", "starlette", "fastapi", "sse-starlette",
                 "granian", "ctranslate2", "trio"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return {"cpu": model, "cores": os.cpu_count(), "server_core": SERVER_CORE, "client_core": CLIENT_CORE,
            "python": platform.python_version(), "kernel": platform.release(), "commit": commit,
            "versions": versions}


def verdict(target: dict) -> str:
    if target["met"] is None:
        return "not measured"
    margin = target["margin"]
    if target["ratio"] is not None:
        pct = abs(margin * 100)
        by = f"{pct:.0f}%" if pct >= 10 else f"{pct:.1f}%"
        return f"met, by {by}" if target["met"] else f"**missed**, by {by}"
    unit = target.get("unit", "")
    return f"met, {margin:.2f} {unit} under" if target["met"] else f"**missed**, {-margin:.2f} {unit} over"


def targets_table(targets: list[dict]) -> list[str]:
    lines = ["| target | runnel | peer / limit | ratio | needed | verdict |", "|---|---|---|---|---|---|"]
    for t in targets:
        fmt = (lambda v: "—" if v is None else f"{v:,.2f}" if v < 100 else f"{v:,.0f}")
        ratio = "—" if t["ratio"] is None else f"{t['ratio']:.2f}x"
        need = f"≤ {t['need']} {t['unit']}" if t.get("unit") else f"≥ {t['need']}x"
        extra = f" (by server CPU: {t['cpu_ratio']:.2f}x)" if t.get("cpu_ratio") else ""
        note = f" — {t['note']}" if t.get("note") and t["note"] not in ("ms", "KB") else ""
        lines.append(f"| {t['name']} | {fmt(t.get('ours'))} | {fmt(t.get('theirs'))} | {ratio}{extra} | {need} | "
                     f"{verdict(t)}{note} |")
    return lines


def points_table(results: dict, workload: str | None, value: str, unit: str) -> list[str]:
    levels = sorted({p["concurrency"] for pts in results.values() for p in (pts[workload] if workload else pts)})
    lines = [f"| server | {' | '.join(f'c={c}' for c in levels)} | peak {unit} | p99 ms at peak | "
             "server CPU at peak | client CPU at peak |",
             "|---|" + "---|" * (len(levels) + 4)]
    for name, pts in results.items():
        pts = pts[workload] if workload else pts
        if not pts:
            continue
        by = {p["concurrency"]: p for p in pts}
        cells = [f"{by[c][value]:,.0f}" if c in by else "—" for c in levels]
        best = peak(pts, value)
        p99 = best.get("latency_ms", {}).get("p99")
        cpu = best.get("server_cpu")
        spread = f" ({min(best['runs']):,.0f}–{max(best['runs']):,.0f})" if len(best.get("runs", ())) > 1 else ""
        lines.append(f"| {name} | {' | '.join(cells)} | {best[value]:,.0f}{spread} | "
                     f"{'—' if p99 is None else f'{p99:.2f}'} | {'—' if cpu is None else f'{cpu:.2f}'} | "
                     f"{best.get('client_cpu', '—')} |")
    return lines


def plot(path: Path, title: str, panels: list[tuple[str, dict[str, list[tuple[int, float]]]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False, layout="constrained")
    for ax, (label, lines) in zip(axes[0], panels):
        for number, (name, xy) in enumerate(lines.items()):
            xy = [(x, y) for x, y in xy if y is not None]
            if xy:  # a fixed colour per server: one with no values must not shift the others'
                ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", color=f"C{number % 10}",
                        linewidth=2.5 if name == "runnel" else 1.2, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncol=5, fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def series(points: list[dict], get) -> list[tuple[int, float]]:
    return [(p["concurrency"], get(p)) for p in points]


def report_http(data: dict, out: Path) -> list[str]:
    res, n = data["servers"], data["sse_events"]
    md = ["Requests/s by concurrent clients (closed loop, keep-alive). \"server CPU\" is cores busy (1.0 = its "
          "one core); \"client CPU\" the same for the load client: near 1.0 the client is the limit.", "",
          "**Small JSON, `GET /v1/models`** (89-byte body)", "", *points_table(res, "json", "requests_per_s", "req/s"),
          "", f"**SSE, `POST /echo/echo`, {n} events per stream + a final event, one write per event** "
          "(events/s)", "", *points_table(res, "sse", "tokens_per_s", "events/s"), ""]
    for workload, label in (("json", "small JSON"), ("sse", "SSE")):
        unit = "events/s" if workload == "sse" else "requests/s"
        key = "tokens_per_s" if workload == "sse" else "requests_per_s"
        plot(out / f"http_{workload}.png", f"HTTP core: {label}",
             [(unit, {k: series(v[workload], lambda p: p[key]) for k, v in res.items()}),
              ("latency p50 (ms)", {k: series(v[workload], lambda p: p["latency_ms"]["p50"]) for k, v in res.items()}),
              ("latency p99 (ms)", {k: series(v[workload], lambda p: p["latency_ms"]["p99"]) for k, v in res.items()})])
        md.append(f"![HTTP core, {label}](http_{workload}.png)")
    return md


def summary_ms(summary: dict) -> str:
    return "—" if summary.get("p50") is None else f"{summary['p50']:.2f} / {summary['p99']:.2f}"


def report_inference(data: dict, out: Path) -> list[str]:
    res = {name: pts for name, pts in data["servers"].items() if pts}
    levels = sorted({p["concurrency"] for pts in res.values() for p in pts})
    model = data.get("model", "`builtin:tiny`")
    md = [f"Model {model}, CPU, inter_threads=2 intra_threads=1, greedy, {data['tokens']} tokens per "
          f"request (ignore_eos), prompt \"{data['prompt']}\", runnel batch window {data['batch_window_ms']:g} ms.",
          "", "**Tokens/s by concurrent streams**", "", *points_table(res, None, "tokens_per_s", "tok/s"), "",
          "**Time to first token and inter-token latency (ms, p50 / p99)**", "",
          "| server | " + " | ".join(f"c={c} TTFT" for c in levels) + " | "
          + " | ".join(f"c={c} ITL" for c in levels) + " |", "|---|" + "---|" * (2 * len(levels))]
    for name, pts in res.items():
        by = {p["concurrency"]: p for p in pts}
        ttft = [summary_ms(by[c]["ttft_ms"]) if c in by else "—" for c in levels]
        itl = [summary_ms(by[c]["itl_ms"]) if c in by else "—" for c in levels]
        md.append(f"| {name} | {' | '.join(ttft)} | {' | '.join(itl)} |")
    md += ["", "In-process ITL is per token; over HTTP it is the gap between reads that carried new text, and "
           "runnel may put several tokens in one event when they arrive together.", ""]
    name = data["scenario"]
    plot(out / f"{name}.png", f"Inference: {model.split(' (')[0].strip('`')} on one core",
         [("tokens/s", {k: series(v, lambda p: p["tokens_per_s"]) for k, v in res.items()}),
          ("TTFT p50 (ms)", {k: series(v, lambda p: p["ttft_ms"]["p50"]) for k, v in res.items()}),
          ("inter-token p99 (ms)", {k: series(v, lambda p: p["itl_ms"]["p99"]) for k, v in res.items()})])
    return md + [f"![Inference]({name}.png)"]


def report_scale(data: dict, out: Path) -> list[str]:
    md = [f"{data['connections']} connections opened to each server, each after one `GET /v1/models`; RSS is "
          "VmRSS of the server's processes, CPU is cores busy over the idle period. Open streams: runnel's echo "
          "app with pace_ms = 1000 (one event per second per stream) on the same connections.", "",
          "| server | KB per idle connection | idle CPU | still open | KB per open stream (with its connection) "
          "| KB per stream over idle | CPU with streams open | CPU µs per event |", "|---" * 8 + "|"]
    for name, row in data["servers"].items():
        if "error" in row:
            md.append(f"| {name} | error: {row['error']} | | | | | | |")
            continue
        md.append(f"| {name} | {row['kb_per_idle_connection']:.1f} | {row['idle_cpu']:.3f} | "
                  f"{row['still_open']}/{row['connections']} | "
                  + (f"{row['kb_per_stream']:.1f} ({row['streams']} open) | {row['kb_per_stream_over_idle']:.1f} | "
                     f"{row['stream_cpu']:.3f} | {row['stream_cpu'] * 1e6 / max(row['streams'], 1):.0f} |"
                     if "streams" in row else "— | — | — | — |"))
    growth = []
    for scenario, key in (("http", "json"), ("http", "sse"), ("inference", None)):
        path = out / f"{scenario}.json"
        if path.exists():
            pts = json.loads(path.read_text())["servers"].get("runnel")
            pts = pts.get(key) if key and pts else pts
            for p in pts or []:
                growth.append(f"| {scenario}{'/' + key if key else ''} | {p['concurrency']} | "
                              f"{summary_ms(p['latency_ms'])} |")
    if growth:
        md += ["", "**runnel's latency as concurrency grows** (from the latest http and inference reports)", "",
               "| workload | clients | latency ms, p50 / p99 |", "|---|---|---|", *growth]
    rows = {k: v for k, v in data["servers"].items() if "error" not in v}
    if rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        labels = [f"{k} (idle)" for k in rows] + [f"{k} (stream)" for k, v in rows.items() if "kb_per_stream" in v]
        values = [v["kb_per_idle_connection"] for v in rows.values()] + \
                 [v["kb_per_stream"] for v in rows.values() if "kb_per_stream" in v]
        ax.barh(labels, values)
        ax.set_xlabel(f"KB of RSS each, at {data['connections']}")
        ax.set_title("RSS per idle connection, and per open stream")
        fig.tight_layout()
        fig.savefig(out / "scale.png", dpi=110)
        plt.close(fig)
        md += ["", "![Cost of scale](scale.png)"]
    return md


def write_report(name: str, title: str, data: dict, out: Path, quick: bool, seconds: float, settings: dict) -> None:
    data.update(scenario=name, quick=quick, date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                run_seconds=round(seconds, 1), machine=machine(), settings=settings)
    m = data["machine"]
    body = {"http": report_http, "inference": report_inference, "scale": report_scale}[name.split("-")[0]](data, out)
    skipped = [f"- {k}: {v}" for k, v in data.get("skipped", {}).items()]
    data["notes"] = list(NOTES)
    md = [f"### {title}", "",
          f"{data['date']}, {'quick' if quick else 'full'} mode"
          + (f", median of {settings['repeat']} passes (min–max of the peak in brackets)" if settings["repeat"] > 1
             and name != "scale" else "") + f", {data['run_seconds']} s; {m['cpu']}, "
          f"{m['cores']} cores, server on core {m['server_core']}, client on core {m['client_core']}; "
          f"Python {m['python']}, runnel {m['commit']}.", "", "**Targets**", "", *targets_table(data["targets"]),
          "", *body, *(["", "Not measured:", *skipped] if skipped else []),
          *(["", "Notes:", *(f"- {note}" for note in data["notes"])] if data["notes"] else [])]
    (out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    readme = ROOT / "benchmarks" / "README.md"
    if readme.exists() and out.resolve() == (ROOT / "benchmarks" / "results").resolve():
        text = readme.read_text()
        begin, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
        if begin in text and end in text:
            inner = "\n".join(md).replace("](", "](results/")
            head, rest = text.split(begin, 1)
            readme.write_text(head + begin + "\n" + inner + "\n" + end + rest.split(end, 1)[1])


# -- main ------------------------------------------------------------------------------------------
def main() -> None:
    global SERVER_CORE, CLIENT_CORE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs, fewer points (each scenario < 2 min)")
    parser.add_argument("--scenario", choices=("http", "inference", "scale", "all"), default="all")
    parser.add_argument("--model", choices=("tiny", "small", "medium"), default="tiny",
                        help="the inference scenario's model (benchmarks/models.py)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--repeat", type=int, default=1,
                        help="passes over the servers (http, inference); each point reports the median pass")
    args = parser.parse_args()
    venv_python = VENV / "bin" / "python"
    if Path(sys.prefix).resolve() != VENV.resolve():
        if venv_python.exists():
            os.execv(venv_python, [str(venv_python), __file__, *sys.argv[1:]])
        sys.exit("benchmarks/.venv-peers is missing: run `make bench` once (it creates it and runs --quick)")
    sys.path.insert(0, str(ROOT))  # benchmarks.loadgen
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(8192, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # servers inherit it
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= 2:
        SERVER_CORE, CLIENT_CORE = cores[0], cores[1]
        os.sched_setaffinity(0, {CLIENT_CORE})
    settings = {**(QUICK if args.quick else FULL), "repeat": max(1, args.repeat), "model": args.model}
    if args.model != "tiny":  # milliseconds a token: shorter requests, longer points (still bounded)
        settings.update(tokens=32, stream_duration=settings["stream_duration"] * 2)
    args.out.mkdir(parents=True, exist_ok=True)
    names = ("http", "inference", "scale") if args.scenario == "all" else (args.scenario,)
    titles = {"http": "HTTP core", "inference": "Inference", "scale": "Cost of scale"}
    runners = {"http": scenario_http, "inference": scenario_inference, "scale": scenario_scale}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"== {titles[name]}", flush=True)
            NOTES.clear()
            start = time.monotonic()
            data = runners[name](settings, tmp)
            report = f"inference-{args.model}" if name == "inference" and args.model != "tiny" else name
            write_report(report, titles[name], data, args.out, args.quick, time.monotonic() - start, settings)
            for target in data["targets"]:
                print(f"  target: {target['name']}: {verdict(target)}", flush=True)
    print(f"reports in {args.out}")


if __name__ == "__main__":
    main()
