"""CTranslate2 thread layouts and batch division, measured through runnel's scheduler in-process.

    .venv/bin/python benchmarks/ct2_layout.py [--model small|medium|tiny] [--passes 3] [--seconds 4] [--busy]
    .venv/bin/python benchmarks/ct2_layout.py --staggered [--clients 4,16] [--rounds 3] [--fold both|on|off] [--json F]
    benchmarks/.venv-peers/bin/python benchmarks/ct2_layout.py --plot F.json F.png   # TTFT distributions

Issue 17 asks which CPU layout to default to and whether dividing a window's rows over the
free batch slots pays. Each point runs ``clients`` closed-loop generations (greedy,
ignore_eos, ``--tokens`` each) through ``runnel_ctranslate2.scheduler.BatchScheduler``,
the code the server runs, with a sink that only counts, so the figures are the scheduler
plus CTranslate2 without HTTP. Layouts:

- ``2x1 divide``: inter_threads=2, intra_threads=1, rows divided over the free slots when
                  each part gets ``MIN_SPLIT_ROWS`` (now)
- ``2x1 split``:  the same, divided whatever the count (a slot taken by even 1 row)
- ``2x1 fill``:   the same, one batch filled first (before issue 17's change)
- ``1x2``:        inter_threads=1, intra_threads=2 (one batch at a time, two threads on it)

The layouts alternate in short windows within each pass (these machines' two cores drift in
speed from minute to minute), and each figure is the median of the passes with the spread.
``--staggered`` measures time to first token instead: ``clients`` requests arriving
``--gap-ms`` apart (a burst spread over a few ms, as real clients arrive), ``--rounds`` rounds
per pass, with folding (admission at the next step, issue 17 §1) on and off alternating in
each pass (``--fold both``, the default; ``on`` or ``off`` measures one), in the layouts
``--layouts`` names (default ``2x1 divide``, the scheduler as it ships); it reports TTFT
p50/p90/p99 and tokens/s (every request's tokens over the round's time, first arrival to
last token). ``--busy`` adds one process spinning on a core meanwhile (a neighbour, or the event loop
under load), the condition in which intra-op threads are said to collapse. Bounded: every
point runs ``--seconds``; the whole run prints its duration up front.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks.models

from benchmarks.models import SHAPES, model_dir  # noqa: E402

PROMPT = "The cat sees a red ball in the garden"


class Counting:
    """A TokenSink that counts tokens and resolves when every choice has finished."""

    def __init__(self, done: asyncio.Future) -> None:
        self.tokens = 0
        self.done = done

    def on_tokens(self, index, text, token_ids, logprobs=None) -> None:
        self.tokens += len(token_ids)

    def on_finish(self, index, reason, completion_tokens) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def on_error(self, error) -> None:
        if not self.done.done():
            self.done.set_exception(error)


async def measure(directory: str, layout: str, clients: int, tokens: int, seconds: float, gap: float | None = None,
                  fold: bool = True, device: str = "cpu"):
    import ctranslate2

    from runnel.generation import SamplingParams
    from runnel_ctranslate2 import scheduler as ct2_scheduler
    from runnel_ctranslate2.tokenizer import load_tokenizer

    inter, intra = (1, 2) if layout == "1x2" else (2, 1)
    compute_type, window = "int8", 0.002
    if device == "cuda":  # the app's GPU defaults: one batch slot, a 5 ms window, int8 weights on float16
        inter, intra, compute_type, window = 1, 1, "int8_float16", 0.005
    generator = ctranslate2.Generator(directory, device=device, inter_threads=inter, intra_threads=intra,
                                      compute_type=compute_type)
    tokenizer = load_tokenizer(directory)
    generator.generate_batch([[tokenizer.id_to_token(tokenizer.bos_id or 0)]], max_length=2)  # warm-up
    scheduler = ct2_scheduler.BatchScheduler(generator, tokenizer, max_batch_size=64, window=window,
                                             max_queue=1024, slots=inter, fold=fold)
    if layout == "2x1 fill":
        scheduler._flush = lambda: _fill_flush(scheduler)  # type: ignore[method-assign]
    elif layout == "2x1 split":
        ct2_scheduler.MIN_SPLIT_ROWS = 1
    else:
        ct2_scheduler.MIN_SPLIT_ROWS = 4
    prompt = tokenizer.encode(PROMPT, add_bos=True)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    made = 0

    async def client() -> None:
        nonlocal made
        while loop.time() < deadline:
            sink = Counting(loop.create_future())
            scheduler.submit(prompt, params, 1, sink)
            await sink.done
            made += sink.tokens

    async def first_token(delay: float) -> float:
        await asyncio.sleep(delay)
        sink = Counting(loop.create_future())
        sent = loop.time()
        first = loop.create_future()
        on_tokens = sink.on_tokens

        def seen(*args) -> None:
            if not first.done():
                first.set_result(loop.time() - sent)
            on_tokens(*args)
        sink.on_tokens = seen  # type: ignore[method-assign]
        scheduler.submit(prompt, params, 1, sink)
        await sink.done
        return first.result()

    started = time.perf_counter()
    if gap is not None:
        ttfts = await asyncio.gather(*(first_token(i * gap) for i in range(clients)))
        rate = clients * tokens / (time.perf_counter() - started)
        folds = scheduler.stats.folds
        await scheduler.close(5)
        del generator
        return ttfts, rate, folds
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    await scheduler.close(5)
    del generator
    return made / elapsed


def _fill_flush(self) -> None:
    """The scheduler's flush before issue 17: each batch takes every row of its key it can."""
    if self._timer is not None:
        self._timer.cancel()
        self._timer = None
    self.waiting = [row for row in self.waiting if not row.done]
    while self.waiting and self.running < self.slots:
        key = self.waiting[0].key
        batch_rows, rest = [], []
        for row in self.waiting:
            if row.key == key and len(batch_rows) < self.max_batch_size:
                batch_rows.append(row)
            else:
                rest.append(row)
        self.waiting = rest
        self._launch(batch_rows)


