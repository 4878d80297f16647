"""The one-shot GPU check: does runnel serve on this GPU, and how fast? (issue 15)

    benchmarks/gpu/run.sh [--cpu] [--out DIR]    # installs what is missing, then runs this

Each step is printed as it ends, and the report (gpu.md, gpu.json, nvidia-smi.txt) is
written under --out:

1. cuBLAS (GPU only): float16 greedy tokens on the GPU must equal float32 tokens on the CPU
   for the shipped tiny model (or differ only where the two scores tie). run.sh may have
   pointed libcublas.so.12 at the machine's CUDA 13 libcublas.so.13; if that does not work,
   the report says so and the check stops (exit status 3).
2. A ~1B-parameter Llama-style model with random weights (runnel_ctranslate2.builtin), saved
   in float16.
3. In-process CTranslate2 on the device: tokens/s at batches of 1 to 128, TOKENS tokens out,
   greedy, in each compute type (float16 and int8_float16; on --cpu float32 and int8).
4. ``runnel serve`` with the app's device defaults (nothing set but the device), loaded by
   the load client at 1, 16, 64 and 128 streams: tokens/s, TTFT and inter-token p50/p99,
   and runnel / in-process (first compute type, same batch) at each. Then once more for each
   ``--variant 'SETTING = VALUE'`` (TOML added to the app's table), reported in its own table.

--cpu runs the same steps on the CPU with a tiny model and short runs, skipping step 1: the
test that keeps this script working (benchmarks/gpu/test_check.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # benchmarks.loadgen, benchmarks.peers

PROMPT = "The cat sees a red ball"
STREAMS = (1, 16, 64, 128)
BATCHES = (1, 8, 16, 32, 64, 128)  # the 1/8/32/64, and the stream counts for the ratios
# ~1.03B parameters: 20 layers of 4*d^2 (attention) + 3*d*ffn (SiLU-gated FFN), as TinyLlama's
# d_model and FFN (its vocabulary of 32k is not: builtin's sentencepiece has ~1k pieces).
GPU_MODEL = {"d_model": 2048, "layers": 20, "heads": 16, "ffn": 5632, "max_position": 2048}
CPU_MODEL = {"d_model": 64, "layers": 2, "heads": 4, "ffn": 256, "max_position": 512}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- the load client: its one caller ---------------------------------------------------------
def load_streams(base_url: str, model: str, prompt: str, tokens: int, streams: int, seconds: float,
                 warmup: float) -> dict:
    """``streams`` closed-loop clients streaming completions of exactly ``tokens`` tokens.

    The only call into benchmarks/loadgen (its CLI and metrics may change: adapt here).
    Returns requests, errors, tokens_per_s (by arrival: every token read inside the window,
    events weighted by the usage each request reports, as several tokens may share one),
    completed_tokens_per_s (requests finished in the window x tokens: at 64-128 streams of
    ~1 s requests in a 3 s window that moves in steps of a third), ttft_ms and itl_ms
    ({"p50", "p99", ...}, milliseconds)."""
    from benchmarks.loadgen import LoadSpec, Workload, run_load

    workload = Workload.openai_completion(base_url, model, prompt, tokens, True, temperature=0, ignore_eos=True)
    report = run_load(workload, LoadSpec(concurrency=streams, duration=seconds, warmup=warmup, timeout=120.0))
    return {"streams": streams, "requests": report["requests"], "errors": report["errors"],
            "tokens_per_s": report["tokens_per_s"],
            "completed_tokens_per_s": report["requests"] * tokens / max(report["duration_s"], 1e-9),
            "ttft_ms": report["ttft_ms"], "itl_ms": report["itl_ms"]}


# -- steps ----------------------------------------------------------------------------------
def nvidia_smi(out: Path) -> str:
    """The GPU's one-line summary; the full output goes to nvidia-smi.txt."""
    try:
        full = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        (out / "nvidia-smi.txt").write_text(full.stdout + full.stderr)
        line = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        return line.stdout.strip() or line.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        (out / "nvidia-smi.txt").write_text(f"nvidia-smi did not run: {error}\n")
        return f"nvidia-smi did not run: {error}"


