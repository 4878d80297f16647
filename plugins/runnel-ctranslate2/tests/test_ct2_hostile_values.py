"""Issue 10, classes 1 and 2: no value a client sends can wedge or crash a CTranslate2
model, or come back as a 500; and a batch stuck inside the model never holds shutdown.

Each hostile value used to reach CTranslate2 (a batch spinning forever on
``no_repeat_ngram_size`` near 2**64; a 500 and an ERROR log for ``top_k`` above the
vocabulary, ``top_p``/``repetition_penalty`` of 1e-300). Now each is a 400 naming it,
streamed or not, before any work starts, and the model keeps serving.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import threading
import time

import h11
import pytest

import runnel_ctranslate2.apps as ct2_apps
from ct2_reference import tiny_config
from runnel.testing import ServerThread, assert_error, request, server_config

VOCAB = 512  # the test model's (conftest.tiny_dir)
CONTEXT = 512

HOSTILE = [
    ({"no_repeat_ngram_size": 2**64 - 1}, "no_repeat_ngram_size"),
    ({"no_repeat_ngram_size": CONTEXT + 1}, "no_repeat_ngram_size"),
    ({"top_k": VOCAB + 1}, "top_k"),
    ({"top_k": 2**63 - 1}, "top_k"),
    ({"top_p": 1e-300}, "top_p"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"repetition_penalty": 1e300}, "repetition_penalty"),
    ({"temperature": 1e-300}, "temperature"),
    ({"seed": 2**64}, "seed"),  # arrives as a float: the wrong type, named
    ({"seed": -(2**63) - 1}, "seed"),
    ({"max_tokens": 2**63}, "max_tokens"),
    ({"min_tokens": 400, "max_tokens": 10}, "min_tokens"),
    ({"min_tokens": 100}, "min_tokens"),  # more than the default max_tokens (16)
    ({"stop_token_ids": [VOCAB]}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": list(range(1000))}, "stop_token_ids"),
    ({"n": 10**6}, "n"),
    ({"logprobs": 10**6}, "logprobs"),
    ({"stop": ["x"] * 5}, "stop"),
    ({"stop": ["x" * 400_000]}, "stop"),
]


@pytest.fixture(scope="module")
def tiny_server(tiny_dir):
    server = ServerThread(server_config(tiny_config(tiny_dir))).start()
    assert server.wait_ready()
    yield server
    server.stop()


def _post(server, body: dict, path: str = "/v1/completions"):
    return request(server.port, "POST", path, headers=[("content-type", "application/json")],
                   body=json.dumps(body).encode())  # stdlib: ints past 64 bits too


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize(("values", "param"), HOSTILE, ids=[param for _, param in HOSTILE])
def test_a_hostile_value_is_a_400_naming_it_and_logs_no_error(tiny_server, caplog, values, param, stream):
    caplog.set_level(logging.WARNING)
    body = {"model": "tiny", "prompt": "The cat sees", "stream": stream, **values}
    reply = _post(tiny_server, body)
    error = assert_error(reply, 400, param)
    assert error["message"]
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


def test_the_model_keeps_serving_after_every_hostile_value(tiny_server):
    for values, _ in HOSTILE:
        for path, base in (("/v1/completions", {"prompt": "The cat sees"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})):
            assert _post(tiny_server, {"model": "tiny", **base, **values}, path).status == 400
    assert request(tiny_server.port, "GET", "/health").status == 200
    reply = _post(tiny_server, {"model": "tiny", "prompt": "The cat sees", "max_tokens": 4, "temperature": 0})
    assert reply.status == 200, reply.body
    assert reply.json()["usage"]["completion_tokens"] == 4


def test_the_largest_allowed_values_are_served(tiny_server, sp_tokenizer):
    assert sp_tokenizer.vocab_size == VOCAB
    body = {"model": "tiny", "prompt": "The cat sees", "max_tokens": 3, "top_k": VOCAB, "top_p": 1e-6,
            "repetition_penalty": 100.0, "temperature": 1e-3, "seed": 2**64 - 1, "stop_token_ids": [VOCAB - 1],
            "no_repeat_ngram_size": CONTEXT - 100, "stop": ["x" * 1024] * 4}
    reply = _post(tiny_server, body)
    assert reply.status == 200, reply.body


def test_a_prompt_too_long_for_any_context_is_refused_before_tokenizing(tiny_server):
    reply = _post(tiny_server, {"model": "tiny", "prompt": "a" * (CONTEXT * 32 + 1)})
    assert assert_error(reply, 400, "prompt", "context_length_exceeded")
    messages = [{"role": "user", "content": "a" * (CONTEXT * 16)}] * 3
    reply = _post(tiny_server, {"model": "tiny", "messages": messages}, "/v1/chat/completions")
    assert assert_error(reply, 400, "messages", "context_length_exceeded")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_conversation_the_template_refuses_is_a_400(tiny_dir, start_server, caplog, stream):
    caplog.set_level(logging.WARNING)
    server = start_server(tiny_config(tiny_dir, chat_template="llama2"))
    messages = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "again"}]  # must alternate
    reply = _post(server, {"model": "tiny", "messages": messages, "stream": stream}, "/v1/chat/completions")
    assert "alternate" in assert_error(reply, 400, "messages", "invalid_messages")["message"]
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


# -- shutdown with a batch stuck inside the model ------------------------------------------


class _StuckGenerator:
    """The real generator, except that generate_batch blocks until released (a batch stuck
    in CTranslate2, as no_repeat_ngram_size near 2**64 made one). Everything else is the model's."""

    def __init__(self, generator, entered: threading.Event, release: threading.Event) -> None:
        self._generator = generator
        self._entered = entered
        self._release = release

    def generate_batch(self, start_tokens, **options):
        if options.get("max_length") == 1 and not self._entered.is_set() and len(start_tokens[0]) == 1:
            return self._generator.generate_batch(start_tokens, **options)  # the start-up warm-up
        self._entered.set()
        self._release.wait(60)
        return self._generator.generate_batch(start_tokens, **options)

    def __getattr__(self, name):
        return getattr(self._generator, name)


