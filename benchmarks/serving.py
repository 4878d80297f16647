"""runnel in the metrics serving benchmarks report: TTFT, TPOT, ITL, E2EL, throughput, goodput.

    .venv/bin/python benchmarks/serving.py [--model tiny|small] [--quick] [--repeat N] [--out DIR]

The load client (benchmarks/loadgen, the ``runnel-loadgen`` distribution) against ``runnel
serve`` with one CTranslate2 model, as ``vllm bench serve`` would be run against it:
streaming ``/v1/completions``, synthetic prompts (uniform 32-96 words, seeded), 128 tokens
out (32 for the small model; ``ignore_eos``), greedy. Closed loop at 1, 4 and 16 clients,
then one open-loop rate (Poisson arrivals at 0.7x what 4 clients got through in the same
pass): requests arrive whether or not earlier ones are done, so queueing shows in TTFT as
lock-step clients never let it. Goodput counts the requests within the SLOs below.
Throughput is counted by token arrival time in the window.

Models: ``tiny`` is builtin:tiny (~0.1 ms a token: the server's own per-token cost is most
of what is measured); ``small`` is a ~113M-parameter Llama-style decoder (d_model 768,
12 layers, 12 heads, FFN 3072) with seeded random weights from the plugin's builder,
built once into the model cache and served with ``compute_type = "int8"``.

As run.py: the server pinned to core 0, the client here on core 1; each pass starts a
fresh server; each point reports the median pass (by output tokens/s) and the spread of
the passes. Writes serving-MODEL.json and .md to ``--out``; with the default ``--out``
the table also replaces the README's ``results:serving-MODEL`` section.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmarks.run, benchmarks.loadgen

import benchmarks.run as bench  # noqa: E402

SMALL = {"d_model": 768, "layers": 12, "heads": 12, "ffn": 3072, "vocab_size": 512, "max_position": 2048}
MODELS = {
    # Tokens out per request, the goodput SLOs in ms, and the seconds of a point (full mode): the
    # small model makes tens of tokens a second on one shared core, so its requests are shorter
    # and its points longer.
    "tiny": {"tokens": 128, "slo": {"ttft": 50.0, "tpot": 5.0}, "duration": 8.0, "warmup": 2.0},
    "small": {"tokens": 32, "slo": {"ttft": 1000.0, "tpot": 100.0}, "duration": 15.0, "warmup": 3.0},
}
# The open-loop rate, unless --rate says: this share of the requests/s that 4 closed-loop clients
# got through in the same pass. The core's speed moves with what else the machine runs, so a fixed
# rate would be an overload one minute and idle the next; this one is a load the server can carry,
# where the TTFT tail is random arrivals queueing behind running batches.
OPEN_LOOP_SHARE = 0.7
CLIENTS = (1, 4, 16)
INPUT_WORDS = (32, 96)
SEED = 17


def model_path(name: str) -> str:
    """builtin:tiny, or the small model's directory (built into the cache once)."""
    if name == "tiny":
        return "builtin:tiny"
    from runnel_ctranslate2.builtin import build_random_model, default_cache_dir

    target = default_cache_dir() / "bench-small-v1"
    if not (target / "model.bin").is_file():
        print(f"building the ~113M model into {target} (once)", flush=True)
        building = Path(tempfile.mkdtemp(prefix=".bench-small-", dir=target.parent))
        build_random_model(building, seed=0, **SMALL)
        os.rename(building, target)
    return str(target)


def server_config(name: str, path: str) -> str:
    compute = '\ncompute_type = "int8"' if name == "small" else ""
    return (f'[apps.bench]\nbackend = "ctranslate2"\nmodel = "{path}"\nserved_model_name = "bench"\n'
            f'device = "cpu"\ninter_threads = 2\nintra_threads = 1\nmax_batch_size = 16\nbatch_window_ms = 2'
            f"{compute}\n")


def point(server: bench.Server, workload, spec) -> dict:
    from benchmarks.loadgen import run_load

    cpu, start = bench.cpu_seconds(server.pids), time.perf_counter()
    report = run_load(workload, spec)
    report["server_cpu"] = round((bench.cpu_seconds(server.pids) - cpu) / (time.perf_counter() - start), 3)
    report["client_cpu"] = round(report["client_cpu_s"] / max(report["wall_s"], 1e-9), 3)
    return report


def one_pass(name: str, path: str, settings: dict, tmp: str) -> list[dict]:
    from benchmarks.loadgen import Lengths, LoadSpec, Workload, synthetic

    tokens = MODELS[name]["tokens"]
    samples = synthetic(200, Lengths(*INPUT_WORDS), Lengths(tokens, tokens), SEED)
    slo, points = MODELS[name]["slo"], []
    with bench.Server(f"runnel {name}", bench.runnel_command(tmp, f"serving-{name}", server_config(name, path)),
                      ready="/health") as server:
        workload = Workload.openai(f"http://127.0.0.1:{server.port}", "bench", samples, ignore_eos=True,
                                   temperature=0)
        common = {"duration": settings["duration"], "warmup": settings["warmup"], "timeout": 120.0,
                  "goodput": slo}
        point(server, workload, LoadSpec(concurrency=4, duration=settings["warmup"], warmup=0))  # warm up
        for clients in (*CLIENTS, None):
            if clients is None:  # the open-loop point
                capacity = next(p["requests_per_s"] for p in points if p["spec"]["concurrency"] == 4)
                rate = settings["rate"] or round(max(0.1, OPEN_LOOP_SHARE * capacity), 2)
                report = point(server, workload, LoadSpec(rate=rate, **common))
                report["load"] = f"{rate:g}/s"
            else:
                report = point(server, workload, LoadSpec(concurrency=clients, **common))
                report["load"] = f"c={clients}"
            points.append(report)
            ttft, tpot = report["ttft_ms"], report["tpot_ms"]
            print(f"  {report['load']:>7}  {report['tokens_per_s']:8.0f} tok/s  {report['requests_per_s']:6.2f} req/s"
                  f"  ttft p50/p99 {ttft['p50'] or 0:7.1f}/{ttft['p99'] or 0:7.1f} ms  tpot p50 {tpot['p50'] or 0:6.2f}"
                  f" ms  goodput {report['goodput']['requests_per_s']:.2f}  errors {sum(report['errors'].values())}"
                  f"  server cpu {report['server_cpu']:.2f}", flush=True)
    return points


