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

Folding (admission at the next step). A static batch makes a row that arrives while
every slot is busy wait for a whole batch to end. Instead, when rows wait, no slot is
free, and re-forwarding is estimated to cost less than the wait (``BatchScheduler._fold``),
a running batch of the same key is asked to stop at its next step (``Batch.folding``;
that step's token is delivered as usual). When its ``generate_batch`` returns, its
unfinished rows are not finished: they go back first in line, resumed from their prompt
plus every token they made (``Row.pieces``, CTranslate2's token strings), with what is
left of their ``max_tokens``, and start at once in one batch with the waiting rows. The
re-forward is not one pass for every row: CTranslate2 forwards the shortest prefix of a
batch at once and feeds the rest of each longer one a token a step (measured: a 203-token
prefix beside a 5-token prompt made its first token at step 196), so a resumed row pauses
about as many steps as it had made. The decision weighs that pause. The client
sees nothing: the same ``Row`` (its count, detokenizer, stop strings, pending text)
goes on in the new batch. A resumed row was admitted and started already: neither the
queue bound (``admit``) nor the queue-wait deadline applies to it again. Batches whose
settings a resume would change (``min_tokens``, ``repetition_penalty``,
``no_repeat_ngram_size``: ``foldable``) are never folded.
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
# Folding: the weight of the newest measurement in the running cost estimates (FoldCosts), and
# how soon to look again while the batch to fold into has not made its first step yet.
COST_WEIGHT = 0.25
FOLD_RECHECK = 0.005


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


def foldable(key: tuple) -> bool:
    """Whether rows of batch ``key`` may be stopped and resumed from their prefix (folded).

    Not with ``min_tokens``: CTranslate2's min_length is per batch and would hold back the end
    of a resumed row that is past it. Not with ``repetition_penalty`` or
    ``no_repeat_ngram_size``: CTranslate2 applies them to the tokens a call generates, not to
    its prompt, so a resumed row would forget what it made before the fold (measured on
    builtin:tiny: greedy output differs from solo a step after the resume with
    no_repeat_ngram_size 2, a few steps after with repetition_penalty 1.5)."""
    _, _, _, repetition_penalty, no_repeat_ngram_size, _, min_tokens, _ = key
    return not min_tokens and repetition_penalty == 1 and not no_repeat_ngram_size


class BatchedGeneration(RowGeneration):
    """One ``generate`` call as the scheduler runs it: a row per choice, each in some batch."""

    __slots__ = ()


class Row(Choice):
    """One choice as a row of a batch: the core's per-choice rules (``runnel.choices``)
    plus where the row sits in its batch and what it starts from."""

    __slots__ = ("generation", "start_tokens", "key", "tokenizer", "batch", "batch_id", "pieces", "resumed")

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
        # Every token made so far as CTranslate2 names it (kept where its batch may fold): a
        # resumed row starts from start_tokens + pieces. Its own list: n > 1 rows share start_tokens.
        self.pieces: list[str] = []
        self.resumed = False  # folded out of a batch at least once: admitted and started already

    def prefix(self) -> list[str]:
        """The tokens CTranslate2 starts this row's next batch from."""
        return self.start_tokens + self.pieces if self.resumed else self.start_tokens

    def prefix_length(self) -> int:
        """How long ``prefix()`` would be if the row resumed now."""
        return len(self.start_tokens) + len(self.pieces)

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

    - ``max_tokens``, ``stop_ids``, ``min_tokens``, ``launched_at``, ``prefix_tokens``,
      ``refeed``: written before the batch starts, only read after.
    - ``counts``, ``started``: written by the callback thread alone; the loop reads
      ``counts`` for the fold decision (a stale read is one step behind).
    - ``first_step_at``: written once by the callback thread at the first step, before it
      schedules the first ``deliver``; read by the loop (0.0: no step yet).
    - ``stop_flags``: written by the loop (a cancelled or finished row), read by the
      callback; a stale read costs one more step of that row, which ``deliver`` drops
      (the row is done).
    - ``folding``: written by the loop once, False to True (``BatchScheduler._fold``), read
      by the callback, which then stops every row at its next step. A stale read costs one
      more step of a row, delivered as usual (the row is not done): rows of one batch may
      stop one step apart, which is harmless, each resuming from its own prefix.
    - ``steps``: appended by the callback, popped by ``deliver`` on the loop.
    - ``scheduled``: set by the callback when it schedules a ``deliver``, cleared by
      ``deliver`` *before* it drains, so a step appended after the drain always finds
      it clear and schedules the next delivery (at worst one finds nothing to do).
    - The rows themselves (``Row``/``Choice`` state, the sink) are the loop's alone.
    """

    __slots__ = ("rows", "loop", "key", "stop_flags", "max_tokens", "stop_ids", "min_tokens", "counts", "steps",
                 "scheduled", "started", "folding", "keep_pieces", "launched_at", "first_step_at",
                 "prefix_tokens", "refeed", "measured")

    def __init__(self, rows: list[Row], loop: asyncio.AbstractEventLoop, *, keep_pieces: bool = False) -> None:
        self.rows = rows
        self.loop = loop
        self.key = rows[0].key
        self.stop_flags = [False] * len(rows)
        # Read by the callback thread without locks: plain lists, written only by the loop.
        # What is left of each row's max_tokens (a resumed row made some in earlier batches).
        self.max_tokens = [row.params.max_tokens - row.count for row in rows]
        self.stop_ids = [row.stop_ids for row in rows]
        self.min_tokens = rows[0].params.min_tokens  # part of the batch key: the same for every row
        self.counts = [0] * len(rows)
        self.steps: collections.deque = collections.deque()
        self.scheduled = False
        self.started = False
        self.folding = False
        self.keep_pieces = keep_pieces  # whether deliver keeps each row's pieces (the batch may fold)
        self.launched_at = 0.0
        self.first_step_at = 0.0
        self.prefix_tokens = 0  # tokens forwarded in one pass before the first step (rows x shortest prefix)
        self.refeed = 0  # steps its longest resumed row spends fed its own prefix (0: none resumed)
        self.measured = False  # its first step has gone into FoldCosts
        for batch_id, row in enumerate(rows):
            row.batch = self
            row.batch_id = batch_id

    def callback(self, step) -> bool:
        """CTranslate2 thread: keep it tiny."""
        batch_id = step.batch_id
        self.steps.append((batch_id, step.token_id, step.token, step.log_prob, step.is_last))
        if not self.scheduled:
            self.scheduled = True
            if not self.started:
                self.first_step_at = time.perf_counter()
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
        return (self.folding or self.stop_flags[batch_id] or count >= self.max_tokens[batch_id]
                or (step.token_id in self.stop_ids[batch_id] and count > self.min_tokens))

    def deliver(self) -> None:
        """Loop thread: run the queued steps through their rows' rules, one push per row."""
        self.scheduled = False
        steps = self.steps
        touched = set()
        rows = self.rows
        keep = self.keep_pieces
        while steps:
            batch_id, token_id, token, log_prob, is_last = steps.popleft()
            row = rows[batch_id]
            if row.done:
                continue
            row.consume(token_id, token, log_prob, is_last)
            if not row.done:
                touched.add(row)
                if keep:
                    row.pieces.append(token)
        for row in touched:
            row.emit()

    def steps_made(self) -> int:
        """Decoding steps so far (loop thread: read from the callback's counts, a step stale at most)."""
        return max(self.counts)

    def live_rows(self) -> list[Row]:
        return [row for row in self.rows if not row.done]


class FoldCosts:
    """Running estimates (EWMA) of what decoding costs, from every batch: the fold decision's
    inputs. Loop thread only.

    - ``token``: seconds per token forwarded in one pass before the first step (a batch's time
      from launch to its first step over its rows x shortest prefix, plus one step's rows);
    - ``step``: seconds per decoding step (a batch's time from its first step to its end over
      the steps between)."""

    __slots__ = ("token", "step")

    def __init__(self) -> None:
        self.token: float | None = None
        self.step: float | None = None

    @staticmethod
    def _mix(old: float | None, new: float) -> float:
        return new if old is None else old + COST_WEIGHT * (new - old)

    def first_step(self, batch: Batch) -> None:
        """Once per batch, when its first step has come (``first_step_at`` set)."""
        batch.measured = True
        tokens = batch.prefix_tokens + len(batch.rows)
        self.token = self._mix(self.token, (batch.first_step_at - batch.launched_at) / tokens)

    def ended(self, batch: Batch, now: float) -> None:
        steps = batch.steps_made()
        if batch.first_step_at and steps >= 2:
            self.step = self._mix(self.step, (now - batch.first_step_at) / (steps - 1))

    def step_time(self, batch: Batch, now: float) -> float | None:
        """Seconds per step of a running batch: its own pace once it has one, else the estimate."""
        steps = batch.steps_made()
        if batch.first_step_at and steps >= 2:
            return (now - batch.first_step_at) / (steps - 1)
        return self.step


@dataclass
class SchedulerStats:
    batches: int = 0
    rows: int = 0  # rows admitted into a batch (a resumed row counts once)
    largest_batch: int = 0
    folds: int = 0  # batches stopped at a step to take waiting rows in
    folded_rows: int = 0  # rows resumed in a new batch by those folds
    recent_batch_sizes: collections.deque = None
    # size_counts[k]: batches launched with k rows (the /metrics batch size histogram).
    size_counts: list = None

    def to_dict(self) -> dict:
        return {"batches": self.batches, "rows": self.rows, "largest_batch": self.largest_batch,
                "recent_batch_sizes": list(self.recent_batch_sizes), "folds": self.folds,
                "folded_rows": self.folded_rows}


class BatchScheduler:
    def __init__(self, generator, tokenizer, *, max_batch_size: int, window: float, max_queue: int,
                 slots: int, bos: bool = True, fold: bool = True) -> None:
        self.generator = generator
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.window = window
        self.max_queue = max_queue
        self.slots = slots
        self.fold = fold  # admission at the next step (the module docstring); off: batches run to their end
        self.costs = FoldCosts()
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
        decoding, the batch sizes and the folds so far; read at scrape time, never on the hot path."""
        return {"waiting_rows": sum(not row.done for row in self.waiting),
                "running_rows": sum(not row.done for batch in self._batches for row in batch.rows),
                "batch_sizes": self.stats.size_counts, "folds": self.stats.folds,
                "folded_rows": self.stats.folded_rows}

    # -- generations -------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, n: int, sink) -> BatchedGeneration:
        # The queue slot is taken (or refused) before any generation work starts.
        admit(sum(not row.done and not row.resumed for row in self.waiting), n, self.max_queue)
        generation = BatchedGeneration(sink)
        start_tokens = self.tokenizer.ids_to_tokens(prompt_ids)
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
        self.waiting = [row for row in self.waiting if not row.done and (row.resumed or not self._expire(row))]
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
        if self.waiting and self.fold:
            self._fold()

    def _fold(self) -> None:
        """Rows wait and every slot is busy: ask a running batch to fold them in at its next
        step where that pays (the module docstring), else look again when it might.

        The cost of a fold (``_fold_cost``): the new batch forwards the shortest prefix of its
        rows in one pass, and then feeds each longer prefix one token a step, so a resumed row
        makes nothing for (its prefix - the shortest) steps. It pays when that is estimated to
        take less than the wait (the soonest-ending batch's remaining steps at its pace): in
        steps, roughly when the rows to resume have made fewer tokens than they have left.
        Bounds: a batch with room for every waiting row of its key, not folding already, not
        holding min_tokens; one that was itself started by a fold only once it has made at
        least as many steps of new tokens as it spent re-feeding prefixes, so that however
        steadily rows arrive, at least half of its steps make new tokens; one fold at a time
        per key (rows arriving meanwhile join it)."""
        now = time.perf_counter()
        costs = self.costs
        for batch in self._batches:
            if batch.first_step_at and not batch.measured:
                costs.first_step(batch)
        waits = [self._time_left(batch, now) for batch in self._batches]
        known = [wait for wait in waits if wait is not None]
        wait = min(known) if known else None
        folding = {batch.key for batch in self._batches if batch.folding}
        by_key: dict[tuple, list[Row]] = {}
        for row in self.waiting:
            if row.key not in folding and foldable(row.key):
                by_key.setdefault(row.key, []).append(row)
        look_again = float("inf")
        for key, rows in by_key.items():
            best, best_cost = None, 0.0
            for batch in self._batches:
                if batch.key != key or batch.folding:
                    continue
                live = batch.live_rows()
                if not live or len(live) + len(rows) > self.max_batch_size:
                    continue
                step = costs.step_time(batch, now)
                if not batch.first_step_at or costs.token is None or step is None or wait is None:
                    look_again = min(look_again, FOLD_RECHECK)  # no first step, or no pace yet
                    continue
                cost = self._fold_cost(live, rows, step)
                if not self._fold_pays(cost, wait):
                    continue
                productive = batch.steps_made() - 2 * batch.refeed
                if productive < 0:  # not yet: see the bound above
                    look_again = min(look_again, -productive * step)
                    continue
                if best is None or cost < best_cost:
                    best, best_cost = batch, cost
            if best is not None:
                best.folding = True
        if look_again != float("inf") and self._timer is None:
            self._timer = self.loop.call_later(look_again, self._flush)

    def _fold_cost(self, live: list[Row], waiting: list[Row], step: float) -> float:
        """Seconds the longest running row of a fold would make nothing: the one-pass forward of
        the shortest prefix over every row, then one step per token its prefix is longer."""
        shortest = min(min(row.prefix_length() for row in live), min(row.prefix_length() for row in waiting))
        longest = max(row.prefix_length() for row in live)
        token = self.costs.token or 0.0
        return token * (len(live) + len(waiting)) * shortest + (longest - shortest) * step

    @staticmethod
    def _fold_pays(cost: float, wait: float) -> bool:
        """Whether a re-forward estimated at ``cost`` seconds beats waiting ``wait`` seconds
        (tests replace it to make folds certain)."""
        return cost < wait

    def _time_left(self, batch: Batch, now: float) -> float | None:
        """Seconds until ``batch`` ends at most (its longest live row's remaining steps at its
        pace); None while there is no pace to go by."""
        step = self.costs.step_time(batch, now)
        if step is None:
            return None
        remaining = max((row.params.max_tokens - row.count for row in batch.rows if not row.done), default=0)
        return remaining * step

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
        key = rows[0].key
        batch = Batch(rows, self.loop, keep_pieces=self.fold and foldable(key))
        top_k, top_p, temperature, repetition_penalty, no_repeat_ngram_size, ignore_eos, min_tokens, logprobs = key
        options = dict(
            max_length=max(batch.max_tokens),
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
        stats.rows += sum(not row.resumed for row in rows)
        stats.largest_batch = max(stats.largest_batch, len(rows))
        stats.recent_batch_sizes.append(len(rows))
        stats.size_counts[len(rows)] += 1
        # The call runs on one of our threads, which waits with the GIL released while
        # CTranslate2 decodes: setting a batch up takes ~0.5 ms that the loop must not spend.
        start_tokens = [row.prefix() for row in rows]
        shortest = min(map(len, start_tokens))
        batch.prefix_tokens = len(rows) * shortest
        batch.refeed = max((len(tokens) - shortest
                            for row, tokens in zip(rows, start_tokens, strict=True) if row.resumed), default=0)
        batch.launched_at = time.perf_counter()
        running = self._threads.run(functools.partial(self.generator.generate_batch, start_tokens, **options))
        running.add_done_callback(lambda future: self._batch_done(
            batch, future.exception() if not future.cancelled() else None))

    def _batch_done(self, batch: Batch, error: BaseException | None) -> None:
        if batch not in self._batches:
            return  # abandoned at close: its rows were stopped then
        self._batches.discard(batch)
        batch.deliver()  # steps that arrived after the last scheduled delivery
        if error is None:
            self.costs.ended(batch, time.perf_counter())
        resumed = []
        for row in batch.rows:
            if row.done:
                continue
            if error is not None:
                # The surfaces check every value against the model's limits first, so a
                # failure here is the server's (an HTTPError a backend raised is the client's).
                row.generation.fail(error, logger)
            elif batch.folding:
                # Stopped for a fold, not finished: first in line, from its prompt and every
                # token so far (the flush below starts it at once, in the slot this batch freed).
                row.resumed = True
                row.batch = None
                resumed.append(row)
            else:
                row.finish("length")
        if batch.folding:
            self.stats.folds += 1
            self.stats.folded_rows += len(resumed)
            self.waiting[:0] = resumed
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