def test_a_stuck_batch_is_abandoned_and_shutdown_ends_within_the_grace(tiny_dir, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    load = ct2_apps.GeneratorApp._load

    def stuck_load(app):
        load(app)
        app.generator = _StuckGenerator(app.generator, entered, release)

    monkeypatch.setattr(ct2_apps.GeneratorApp, "_load", stuck_load)
    grace = 1.0
    config = tiny_config(tiny_dir)
    config["server"] = {"shutdown_grace": grace}
    server = ServerThread(server_config(config)).start()
    try:
        assert server.wait_ready()
        def stream():
            with contextlib.suppress(OSError, h11.RemoteProtocolError):  # cut at the end of the grace
                _post(server, {"model": "tiny", "prompt": "The cat", "stream": True})

        caller = threading.Thread(target=stream, daemon=True)
        caller.start()
        assert entered.wait(10), "the batch never started"
        # The loop still answers while the batch is stuck.
        assert request(server.port, "GET", "/health").status == 200
        started = time.monotonic()
        server.stop(grace)
        took = time.monotonic() - started
        assert not server._thread.is_alive(), "the server's loop never finished stopping"
        # grace for the connections, then at most min(grace, 5 s) for the batch to notice.
        assert took < 2 * grace + 1.5, took
    finally:
        release.set()


_REAL_STUCK_BATCH = """
import asyncio, ctranslate2, sys
from runnel.workers import DaemonThreads

generator = ctranslate2.Generator(sys.argv[1], device="cpu", inter_threads=1, intra_threads=1)

async def main():
    threads = DaemonThreads(1, "batch")
    # What the surfaces now refuse: this value makes CTranslate2 spin inside the call, for good.
    running = threads.run(lambda: generator.generate_batch(
        [["<s>", "\u2581The"]], max_length=8, sampling_topk=1, no_repeat_ngram_size=2**64 - 1,
        callback=lambda step: False))
    try:
        await asyncio.wait_for(asyncio.shield(running), 1.0)
    except TimeoutError:
        print("abandoned", flush=True)
    threads.close()

asyncio.run(main())
"""


def test_a_process_with_a_batch_stuck_inside_ctranslate2_still_exits(tiny_dir, tmp_path):
    # A real stuck batch, in a process of its own: with the executor's (joined) threads
    # it never exited; with daemon threads it exits at once, and cleanly (no abort).
    script = tmp_path / "stuck.py"
    script.write_text(_REAL_STUCK_BATCH)
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(script), str(tiny_dir)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "abandoned"
    assert time.monotonic() - started < 15


_ABANDONED_CALLING_BACK = """
import asyncio, ctranslate2, sys, time
from runnel.workers import DaemonThreads, calls_running, exit_past_running_calls

generator = ctranslate2.Generator(sys.argv[1], device="cpu", inter_threads=1, intra_threads=1)

def slow_step(step):  # each step calls back into Python, slowly: the batch outlives its wait
    time.sleep(0.01)
    return False

async def main():
    threads = DaemonThreads(1, "batch")
    running = threads.run(lambda: generator.generate_batch(
        [["<s>", "\\u2581The"]], max_length=2000, sampling_topk=1, end_token=[], callback=slow_step))
    try:
        await asyncio.wait_for(asyncio.shield(running), 0.5)
    except TimeoutError:
        print("abandoned", calls_running(), flush=True)
    threads.close()

asyncio.run(main())
exit_past_running_calls(0)  # what `runnel serve` does last
"""


def test_a_process_whose_abandoned_batch_still_calls_back_exits_cleanly(tiny_dir, tmp_path):
    # Finalizing the interpreter while CTranslate2's thread calls the step callback ends that
    # thread with pthread_exit through C++ frames: SIGABRT or SIGSEGV (5 exits in 5 without
    # exit_past_running_calls). The server exits past such calls instead.
    script = tmp_path / "calling_back.py"
    script.write_text(_ABANDONED_CALLING_BACK)
    done = subprocess.run([sys.executable, str(script), str(tiny_dir)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "abandoned 1"
    assert "1 backend call(s) still running at exit" in done.stderr
