"""The report as text: a progress line while running, an aligned table at the end."""

from __future__ import annotations

from .stats import KEYS

BAR_WIDTH = 24


def format_progress(elapsed: float, total: float, warming: bool, sent: int, max_requests: int,
                    ok: int, errors: int, rate: float, in_flight: int) -> str:
    done = min(1.0, max(elapsed / total if total else 1.0, sent / max_requests))
    filled = int(done * BAR_WIDTH)
    phase = "warmup " if warming else "measure"
    return (
        f"{phase} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {elapsed:5.1f}/{total:.1f} s"
        f"  sent {sent}  ok {ok}  errors {errors}  {rate:.0f} req/s  in flight {in_flight}"
    )


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 100 else f"{value:.1f}"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_table(report: dict) -> str:
    """The report dict as plain aligned text."""
    w, spec = report["workload"], report["spec"]
    if spec["concurrency"] is not None:
        load = f"closed loop, {spec['concurrency']} clients"
    else:
        burstiness = spec.get("burstiness", 1.0)
        shape = "Poisson" if burstiness == 1.0 else f"gamma, burstiness {burstiness:g}"
        load = f"open loop, {spec['rate']:g} requests/s ({shape})"
    load += f", {spec['duration']:g} s after {spec['warmup']:g} s warmup, at most {spec['max_requests']} requests"
    errors = report["errors"]
    n_errors = sum(errors.values())
    rows = [
        ("target", f"{w['method']} {w['url']}" + (" (SSE stream)" if w["stream"] else "")),
        ("load", load),
        ("requests", f"{report['requests']} ok, {n_errors} errors in {report['duration_s']:.3f} s"
                     f" = {report['requests_per_s']:.1f} requests/s"),
    ]
    if report["tokens"] or w["stream"]:
        per = f" ({report['tokens'] / report['requests']:.1f} per request)" if report["requests"] else ""
        rows.append(("tokens", f"{report['tokens']} out{per}; {report['tokens_per_s']:.1f} tokens/s by arrival"
                               f" ({report.get('completed_tokens_per_s', 0.0):.1f} counting finished requests only)"))
    if "goodput" in report:
        good = report["goodput"]
        slos = ", ".join(f"{key} <= {bound:g} ms" for key, bound in good["slo_ms"].items())
        rows.append(("goodput", f"{good['requests']} requests met {slos} = {good['requests_per_s']:.1f} requests/s"))
    rows.append(("received", _size(report["bytes_received"])))
    if n_errors:
        rows.append(("errors", ", ".join(f"{kind} {count}" for kind, count in errors.items())))
    if report.get("in_flight_at_end"):
        rows.append(("cut", f"{report['in_flight_at_end']} requests in flight at the end (not counted)"))
    if "client_cpu_s" in report and report.get("wall_s"):
        rows.append(("client", f"{report['client_cpu_s']:.2f} s CPU in {report['wall_s']:.2f} s"
                               f" ({100 * report['client_cpu_s'] / report['wall_s']:.0f}% of one core)"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]

    dists = [(name, report[key]) for name, key in
             (("e2el ms", "latency_ms"), ("ttft ms", "ttft_ms"), ("tpot ms", "tpot_ms"), ("itl ms", "itl_ms"))
             if key in report]
    table = [["", *KEYS]] + [[name, *(_number(d[k]) for k in KEYS)] for name, d in dists]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines.append("")
    for row in table:
        lines.append("  ".join([row[0].ljust(widths[0])] + [cell.rjust(widths[i]) for i, cell in
                                                            enumerate(row[1:], 1)]).rstrip())
    return "\n".join(lines)
