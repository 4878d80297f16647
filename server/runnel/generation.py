"""The contract between surfaces and model backends.

A surface (OpenAI, RunPod, ...) validates a request into ``SamplingParams``,
tokenizes through the app, and calls ``app.generate(prompt_tokens, params, n,
sink)``. The backend pushes results into the sink as they are made, on the event
loop thread; the sink writes them straight to the response. Nothing is collected
in between for streams, and ``cancel()`` on the returned handle stops the work
when the client goes away.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol

from .errors import HTTPError


@dataclass(slots=True, kw_only=True)
class SamplingParams:
    """Per-request generation settings, already validated. Defaults mean 'off'."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = no limit; 1 = greedy
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0  # 0 = off; n = never repeat an n-gram
    ignore_eos: bool = False
    min_tokens: int = 0
    # None: plain text. {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema",
    # "strict"}}: output constrained to it, by a backend with logits control (it lists "response_format" in
    # ``supported``; a backend without is refused the request with a 400 naming the parameter).
    response_format: dict | None = None
    # OpenAI's logit_bias: (token id, bias added to its logit, -100..100), ids in increasing order.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # A forced tool call, held to its tools' schemas by a backend that decodes by grammar (it
    # lists "tool_call" in ``supported``; the surfaces set it for no other, which are forced
    # by the chat prompt's prefill alone): {"schema": a JSON schema, "suffix": str}: after the
    # prefill, the reply is one JSON value the schema allows, then the suffix, then the end.
    tool_call: dict | None = None
    # The request's queue deadline, a ``time.monotonic()`` value (runnel.deadlines): work
    # still waiting for the model then is dropped, never started (``expired_while_waiting``);
    # work already running is not affected. None: no deadline. Not a sampling setting: no
    # backend declares it, and one that never checks it still serves the request.
    deadline: float | None = None


_DEFAULTS = SamplingParams()
# Settings every backend must honour; the rest a backend declares in ``supported``.
REQUIRED_PARAMETERS = frozenset({"max_tokens"})
# Fields no backend is asked to support: a backend that ignores one still serves the request.
_NOT_SAMPLING = frozenset({"deadline"})
DEADLINE_EXCEEDED = "deadline_exceeded"  # the error code of work dropped at its deadline


def unsupported(params: SamplingParams, supported: frozenset[str]) -> str | None:
    """The first parameter set to a non-default value that the backend does not support."""
    for item in fields(SamplingParams):
        name = item.name
        if name in supported or name in REQUIRED_PARAMETERS or name in _NOT_SAMPLING:
            continue
        if getattr(params, name) != getattr(_DEFAULTS, name):
            return name
    return None


def admit(waiting: int, n: int, max_queue: int) -> None:
    """A backend's bounded queue: room for ``n`` more choices beside ``waiting``, else an
    HTTPError: 400 when ``n`` alone could never fit (the surfaces refuse it first, through
    ``ModelApp.max_choices``), 429 with Retry-After when the queue is full for now."""
    if n > max_queue:
        raise HTTPError(400, f"n={n} is more than this model's queue holds ({max_queue})", param="n",
                        code="too_many_choices")
    if waiting + n > max_queue:
        raise HTTPError(429, f"The server is busy: {waiting} requests are waiting. Retry shortly.",
                        type="rate_limit_error", code="queue_full", headers=((b"retry-after", b"1"),))


def deadline_exceeded(message: str = "The request waited in the model's queue past its deadline "
                      "(X-Request-Deadline, or the server's max_queue_wait) and was not run.") -> HTTPError:
    """The error of work dropped at its deadline: 504, as a gateway answers when what it waited
    on did not come in time (not 408, which says the client was slow to send its request and
    which clients may retry on their own); no Retry-After: its client has given up already."""
    return HTTPError(504, message, type="timeout_error", code=DEADLINE_EXCEEDED)


def expired_while_waiting(params: SamplingParams) -> HTTPError | None:
    """For a backend taking work off its waiting queue: the error to fail it with when its
    deadline has passed (then it must not reach the model), else None. Safe on any thread."""
    deadline = params.deadline
    if deadline is None or time.monotonic() < deadline:
        return None
    return deadline_exceeded()


@dataclass(slots=True)
class TokenLogprob:
    token: str
    logprob: float
    top: Sequence[tuple[str, float]] = ()


class TokenSink(Protocol):
    """Where a backend pushes a generation. Called on the event loop thread only."""

    def on_tokens(self, index: int, text: str, token_ids: Sequence[int],
                  logprobs: Sequence[TokenLogprob] | None) -> None:
        """New tokens for choice ``index``; ``text`` is what they add (stop strings removed)."""

    def on_finish(self, index: int, reason: str, completion_tokens: int) -> None:
        """Choice ``index`` is complete; ``reason`` is "stop" or "length"."""

    def on_error(self, error: BaseException) -> None:
        """The generation failed; no more calls follow."""


# A sink may also have ``on_stop_string(index, stop)``: called just before
# ``on_finish(index, "stop", ...)`` when the stop string ``stop`` ended the choice
# (Anthropic's answer names it); optional, so sinks without it are unchanged.


class Generation(Protocol):
    def cancel(self) -> None:
        """Stop generating (client gone). Safe to call at any time, more than once."""