def _percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile of ``values`` (sorted), q in [0, 1]."""
    return values[min(len(values) - 1, max(0, round(q * len(values) + 0.5) - 1))]


def staggered(args) -> None:
    layouts = args.layouts.split(",")
    modes = {"both": [True, False], "on": [True], "off": [False]}[args.fold]
    clients = [int(c) for c in args.clients.split(",")]
    directory = model_dir(args.model)
    ttfts: dict[tuple[str, bool, int], list[float]] = {}
    rates: dict[tuple[str, bool, int], list[float]] = {}
    folds: dict[tuple[str, bool, int], int] = {}
    for _ in range(args.passes):
        for count in clients:
            for _ in range(args.rounds):
                for layout in layouts:
                    for fold in modes:
                        got, rate, folded = asyncio.run(
                            measure(directory, layout, count, args.tokens, 0, args.gap_ms / 1000, fold,
                                    args.device))
                        ttfts.setdefault((layout, fold, count), []).extend(got)
                        rates.setdefault((layout, fold, count), []).append(rate)
                        folds[layout, fold, count] = folds.get((layout, fold, count), 0) + folded
    print(f"\nTTFT (ms) of {args.passes} passes x {args.rounds} rounds of N requests arriving {args.gap_ms:g} ms "
          f"apart, {args.tokens} tokens each ({args.model} model, {args.device}); tokens/s: median of the rounds "
          "(spread)")
    print("| clients | layout | fold | TTFT p50 / p90 / p99 | p99 / p50 | tokens/s | folds a round |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for count in clients:
        for layout in layouts:
            for fold in modes:
                values = sorted(ttfts[layout, fold, count])
                p50, p90, p99 = (_percentile(values, q) for q in (0.5, 0.9, 0.99))
                spread = rates[layout, fold, count]
                print(f"| {count} | {layout} | {'on' if fold else 'off'} | {1000 * p50:.0f} / {1000 * p90:.0f} / "
                      f"{1000 * p99:.0f} | {p99 / p50:.1f}x | {statistics.median(spread):.0f} "
                      f"({min(spread):.0f}-{max(spread):.0f}) | {folds[layout, fold, count] / len(spread):.1f} |")
    if args.json:
        points = [{"clients": count, "layout": layout, "fold": fold, "ttft_s": sorted(ttfts[layout, fold, count]),
                   "tokens_per_s": rates[layout, fold, count], "folds": folds[layout, fold, count]}
                  for count in clients for layout in layouts for fold in modes]
        Path(args.json).write_text(json.dumps({"model": args.model, "device": args.device, "tokens": args.tokens,
                                               "gap_ms": args.gap_ms, "passes": args.passes, "rounds": args.rounds,
                                               "points": points}, indent=1) + "\n")
        print(f"wrote {args.json}")


def plot_staggered(source: Path, path: Path) -> None:
    """TTFT distributions of a ``--staggered --json`` run, folding on against off: a panel per
    client count, a line per layout and fold (needs matplotlib: benchmarks/.venv-peers has it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    data = json.loads(source.read_text())
    counts = sorted({point["clients"] for point in data["points"]})
    fig, axes = plt.subplots(1, len(counts), figsize=(6 * len(counts), 4.5), squeeze=False, layout="constrained")
    for ax, count in zip(axes[0], counts):
        for point in (p for p in data["points"] if p["clients"] == count):
            values = [1000 * v for v in point["ttft_s"]]
            ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post",
                    linewidth=2.2 if point["fold"] else 1.2, linestyle="-" if point["fold"] else "--",
                    label=f"{point['layout']}, fold {'on' if point['fold'] else 'off'}")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("time to first token (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{count} clients arriving {data['gap_ms']:g} ms apart")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Folding: TTFT, {data['model']} model ({data['device']}), {data['tokens']} tokens a request, "
                 f"{data['passes']} passes x {data['rounds']} rounds")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _spin(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="small")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--busy", action="store_true", help="one process spins on a core meanwhile")
    parser.add_argument("--staggered", action="store_true", help="TTFT of requests arriving --gap-ms apart")
    parser.add_argument("--gap-ms", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3, help="--staggered: rounds per pass")
    parser.add_argument("--fold", choices=("both", "on", "off"), default="both",
                        help="--staggered: folding on, off, or both alternating (default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="--staggered: cuda runs the app's GPU defaults (one slot, 5 ms window, int8_float16)")
    parser.add_argument("--layouts", default="2x1 divide",
                        help="--staggered: comma-separated layouts (2x1 divide, 2x1 split, 2x1 fill, 1x2)")
    parser.add_argument("--json", help="--staggered: also write every TTFT and rate to this JSON file")
    parser.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"),
                        help="plot a --staggered --json run's TTFT distributions (matplotlib), and do nothing else")
    args = parser.parse_args()
    if args.plot:
        return plot_staggered(Path(args.plot[0]), Path(args.plot[1]))
    if args.staggered:
        return staggered(args)
    layouts = ["2x1 divide", "2x1 fill", "1x2"]
    clients = [int(c) for c in args.clients.split(",")]
    directory = model_dir(args.model)
    print(f"{args.model} model, {args.tokens} tokens a request, {args.passes} passes x {len(clients)} client "
          f"counts x {len(layouts)} layouts x {args.seconds:g} s = ~"
          f"{args.passes * len(clients) * len(layouts) * (args.seconds + 1):.0f} s"
          + (", one core kept busy" if args.busy else ""), flush=True)
    stop = multiprocessing.Event()
    spinner = None
    if args.busy:
        spinner = multiprocessing.Process(target=_spin, args=(stop,), daemon=True)
        spinner.start()
    results: dict[tuple[str, int], list[float]] = {}
    try:
        for _ in range(args.passes):
            for count in clients:
                for layout in layouts:
                    rate = asyncio.run(measure(directory, layout, count, args.tokens, args.seconds))
                    results.setdefault((layout, count), []).append(rate)
    finally:
        stop.set()
        if spinner is not None:
            spinner.join(5)
    print(f"\n| clients | {' | '.join(layouts)} | divide / fill | 1x2 / divide |")
    print("|---:|" + "---:|" * (len(layouts) + 2))
    for count in clients:
        medians = {layout: statistics.median(results[layout, count]) for layout in layouts}
        cells = [f"{medians[layout]:.0f} ({min(results[layout, count]):.0f}-{max(results[layout, count]):.0f})"
                 for layout in layouts]
        print(f"| {count} | {' | '.join(cells)} | {medians['2x1 divide'] / medians['2x1 fill']:.2f}x | "
              f"{medians['1x2'] / medians['2x1 divide']:.2f}x |")
    print("\ntokens/s, median of the passes (spread)", file=sys.stderr)


if __name__ == "__main__":
    main()
