"""A plugin installed with pip is found through its entry point, listed, and served."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from runnel.testing import H11Client, free_port, request, wait_until

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "plugins" / "runnel-echo"


def health(port: int):
    try:
        return request(port, "GET", "/health")
    except OSError:
        return None


def test_pip_installed_plugin_is_found_listed_and_served(tmp_path):
    # Build from a copy so the shared checkout gets no build/ or egg-info output; the
    # copy's version is bumped so the distribution found can be told from the editable one.
    source = tmp_path / "src" / "runnel-echo"
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pyproject = source / "pyproject.toml"
    text = pyproject.read_text()
    assert 'version = "0.1.0"' in text
    pyproject.write_text(text.replace('version = "0.1.0"', 'version = "0.1.0.post7"'))
    target = tmp_path / "site"

    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNEL_")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert (target / "runnel_echo" / "__init__.py").is_file()

    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH")]))

    # The entry point resolves to the copy under the target dir, not the editable one.
    code = (
        "import runnel.plugins as p\n"
        "pm = p.make_plugin_manager()\n"
        "print(pm.get_plugin('echo').__file__)\n"
        "print([(n, d) for n, d in ((r['name'], r['distribution']) for r in p.describe_plugins(pm)) if n == 'echo'])\n"
    )
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=60)
    assert probe.returncode == 0, probe.stderr
    module_file, described = probe.stdout.splitlines()
    assert Path(module_file).resolve() == (target / "runnel_echo" / "__init__.py").resolve()
    assert described == "[('echo', 'runnel-echo 0.1.0.post7')]"

    listed = subprocess.run([sys.executable, "-m", "runnel", "plugins"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "echo\trunnel-echo 0.1.0.post7\trunnel_register_backends, runnel_register_routes\n" in listed.stdout

    config = tmp_path / "echo.toml"
    config.write_text('[apps.echo]\nbackend = "echo"\n')
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "runnel", "serve", "--config", str(config), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
    )
    try:
        reply = wait_until(lambda: proc.poll() is None and health(port), timeout=30)
        assert (reply.status, reply.body) == (200, b'{"status":"ok"}')
        with H11Client(port) as client:
            reply = client.request("POST", "/echo/echo", body=b'{"prompt": "hello plugin", "max_tokens": 3}')
            assert reply.status == 200
            assert reply.json() == {"app": "echo", "text": "hello plugin hello", "tokens": 3}
            reply = client.request("POST", "/echo/echo", body=b'{"prompt": "s", "max_tokens": 1, "stream": true}')
            assert reply.body == b'data: {"index":0,"token":"s"}\n\ndata: {"done":true,"tokens":1}\n\n'
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()
