"""The Dockerfile and deploy/ (compose, Kubernetes) hold together, offline.

Nothing here builds an image or talks to a cluster (neither exists on the machines the
tests run on): the files are parsed (PyYAML, runnel's own config loader) and the
fields they rely on are checked against each other and against runnel: the port the
image listens on, the probes, the RUNNEL_* variables (each one runnel reads), the
config they mount (valid), and grace periods that cover shutdown_grace.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import yaml

from runnel.config import Config, load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PORT = 8000
RUNS_URL = "RUNNEL_RUNS_URL"  # the Redis run store's URL (config.py)


def runnel_variables() -> set[str]:
    """Every RUNNEL_* name that runnel's code (core and plugins) mentions."""
    names: set[str] = set()
    for path in [*(ROOT / "server" / "runnel").rglob("*.py"), *(ROOT / "plugins").rglob("runnel_*/*.py")]:
        names.update(re.findall(r"\bRUNNEL_[A-Z_]+\b", path.read_text(encoding="utf-8")))
    return names


def check_variables(env: dict[str, str]) -> None:
    unknown = {name for name in env if name.startswith("RUNNEL_")} - runnel_variables()
    assert not unknown, f"variables runnel does not read: {unknown}"
    assert env["RUNNEL_PORT"] == str(PORT) and env["RUNNEL_HOST"] == "0.0.0.0"
    assert int(env["RUNNEL_WORKERS"]) >= 1
    assert env[RUNS_URL].startswith("redis://")


def dockerfile() -> dict[str, list[str]]:
    """Each instruction's arguments (continuation lines joined), by instruction."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    instructions: dict[str, list[str]] = {}
    for line in re.sub(r"\\\n", " ", text).splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            instructions.setdefault(word.upper(), []).append(rest.strip())
    return instructions


def deployed_config() -> Config:
    return load_config(DEPLOY / "runnel.toml")


def test_the_image_is_slim_non_root_and_serves_on_the_port():
    steps = dockerfile()
    assert re.fullmatch(r"python:3\.1[1-9]-slim", steps["FROM"][0])
    assert steps["USER"][-1].split(":")[0] not in ("root", "0")
    assert json.loads(steps["ENTRYPOINT"][0]) == ["runnel", "serve"]
    assert steps["EXPOSE"] == [str(PORT)]
    env = dict(shlex.split(assignment)[0].split("=", 1) for line in steps["ENV"] for assignment in
               re.findall(r"\S+=\S+", line))
    assert env["RUNNEL_PORT"] == str(PORT) and env["RUNNEL_HOST"] == "0.0.0.0"
    assert set(filter(lambda name: name.startswith("RUNNEL_"), env)) <= runnel_variables()
    # The default config it names is copied in, and valid.
    assert env["RUNNEL_CONFIG"] == "/opt/runnel/conf/runnel.toml" and "conf ./conf" in steps["COPY"]
    load_config(ROOT / "conf" / "runnel.toml")


def test_the_mounted_config_is_valid_and_kubernetes_mounts_the_same():
    config = deployed_config()
    assert {"tiny", "hello"} <= set(config.apps)
    [configmap] = [doc for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / "runnel.yaml").read_text())
                   if doc["kind"] == "ConfigMap"]
    assert configmap["data"]["runnel.toml"] == (DEPLOY / "runnel.toml").read_text(encoding="utf-8")


def test_compose_runs_two_replicas_behind_nginx_with_redis():
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    services = compose["services"]
    replicas = {name: service for name, service in services.items() if name.startswith("runnel-")}
    assert len(replicas) == 2
    grace = deployed_config().server.shutdown_grace
    for service in replicas.values():
        assert service["build"]["dockerfile"] == "Dockerfile"
        assert (DEPLOY / "compose" / service["build"]["context"] / "Dockerfile").is_file()
        check_variables(service["environment"])
        assert service["environment"][RUNS_URL].startswith("redis://redis:6379/")
        mount = next(volume for volume in service["volumes"] if volume.endswith(":/etc/runnel/runnel.toml:ro"))
        assert (DEPLOY / "compose" / mount.split(":")[0]).resolve() == DEPLOY / "runnel.toml"
        assert service["environment"]["RUNNEL_CONFIG"] == "/etc/runnel/runnel.toml"
        assert int(service["stop_grace_period"].removesuffix("s")) > grace
        assert f"http://127.0.0.1:{PORT}/health" in " ".join(service["healthcheck"]["test"])
    assert "--appendonly" in services["redis"]["command"]
    nginx = (DEPLOY / "compose" / "nginx.conf").read_text()
    upstreams = set(re.findall(r"^\s*server\s+([\w.-]+:\d+)", nginx, re.M))
    assert upstreams == {f"{name}:{PORT}" for name in replicas}
    listen = re.search(r"listen\s+(\d+);", nginx)
    assert listen and services["nginx"]["ports"] == [f"{listen[1]}:{listen[1]}"]
    assert "proxy_buffering off;" in nginx  # streams are not held back


def test_kubernetes_readiness_on_health_and_grace_past_shutdown_grace():
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / "runnel.yaml").read_text())}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    port = container["ports"][0]
    assert port["containerPort"] == PORT
    ready = container["readinessProbe"]["httpGet"]
    assert ready["path"] == "/health" and ready["port"] == port["name"]
    check_variables({item["name"]: item["value"] for item in container["env"]})
    assert pod["securityContext"]["runAsNonRoot"] is True
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pause + deployed_config().server.shutdown_grace
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert mount["mountPath"] == "/etc/runnel"
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    selector = docs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert docs["Service"]["spec"]["selector"] == selector
    assert docs["Deployment"]["spec"]["template"]["metadata"]["labels"] == selector
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == port["name"]

    redis = {doc["kind"]: doc for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / "redis.yaml").read_text())}
    statefulset = redis["StatefulSet"]
    host = container["env"][[item["name"] for item in container["env"]].index(RUNS_URL)]["value"]
    # redis://<pod>.<headless service>:6379/0
    assert host.startswith(f"redis://{statefulset['metadata']['name']}-0.{redis['Service']['metadata']['name']}:6379/")
    assert statefulset["spec"]["serviceName"] == redis["Service"]["metadata"]["name"]
    assert redis["Service"]["spec"]["clusterIP"] == "None"
    assert "--appendonly" in statefulset["spec"]["template"]["spec"]["containers"][0]["args"]

