"""A backend that only yields text: subclass ``SimpleModel`` and write ``stream``.

``stream(prompt, params)`` is a generator (or async generator) of the answer's
pieces for one choice: ``str`` text pieces, or ``int`` token ids of the model's
vocabulary (``tokenize``/``piece``), or ``END`` where the model would end but
``min_tokens``/``ignore_eos`` may tell it to go on. Returning ends the choice
with "stop". Everything else is done here, once for every backend: one
generator per choice, the per-choice rules of ``runnel.choices`` (stop strings,
stop ids, min_tokens, max_tokens, finish reasons), cancellation when the client
goes away (the generator is closed, so its ``finally`` runs), and errors
reported to the sink.

Where a generator runs:

- an **async generator** runs on the event loop, as a task per choice. It must
  not block (await its slow parts); each piece is pushed as it comes, and a
  generator that never awaits is still paused every 32 pieces so that other
  requests run.
- a **sync generator** runs in a thread of the model's own pool (``threads``
  at once; more choices wait for a thread), since it may block (``time.sleep``,
  a model call without async). The thread hands pieces to the loop in bursts,
  one loop wake-up per burst and one ``on_tokens`` push per burst; it stops
  after ``max_tokens`` pieces, or at the next piece once the choice is done
  (cancelled, or ended by a rule). A generator blocked inside one step can not
  be interrupted there.

``slots`` (None: no limit) bounds the choices generating at once, async ones too; more
wait their turn, in order. A choice whose deadline (``SamplingParams.deadline``) passed
while it waited, for a slot or for a pool thread, fails with the 504 of
``runnel.generation.expired_while_waiting`` and its generator is never started.

The default tokenizer splits text into words with their leading whitespace, ids
assigned as pieces are first seen (so they are stable for the model's life).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import re
import threading
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

from .choices import Choice
from .generation import SamplingParams, TokenSink, expired_while_waiting
from .workers import DaemonThreads

if TYPE_CHECKING:
    from .config import AppConfig, Table
    from .server import Server


class _End:
    __slots__ = ()

    def __repr__(self) -> str:
        return "END"


END: Any = _End()
"""Yield this where the model would end: it ends the choice ("stop") unless min_tokens or ignore_eos say go on."""

# Words with the whitespace before them; the whitespace at the very end is its own piece.
_PIECES = re.compile(r"\s*\S+|\s+")
_FINDALL_CHARS = 65_536
_DECODE_ON_LOOP_TOKENS = 4096  # a longer prompt is decoded on a worker thread
# A generator that never awaits is paused this often, so it cannot hold the loop.
_YIELD_EVERY = 32


class WordPieces:
    """The default tokenizer: words with their leading whitespace, ids in order of first sight."""

    __slots__ = ("ids", "pieces", "_adding")

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.pieces: list[str] = []  # only ever appended to
        # Generators on pool threads may tokenize too: adding a piece is one step under a lock.
        self._adding = threading.Lock()

    def id(self, piece: str) -> int:
        token_id = self.ids.get(piece)
        if token_id is None:
            with self._adding:
                token_id = self.ids.get(piece)
                if token_id is None:
                    self.pieces.append(piece)
                    token_id = self.ids[piece] = len(self.pieces) - 1
        return token_id

    def tokenize(self, text: str, limit: int | None = None) -> list[int]:
        """The ids of ``text``'s pieces (only the first ``limit``, if given)."""
        if limit is None and len(text) <= _FINDALL_CHARS:
            return [self.id(piece) for piece in _PIECES.findall(text)]
        # One findall over a large text holds the GIL throughout (the loop too, when this
        # runs on a worker thread); matching piece by piece lets it go every switch interval.
        matches = _PIECES.finditer(text)
        if limit is not None:
            matches = itertools.islice(matches, limit)
        return [self.id(match.group()) for match in matches]


