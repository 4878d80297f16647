"""deploy/: the Grafana dashboard is panels.py's, and every metric its queries name is one runnel exports."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from runnel.testing import request
from runnel.testing.pytest_plugin import TINY_CONFIG

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SUFFIXES = ("_bucket", "_sum", "_count", "_total")


def panels():
    spec = importlib.util.spec_from_file_location("panels", DEPLOY / "grafana" / "panels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expressions() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "runnel-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_the_committed_dashboard_is_what_panels_py_makes():
    committed = json.loads((DEPLOY / "grafana" / "runnel-dashboard.json").read_text())
    assert committed == panels().dashboard(), "run: python deploy/grafana/panels.py"


def test_every_metric_the_dashboard_queries_is_exported(start_server):
    config = {"server": {"runs_path": ""}, "apps": {**TINY_CONFIG["apps"], "echo": {"backend": "echo"}}}
    server = start_server(config)
    text = request(server.port, "GET", "/metrics").body.decode()
    exported = {family.name for family in text_string_to_metric_families(text)}
    named = {name for expr in expressions() for name in re.findall(r"\b(runnel_\w+)", expr)}
    assert len(named) >= 15
    for name in named:
        base = next((name[: -len(s)] for s in SUFFIXES if name.endswith(s) and name[: -len(s)] in exported), name)
        assert base in exported, name


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus package) not installed")
def test_promtool_parses_every_query_and_the_scrape_config(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{index}", "expr": expr.replace("$__rate_interval", "1m")}
        for index, expr in enumerate(expressions())]}]}
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    for command in (["promtool", "check", "rules", str(path)],
                    ["promtool", "check", "config", str(DEPLOY / "prometheus.yml")]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
