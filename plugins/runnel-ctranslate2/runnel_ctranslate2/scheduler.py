"""Cross-request batching for a CTranslate2 generator.

Each ``generate`` call (a ``BatchedGeneration``) adds one ``Row`` per choice to
the waiting rows. Rows wait a short window (or until a batch is full), then the waiting rows
that share the batch-level sampling settings run in ``generate_batch`` calls, divided
evenly over the free slots when there are enough of them (``MIN_SPLIT_ROWS`` a part), so
that each slot's thread, and core, has work.
CTranslate2's batches are static: a row that starts alone keeps its slot to the
end, so the window is what lets a burst share one. A window of 0 starts work at
the loop's next turn, for deployments that put first-token latency first.
Up to ``slots`` batches run at once (CTranslate2's ``inter_threads``). A row whose
deadline (``SamplingParams.deadline``) passed while it waited is dropped when the rows are
next gathered into a batch: its generation fails with the 504 and it is never decoded.

The per-step callback runs on a CTranslate2 thread holding the GIL, so it only
queues the step and, once per burst, schedules ``Batch.deliver`` on the event
loop; its return value stops a row that was cancelled, reached its own
``max_tokens``, or hit a stop token or stop string. ``deliver`` runs each step
through its row's rules (``runnel.choices.Choice``: detokenizing, min_tokens,
stop ids and strings, finish reasons) and pushes one ``on_tokens`` per row for
everything that arrived together.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from dataclasses import dataclass

from runnel import HTTPError
from runnel.choices import Choice, RowGeneration
from runnel.generation import SamplingParams, admit, expired_while_waiting
from runnel.memory import IdleTrim
from runnel.workers import DaemonThreads

from .tokenizer import IncrementalDetokenizer

logger = logging.getLogger("runnel.ctranslate2")

# The fewest rows a batch split off to use another free slot gets (see BatchScheduler._flush).
MIN_SPLIT_ROWS = 4


def batch_key(params: SamplingParams) -> tuple:
    """Settings CTranslate2 takes per batch: only rows that agree on all of them share one."""
    greedy = params.temperature == 0 or params.top_k == 1
    return (
        1 if greedy else (0 if params.top_k == -1 else params.top_k),
        1.0 if greedy else params.top_p,
        1.0 if greedy else params.temperature,
        params.repetition_penalty,
        params.no_repeat_ngram_size,
        params.ignore_eos,
        params.min_tokens,
        params.logprobs,
    )


class BatchedGeneration(RowGeneration):
    """One ``generate`` call as the scheduler runs it: a row per choice, each in some batch."""

    __slots__ = ()


class Row(Choice):
    """One choice as a row of a batch: the core's per-choice rules (``runnel.choices``)
    plus where the row sits in its batch and what it starts from."""

    __slots__ = ("generation", "start_tokens", "key", "tokenizer", "batch", "batch_id")

    def __init__(self, generation: BatchedGeneration, index: int, start_tokens, prompt_ids, params,
                 tokenizer) -> None:
        super().__init__(generation.sink, index, params, eos_id=tokenizer.eos_id,
                         detokenizer=IncrementalDetokenizer(tokenizer, context_ids=prompt_ids))
        self.generation = generation
        self.start_tokens = start_tokens
        self.key = batch_key(params)
        self.tokenizer = tokenizer
        self.batch: Batch | None = None
        self.batch_id = -1

    def stop(self) -> None:
        """No more output for this row; the batch stops generating it at its next step."""
        self.done = True
        if self.batch is not None:
            self.batch.stop_flags[self.batch_id] = True

    def logprob_token(self, token_id: int, piece: str) -> str:
        # ``piece`` is CTranslate2's vocabulary token ("\u2581cat"); show a regular token as its text.
        return piece if token_id in self.tokenizer.special_ids else self.tokenizer.decode([token_id])


class Batch:
    """The rows of one generate_batch call and the hand-off from CTranslate2's thread.

    Two threads touch a batch, and this is why it is safe without a lock (the GIL
    makes each single read, write, append and popleft atomic):

    - ``max_tokens``, ``stop_ids``, ``min_tokens``: written before the batch starts,
      only read after.
    - ``counts``, ``started``: the callback thread's alone.
    - ``stop_flags``: written by the loop (a cancelled or finished row), read by the
      callback; a stale read costs one more step of that row, which ``deliver`` drops
      (the row is done).
    - ``steps``: appended by the callback, popped by ``deliver`` on the loop.
    - ``scheduled``: set by the callback when it schedules a ``deliver``, cleared by
      ``deliver`` *before* it drains, so a step appended after the drain always finds
      it clear and schedules the next delivery (at worst one finds nothing to do).
    - The rows themselves (``Row``/``Choice`` state, the sink) are the loop's alone.
    """

    __slots__ = ("rows", "loop", "stop_flags", "max_tokens", "stop_ids", "min_tokens", "counts", "steps",
                 "scheduled", "started")

    def __init__(self, rows: list[Row], loop: asyncio.AbstractEventLoop) -> None:
        self.rows = rows
        self.loop = loop
        self.stop_flags = [False] * len(rows)
        # Read by the callback thread without locks: plain lists, written only by the loop.
        self.max_tokens = [row.params.max_tokens for row in rows]
        self.stop_ids = [row.stop_ids for row in rows]
        self.min_tokens = rows[0].params.min_tokens  # part of the batch key: the same for every row
        self.counts = [0] * len(rows)
        self.steps: collections.deque = collections.deque()
        self.scheduled = False
        self.started = False
        for batch_id, row in enumerate(rows):
            row.batch = self
            row.batch_id = batch_id

    def callback(self, step) -> bool:
        """CTranslate2 thread: keep it tiny."""
        batch_id = step.batch_id
        self.steps.append((batch_id, step.token_id, step.token, step.log_prob, step.is_last))
        if not self.scheduled:
            self.scheduled = True
            try:
                self.loop.call_soon_threadsafe(self.deliver)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                return True
            if not self.started:
                # First tokens: hand the GIL to the loop thread we just woke. Otherwise
                # this thread takes it back at every step's callback and the loop waits
                # for CPython's 5 ms switch interval (measured: 3.4 ms from first token
                # to first write). Doing it at every delivery cost ~30% of throughput,
                # which coalescing later tokens into fewer writes wins back.
                self.started = True
                time.sleep(0)
        count = self.counts[batch_id] = self.counts[batch_id] + 1
        # A stop id ends the row only past min_tokens, as Choice.consume decides on the loop.
        return (self.stop_flags[batch_id] or count >= self.max_tokens[batch_id]
                or (step.token_id in self.stop_ids[batch_id] and count > self.min_tokens))

    def deliver(self) -> None:
        """Loop thread: run the queued steps through their rows' rules, one push per row."""
        self.scheduled = False
        steps = self.steps
        touched = set()
        rows = self.rows
        while steps:
            batch_id, token_id, token, log_prob, is_last = steps.popleft()
            row = rows[batch_id]
            if row.done:
                continue
            row.consume(token_id, token, log_prob, is_last)
            if not row.done:
                touched.add(row)
        for row in touched:
            row.emit()


