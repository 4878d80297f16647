"""The README, run as a new user would: its examples against the server it tells them to start.

The server is ``runnel serve --config conf/runnel.toml`` (what ``make serve`` runs) on a
free port, started in a scratch directory so that nothing it writes lands in the checkout.
Every ```sh block of README.md is split into commands and the ``# `` lines shown below
each; each command runs through bash exactly as written (``localhost:8000`` rewritten to
the port) and its output must match what is shown. The matching rules, and the
``<!-- readme-test: skip: why -->`` marker for blocks not meant to be run, are written
down in README.md itself (an HTML comment under "Set up and run"), so the README says
how it is tested. ```python blocks are compiled (a snippet that cannot be pasted into a
script is a bug) and those that use the openai SDK are run; ```toml blocks are parsed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from runnel.testing import free_port, request, wait_until

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
README_PORT = "localhost:8000"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip:\s*(\S.*?)-->\s*$", re.S)
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
COMMAND_SECONDS = 10  # each command's deadline: a README example answers in well under a second
RETRY_SECONDS = 5  # how long a command without a body is retried until it shows what is shown

MODEL_WORDS = ("content", "text")  # keys whose values are the model's words
ENDINGS = ("stop", "length")  # where a reply ends is the model's choice too
TIMINGS = ("created", "run_time_ms", "delayTime", "executionTime")
JSON_STRING = r'"(?:[^"\\]|\\.)*"'
ANY_STRING_BODY = r'(?:[^"\\]|\\.)*'
NUMBER = r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
ID_PLACEHOLDER = re.compile(r"[0-9a-f]+\.\.\.")


@dataclass
class Block:
    language: str
    text: str
    line: int  # 1-based line of the opening fence
    skip: str | None  # why it is not run, from the marker above it

    @property
    def id(self) -> str:
        return f"{self.language or 'text'}-line{self.line}"


@dataclass
class Example:
    command: str
    shown: list[str] = field(default_factory=list)  # the shown output, continuations joined


def readme_blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip()
        marker = SKIP.search(before[before.rfind("<!--"):]) if before.endswith("-->") else None
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(match.group(1), match.group(2), line, marker and " ".join(marker.group(1).split())))
    return blocks


def examples(block: Block) -> list[Example]:
    """Commands (backslash continuations joined) with the ``# `` lines below each."""
    found: list[Example] = []
    pending = ""
    for line in block.text.splitlines():
        if pending:
            pending += "\n" + line
        elif line.startswith("#"):
            if not found:
                continue  # a note before the block's first command
            shown = line[1:].strip()
            if line.startswith("#  ") and found[-1].shown:
                found[-1].shown[-1] += shown
            else:
                found[-1].shown.append(shown)
            continue
        elif line.strip():
            pending = line
        if pending and not pending.endswith("\\"):
            found.append(Example(pending))
            pending = ""
    assert not pending, f"README line {block.line}: a command ends in a backslash"
    return found


def line_pattern(shown: str, bound: dict[str, str], groups: dict[str, str]) -> str:
    """One shown line as a regex over the server's compact JSON (the rules in README.md)."""
    parts = []
    pos = 0
    for match in re.finditer(JSON_STRING, shown):
        parts.append(_outside(shown[pos:match.start()], parts))
        parts.append(_string(match.group(), "".join(parts), bound, groups))
        pos = match.end()
    parts.append(_outside(shown[pos:], parts))
    return "".join(parts)


def _outside(text: str, before: list[str]) -> str:
    """Text between strings: `...` is anything, a timing's value any number."""
    pieces = []
    for index, piece in enumerate(text.split("...")):
        if index:
            pieces.append(".*?")
        timing = re.match(r":(\d+)", piece)
        if timing and any("".join(before).endswith(re.escape(f'"{key}"')) for key in TIMINGS):
            pieces.append(":" + NUMBER + re.escape(piece[timing.end():]))
        else:
            pieces.append(re.escape(piece))
    return "".join(pieces)


def _string(literal: str, before: str, bound: dict[str, str], groups: dict[str, str]) -> str:
    value = literal[1:-1]
    if any(before.endswith(re.escape(f'"{key}":')) for key in MODEL_WORDS):
        return JSON_STRING
    if before.endswith(re.escape('"finish_reason":')) and value in ENDINGS:
        return '"(?:' + "|".join(ENDINGS) + ')"'
    if ID_PLACEHOLDER.fullmatch(value):
        if value in bound:
            return re.escape(f'"{bound[value]}"')
        if value in groups:
            return f'"(?P={groups[value]})"'
        groups[value] = f"id{len(groups)}"
        return f'"(?P<{groups[value]}>{ANY_STRING_BODY})"'
    return '"' + ANY_STRING_BODY.join(re.escape(piece) for piece in value.split("...")) + '"'


def matches(shown: list[str], output: str, bound: dict[str, str]) -> dict[str, str] | None:
    """The ids the output binds when it matches the shown lines, else None."""
    groups: dict[str, str] = {}
    pattern = "".join(
        r"(?:[^\n]*\n)*?" if line == "..." else line_pattern(line, bound, groups) + r"\n" for line in shown
    )
    lines = "".join(line + "\n" for line in output.splitlines() if line.strip())
    found = re.fullmatch(pattern, lines, re.S)
    if found is None:
        return None
    return {placeholder: found.group(name) for placeholder, name in groups.items()}