def ms(summary: dict, key: str) -> str:
    value = summary.get(key)
    return "—" if value is None else (f"{value:.2f}" if value < 10 else f"{value:.1f}")


def table(name: str, merged: list[dict], settings: dict, header: str) -> list[str]:
    slo = " and ".join(f"{key.upper()} ≤ {bound:g} ms" for key, bound in MODELS[name]["slo"].items())
    lines = [header, "",
             "| load | output tok/s (spread) | req/s | goodput req/s | TTFT p50 / p90 / p99 ms | "
             "TPOT p50 / p99 ms | ITL p50 / p99 ms | E2EL p50 / p99 ms | prompt tokens | server CPU | client CPU "
             "| errors |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in merged:
        runs = p["runs"]
        spread = f" ({min(runs):,.0f}–{max(runs):,.0f})" if len(runs) > 1 else ""
        lines.append(
            f"| {p['load']} | {p['tokens_per_s']:,.0f}{spread} | {p['requests_per_s']:.2f} | "
            f"{p['goodput']['requests_per_s']:.2f} | {ms(p['ttft_ms'], 'p50')} / {ms(p['ttft_ms'], 'p90')} / "
            f"{ms(p['ttft_ms'], 'p99')} | {ms(p['tpot_ms'], 'p50')} / {ms(p['tpot_ms'], 'p99')} | "
            f"{ms(p['itl_ms'], 'p50')} / {ms(p['itl_ms'], 'p99')} | {ms(p['latency_ms'], 'p50')} / "
            f"{ms(p['latency_ms'], 'p99')} | {p['input_tokens'] / max(p['requests'], 1):.0f} | "
            f"{p['server_cpu']:.2f} | {p['client_cpu']:.2f} | "
            f"{sum(p['errors'].values())} |")
    lines += ["", f"The open-loop rate is {OPEN_LOOP_SHARE:g}x the requests/s of 4 clients in the same pass (Poisson "
              f"arrivals). Goodput: requests with {slo}. Each row is the median of {settings['repeat']} passes by "
              "output tokens/s (the spread is the passes' min–max); the latencies are that pass's. Prompt tokens: the "
              "mean per request, as the server's usage counts them."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--quick", action="store_true", help="2 s points, one pass")
    parser.add_argument("--repeat", type=int, default=None, help="passes (default 3, quick 1)")
    parser.add_argument("--rate", type=float,
                        help=f"the open-loop requests/s (default: {OPEN_LOOP_SHARE:g} x what 4 clients got through)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    model = MODELS[args.model]
    settings = {"duration": 2.0 if args.quick else model["duration"], "warmup": 1.0 if args.quick else model["warmup"],
                "repeat": args.repeat or (1 if args.quick else 3), "rate": args.rate}
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= 2:
        bench.SERVER_CORE = cores[0]
        os.sched_setaffinity(0, {cores[1]})
    path = model_path(args.model)
    started = time.monotonic()
    passes = []
    with tempfile.TemporaryDirectory() as tmp:
        for number in range(settings["repeat"]):
            print(f"pass {number + 1}/{settings['repeat']}", flush=True)
            passes.append(one_pass(args.model, path, settings, tmp))
    merged = bench.median_points(passes, "tokens_per_s")
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    header = (f"{datetime.now(UTC).isoformat(timespec='seconds')}, {'quick' if args.quick else 'full'}, "
              f"{time.monotonic() - started:.0f} s; {platform.processor() or platform.machine()}, "
              f"{len(cores)} cores (server on one, client on the other; load average {load} at the end); "
              f"Python {platform.python_version()}; model {args.model}, {INPUT_WORDS[0]}-{INPUT_WORDS[1]} words in, "
              f"{model['tokens']} tokens out, {settings['duration']:g} s points after {settings['warmup']:g} s warmup.")
    lines = table(args.model, merged, settings, header)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"serving-{args.model}.json").write_text(json.dumps(
        {"settings": settings, "model": args.model, "slo_ms": MODELS[args.model]["slo"], "header": header,
         "notes": bench.NOTES, "passes": passes, "points": merged}, indent=1) + "\n")
    (args.out / f"serving-{args.model}.md").write_text("\n".join(lines) + "\n")
    readme = ROOT / "benchmarks" / "README.md"
    begin, end = f"<!-- results:serving-{args.model} -->", f"<!-- /results:serving-{args.model} -->"
    text = readme.read_text()
    if args.out.resolve() == (ROOT / "benchmarks" / "results").resolve() and begin in text and end in text:
        head, rest = text.split(begin, 1)
        readme.write_text(head + begin + "\n" + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1])
    print("\n".join(lines + bench.NOTES))


if __name__ == "__main__":
    main()
