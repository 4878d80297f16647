"""Generation on llama.cpp: a pool of contexts, one row (one choice) at a time each.

llama-cpp-python's ``Llama`` holds one context; a context decodes one sequence here.
``parallel`` contexts (each its own ``Llama``, so its own KV cache and weights) serve that
many rows at once; further rows wait in a bounded queue (full: 429), and one whose
deadline (``SamplingParams.deadline``) passed meanwhile fails with the 504 instead of
taking a context. A context keeps the
tokens it last saw, so a row whose prompt shares a prefix with its context's last one
(a conversation going on) evaluates only the rest.

A row runs on its context's thread (``runnel.workers.DaemonThreads``), which decodes with
the GIL released. Each step (token id, log probability, top alternatives) is appended to
the row's deque and, once per burst, ``Row.deliver`` is scheduled on the loop, where the
core's rules (``runnel.choices.Choice``: text, stop strings, finish reasons) run. The
thread reads only the row's ``done`` flag back: a cancelled row, or one a stop string
ended, stops at its next step.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import logging
import time
from collections.abc import Sequence

import numpy as np

from runnel.choices import Choice, RowGeneration
from runnel.generation import SamplingParams, admit, expired_while_waiting
from runnel.workers import DaemonThreads

from .sampling import Sampler, grammar_for

logger = logging.getLogger("runnel.llamacpp")


class Detokenizer:
    """Token ids to text, one at a time: each id's bytes (a table made once per model)
    through an incremental UTF-8 decoder, so a character split across byte tokens comes
    out whole, and never half of one."""

    __slots__ = ("_pieces", "_decoder")

    def __init__(self, pieces: Sequence[bytes]) -> None:
        self._pieces = pieces
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(self._pieces[token_id])

    def flush(self) -> str:
        return self._decoder.decode(b"", True)


class Generation(RowGeneration):
    """One ``generate`` call: a row per choice, each on a context of the pool when its turn comes."""

    __slots__ = ()


class Row(Choice):
    """One choice: the core's rules on the loop, and the hand-off from its context's thread.

    Threads: ``steps`` is appended by the context's thread and drained by ``deliver`` on
    the loop; ``scheduled`` is set by the thread when it schedules a delivery and cleared
    by ``deliver`` before it drains (a step appended after the drain finds it clear);
    ``done`` is written by the loop and read by the thread (a stale read costs one step,
    which ``deliver`` drops). Everything else is the loop's.
    """

    __slots__ = ("generation", "prompt_ids", "steps", "scheduled", "loop", "vocab_pieces", "made")

    def __init__(self, generation: Generation, sink, index: int, prompt_ids: list[int], params: SamplingParams,
                 eos_id: int | None, pieces: Sequence[bytes], texts: Sequence[str],
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(sink, index, params, eos_id=eos_id, detokenizer=Detokenizer(pieces))
        self.generation = generation
        self.prompt_ids = prompt_ids
        self.steps: collections.deque = collections.deque()
        self.scheduled = False
        self.loop = loop
        self.vocab_pieces = texts
        self.made = 0  # tokens the context made for this row (the thread's; read once it is done)

    # -- the context's thread ------------------------------------------------------------
    def hand_off(self, step: tuple) -> None:
        self.steps.append(step)
        if not self.scheduled:
            self.scheduled = True
            try:
                self.loop.call_soon_threadsafe(self.deliver)
            except RuntimeError:  # the loop is closed: nobody listens any more
                self.done = True

    # -- the loop ------------------------------------------------------------------------
    def deliver(self) -> None:
        self.scheduled = False
        steps = self.steps
        while steps and not self.done:
            token_id, logprob, top = steps.popleft()
            self.consume(token_id, logprob=logprob, top=top)
        if not self.done:
            self.emit()

    def logprob_token(self, token_id: int, piece: str) -> str:
        return self.vocab_pieces[token_id]


class ContextPool:
    """``contexts`` (one ``Llama`` each) and the rows waiting for one."""

    def __init__(self, contexts: list, *, max_queue: int, eos_id: int | None, pieces: Sequence[bytes],
                 texts: Sequence[str]) -> None:
        self.loop = asyncio.get_running_loop()
        self.free = list(contexts)
        self.count = len(contexts)
        self.max_queue = max_queue
        self.eos_id = eos_id
        self.pieces = pieces
        self.texts = texts
        self.waiting: collections.deque[Row] = collections.deque()
        self.running: set[Row] = set()
        self._idle: asyncio.Event | None = None
        self._threads = DaemonThreads(len(contexts), "runnel-llamacpp")
        self.rows_served = 0
        self.tokens_made = 0

    def submit(self, prompt_ids: list[int], params: SamplingParams, n: int, sink) -> Generation:
        admit(sum(not row.done for row in self.waiting), n, self.max_queue)
        generation = Generation(sink)
        generation.rows = [Row(generation, sink, index, prompt_ids, params, self.eos_id, self.pieces, self.texts,
                               self.loop) for index in range(n)]
        self.waiting.extend(generation.rows)
        self._dispatch()
        return generation

    def _dispatch(self) -> None:
        while self.free and self.waiting:
            row = self.waiting.popleft()
            if row.done:
                continue
            expired = expired_while_waiting(row.params)
            if expired is not None:  # its deadline passed while it waited: never started
                row.generation.fail(expired)
                continue
            llama = self.free.pop()
            self.running.add(row)
            running = self._threads.run(lambda llama=llama, row=row: decode_row(llama, row))
            running.add_done_callback(lambda future, llama=llama, row=row: self._row_done(llama, row, future))

    def _row_done(self, llama, row: Row, future: asyncio.Future) -> None:
        self.running.discard(row)
        self.free.append(llama)
        self.rows_served += 1
        self.tokens_made += row.made
        error = None if future.cancelled() else future.exception()
        if not row.done:
            row.deliver()  # steps that arrived after the last scheduled delivery
        if not row.done:
            if error is not None:
                row.generation.fail(error, logger)
            else:
                row.finish("length")  # the context ran out (the surface keeps prompt + max_tokens within it)
        if not self.running and self._idle is not None:
            self._idle.set()
        self._dispatch()

    async def close(self, wait: float) -> bool:
        """Stop every row and wait up to ``wait`` s for running ones (each stops at its next
        step). True when all did; the contexts may then be freed."""
        for row in self.waiting:
            row.stop()
        self.waiting.clear()
        for row in self.running:
            row.stop()
        finished = True
        if self.running:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), wait)
            except TimeoutError:
                finished = False
                logger.warning("%d row(s) did not stop within %.1f s of shutdown: abandoned", len(self.running), wait)
        self._threads.close()
        return finished


def _common_prefix(cached: np.ndarray, prompt: list[int]) -> int:
    size = min(len(cached), len(prompt))
    if size == 0:
        return 0
    differs = np.flatnonzero(cached[:size] != np.asarray(prompt[:size], dtype=cached.dtype))
    return int(differs[0]) if differs.size else size


def decode_row(llama, row: Row) -> None:
    """(The context's thread) generate one row: prompt, then a token per step until a rule ends it."""
    params = row.params
    prompt = row.prompt_ids
    # Here, not on the loop: converting a large schema takes a while. A schema llama.cpp can't
    # follow fails the row before its first token, so the client gets a plain 400.
    grammar = grammar_for(params)
    with Sampler(llama, params, grammar, seed_offset=row.index) as sampler:
        # Reuse the context's cached prefix; at least one prompt token is evaluated, for its logits.
        reuse = min(_common_prefix(llama.input_ids[: llama.n_tokens], prompt), len(prompt) - 1)
        llama.n_tokens = reuse
        llama.eval(prompt[reuse:])
        eos = None if params.ignore_eos else llama.token_eos()
        stop_ids = row.stop_ids
        top_n = params.top_logprobs if params.logprobs else 0
        n_vocab = llama.n_vocab()
        ctx = llama._ctx
        first = True
        for count in range(1, params.max_tokens + 1):
            if row.done:
                return
            token = sampler.sample()
            row.made = count
            logprob, top = None, None
            if params.logprobs:
                logits = np.ctypeslib.as_array(ctx.get_logits_ith(-1), shape=(n_vocab,))
                shifted = logits - logits.max()
                logprobs = shifted - np.log(np.exp(shifted).sum())
                logprob = float(logprobs[token])
                if top_n:
                    best = np.argpartition(-logprobs, top_n - 1)[:top_n]
                    best = best[np.argsort(-logprobs[best])]
                    top = [(int(i), float(logprobs[i])) for i in best]
            row.hand_off((token, logprob, top))
            if first:
                # Hand the GIL to the loop we just woke, so the first token goes out now
                # rather than after CPython's switch interval (as the CTranslate2 scheduler).
                first = False
                time.sleep(0)
            if token == eos or token in stop_ids or count == params.max_tokens or llama.n_tokens >= llama.n_ctx() - 1:
                return
            llama.eval([token])