class ModelApp(Protocol):
    """What a backend's app offers to serve the OpenAI-style surfaces."""

    model_id: str  # the served model name
    owned_by: str
    supported: frozenset[str]  # SamplingParams names honoured beyond max_tokens
    default_max_tokens: int
    # The limits the surfaces check every request against, so that no value a client
    # sends can wedge or crash the backend (runnel.surfaces.openai.params.fit_to_model):
    context_length: int  # prompt + max_tokens; also bounds no_repeat_ngram_size
    vocab_size: int | None  # ids are 0..vocab_size-1 (top_k, stop_token_ids); None: not fixed
    # The most choices (prompts x n) one request may ask for: what the backend can hold at
    # once (its queue). More can never fit, so it is a 400, not a 429 a client would retry
    # forever. None (or absent, for older backends): no such limit.
    max_choices: int | None

    def tokenize(self, text: str) -> list[int]:
        """The prompt's token ids. Large prompts are tokenized on a worker thread: thread-safe."""

    def chat_prompt(self, messages: list[dict], *, tools: list[dict] | None = None, prefill: str = "") -> str:
        """Render chat messages through the model's chat template (on a worker thread for
        large conversations: thread-safe).

        A message is {"role": "system" | "user" | "assistant" | "tool", "content": str}; an
        assistant's may carry "tool_calls" [{"id", "type": "function", "function": {"name",
        "arguments": dict}}], a tool's its "tool_call_id". ``tools`` (function tools, as
        runnel.tools.function_tool makes them) are the template's ``tools`` variable. ``prefill``:
        begin the assistant's reply with this text, for the model to continue (as transformers'
        continue_final_message). Both are passed only to an app with a tool parser (``tool_parser``
        below, or the app's config), so a backend without tools may keep ``chat_prompt(messages)``."""

    def generate(self, prompt_tokens: list[int], params: SamplingParams, n: int, sink: TokenSink) -> Generation: ...

    # A backend that keeps work waiting (a queue, a pool of slots) calls
    # ``expired_while_waiting(params)`` where it takes work off it, and fails the generation
    # with the error it returns (runnel.generation.deadline_exceeded) instead of starting it.
    # Optional: ``batching_stats() -> {"waiting_rows", "running_rows", "batch_sizes"}`` (rows waiting
    # for a batch, rows decoding, and batch_sizes[k] = batches launched with k rows so far; optionally
    # "folds" and "folded_rows" too), read by GET /metrics at scrape time only
    # (runnel.metrics.LiveState); None while the app is loading.
    # Optional: ``tool_parser``: the name of the format its model writes tool calls in
    # (runnel.tools.FORMATS), the default for ``[apps.NAME] tool_parser``.
    # Optional: ``decode(token_ids) -> str``, the text of ids (thread-safe). Without it, token-id
    # input that must become text (completions' echo, embeddings of ids, /detokenize) is a 400.
    # An embedding app may offer ``async embed_tokens(rows) -> (vectors, tokens)`` to embed ids
    # as they are; else ids are decoded and embedded as text.


class StopStrings:
    """Cuts generated text at the first stop string, across token boundaries.

    Text that could still grow into a stop string is held back until it can't;
    the stop string itself is never released.

    Cost per push is linear in what is scanned, never quadratic in a stop string's
    length: a stop found must start in ``pending + text``, and the text held back
    (the longest tail that some stop starts with) can only start at a position
    that holds a stop's first character, so only those positions are tried, each
    with one C-level comparison. Invariant: ``_pending`` is a proper prefix of
    some stop, and text before it was ruled out once and is never looked at again.

    The same fact makes most pushes free: with nothing held back, text holding no stop's
    first character can neither contain a stop nor start one, and is released unscanned.
    """

    __slots__ = ("_stops", "_longest", "_by_first", "_firsts", "_pending", "stopped", "matched")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stop for stop in stops if stop)
        self._longest = max((len(stop) for stop in self._stops), default=0)
        by_first: dict[str, list[str]] = {}
        for stop in self._stops:
            by_first.setdefault(stop[0], []).append(stop)
        self._by_first = tuple((first, tuple(group)) for first, group in by_first.items())
        self._firsts = frozenset(by_first)
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text, once stopped

    def push(self, text: str) -> str:
        """The text that is now safe to release. Sets ``stopped`` when a stop string completes."""
        if self.stopped:
            return ""
        if not self._pending and self._firsts.isdisjoint(text):
            return text  # no stops at all, or none can start in this text (see the class docstring)
        buffer = self._pending + text
        cut = -1
        for stop in self._stops:
            found = buffer.find(stop)
            if found != -1 and (cut == -1 or found < cut):
                cut = found
                self.matched = stop
        if cut != -1:
            self.stopped = True
            self._pending = ""
            return buffer[:cut]
        size = len(buffer)
        hold_from = size
        earliest = max(0, size - self._longest + 1)  # a held tail is shorter than the longest stop
        for first, group in self._by_first:
            at = buffer.find(first, earliest, hold_from)
            while at != -1:
                tail = buffer[at:]
                if any(stop.startswith(tail) for stop in group):
                    hold_from = at  # the longest tail for this first character; others must beat it
                    break
                at = buffer.find(first, at + 1, hold_from)
        self._pending = buffer[hold_from:]
        return buffer[:hold_from]

    def flush(self) -> str:
        """At the end of generation: what was held back was not a stop string after all."""
        pending, self._pending = self._pending, ""
        return "" if self.stopped else pending


__all__ = [
    "DEADLINE_EXCEEDED",
    "Generation",
    "admit",
    "deadline_exceeded",
    "expired_while_waiting",
    "ModelApp",
    "SamplingParams",
    "StopStrings",
    "TokenLogprob",
    "TokenSink",
    "unsupported",
]
