"""What one request's generation did, kept beside it: the one source of its metrics and log fields.

``run_generations`` makes a ``GenerationRecord`` for a request (``request.generation``)
and puts a ``RecordingTap`` between the backend and the request's sink. When the request
is finished, the metrics (runnel.metrics) and the access log read the same record, so
time to first token is computed once, here, and nowhere else.

Cost on the per-token path: nothing after the first push. The tap's ``on_tokens`` is an
instance slot that starts as ``_first_push`` (which notes the time) and is then replaced
by the sink's own bound method, so every later push goes straight to the sink; finishes
(once per choice) pass through the tap.

Times are ``time.perf_counter()`` seconds: ``loop.time()`` (uvloop's) ticks in whole
milliseconds and stands still within a loop iteration, too coarse for a GPU's
inter-token latency. ``started_at`` is the request head's arrival (``request.started_at``,
a loop time) moved onto that clock by ``started_at_of``: within a millisecond or so.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .generation import DEADLINE_EXCEEDED

if TYPE_CHECKING:
    from .generation import TokenLogprob, TokenSink


def started_at_of(loop_time: float) -> float:
    """A ``loop.time()`` of the past (``request.started_at``) as a ``time.perf_counter()``."""
    return time.perf_counter() - (asyncio.get_running_loop().time() - loop_time)


class GenerationRecord:
    """One request's generation. ``first_token_at`` and ``ended_at`` stay 0.0 until they happen.

    Invariants: ``ended_at`` is set once, when the last choice finished or the generation
    failed (``failed``); a record with neither was cut short (its client went away, or the
    server stopped it). ``reasons`` holds one finish reason per finished choice. ``expired``:
    its deadline passed before the model started it (refused, or dropped from the queue).
    """

    __slots__ = ("app", "started_at", "first_token_at", "ended_at", "prompt_tokens", "completion_tokens",
                 "choices", "reasons", "failed", "expired")

    def __init__(self, app: Any, started_at: float, prompt_tokens: int, choices: int) -> None:
        self.app = app  # the app object; runnel.metrics maps it to its name
        self.started_at = started_at
        self.first_token_at = 0.0
        self.ended_at = 0.0
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.choices = choices
        self.reasons: list[str] = []
        self.failed = False
        self.expired = False

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from the request's head to the first generated text, if any came."""
        return self.first_token_at - self.started_at if self.first_token_at else None

    @property
    def inter_token_latency(self) -> float | None:
        """Mean seconds between a choice's tokens: (end - first token) / (tokens per choice - 1).

        Measured once per request, not per token (that would cost every push); a request's
        choices decode side by side, so tokens per choice is the completion's mean.
        """
        if not self.first_token_at or not self.ended_at or self.failed:
            return None
        per_choice = self.completion_tokens / self.choices
        if per_choice <= 1:
            return None
        return (self.ended_at - self.first_token_at) / (per_choice - 1)


class RecordingTap:
    """Between a backend and a sink (a TokenSink itself): fills ``record`` as the generation goes."""

    __slots__ = ("sink", "record", "remaining", "on_tokens")

    def __init__(self, sink: TokenSink, record: GenerationRecord) -> None:
        self.sink = sink
        self.record = record
        self.remaining = record.choices
        # Until the first push: then the sink's own method (see the module docstring).
        self.on_tokens = self._first_push

    def _first_push(self, index: int, text: str, token_ids: Sequence[int],
                    logprobs: Sequence[TokenLogprob] | None) -> None:
        self.record.first_token_at = time.perf_counter()
        on_tokens = self.on_tokens = self.sink.on_tokens  # also ends the cycle self -> bound method -> self
        on_tokens(index, text, token_ids, logprobs)

    def on_stop_string(self, index: int, stop: str) -> None:
        on_stop_string = getattr(self.sink, "on_stop_string", None)  # optional on a sink (runnel.generation)
        if on_stop_string is not None:
            on_stop_string(index, stop)

    def on_finish(self, index: int, reason: str, completion_tokens: int) -> None:
        record = self.record
        record.completion_tokens += completion_tokens
        record.reasons.append(reason)
        self.remaining -= 1
        if self.remaining == 0 and not record.ended_at:
            record.ended_at = time.perf_counter()
        self.sink.on_finish(index, reason, completion_tokens)

    def on_error(self, error: BaseException) -> None:
        record = self.record
        if not record.ended_at:
            record.failed = True
            record.ended_at = time.perf_counter()
            record.expired = getattr(error, "code", None) == DEADLINE_EXCEEDED
        self.sink.on_error(error)