@pytest.fixture(scope="module")
def readme_server(tmp_path_factory) -> Iterator[int]:
    """``runnel serve --config conf/runnel.toml`` on a free port, run from a scratch
    directory with its own data home, so that whatever it stores (the run store) is
    its own, wherever the server keeps it."""
    scratch = tmp_path_factory.mktemp("readme")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNEL_")}
    env["XDG_DATA_HOME"] = str(scratch / "data")
    port = free_port()
    log = open(scratch / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "runnel", "serve", "--config", str(REPO / "conf" / "runnel.toml"), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=scratch,
    )

    def healthy() -> bool:
        assert proc.poll() is None, (scratch / "serve.log").read_text()
        try:
            return request(port, "GET", "/health").status == 200
        except OSError:
            return False

    try:
        wait_until(healthy, timeout=30)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def run_command(command: str, port: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", command.replace(README_PORT, f"localhost:{port}")],
        capture_output=True, text=True, timeout=COMMAND_SECONDS, cwd=REPO,
    )


SH_BLOCKS = [block for block in readme_blocks() if block.language == "sh"]
PYTHON_BLOCKS = [block for block in readme_blocks() if block.language == "python"]
TOML_BLOCKS = [block for block in readme_blocks() if block.language == "toml"]


def test_readme_is_mostly_run():
    """A parsing slip (or a skip marker too many) must not quietly turn the test into nothing."""
    run = [example for block in SH_BLOCKS if not block.skip for example in examples(block)]
    assert len(run) >= 8, run
    assert all(example.shown for example in run), [e.command for e in run if not e.shown]
    skipped = [block for block in SH_BLOCKS if block.skip]
    assert skipped and all(len(block.skip or "") > 10 for block in skipped), "each skip says why"


@pytest.mark.skipif(shutil.which("curl") is None, reason="the README's examples use curl")
@pytest.mark.parametrize("block", [b for b in SH_BLOCKS if not b.skip], ids=lambda b: b.id)
def test_shell_block(block: Block, readme_server: int):
    bound: dict[str, str] = {}
    for example in examples(block):
        command = example.command
        for placeholder, value in bound.items():
            command = command.replace(placeholder, value)
        retry = not re.search(r"(^|\s)(-d|--data)", command)
        deadline = time.monotonic() + RETRY_SECONDS
        while True:
            done = run_command(command, readme_server)
            assert done.returncode == 0, f"README line {block.line}: {command}\n{done.stderr}"
            found = matches(example.shown, done.stdout, bound)
            if found is not None or not retry or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert found is not None, (
            f"README line {block.line}: {command}\nshown:\n" + "\n".join(example.shown) + f"\nsent:\n{done.stdout}"
        )
        bound.update(found)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: b.id)
def test_python_block_compiles(block: Block):
    compile(block.text, f"README.md:{block.line}", "exec")


@pytest.mark.parametrize("block", [b for b in PYTHON_BLOCKS if "from openai import" in b.text], ids=lambda b: b.id)
def test_openai_snippet_runs(block: Block, readme_server: int, tmp_path: Path):
    script = tmp_path / "snippet.py"
    script.write_text(block.text.replace(README_PORT, f"localhost:{readme_server}"))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "the snippet prints the reply"


@pytest.mark.parametrize("block", TOML_BLOCKS, ids=lambda b: b.id)
def test_toml_block_parses(block: Block):
    tomllib.loads(block.text)


# The matcher itself: a README example that does not match must fail, or the test above proves nothing.

def test_matcher_checks_structure_not_words():
    shown = ['{"id":"chatcmpl-...","choices":[{"message":{"content":"Hello!"}}],"usage":{...}}']
    assert matches(shown, '{"id":"chatcmpl-1f","choices":[{"message":{"content":"Bye."}}],"usage":{"n":1}}', {}) == {}
    assert matches(shown, '{"id":"cmpl-1f","choices":[{"message":{"content":"Bye."}}],"usage":{"n":1}}', {}) is None
    assert matches(shown, '{"id":"chatcmpl-1f","choices":[{"message":{"text":"Bye."}}],"usage":{"n":1}}', {}) is None
    assert matches(['{"result":"Hello, Ada!","run_time_ms":0}'], '{"result":"Hello, Bob!","run_time_ms":7}', {}) is None
    assert matches(['{"result":"Hello, Ada!","run_time_ms":0}'], '{"result":"Hello, Ada!","run_time_ms":7}', {}) == {}
    shown = ['{"finish_reason":"stop"}']
    assert matches(shown, '{"finish_reason":"length"}', {}) == {}
    assert matches(shown, '{"finish_reason":null}', {}) is None


def test_matcher_binds_ids_and_elides_lines():
    assert matches(['{"run_id":"5f0c..."}'], '{"run_id":"abc123"}', {}) == {"5f0c...": "abc123"}
    assert matches(['{"run_id":"5f0c..."}'], '{"run_id":"other"}', {"5f0c...": "abc123"}) is None
    shown = ["data: {\"n\":1}", "...", "data: [DONE]"]
    assert matches(shown, 'data: {"n":1}\n\ndata: {"n":2}\n\ndata: [DONE]\n\n', {}) == {}
    assert matches(shown, 'data: {"n":1}\n\ndata: [DONE]\n', {}) == {}
    assert matches(shown, 'data: {"n":2}\n\ndata: [DONE]\n', {}) is None
    assert matches(shown, 'data: {"n":1}\n\ndata: {"n":2}\n', {}) is None


def test_examples_split_commands_notes_and_output():
    block = Block("sh", "# a note\ncurl -s a \\\n  -d x\n# {\"a\":\n#  1}\ncurl b\n# ...\n", 1, None)
    assert [(e.command, e.shown) for e in examples(block)] == [
        ("curl -s a \\\n  -d x", ['{"a":1}']), ("curl b", ["..."])]
