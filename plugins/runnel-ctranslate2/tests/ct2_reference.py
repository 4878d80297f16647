"""Helpers for the CTranslate2 server tests: CTranslate2's own greedy output as the reference,
and a probe on the scheduler's per-step callback.

Not in conftest.py: the test modules that use these import them.
"""

from __future__ import annotations

import threading
import time

import ctranslate2
import openai
import pytest

from runnel_ctranslate2 import scheduler as ct2_scheduler
from runnel_ctranslate2.tokenizer import load_tokenizer


class Reference:
    """Greedy decoding straight through ``ctranslate2.Generator``, outside the server."""

    def __init__(self, model_dir) -> None:
        self.tokenizer = load_tokenizer(model_dir)
        self.generator = ctranslate2.Generator(str(model_dir), device="cpu", intra_threads=1, inter_threads=1)
        self._cache: dict = {}

    def prompt_ids(self, prompt: str) -> list[int]:
        """What the app feeds the model for a raw completion prompt: bos + the text's pieces."""
        return self.tokenizer.encode(prompt, add_bos=True)

    def greedy_ids(self, prompt_ids: list[int], max_tokens: int, **options) -> list[int]:
        """``options``: more generate_batch settings (repetition_penalty=..., end_token=[])."""
        key = (tuple(prompt_ids), max_tokens, repr(sorted(options.items())))
        if key not in self._cache:
            start = [self.tokenizer.id_to_token(i) for i in prompt_ids]
            result = self.generator.generate_batch([start], max_length=max_tokens, sampling_topk=1,
                                                   include_prompt_in_result=False, **options)
            self._cache[key] = list(result[0].sequences_ids[0])
        return self._cache[key]

    def continuation(self, prompt_ids: list[int], ids: list[int]) -> str:
        """The text ``ids`` add after the prompt: ``decode(prompt + ids)`` minus ``decode(prompt)``.

        That is ``decode(ids)`` except that a first word keeps its leading space, as an
        OpenAI completion does (" Paris", not "Paris").
        """
        before = self.tokenizer.decode(prompt_ids)
        full = self.tokenizer.decode(list(prompt_ids) + list(ids))
        assert full.startswith(before)
        text = full[len(before):]
        assert text.lstrip(" ") == self.tokenizer.decode(ids).lstrip(" ")
        return text

    def greedy_text(self, prompt: str, max_tokens: int, **options) -> str:
        ids = self.prompt_ids(prompt)
        return self.continuation(ids, self.greedy_ids(ids, max_tokens, **options))

    def close(self) -> None:
        self.generator.unload_model()
        del self.generator


@pytest.fixture(scope="module")
def reference(tiny_dir):
    ref = Reference(tiny_dir)
    yield ref
    ref.close()


class StepProbe:
    """Wraps ``Batch.callback``: counts the steps CTranslate2 makes for each row of each batch.

    A row is named by its prompt (its start tokens). ``delay`` slows every decoding step by
    about that many seconds, so that a test can act while a batch is still running;
    ``gate``, when cleared, holds every step until it is set again.
    """

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()
        self.batches: dict[int, list[tuple[str, ...]]] = {}  # id(batch) -> its rows' prompts
        self._last_step: dict[int, int] = {}
        self._alive: list = []  # the batches seen, kept so that their ids stay unique
        self.counts: dict[tuple[int, tuple[str, ...]], int] = {}
        self.stopped: dict[tuple[int, tuple[str, ...]], int] = {}  # step count when the callback said stop

    def install(self, monkeypatch) -> StepProbe:
        original = ct2_scheduler.Batch.callback
        probe = self

        def callback(batch, step):
            probe.gate.wait(30)
            rows = batch.rows
            key = (id(batch), tuple(rows[step.batch_id].start_tokens))
            with probe.lock:
                if id(batch) not in probe.batches:
                    probe.batches[id(batch)] = [tuple(row.start_tokens) for row in rows]
                    probe._alive.append(batch)
                probe.counts[key] = probe.counts.get(key, 0) + 1
            if probe.delay and probe._last_step.get(id(batch)) != step.step:
                probe._last_step[id(batch)] = step.step  # once per decoding step, not per row
                time.sleep(probe.delay)
            stop = original(batch, step)
            if stop:
                with probe.lock:
                    probe.stopped.setdefault(key, probe.counts[key])
            return stop

        monkeypatch.setattr(ct2_scheduler.Batch, "callback", callback)
        return self

    def steps(self, start_tokens) -> list[int]:
        """The step counts of every row that had this prompt, one per batch it ran in."""
        start_tokens = tuple(start_tokens)
        with self.lock:
            return [count for (_, tokens), count in self.counts.items() if tokens == start_tokens]

    def batch_of(self, start_tokens) -> list[tuple[str, ...]]:
        start_tokens = tuple(start_tokens)
        with self.lock:
            found = [rows for rows in self.batches.values() if start_tokens in rows]
        assert len(found) == 1, found
        return found[0]


def sync_client(server, timeout: float = 60, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="test", max_retries=0, timeout=timeout, **kwargs)


def stream_completion(server, **kwargs) -> tuple[str, str | None, object]:
    """(concatenated text, finish_reason, usage) of a streamed /v1/completions call."""
    with sync_client(server) as client:
        stream = client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
        with stream:
            chunks = list(stream)
    text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    reasons = [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason]
    assert len(reasons) == 1, reasons
    usage = [chunk.usage for chunk in chunks if chunk.usage is not None]
    assert len(usage) == 1
    return text, reasons[0], usage[0]


def tiny_config(model_dir, **options) -> dict:
    app = {"backend": "ctranslate2", "model": str(model_dir), "served_model_name": "tiny", "device": "cpu",
           "intra_threads": 1, "inter_threads": 1, **options}
    return {"apps": {"tiny": app}}