@dataclass
class SchedulerStats:
    batches: int = 0
    rows: int = 0
    largest_batch: int = 0
    recent_batch_sizes: collections.deque = None
    # size_counts[k]: batches launched with k rows (the /metrics batch size histogram).
    size_counts: list = None

    def to_dict(self) -> dict:
        return {"batches": self.batches, "rows": self.rows, "largest_batch": self.largest_batch,
                "recent_batch_sizes": list(self.recent_batch_sizes)}


class BatchScheduler:
    def __init__(self, generator, tokenizer, *, max_batch_size: int, window: float, max_queue: int,
                 slots: int, bos: bool = True) -> None:
        self.generator = generator
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.window = window
        self.max_queue = max_queue
        self.slots = slots
        self.loop = asyncio.get_running_loop()
        self.waiting: list[Row] = []
        self.running = 0
        self._batches: set[Batch] = set()  # the batches running now
        self._idle: asyncio.Event | None = None  # set by the last batch to end, while close() waits
        self._timer = None
        # One thread per batch that may run at once: each makes one generate_batch call.
        # Daemons: a batch stuck in CTranslate2 is abandoned at close, not joined (runnel.workers).
        self._threads = DaemonThreads(slots, "runnel-ct2-batch")
        # The batches' freed memory goes back to the OS once no batch has run for a second.
        self._trim = IdleTrim(self.loop)
        self.stats = SchedulerStats(recent_batch_sizes=collections.deque(maxlen=32),
                                    size_counts=[0] * (max_batch_size + 1))

    def batching_stats(self) -> dict:
        """Rows waiting (cancelled ones are dropped at the next flush: not counted), rows
        decoding, and the batch sizes so far; read at scrape time, never on the hot path."""
        return {"waiting_rows": sum(not row.done for row in self.waiting),
                "running_rows": sum(not row.done for batch in self._batches for row in batch.rows),
                "batch_sizes": self.stats.size_counts}

    # -- generations -------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, n: int, sink) -> BatchedGeneration:
        # The queue slot is taken (or refused) before any generation work starts.
        admit(sum(not row.done for row in self.waiting), n, self.max_queue)
        generation = BatchedGeneration(sink)
        start_tokens = [self.tokenizer.id_to_token(token_id) for token_id in prompt_ids]
        generation.rows = [Row(generation, index, start_tokens, prompt_ids, params, self.tokenizer)
                           for index in range(n)]
        self.waiting.extend(generation.rows)
        if len(self.waiting) >= self.max_batch_size and self.running < self.slots:
            self._flush()
        elif self._timer is None:
            self._timer = self.loop.call_later(self.window, self._flush)
        return generation

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # Drop cancelled rows, and rows whose deadline passed while they waited (never started).
        self.waiting = [row for row in self.waiting if not row.done and not self._expire(row)]
        while self.waiting and self.running < self.slots:
            key = self.waiting[0].key
            # Divide the rows over the free slots: each batch decodes on its own thread, so
            # two half batches use two cores where one full batch leaves the second idle
            # (benchmarks/ct2_layout.py: 1.54x tokens/s at 16 clients). But a batch is
            # static: a slot taken now is not free for the rows arriving a few ms later,
            # which then wait for a whole batch to end. So a few rows stay one batch, and
            # only MIN_SPLIT_ROWS or more per part are worth a slot of their own.
            same = sum(1 for row in self.waiting if row.key == key)
            parts = max(1, min(self.slots - self.running, same // MIN_SPLIT_ROWS))
            share = min(self.max_batch_size, -(-same // parts))
            batch_rows, rest = [], []
            for row in self.waiting:
                if row.key == key and len(batch_rows) < share:
                    batch_rows.append(row)
                else:
                    rest.append(row)
            self.waiting = rest
            self._launch(batch_rows)

    @staticmethod
    def _expire(row: Row) -> bool:
        """Whether ``row``'s deadline has passed (runnel.generation.expired_while_waiting): then its
        generation fails with that error, and every row of it stops (a sibling already running
        in another batch too: its request is answered with the error, so its tokens would be lost)."""
        error = expired_while_waiting(row.params)
        if error is None:
            return False
        row.generation.fail(error)
        return True

    def _launch(self, rows: list[Row]) -> None:
        batch = Batch(rows, self.loop)
        top_k, top_p, temperature, repetition_penalty, no_repeat_ngram_size, ignore_eos, min_tokens, logprobs = rows[0].key
        options = dict(
            max_length=max(row.params.max_tokens for row in rows),
            include_prompt_in_result=False,
            sampling_topk=top_k,
            sampling_topp=top_p,
            sampling_temperature=temperature,
            repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
            min_length=min_tokens,
            return_scores=logprobs,
            callback=batch.callback,
        )
        if ignore_eos:
            options["end_token"] = []
        self.running += 1
        self._batches.add(batch)
        self._trim.busy()
        stats = self.stats
        stats.batches += 1
        stats.rows += len(rows)
        stats.largest_batch = max(stats.largest_batch, len(rows))
        stats.recent_batch_sizes.append(len(rows))
        stats.size_counts[len(rows)] += 1
        # The call runs on one of our threads, which waits with the GIL released while
        # CTranslate2 decodes: setting a batch up takes ~0.5 ms that the loop must not spend.
        start_tokens = [row.start_tokens for row in rows]
        running = self._threads.run(functools.partial(self.generator.generate_batch, start_tokens, **options))
        running.add_done_callback(lambda future: self._batch_done(
            batch, future.exception() if not future.cancelled() else None))

    def _batch_done(self, batch: Batch, error: BaseException | None) -> None:
        if batch not in self._batches:
            return  # abandoned at close: its rows were stopped then
        self._batches.discard(batch)
        batch.deliver()  # steps that arrived after the last scheduled delivery
        for row in batch.rows:
            if row.done:
                continue
            if error is not None:
                # The surfaces check every value against the model's limits first, so a
                # failure here is the server's (an HTTPError a backend raised is the client's).
                row.generation.fail(error, logger)
            else:
                row.finish("length")
        self.running -= 1
        if not self._batches and self._idle is not None:
            self._idle.set()
        if self.waiting:
            self._flush()
        if not self._batches:
            self._trim.idle()

    async def close(self, wait: float) -> bool:
        """Stop every row, then wait up to ``wait`` seconds for the running batches to end
        (a stopped row ends at its batch's next step). True when they all did; else the
        rest are abandoned: their threads are daemons and keep the generator they run
        referenced until they return, or until the process exits (runnel.workers)."""
        for row in self.waiting:
            row.stop()
        self.waiting = []
        self._trim.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for batch in self._batches:
            for row in batch.rows:
                row.stop()
        finished = True
        if self._batches:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), wait)
            except TimeoutError:
                finished = False
                logger.warning("%d batch(es) did not stop within %.1f s of shutdown: abandoned",
                               len(self._batches), wait)
                for batch in self._batches:
                    for row in batch.rows:
                        row.generation.fail(HTTPError(503, "The server is shutting down.", code="shutting_down"))
                self._batches.clear()
        self._threads.close()
        self.generator = None  # the app deletes it next; no reference of ours may outlive that
        return finished
