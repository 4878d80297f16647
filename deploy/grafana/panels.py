"""The dashboard's panels and their PromQL: the one list both the Grafana JSON and the
stand-in rendering are made from (``python deploy/grafana/panels.py`` writes
runnel-dashboard.json; render.py draws the same queries)."""

from __future__ import annotations

import json
from pathlib import Path

RATE = "[$__rate_interval]"


def quantiles(metric: str, by: str = "app") -> list[tuple[str, str]]:
    return [(f"p{q} {{{{{by}}}}}", f"histogram_quantile(0.{q}, sum by (le, {by}) (rate({metric}_bucket{RATE})))")
            for q in ("50", "90", "99")]


# (title, unit, [(legend, PromQL)])
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Generation requests / s", "reqps", [
        ("{{app}} {{finish_reason}}", f"sum by (app, finish_reason) (rate(runnel_generation_requests_total{RATE}))")]),
    ("Generated tokens / s", "short", [
        ("{{app}}", f"sum by (app) (rate(runnel_generation_generated_tokens_total{RATE}))")]),
    ("Time to first token", "s", quantiles("runnel_generation_time_to_first_token_seconds")),
    ("Inter-token latency", "s", quantiles("runnel_generation_inter_token_latency_seconds")),
    ("End-to-end latency", "s", quantiles("runnel_generation_e2e_latency_seconds")),
    ("Queue depth", "short", [
        ("waiting rows {{app}}", "sum by (app) (runnel_generation_waiting_rows)"),
        ("running rows {{app}}", "sum by (app) (runnel_generation_running_rows)"),
        ("runs queued", "sum(runnel_runs_queued)")]),
    ("Batch size (rows)", "short", [
        ("mean {{app}}", f"sum by (app) (rate(runnel_generation_batch_size_rows_sum{RATE})) / "
                         f"sum by (app) (rate(runnel_generation_batch_size_rows_count{RATE}))"),
        ("p90 {{app}}", f"histogram_quantile(0.90, sum by (le, app) (rate(runnel_generation_batch_size_rows_bucket"
                        f"{RATE})))")]),
    ("Errors / s", "reqps", [
        ("5xx {{route}}", f'sum by (route) (rate(runnel_http_requests_total{{status="5xx"}}{RATE}))'),
        ("429 {{app}}", f'sum by (app) (rate(runnel_generation_requests_total{{finish_reason="rejected"}}{RATE}))'),
        ("client gone {{app}}",
         f'sum by (app) (rate(runnel_generation_requests_total{{finish_reason="cancelled"}}{RATE}))')]),
    ("HTTP requests / s", "reqps", [
        ("{{route}} {{status}}", f"sum by (route, status) (rate(runnel_http_requests_total{RATE}))")]),
    ("HTTP latency p99", "s", quantiles("runnel_http_request_duration_seconds", by="route")[2:]),
    ("Connections", "short", [
        ("open", "sum(runnel_http_connections_open)"),
        ("requests in flight", "sum(runnel_http_requests_in_flight)"),
        ("refused / s", f"sum(rate(runnel_http_connections_rejected_total{RATE}))")]),
    ("Runs", "short", [
        ("finished {{state}} / s", f"sum by (state) (rate(runnel_runs_finished_total{RATE}))"),
        ("webhooks {{outcome}} / s", f"sum by (outcome) (rate(runnel_webhook_deliveries_total{RATE}))")]),
]


def dashboard() -> dict:
    panels = []
    for number, (title, unit, targets) in enumerate(PANELS):
        panels.append({
            "id": number + 1, "type": "timeseries", "title": title,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 8, "x": (number % 3) * 8, "y": (number // 3) * 8},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
            "targets": [{"refId": chr(ord("A") + index), "expr": expr, "legendFormat": legend,
                         "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                        for index, (legend, expr) in enumerate(targets)],
        })
    return {
        "title": "runnel", "uid": "runnel-overview", "tags": ["runnel"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "refresh": "10s", "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus", "current": {}}]},
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("runnel-dashboard.json")
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {out}")
