"""HTTP requests per second with ``runnel serve --workers 1`` and ``--workers 2``.

    .venv/bin/python benchmarks/workers.py [--quick] [--repeat N] [--out benchmarks/results]

Unlike run.py's scenarios nothing is pinned: the workers are meant to use every core,
and the load client (benchmarks/loadgen, in this process) shares them. Each pass starts
each server in turn and loads ``GET /v1/models`` (an 89-byte JSON body) with N closed-loop
keep-alive clients; SO_REUSEPORT spreads their connections over the workers. Reported per
point: the median pass's requests/s, the server's CPU (the supervisor and its workers
together; 1.0 = one core busy) and the client's. Writes ``workers.json`` and ``workers.md``
to ``--out``; benchmarks/README.md carries the table of the latest full run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmarks.run, benchmarks.loadgen

from benchmarks.run import NOTES, Server, median_points, run_points, runnel_command  # noqa: E402

APPS = '[apps.echo]\nbackend = "echo"\npace_ms = 0\n'


def measure(settings: dict, tmp: str) -> dict[str, list[dict]]:
    from benchmarks.loadgen import Workload

    command = runnel_command(tmp, "workers", APPS)
    passes: dict[str, list[list[dict]]] = {}
    for _ in range(settings["repeat"]):
        for workers in (1, 2):
            name = f"--workers {workers}"
            with Server(name, [*command, "--workers", str(workers)]) as server:
                workload = Workload(f"http://127.0.0.1:{server.port}/v1/models")
                passes.setdefault(name, []).append(
                    run_points(server, workload, settings["concurrency"], settings["duration"], settings["warmup"]))
    return {name: median_points(runs, "requests_per_s") for name, runs in passes.items()}


def table(results: dict[str, list[dict]]) -> list[str]:
    one, two = results["--workers 1"], results["--workers 2"]
    lines = ["| clients | --workers 1 req/s | server CPU | client CPU | --workers 2 req/s | server CPU | "
             "client CPU | 2 / 1 |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for a, b in zip(one, two, strict=True):
        lines.append(f"| {a['concurrency']} | {a['requests_per_s']:.0f} | {a['server_cpu']:.2f} | "
                     f"{a['client_cpu']:.2f} | {b['requests_per_s']:.0f} | {b['server_cpu']:.2f} | "
                     f"{b['client_cpu']:.2f} | {b['requests_per_s'] / max(a['requests_per_s'], 1e-9):.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 s points, one pass")
    parser.add_argument("--repeat", type=int, default=None, help="passes (default 3, quick 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    settings = {"concurrency": (16, 64), "duration": 1.0 if args.quick else 4.0,
                "warmup": 0.3 if args.quick else 1.0, "repeat": args.repeat or (1 if args.quick else 3)}
    with tempfile.TemporaryDirectory() as tmp:
        results = measure(settings, tmp)
    lines = table(results)
    cores = len(os.sched_getaffinity(0))
    when = datetime.now(UTC).isoformat(timespec="seconds")
    header = (f"{when}, {platform.processor() or platform.machine()}, {cores} cores, "
              f"Python {platform.python_version()}, {'quick' if args.quick else 'full'}, "
              f"median of {settings['repeat']} passes of {settings['duration']:g} s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "workers.json").write_text(json.dumps({"settings": settings, "machine": header, "notes": NOTES,
                                                       "servers": results}, indent=1))
    (args.out / "workers.md").write_text("\n".join([f"# --workers 1 vs 2: GET /v1/models\n\n{header}\n", *lines,
                                                    *(f"\nNote: {note}" for note in NOTES)]) + "\n")
    print("\n".join([header, *lines, *NOTES]))


if __name__ == "__main__":
    main()
