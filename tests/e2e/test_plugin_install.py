"""A plugin installed with pip is found through its entry point, listed, and served."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from runnel.testing import H11Client, free_port, request, wait_until

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "plugins" / "runnel-echo"


def health(port: int):
    try:
        return request(port, "GET", "/health")
    except OSError:
        return None


def pip_install_copy(plugin: Path, tmp_path: Path, version: str) -> tuple[Path, dict]:
    """pip-install a copy of ``plugin`` (its version set to ``version``) into a target dir.

    Built from a copy so the shared checkout gets no build/ or egg-info output; the copy's
    version is bumped so the distribution found can be told from an editable one. Returns
    the target dir and an environment whose PYTHONPATH puts it first.
    """
    source = tmp_path / "src" / plugin.name
    shutil.copytree(plugin, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pyproject = source / "pyproject.toml"
    text = pyproject.read_text()
    assert 'version = "0.1.0"' in text
    pyproject.write_text(text.replace('version = "0.1.0"', f'version = "{version}"'))
    target = tmp_path / "site"

    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNEL_")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH")]))
    return target, env


@contextlib.contextmanager
def serving(config_text: str, env: dict, tmp_path: Path):
    """``runnel serve`` in its own process with ``env``; yields its port once healthy, stops it after."""
    config = tmp_path / "serve.toml"
    config.write_text(config_text)
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "runnel", "serve", "--config", str(config), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
    )
    try:
        reply = wait_until(lambda: proc.poll() is None and health(port), timeout=30)
        assert (reply.status, reply.body) == (200, b'{"status":"ok"}'), (tmp_path / "serve.log").read_text()
        yield port
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


def test_pip_installed_plugin_is_found_listed_and_served(tmp_path):
    target, env = pip_install_copy(PLUGIN, tmp_path, "0.1.0.post7")
    assert (target / "runnel_echo" / "__init__.py").is_file()

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

    with serving('[apps.echo]\nbackend = "echo"\n', env, tmp_path) as port:
        with H11Client(port) as client:
            reply = client.request("POST", "/echo/echo", body=b'{"prompt": "hello plugin", "max_tokens": 3}')
            assert reply.status == 200
            assert reply.json() == {"app": "echo", "text": "hello plugin hello", "tokens": 3}
            reply = client.request("POST", "/echo/echo", body=b'{"prompt": "s", "max_tokens": 1, "stream": true}')
            assert reply.body == b'data: {"index":0,"token":"s"}\n\ndata: {"done":true,"tokens":1}\n\n'


# -- runnel-markov: the smallest backend plugin, the one the README shows -----------------------------------

MARKOV = REPO / "plugins" / "runnel-markov"
# Every word is followed by exactly one other, except "mat": greedy or not, the chain is fixed.
STORY = "the cat sat on a mat"


def test_markov_plugin_installed_with_pip_serves_the_openai_api(tmp_path):
    target, env = pip_install_copy(MARKOV, tmp_path, "0.1.0.post3")
    assert (target / "runnel_markov.py").is_file()
    listed = subprocess.run([sys.executable, "-m", "runnel", "plugins"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=60)
    assert "markov\trunnel-markov 0.1.0.post3\trunnel_register_backends\n" in listed.stdout, listed.stdout

    with serving('[apps.markov]\nbackend = "markov"\n', env, tmp_path) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
        assert [model.id for model in client.models.list().data] == ["markov"]

        # Chat and completions, not streamed: the chain runs to "mat", which nothing follows.
        chat = client.chat.completions.create(model="markov", messages=[{"role": "user", "content": STORY}])
        assert chat.choices[0].message.content == STORY
        assert chat.choices[0].finish_reason == "stop"
        assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (6, 6)
        completion = client.completions.create(model="markov", prompt=STORY, max_tokens=3)
        assert (completion.choices[0].text, completion.choices[0].finish_reason) == ("the cat sat", "length")
        assert completion.usage.completion_tokens == 3

        # Streamed, with a stop string that spans words: it is never sent.
        stream = client.chat.completions.create(model="markov", messages=[{"role": "user", "content": STORY}],
                                                stream=True, stop=["on a"], stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)
        reasons = [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason]
        assert (text, reasons) == ("the cat sat ", ["stop"])
        assert chunks[-1].usage.completion_tokens == 5  # "a" completed the stop string: counted, not sent
        stream = client.completions.create(model="markov", prompt=STORY, max_tokens=4, stream=True)
        chunks = list(stream)
        assert "".join(choice.text for chunk in chunks for choice in chunk.choices) == "the cat sat on"
        assert [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason] == ["length"]

        # n > 1 with a seed: each choice its own chain; the same seed, the same answers.
        branching = "a b a c a d a e"
        many = client.completions.create(model="markov", prompt=branching, n=3, max_tokens=9, seed=7)
        assert sorted(choice.index for choice in many.choices) == [0, 1, 2]
        for choice in many.choices:
            words = choice.text.split()
            assert words[0] == "a" and all(w == "a" for w in words[::2]) and set(words[1::2]) <= set("bcde")
        again = client.completions.create(model="markov", prompt=branching, n=3, max_tokens=9, seed=7)
        assert [c.text for c in again.choices] == [c.text for c in many.choices]
        streamed = client.completions.create(model="markov", prompt=branching, n=2, max_tokens=6, seed=7,
                                             stream=True)
        texts = ["", ""]
        for chunk in streamed:
            for choice in chunk.choices:
                texts[choice.index] += choice.text
        assert all(text.split()[0] == "a" for text in texts)

        # What the backend does not honour is refused, not ignored.
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model="markov", prompt=STORY, logprobs=1)
        assert refused.value.body["param"] == "logprobs"


def test_readme_shows_the_whole_markov_plugin():
    # The README's "Writing a backend plugin" shows the plugin's source: the very file the test above installs.
    readme = (REPO / "README.md").read_text()
    source = (MARKOV / "runnel_markov.py").read_text()
    assert f"```python\n{source}```\n" in readme
    assert len(source.splitlines()) <= 80
    assert '[project.entry-points.runnel]\nmarkov = "runnel_markov"\n' in (MARKOV / "pyproject.toml").read_text()
