"""runnel against llama.cpp on the same weights, in alternating windows.

    benchmarks/.venv-peers/bin/python benchmarks/llamacpp_peer.py [--model small|medium|tiny]
        [--streams 1,4,16] [--rounds 3] [--window 12] [--single-rounds 6] [--single-window 5]

Two servers run side by side for the whole measurement, on 127.0.0.1, each on two threads:
runnel with the CTranslate2 model (inter_threads=2, intra_threads=1, int8) and
llama-cpp-python's own server (``--n_threads 2``) with the same weights as a Q8_0 GGUF
(benchmarks/models.py: the llamacpp plugin's converter, llama.cpp's quantizer). Neither is
pinned: two threads on one core would be a layout nobody runs. The load client
(benchmarks/loadgen) loads one at a time while the other is idle.

These machines' cores drift ~1.5x in speed from minute to minute, so a ratio is only
taken between windows next to each other: each round loads runnel then llama.cpp (the
order flips every round, so neither always goes first) at each stream count, and the
ratio of a round is of its two windows. Reported: the median over the rounds and their
spread. Then the single-stream ratio alone, in more, shorter rounds. Every window is
bounded (warmup + window seconds); requests time out after 120 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmarks.run, benchmarks.loadgen, benchmarks.models

import benchmarks.run as bench  # noqa: E402

TOKENS = {"tiny": 128, "small": 64, "medium": 32}  # out per request (ignore_eos); shorter as tokens cost more
WARMUP = 1.0


def orders(names: tuple[str, str], rounds: int) -> list[tuple[str, str]]:
    """The order of the pair in each round: flipped every round, so that drift within a
    round favours neither side over the rounds."""
    return [names if number % 2 == 0 else names[::-1] for number in range(rounds)]


def paired(rounds: list[dict[str, float]], ours: str, theirs: str) -> dict:
    """The per-round ratios ours/theirs of one measure, their median and spread. A round
    where theirs is zero (nothing arrived in its window) has no ratio and is counted apart."""
    ratios = [r[ours] / r[theirs] for r in rounds if r[theirs]]
    if not ratios:
        return {"median": None, "min": None, "max": None, "rounds": 0, "without_ratio": len(rounds)}
    return {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
            "max": round(max(ratios), 3), "rounds": len(ratios), "without_ratio": len(rounds) - len(ratios)}


def settle(server: bench.Server, limit: float = 120.0) -> float:
    """Wait until the server is idle (under 5% of a core over a quarter second); the seconds
    waited. A window ends with requests in flight, and llama-cpp-python's server (run with
    interrupt_requests off) finishes a request whose client has gone: without this, the
    next window would measure that leftover work."""
    began = time.monotonic()
    while time.monotonic() - began < limit:
        cpu = bench.cpu_seconds(server.pids)
        time.sleep(0.25)
        if bench.cpu_seconds(server.pids) - cpu < 0.05 * 0.25:
            return time.monotonic() - began
    bench.NOTES.append(f"{server.name} was still busy {limit:g} s after a window")
    return limit


def window(server: bench.Server, workload, streams: int, seconds: float) -> dict:
    from benchmarks.loadgen import LoadSpec, run_load

    spec = LoadSpec(concurrency=streams, duration=seconds, warmup=WARMUP, timeout=120.0, max_requests=100_000)
    cpu, start = bench.cpu_seconds(server.pids), time.perf_counter()
    report = run_load(workload, spec)
    busy = round((bench.cpu_seconds(server.pids) - cpu) / (time.perf_counter() - start), 2)
    waited = settle(server)
    ttft = report["ttft_ms"]
    return {"tokens_per_s": report["tokens_per_s"], "ttft_p50_ms": ttft["p50"], "ttft_p99_ms": ttft["p99"],
            "requests": report["requests"], "errors": sum(report["errors"].values()),
            "server_cpu": busy, "settled_s": round(waited, 2)}


def measure(servers: dict, workloads: dict, streams: list[int], rounds: int, seconds: float) -> dict[int, list]:
    """Per stream count, one entry per round: {server name: its window}."""
    results: dict[int, list] = {count: [] for count in streams}
    for number, order in enumerate(orders(tuple(servers), rounds)):
        for count in streams:
            entry = {}
            for name in order:
                entry[name] = window(servers[name], workloads[name], count, seconds)
                got = entry[name]
                print(f"  round {number + 1} c={count:<3} {name:8} {got['tokens_per_s']:8.1f} tok/s  ttft p50 "
                      f"{got['ttft_p50_ms'] or 0:8.1f} ms  requests {got['requests']}  errors {got['errors']}  "
                      f"server cpu {got['server_cpu']}  idle after {got['settled_s']} s", flush=True)
            results[count].append(entry)
    return results


def summarize(results: dict[int, list]) -> list[dict]:
    rows = []
    for count, entries in results.items():
        row: dict = {"streams": count}
        for name in ("runnel", "llama.cpp"):
            windows = [entry[name] for entry in entries]
            for key in ("tokens_per_s", "ttft_p50_ms"):
                values = [w[key] for w in windows if w[key] is not None]
                row[f"{name} {key}"] = statistics.median(values) if values else None
            row[f"{name} errors"] = sum(w["errors"] for w in windows)
        row["tokens ratio"] = paired([{k: e[k]["tokens_per_s"] for k in e} for e in entries], "runnel", "llama.cpp")
        # TTFT: llama.cpp's / runnel's, so that above 1 means runnel answers first, as for tokens.
        ttft = [{k: e[k]["ttft_p50_ms"] for k in e} for e in entries]
        row["ttft ratio"] = paired([t for t in ttft if None not in t.values()], "llama.cpp", "runnel")
        rows.append(row)
    return rows


def fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def ratio_cell(ratio: dict) -> str:
    if ratio["median"] is None:
        return "—"
    return f"{ratio['median']:.2f}x ({ratio['min']:.2f}–{ratio['max']:.2f}, {ratio['rounds']} rounds)"


def table(rows: list[dict]) -> list[str]:
    lines = ["| streams | runnel tok/s | llama.cpp tok/s | runnel / llama.cpp tok/s | runnel TTFT p50 ms | "
             "llama.cpp TTFT p50 ms | llama.cpp / runnel TTFT | errors (runnel, llama.cpp) |",
             "|---:|---:|---:|---|---:|---:|---|---|"]
    for row in rows:
        lines.append(f"| {row['streams']} | {fmt(row['runnel tokens_per_s'])} | {fmt(row['llama.cpp tokens_per_s'])} | "
                     f"{ratio_cell(row['tokens ratio'])} | {fmt(row['runnel ttft_p50_ms'])} | "
                     f"{fmt(row['llama.cpp ttft_p50_ms'])} | {ratio_cell(row['ttft ratio'])} | "
                     f"{row['runnel errors']}, {row['llama.cpp errors']} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "small", "medium"), default="small")
    parser.add_argument("--streams", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds over every stream count")
    parser.add_argument("--window", type=float, default=12.0, help="seconds each server is loaded per round")
    parser.add_argument("--single-rounds", type=int, default=6, help="then rounds at one stream only (0: none)")
    parser.add_argument("--single-window", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    from benchmarks.loadgen import Workload
    from benchmarks.models import gguf_path, model_spec
    from runnel_ctranslate2.apps import model_directory

    streams = [int(count) for count in args.streams.split(",")]
    tokens = TOKENS[args.model]
    model, compute_type = model_spec(args.model)
    gguf = gguf_path(args.model)
    model_dir = model_directory(model)
    total = (args.rounds * len(streams) * (args.window + WARMUP) + args.single_rounds * (args.single_window + WARMUP))
    print(f"model {args.model}, {tokens} tokens a request; ~{2 * total:.0f} s of windows", flush=True)
    apps = (f'[apps.bench]\nbackend = "ctranslate2"\nmodel = "{model}"\nserved_model_name = "bench"\n'
            f'device = "cpu"\ninter_threads = 2\nintra_threads = 1\nmax_batch_size = 16\nbatch_window_ms = 2\n'
            + (f'compute_type = "{compute_type}"\n' if compute_type else ""))
    common = {"model": "bench", "prompt": bench.PROMPT, "max_tokens": tokens, "temperature": 0}
    fields = {"runnel": {"ignore_eos": True}, "llama.cpp": bench.without_eos(model_dir)}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, \
            bench.Server("runnel", bench.runnel_command(tmp, "peer", apps), ready="/health") as runnel, \
            bench.llama_cpp_server(gguf, "bench") as llama:
        servers = {"runnel": runnel, "llama.cpp": llama}
        workloads = {}
        for name, server in servers.items():
            bench.check_tokens(server, {**common, **fields[name]}, tokens)
            workloads[name] = Workload.openai_completion(f"http://127.0.0.1:{server.port}", "bench", bench.PROMPT,
                                                         tokens, True, **fields[name], temperature=0)
            window(server, workloads[name], 1, 2.0)  # warm up
        print("== stream counts", flush=True)
        levels = measure(servers, workloads, streams, args.rounds, args.window)
        single = {}
        if args.single_rounds:
            print("== one stream, short windows", flush=True)
            single = measure(servers, workloads, [1], args.single_rounds, args.single_window)
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    rows, single_rows = summarize(levels), summarize(single) if single else []
    header = (f"{datetime.now(UTC).isoformat(timespec='seconds')}, {time.monotonic() - started:.0f} s, load average "
              f"{load} at the end; {os.cpu_count()} cores; model {args.model}, {tokens} tokens out per request "
              f"(greedy, no end token), prompt \"{bench.PROMPT}\"; {args.rounds} alternating rounds of "
              f"{args.window:g} s windows per stream count")
    lines = [header, "", *table(rows)]
    if single_rows:
        lines += ["", f"One stream alone, {args.single_rounds} alternating rounds of {args.single_window:g} s windows:",
                  "", *table(single_rows)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"llamacpp-{args.model}.json").write_text(json.dumps(
        {"header": header, "model": args.model, "tokens": tokens, "levels": {str(k): v for k, v in levels.items()},
         "single": {str(k): v for k, v in single.items()}, "rows": rows, "single_rows": single_rows,
         "notes": bench.NOTES}, indent=1) + "\n")
    (args.out / f"llamacpp-{args.model}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines + bench.NOTES))


if __name__ == "__main__":
    main()