class SimpleModel:
    """A ``runnel.generation.ModelApp`` made from one method, ``stream``.

    Subclasses set ``supported`` to the SamplingParams they honour beyond
    ``max_tokens``: "stop" always works (the rules here apply it); "stop_token_ids"
    works with the vocabulary's ids; "min_tokens" and "ignore_eos" where the
    generator yields ``END`` rather than returning; "logprobs" reports 0.0 (the
    generator gives none). Sampling settings (temperature, seed, ...) are the
    generator's to read from ``params``.
    """

    owned_by = "runnel"
    supported: frozenset[str] = frozenset({"stop"})
    threads = 8  # sync generators running at once
    slots: int | None = None  # choices generating at once (async generators too); None: no limit
    vocab_size: int | None = None  # the vocabulary grows as text is seen: no fixed bound
    max_choices: int | None = None  # choices one request may ask for (runnel.generation.ModelApp)

    def __init__(self, name: str, *, served_model_name: str | None = None, context_length: int = 4096,
                 default_max_tokens: int = 16) -> None:
        self.name = name
        self.model_id = served_model_name or name
        self.context_length = context_length
        self.default_max_tokens = default_max_tokens
        self.vocabulary = WordPieces()
        self._pool: DaemonThreads | None = None
        self._slots: asyncio.Semaphore | None = None  # made on the loop, on first use
        self.started = 0  # generators started: choices that reached the model (a statistic)
        self._counting = threading.Lock()  # pool threads count too

    # -- what a subclass writes ----------------------------------------------------
    def stream(self, prompt: str, params: SamplingParams) -> Iterator[str | int] | AsyncIterator[str | int]:
        """The pieces of one choice's answer to ``prompt``."""
        raise NotImplementedError

    # -- building from [apps.NAME] ---------------------------------------------------
    @staticmethod
    def settings(app_config: AppConfig, table: Table) -> dict[str, Any]:
        """The keys every simple model takes: served_model_name, context_length, default_max_tokens."""
        settings = {
            "served_model_name": table.get("served_model_name", str, default=app_config.name),
            "context_length": table.get("context_length", int, default=4096),
            "default_max_tokens": table.get("default_max_tokens", int, default=16),
        }
        if settings["context_length"] < 1:
            raise table.error("context_length", "must be >= 1")
        if not 1 <= settings["default_max_tokens"] <= settings["context_length"]:
            raise table.error("default_max_tokens", "must be between 1 and context_length")
        return settings

    @classmethod
    def from_config(cls, app_config: AppConfig, table: Table, server: Server) -> SimpleModel:
        """A backend factory (``runnel_register_backends``) for a model with no settings of its own."""
        model = cls(app_config.name, **cls.settings(app_config, table))
        table.finish()
        return model

    # -- the app's life ------------------------------------------------------------
    async def start(self) -> None:
        pass

    async def close(self) -> None:
        if self._pool is not None:
            # Running generators end at their next piece once their choices are stopped;
            # waiting here could hang on one stuck inside a step, and the threads are
            # daemons, so such a one does not keep the process from exiting either.
            self._pool.close()
            self._pool = None

    # -- runnel.generation.ModelApp ----------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.vocabulary.tokenize(text)

    @property
    def known_tokens(self) -> int:
        """Ids handed out so far: a larger one names no piece (runnel.surfaces.openai.params.check_token_ids)."""
        return len(self.vocabulary.pieces)

    def piece(self, token_id: int) -> str:
        return self.vocabulary.pieces[token_id]

    def decode(self, token_ids: Sequence[int]) -> str:
        pieces = self.vocabulary.pieces
        return "".join(pieces[token_id] for token_id in token_ids)

    def chat_prompt(self, messages: list[dict], *, tools: list[dict] | None = None, prefill: str = "") -> str:
        """The default chat template: the last user message is the whole prompt. Tools and a
        prefill are not shown to such a model: given a ``tool_parser`` (a test rig, say), its
        replies are still parsed for calls."""
        for message in reversed(messages):
            if message["role"] == "user":
                content: str = message["content"]
                return content
        return ""

    def generate(self, prompt_tokens: list[int], params: SamplingParams, n: int, sink: TokenSink) -> SimpleGeneration:
        return SimpleGeneration(self, prompt_tokens, params, n, sink)

    def count_started(self) -> None:
        with self._counting:
            self.started += 1

    def _slot(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """Held while a choice generates: one of ``slots``, waited for in order; nothing without a limit."""
        if self.slots is None:
            return contextlib.nullcontext()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.slots)
        return self._slots

    def _threads(self) -> DaemonThreads:
        if self._pool is None:
            self._pool = DaemonThreads(self.threads, f"runnel-{self.name}")
        return self._pool


class _PieceChoice(Choice):
    """A choice fed with what a generator yields: text pieces, token ids or END."""

    __slots__ = ("vocabulary", "pieces")

    def __init__(self, sink: TokenSink, index: int, params: SamplingParams, vocabulary: WordPieces) -> None:
        super().__init__(sink, index, params)
        self.vocabulary = vocabulary
        self.pieces = vocabulary.pieces  # only ever appended to: safe to hold

    def take(self, item: Any) -> None:  # a text piece, a token id or END
        if item is END:
            self.end()
        elif type(item) is int:
            self.consume(item, self.pieces[item])
        else:
            self.consume(self.vocabulary.id(item), item)


