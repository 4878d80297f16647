"""A stand-in for a Grafana screenshot: the dashboard's queries (panels.py) over a recorded
run, evaluated here and drawn with matplotlib. Not Grafana, and not Prometheus: a small
evaluator for exactly the query shapes the dashboard uses (sum by, rate, histogram_quantile,
a ratio), with rate() over a fixed window of the recorded scrapes.

    python deploy/grafana/render.py record run.jsonl   # a server with builtin:tiny and echo, driven ~90 s
    python deploy/grafana/render.py draw run.jsonl deploy/grafana/runnel-dashboard.png

Needs runnel (the project's .venv) to record, matplotlib and prometheus_client to draw.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from panels import PANELS  # noqa: E402

WINDOW = 15.0  # seconds: rate()'s window over the recorded scrapes
SCRAPE_EVERY = 2.0


# -- recording ------------------------------------------------------------------------------
def record(out: str, seconds: float = 90.0) -> None:
    import orjson

    from runnel.testing import request
    from runnel.testing.server import ServerThread, server_config

    hello = Path(__file__).resolve().parents[2] / "examples" / "hello" / "main.py"
    config = {"server": {"max_connections": 64, "runs_path": ""},
              "apps": {"tiny": {"backend": "ctranslate2", "model": "builtin:tiny", "device": "cpu",
                                "max_batch_size": 8, "max_queue": 24},
                       "echo": {"backend": "echo", "pace_ms": 15, "max_generations": 2},  # 429s past 2
                       "hello": {"backend": "python", "module": str(hello)}}}
    server = ServerThread(server_config(config)).start()
    assert server.wait_ready(120)
    port, stop, started = server.port, threading.Event(), time.monotonic()

    def client(number: int) -> None:
        rng = random.Random(number)
        while not stop.is_set():
            phase = (time.monotonic() - started) / seconds  # load rises, then falls
            if rng.random() > math.sin(math.pi * phase) + 0.1:
                time.sleep(0.2)
                continue
            if number == 0:  # async runs, some of which fail
                function = "fail" if rng.random() < 0.2 else "spell"
                request(port, "POST", f"/v4/demo/hello/{function}?async=true",
                        body=orjson.dumps({"word": "runnel", "delay": 0.05} if function == "spell" else {}),
                        headers=[("content-type", "application/json")])
                time.sleep(0.1)
                continue
            model = "tiny" if number % 3 else "echo"
            body = {"model": model, "prompt": rng.choice(["Once upon a time", "The cat", "A dog ran to"]),
                    "max_tokens": rng.randint(8, 48), "stream": rng.random() < 0.5, "temperature": 0.8}
            try:
                request(port, "POST", "/v1/completions", body=orjson.dumps(body),
                        headers=[("content-type", "application/json")])
            except OSError:
                pass

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(12)]
    for thread in threads:
        thread.start()
    with open(out, "w") as f:
        while time.monotonic() - started < seconds:
            text = request(port, "GET", "/metrics").body.decode()
            kept = "\n".join(line for line in text.splitlines() if "runnel_" in line)
            f.write(json.dumps({"t": time.monotonic() - started, "text": kept}) + "\n")
            time.sleep(SCRAPE_EVERY)
    stop.set()
    for thread in threads:
        thread.join(30)
    server.stop()


# -- evaluating the dashboard's query shapes ---------------------------------------------------
Series = dict[tuple, float]  # labels (sorted items) -> value


def load(path: str) -> list[tuple[float, dict[str, Series]]]:
    from prometheus_client.parser import text_string_to_metric_families

    scrapes = []
    for line in open(path):
        row = json.loads(line)
        samples: dict[str, Series] = defaultdict(dict)
        for family in text_string_to_metric_families(row["text"]):
            for sample in family.samples:
                samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
        scrapes.append((row["t"], samples))
    return scrapes


SELECTOR = re.compile(r"(\w+)(?:\{(.*?)\})?")


def select(samples: dict[str, Series], selector: str) -> Series:
    name, matchers = SELECTOR.fullmatch(selector.strip()).groups()
    wanted = dict(re.findall(r'(\w+)="([^"]*)"', matchers or ""))
    return {labels: value for labels, value in samples.get(name, {}).items()
            if all(dict(labels).get(k) == v for k, v in wanted.items())}


def sum_by(series: Series, by: tuple[str, ...]) -> Series:
    out: Series = defaultdict(float)
    for labels, value in series.items():
        out[tuple((k, v) for k, v in labels if k in by)] += value
    return out


def evaluate(expr: str, scrapes, at: int) -> Series:
    expr = expr.replace("[$__rate_interval]", "")
    if " / " in expr:
        top, bottom = (evaluate(part, scrapes, at) for part in expr.split(" / "))
        return {k: v / bottom[k] for k, v in top.items() if bottom.get(k)}
    quantile = re.fullmatch(r"histogram_quantile\(([\d.]+), (.*)\)", expr)
    if quantile:
        buckets = evaluate(quantile[2], scrapes, at)
        return histogram_quantile(float(quantile[1]), buckets)
    grouped = re.fullmatch(r"sum(?: by \(([\w, ]+)\) )?\((.*)\)", expr)
    if grouped:
        by = tuple(k.strip() for k in (grouped[1] or "").split(",") if k.strip())
        return sum_by(evaluate(grouped[2], scrapes, at), by)
    rate = re.fullmatch(r"rate\((.*)\)", expr)
    if rate:
        now_t, now = scrapes[at]
        then = next((i for i in range(at, -1, -1) if now_t - scrapes[i][0] >= WINDOW), 0)
        then_t, earlier = scrapes[then]
        if now_t == then_t:
            return {}
        new, old = select(now, rate[1]), select(earlier, rate[1])
        return {k: max(v - old.get(k, 0.0), 0.0) / (now_t - then_t) for k, v in new.items()}
    return select(scrapes[at][1], expr)


def histogram_quantile(q: float, buckets: Series) -> Series:
    groups: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for labels, value in buckets.items():
        le = float(dict(labels)["le"])
        groups[tuple((k, v) for k, v in labels if k != "le")].append((le, value))
    out: Series = {}
    for key, points in groups.items():
        points.sort()
        total = points[-1][1]
        if total <= 0:
            continue
        rank, lower, below = q * total, 0.0, 0.0
        for upper, count in points:
            if count >= rank:
                if math.isinf(upper):
                    out[key] = lower
                else:  # linear within the bucket, as Prometheus does
                    out[key] = lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
                break
            lower, below = upper, count
    return out


def legend(template: str, labels: tuple) -> str:
    values = dict(labels)
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values.get(m[1], ""), template).strip()


def draw(path: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scrapes = load(path)
    times = [t for t, _ in scrapes]
    columns, rows = 3, math.ceil(len(PANELS) / 3)
    figure, axes = plt.subplots(rows, columns, figsize=(15, 3.0 * rows), dpi=60)
    for axis, (title, unit, targets) in zip(axes.flat, PANELS, strict=False):
        for template, expr in targets:
            lines: dict[str, list[float]] = defaultdict(lambda: [math.nan] * len(scrapes))
            for at in range(len(scrapes)):
                for labels, value in evaluate(expr, scrapes, at).items():
                    lines[legend(template, labels)][at] = value * (1000 if unit == "s" else 1)
            for name, values in sorted(lines.items()):
                axis.plot(times, values, label=name, linewidth=1.2)
        axis.set_title(title + (" (ms)" if unit == "s" else ""), fontsize=10)
        axis.tick_params(labelsize=7)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=6, loc="upper left", ncols=2)
    for axis in list(axes.flat)[len(PANELS):]:
        axis.axis("off")
    figure.suptitle("STAND-IN, not Grafana: runnel-dashboard.json's queries over a recorded run "
                    "(builtin:tiny, echo, async runs on 2 CPU cores; seconds since start), drawn with matplotlib", fontsize=11)
    figure.tight_layout()
    figure.savefig(out)


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    record(*rest) if command == "record" else draw(*rest)