def check_cublas() -> dict:
    """Float16 greedy tokens on the GPU against float32 on the CPU, for the trained tiny model.

    A broken cuBLAS (a symbol that does not behave as CUDA 12's) gives garbage or an error;
    float16 rounding can at most flip a near-tie. So where the tokens differ, both devices
    score the GPU's sequences: a working library scores them alike, a broken one does not."""
    import ctranslate2
    from benchmarks.peers.ct2_in_process import prompt_tokens
    from runnel_ctranslate2.builtin import ensure_builtin

    model = ensure_builtin("tiny")
    prompts = [prompt_tokens(model, text) for text in
               ("Once upon a time", "User: What is a dog?\nAssistant:", "The river", "User: Hello!\nAssistant:")]
    options = dict(max_length=32, sampling_topk=1, include_prompt_in_result=False)
    result = {"model": "builtin:tiny", "prompts": len(prompts), "max_tokens": 32,
              "cublas": os.environ.get("RUNNEL_GPU_CUBLAS", "CUDA 12 cuBLAS, as installed")}
    if ctranslate2.get_cuda_device_count() == 0:
        return {**result, "ok": False, "error": "no CUDA GPU is visible to CTranslate2 (get_cuda_device_count() is 0)"}
    try:
        cpu = ctranslate2.Generator(model, device="cpu", compute_type="float32")
        gpu = ctranslate2.Generator(model, device="cuda", compute_type="float16")
        on_cpu = [r.sequences[0] for r in cpu.generate_batch(prompts, **options)]
        on_gpu = [r.sequences[0] for r in gpu.generate_batch(prompts, **options)]
        differing = [i for i, (a, b) in enumerate(zip(on_cpu, on_gpu, strict=True)) if a != b]
        result["same_tokens"] = not differing
        if differing:
            # Both devices score the GPU's sequences: a tie flipped by rounding scores the same.
            rows = [prompts[i] + on_gpu[i] for i in differing]
            gaps = [abs(sum(a.log_probs) - sum(b.log_probs))
                    for a, b in zip(cpu.score_batch(rows), gpu.score_batch(rows), strict=True)]
            result["score_gap"] = max(gaps)
            result["ok"] = max(gaps) < 0.05 * 32
        else:
            result["ok"] = True
        del cpu, gpu
    except Exception as error:  # what a CUDA 13 library behind a CUDA 12 name does is unknown
        result.update(ok=False, error=f"{type(error).__name__}: {error}")
    return result


def build_model(directory: Path, sizes: dict, quantization: str) -> dict:
    from runnel_ctranslate2.builtin import build_random_model

    start = time.perf_counter()
    build_random_model(directory, seed=1, quantization=quantization, **sizes)
    vocab = len(json.loads((directory / "vocabulary.json").read_text()))
    d, ffn = sizes["d_model"], sizes["ffn"]
    params = sizes["layers"] * (4 * d * d + 3 * d * ffn) + 2 * vocab * d
    return {**sizes, "vocabulary": vocab, "parameters": params, "build_s": round(time.perf_counter() - start, 1),
            "size_mb": round((directory / "model.bin").stat().st_size / 1e6, 1)}


def in_process(model_dir: Path, device: str, compute_types: tuple[str, ...], tokens: int, seconds: float,
               warmup: float) -> dict:
    import ctranslate2
    from benchmarks.peers.ct2_in_process import measure, prompt_tokens

    prompt = prompt_tokens(str(model_dir), PROMPT)
    results: dict[str, dict] = {}
    for compute_type in compute_types:
        start = time.perf_counter()
        generator = ctranslate2.Generator(str(model_dir), device=device, compute_type=compute_type, inter_threads=1)
        loaded = time.perf_counter() - start
        points = {}
        for batch in BATCHES:
            points[batch] = measure(generator, prompt, batch, tokens, seconds, warmup)
            log(f"in-process {compute_type:>12} batch {batch:>3}: {points[batch]['tokens_per_s']:>10,.0f} tok/s")
        results[compute_type] = {"effective": generator.compute_type, "load_s": round(loaded, 1), "points": points}
        del generator
    return results


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            return b" 200 " in sock.recv(100)
    except OSError:
        return False


