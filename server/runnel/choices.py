"""The rules every choice of a generation follows, whatever the backend.

A backend makes tokens; a ``Choice`` decides what they mean for the client:
``min_tokens`` holds every end back until that many tokens exist (as in vLLM),
a stop token id or the end-of-sequence id ends with "stop" (unless
``ignore_eos``; neither is sent), a stop string ends with "stop" across token
boundaries (``StopStrings``; it is never sent), and ``max_tokens`` ends with
"length". At the end, held-back text is released in one order: the
detokenizer's (a partial character), then the stop strings' (text that could
have become a stop string but did not).

The backend calls ``consume`` once per token and ``emit`` once per burst of
tokens that arrived together, so a burst is one ``on_tokens`` push; ``finish``
emits what is pending and reports ``on_finish``. All of it runs on the event
loop thread, as the sink requires. A backend may subclass ``Choice`` (with its
own ``__slots__``) to keep its per-row state in the same object, and override
``stop`` (called once the choice is done) or ``logprob_token``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from .errors import HTTPError
from .generation import SamplingParams, StopStrings, TokenLogprob, TokenSink


class Detokenizer(Protocol):
    """Turns token ids into text incrementally (see runnel-ctranslate2's IncrementalDetokenizer)."""

    def push(self, token_id: int) -> str:
        """The text this id completes; "" while it is not whole yet."""

    def flush(self) -> str:
        """Whatever is still held back, at the end of generation."""


class Choice:
    """One choice (one sequence) of a generation, and the rules for ending it.

    State: ``count`` tokens consumed so far (every one counts as a completion token,
    a stop token included); ``pending_*`` what arrived since the last ``emit``;
    ``done`` once finished or stopped, after which nothing more is pushed.
    """

    __slots__ = ("sink", "index", "params", "count", "stop_ids", "eos_id", "detokenizer", "stops", "done",
                 "pending_text", "pending_ids", "pending_logprobs")

    def __init__(self, sink: TokenSink, index: int, params: SamplingParams, *, eos_id: int | None = None,
                 detokenizer: Detokenizer | None = None) -> None:
        self.sink = sink
        self.index = index
        self.params = params
        self.count = 0
        self.stop_ids = frozenset(params.stop_token_ids)
        self.eos_id = None if params.ignore_eos else eos_id
        # With a detokenizer, consume() takes ids and makes the text; without, the backend passes text.
        self.detokenizer = detokenizer
        self.stops = StopStrings(params.stop)
        self.done = False
        self.pending_text: list[str] = []
        self.pending_ids: list[int] = []
        self.pending_logprobs: list[TokenLogprob] | None = [] if params.logprobs else None

    def consume(self, token_id: int, piece: str = "", logprob: float | None = None, last: bool = False,
                top: Sequence[tuple[int, float]] | None = None) -> None:
        """One generated token: its id, its text ``piece`` (ignored when there is a
        detokenizer), its log probability, and whether the backend makes no more.
        ``top``: the most likely tokens at this step as (id, logprob), best first, from
        a backend that has them (else the alternatives are the token alone).
        Finishes the choice when a rule says so; the caller stops once ``done``."""
        params = self.params
        past_min = self.count >= params.min_tokens
        self.count += 1
        if past_min and (token_id == self.eos_id or token_id in self.stop_ids):
            self.finish("stop")
            return
        detokenizer = self.detokenizer
        text = self.stops.push(piece if detokenizer is None else detokenizer.push(token_id))
        if text:
            self.pending_text.append(text)
        self.pending_ids.append(token_id)
        if self.pending_logprobs is not None:
            token = self.logprob_token(token_id, piece)
            value = float(logprob or 0.0)
            alternatives = ([(token, value)] if top is None else
                            [(self.logprob_token(other, ""), other_value) for other, other_value in top])
            self.pending_logprobs.append(TokenLogprob(token, value, alternatives[: params.top_logprobs]))
        if self.stops.stopped:
            self.finish("stop")
        elif self.count >= params.max_tokens or last:
            self.finish("length")

    def end(self) -> bool:
        """The model would end here without making a token (its end of sequence): the
        choice finishes with "stop" unless ``min_tokens`` or ``ignore_eos`` hold it
        back, and then the model goes on. True when it finished."""
        params = self.params
        if params.ignore_eos or self.count < params.min_tokens:
            return False
        self.finish("stop")
        return True

    def emit(self) -> None:
        """Push what arrived since the last emit as one on_tokens call."""
        if self.pending_ids or self.pending_text:
            self.sink.on_tokens(self.index, "".join(self.pending_text), self.pending_ids,
                                self.pending_logprobs or None)
            self.pending_text = []
            self.pending_ids = []
            if self.pending_logprobs is not None:
                self.pending_logprobs = []

    def finish(self, reason: str) -> None:
        """End the choice with ``reason`` ("stop" or "length"): release what was held back, emit, report."""
        if reason != "stop" or not self.stops.stopped:
            # What was held back (a partial character, a possible stop string) is final now.
            rest = "" if self.detokenizer is None else self.stops.push(self.detokenizer.flush())
            rest += self.stops.flush()
            if rest:
                self.pending_text.append(rest)
        self.emit()
        self.stop()
        if self.stops.stopped:
            on_stop_string = getattr(self.sink, "on_stop_string", None)
            if on_stop_string is not None:
                on_stop_string(self.index, self.stops.matched)
        self.sink.on_finish(self.index, reason, self.count)

    def stop(self) -> None:
        """No more output for this choice (finished, cancelled or failed)."""
        self.done = True

    def logprob_token(self, token_id: int, piece: str) -> str:
        """The token's text as its log-probability entry shows it."""
        return piece


class RowGeneration:
    """One ``generate`` call of a backend that runs each choice as a row (a ``Choice``): its
    rows, its sink, and its cancellation (``runnel.generation.Generation``). Invariant: the
    sink hears of a failure once (``failed``); a later failure of another row is dropped, its
    request having been answered with the first."""

    __slots__ = ("rows", "sink", "failed")

    def __init__(self, sink: TokenSink) -> None:
        self.rows: list[Choice] = []
        self.sink = sink
        self.failed = False

    def cancel(self) -> None:
        for row in self.rows:
            row.stop()

    def fail(self, error: BaseException, logger: logging.Logger | None = None) -> None:
        """Fail the whole generation with ``error`` (once) and stop every row: its request is
        answered with the error, so no row's tokens would reach it. ``logger``: where a
        failure that is the server's (not an HTTPError below 500, which the client caused)
        is logged."""
        if not self.failed:
            self.failed = True
            if logger is not None and not (isinstance(error, HTTPError) and error.status < 500):
                logger.error("generation failed: %s", error)
            self.sink.on_error(error)
        self.cancel()


__all__ = ["Choice", "Detokenizer", "RowGeneration"]