class SimpleGeneration:
    """One ``generate`` call: a task per choice, each running its own generator."""

    __slots__ = ("sink", "choices", "prompt", "tasks", "failed")

    def __init__(self, model: SimpleModel, prompt_tokens: list[int], params: SamplingParams, n: int,
                 sink: TokenSink) -> None:
        loop = asyncio.get_running_loop()
        self.sink = sink
        self.failed = False
        self.choices = [_PieceChoice(sink, index, params, model.vocabulary) for index in range(n)]
        # The prompt's text, decoded once for every choice (off the loop when it is long).
        self.prompt = loop.create_task(_decode(model, prompt_tokens))
        # Tasks start at the loop's next turn: nothing reaches the sink inside generate().
        self.tasks = [loop.create_task(self._run(model, choice, params)) for choice in self.choices]

    def cancel(self) -> None:
        for choice in self.choices:
            choice.stop()
        self.prompt.cancel()
        for task in self.tasks:
            task.cancel()

    async def _run(self, model: SimpleModel, choice: _PieceChoice, params: SamplingParams) -> None:
        try:
            prompt = await asyncio.shield(self.prompt)
            async with model._slot():
                if choice.done:
                    return  # stopped while it waited (a sibling failed): never started
                expired = expired_while_waiting(params)
                if expired is not None:
                    raise expired
                pieces = model.stream(prompt, params)
                if hasattr(pieces, "__aiter__"):
                    model.count_started()
                    await _iterate(choice, cast("AsyncIterator[Any]", pieces))
                else:
                    await _ThreadFeed(choice, model).run(model._threads(), cast("Iterator[Any]", pieces))
            if not choice.done:
                choice.finish("stop")  # the generator returned: the model ended
        except Exception as error:  # reported in the surface's own shape; an HTTPError as it is
            if choice.done:
                return  # it had ended (or was cancelled) before the generator failed: nothing is lost
            choice.stop()
            if not self.failed:
                self.failed = True
                for other in self.choices:
                    other.stop()
                self.sink.on_error(error)


async def _decode(model: SimpleModel, prompt_tokens: list[int]) -> str:
    if len(prompt_tokens) <= _DECODE_ON_LOOP_TOKENS:
        return model.decode(prompt_tokens)
    return await asyncio.to_thread(model.decode, prompt_tokens)


async def _iterate(choice: _PieceChoice, pieces: AsyncIterator[Any]) -> None:
    """Run an async generator on the loop, pushing each piece as it comes."""
    iterator = pieces.__aiter__()
    made = 0
    try:
        async for item in iterator:
            choice.take(item)
            if choice.done:
                return
            choice.emit()
            made += 1
            if made % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
    finally:
        close = getattr(iterator, "aclose", None)
        if close is not None:
            await close()


class _ThreadFeed:
    """A sync generator driven on a pool thread, its pieces handed to the loop in bursts.

    ``queue`` and ``scheduled`` are shared without locks: the thread appends and sets
    ``scheduled`` before waking the loop; the loop clears ``scheduled`` before emptying
    the queue, so a piece appended after that wakes it again.
    """

    __slots__ = ("choice", "model", "loop", "queue", "scheduled")

    def __init__(self, choice: _PieceChoice, model: SimpleModel) -> None:
        self.choice = choice
        self.model = model
        self.loop = asyncio.get_running_loop()
        self.queue: collections.deque[Any] = collections.deque()
        self.scheduled = False

    async def run(self, pool: DaemonThreads, pieces: Iterable[Any]) -> None:
        try:
            await pool.run(lambda: self._drive(pieces))
        finally:
            self.deliver()  # pieces that came after the last scheduled delivery

    def _drive(self, pieces: Iterable[Any]) -> None:
        """Pool thread: run the generator until it ends, has made max_tokens pieces, or the choice is done."""
        choice = self.choice
        budget = choice.params.max_tokens
        iterator = iter(pieces)
        try:
            expired = expired_while_waiting(choice.params)  # it waited for this thread
            if expired is not None:
                raise expired
            self.model.count_started()
            for item in iterator:
                self.queue.append(item)
                if not self.scheduled:
                    self.scheduled = True
                    try:
                        self.loop.call_soon_threadsafe(self.deliver)
                    except RuntimeError:  # the loop is closed: nobody is listening any more
                        return
                if item is not END:
                    budget -= 1
                if budget <= 0 or choice.done:
                    return
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()  # its finally runs here, on the thread that ran it

    def deliver(self) -> None:
        """Loop thread: run what arrived through the rules, one push for the burst."""
        self.scheduled = False
        queue = self.queue
        choice = self.choice
        while queue:
            item = queue.popleft()
            if not choice.done:
                choice.take(item)
        if not choice.done:
            choice.emit()


__all__ = ["END", "SimpleGeneration", "SimpleModel", "WordPieces"]