def serve(model_dir: Path, device: str, out: Path, tokens: int, seconds: float, warmup: float,
          setting: str = "") -> dict:
    """``runnel serve`` on a free port with the app's device defaults, or with ``setting`` (TOML
    lines added to the app's table) on top; the load client at each count."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "gpu.toml"
        config.write_text(f'[server]\nport = {port}\nlog_level = "info"\n\n[apps.bench]\nbackend = "ctranslate2"\n'
                          f'model = "{model_dir}"\nserved_model_name = "bench"\ndevice = "{device}"\n{setting}\n')
        with open(out / "server.log", "a") as server_log:
            server = subprocess.Popen([sys.executable, "-m", "runnel", "serve", "--config", str(config)],
                                      stdout=server_log, stderr=subprocess.STDOUT, cwd=ROOT)
            try:
                deadline = time.monotonic() + 300
                while not health(port):
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"runnel did not become ready: {(out / 'server.log').read_text()[-600:]}")
                    time.sleep(0.2)
                points = {}
                for streams in STREAMS:
                    points[streams] = load_streams(f"http://127.0.0.1:{port}", "bench", PROMPT, tokens, streams,
                                                   seconds, warmup)
                    log(f"runnel{f' ({setting})' if setting else ''} {streams:>3} streams: {points[streams]['tokens_per_s']:>10,.0f} tok/s, "
                        f"TTFT p50 {points[streams]['ttft_ms']['p50'] or 0:.1f} ms, errors {points[streams]['errors']}")
            finally:
                server.send_signal(signal.SIGINT)
                try:
                    server.wait(30)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait(10)
    app_lines = re.findall(r"app 'bench': .*", (out / "server.log").read_text())
    return {"app": app_lines[-1] if app_lines else None, "setting": setting, "points": points}


# -- the report -----------------------------------------------------------------------------
def ms(summary: dict) -> str:
    return "—" if summary.get("p50") is None else f"{summary['p50']:.1f} / {summary['p99']:.1f}"


def report(data: dict) -> str:
    machine = data["machine"]
    md = ["### GPU", "",
          f"{data['started']}, {'--cpu (tiny model, short runs: not a measurement)' if data['cpu'] else 'GPU'}, "
          f"{data['elapsed_s']:.0f} s; {machine['gpu']}; {machine['cpu']}, {machine['cores']} cores; "
          f"Python {machine['python']}, CTranslate2 {machine['ctranslate2']}, runnel {machine['commit']}.", ""]
    cublas = data.get("cublas")
    if cublas:
        verdict = "works" if cublas["ok"] else "**does not work**"
        detail = cublas.get("error") or ("same tokens" if cublas.get("same_tokens") else
                                         f"tokens differ, scores within {cublas.get('score_gap', 0):.3f}")
        md += [f"**cuBLAS**: {cublas['cublas']}: {verdict} (float16 on the GPU against float32 on the CPU, "
               f"{cublas['model']}, {cublas['prompts']} prompts x {cublas['max_tokens']} greedy tokens: {detail}).", ""]
    if data.get("stopped"):
        md += [f"**Stopped**: {data['stopped']}", ""]
    model = data.get("model")
    if model is None:
        return "\n".join(md)
    md += [f"Model: random Llama-style, {model['parameters'] / 1e6:,.1f}M parameters (d_model {model['d_model']}, "
           f"{model['layers']} layers, {model['heads']} heads, FFN {model['ffn']}, vocabulary {model['vocabulary']}), "
           f"{model['size_mb']:,.0f} MB on disk, built in {model['build_s']} s. Greedy, {data['tokens']} tokens per "
           f"request (ignore_eos), prompt \"{PROMPT}\".", "",
           ]
    if "in_process" not in data:
        return "\n".join(md)
    md += ["**In-process CTranslate2, tokens/s by batch size** (one generate_batch of b prompts, again and again)", "",
           "| compute type | load s | " + " | ".join(f"b={b}" for b in BATCHES) + " |",
           "|---|---|" + "---|" * len(BATCHES)]
    for name, result in data["in_process"].items():
        cells = [f"{result['points'][b]['tokens_per_s']:,.0f}" for b in BATCHES]
        md.append(f"| {name} ({result['effective']}) | {result['load_s']} | {' | '.join(cells)} |")
    served = data.get("runnel")
    if served is None:
        return "\n".join(md + [""])
    base = next(iter(data["in_process"]))
    for served in [served, *data.get("variants", [])]:
        title = f"with `{served['setting']}`" if served["setting"] else "device defaults"
        md += ["", f"**runnel** (`runnel serve`, {title}: `{served['app']}`)", "",
               f"| streams | tokens/s | in-process {base}, same batch | runnel / in-process | TTFT p50 / p99 ms | "
               "ITL p50 / p99 ms | errors |", "|---|---|---|---|---|---|---|"]
        for streams in STREAMS:
            point = served["points"][streams]
            ceiling = data["in_process"][base]["points"][streams]["tokens_per_s"]
            md.append(f"| {streams} | {point['tokens_per_s']:,.0f} | {ceiling:,.0f} | "
                      f"{point['tokens_per_s'] / ceiling:.2f}x | {ms(point['ttft_ms'])} | {ms(point['itl_ms'])} | "
                      f"{sum(point['errors'].values()) or '—'} |")
    md += ["", "Over HTTP the inter-token gap is between reads that carried new text (several tokens may share "
           "one event); in-process figures are per generate_batch.", ""]
    return "\n".join(md)


def machine(cpu: bool, out: Path) -> dict:
    import ctranslate2

    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                            timeout=10).stdout.strip() or "unknown"
    return {"gpu": "no GPU (--cpu)" if cpu else nvidia_smi(out), "cpu": name, "cores": os.cpu_count(),
            "python": platform.python_version(), "ctranslate2": ctranslate2.__version__, "commit": commit}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks/gpu/out"))
    parser.add_argument("--cpu", action="store_true", help="the same steps on the CPU, tiny model, short runs")
    parser.add_argument("--tokens", type=int, help="tokens per request (default 128; --cpu: 32)")
    parser.add_argument("--seconds", type=float, help="each measured point (default 3; --cpu: 0.3)")
    parser.add_argument("--variant", action="append", default=[], metavar="TOML",
                        help="serve and load once more with this app setting (e.g. 'max_batch_size = 128'); "
                             "repeatable, each a run of its own after the defaults'")
    args = parser.parse_args(argv)
    cpu = args.cpu
    tokens = args.tokens or (32 if cpu else 128)
    seconds = args.seconds or (0.3 if cpu else 3.0)
    warmup = min(1.0, seconds / 3)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "server.log").write_text("")  # every server this run starts appends its log
    started = time.monotonic()
    data: dict = {"started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "cpu": cpu,
                  "tokens": tokens, "seconds_per_point": seconds, "machine": machine(cpu, out)}
    log(f"machine: {data['machine']}")
    status = 0

    def save() -> None:  # after every step: a run cut short still leaves what it measured
        data["elapsed_s"] = time.monotonic() - started
        (out / "gpu.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
        (out / "gpu.md").write_text(report(data))

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, device = Path(tmp) / "model", "cpu" if cpu else "cuda"
        try:
            if not cpu:
                data["cublas"] = check_cublas()
                log(f"cuBLAS: {data['cublas']}")
                save()
            if not data.get("cublas", {"ok": True})["ok"]:
                status = 3
                data["stopped"] = ("CTranslate2 cannot use this machine's GPU and cuBLAS (above), so nothing was "
                                   "measured on the GPU. Where the GPU is there, it needs the CUDA 12 cuBLAS: the "
                                   "nvidia-cublas-cu12 wheel (~400 MB, more than a device call carries) or a CUDA 12 "
                                   "toolkit.")
            else:
                # float16 on disk on a GPU: half the bytes to write and load, and the type it runs in.
                data["model"] = build_model(model_dir, *((CPU_MODEL, "float32") if cpu else (GPU_MODEL, "float16")))
                log(f"model: {data['model']}")
                save()
                types = ("float32", "int8") if cpu else ("float16", "int8_float16")
                data["in_process"] = in_process(model_dir, device, types, tokens, seconds, warmup)
                save()
                data["runnel"] = serve(model_dir, device, out, tokens, seconds, warmup)
                data["variants"] = []
                for setting in args.variant:
                    save()
                    data["variants"].append(serve(model_dir, device, out, tokens, seconds, warmup, setting))
        except Exception as error:
            status = 1
            data["stopped"] = f"{type(error).__name__}: {error}"
            raise
        finally:
            save()
            log(f"wrote {out / 'gpu.md'} and gpu.json in {data['elapsed_s']:.0f} s"
                + (f" (stopped: {data['stopped']})" if data.get("stopped") else ""))
    return status


if __name__ == "__main__":
    sys.exit(main())
