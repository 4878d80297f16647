"""Token sinks that turn a generation into OpenAI's response objects.

The streaming sinks send each push as one event straight to the response stream,
which frames it (SSE, or bare JSON lines for RunPod's non-raw output) and owns the
stream's end (``[DONE]``) and its error event. The constant parts of a chunk are
encoded once per request (a text chunk's once per choice: all of it but the text), so
a token costs one orjson.dumps of its text, two concatenations and one transport write.

Errors: a sink never writes one. A failed generation fails ``done`` with an
HTTPError, the handler raises it, and the dispatcher renders it: as the response,
or as the stream's last event once the stream has started.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from ...deadlines import monotonic_deadline
from ...errors import HTTPError
from ...generation import SamplingParams, TokenLogprob, TokenSink, deadline_exceeded
from ...generation_record import GenerationRecord, RecordingTap, started_at_of
from ...tools import ToolCallParser, ToolUse

if TYPE_CHECKING:
    from ...http import Request, ResponseStream


def generation_error(error: BaseException) -> HTTPError:
    """What a backend's failure is to the client: its own HTTPError, else a 500."""
    if isinstance(error, HTTPError):
        return error
    return HTTPError(500, f"Generation failed: {error}", code="generation_failed")


def chat_logprobs(items: Sequence[TokenLogprob]) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [
            {**entry(item.token, item.logprob), "top_logprobs": [entry(token, lp) for token, lp in item.top]}
            for item in items
        ]
    }


def completion_logprobs(items: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top: list[dict[str, float]] = []
    offsets: list[int] = []
    for item in items:
        tokens.append(item.token)
        token_logprobs.append(item.logprob)
        top.append({token: lp for token, lp in item.top})
        offsets.append(offset)
        offset += len(item.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


class Usage:
    """Exact token counts: the prompt's as tokenized, the completion's as generated."""

    __slots__ = ("prompt_tokens", "completion_tokens")

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class SinkBase:
    """What every sink shares: counting choices down to ``done``, or failing it."""

    __slots__ = ("usage", "remaining", "done")

    def __init__(self, choices: int, usage: Usage) -> None:
        self.usage = usage
        self.remaining = choices
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_tokens(self, index: int, text: str, token_ids: Sequence[int],
                  logprobs: Sequence[TokenLogprob] | None) -> None:
        raise NotImplementedError

    def finish(self, index: int, reason: str) -> None:
        """Choice ``index`` ended with ``reason``: recorded, or sent."""
        raise NotImplementedError

    def complete(self) -> None:
        """Every choice has finished (called before ``done`` is set)."""
        raise NotImplementedError

    def on_finish(self, index: int, reason: str, completion_tokens: int) -> None:
        self.usage.completion_tokens += completion_tokens
        self.finish(index, reason)
        self.remaining -= 1
        if self.remaining == 0 and not self.done.done():
            self.complete()
            self.done.set_result(None)

    def on_error(self, error: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(generation_error(error))


class Collector(SinkBase):
    """Non-streaming: gathers each choice's text, log probs and finish reason."""

    __slots__ = ("texts", "logprobs", "reasons")

    def __init__(self, choices: int, usage: Usage) -> None:
        super().__init__(choices, usage)
        self.texts: list[list[str]] = [[] for _ in range(choices)]
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(choices)]
        self.reasons: list[str | None] = [None] * choices

    def on_tokens(self, index: int, text: str, token_ids: Sequence[int],
                  logprobs: Sequence[TokenLogprob] | None) -> None:
        if text:
            self.texts[index].append(text)
        if logprobs:
            self.logprobs[index].extend(logprobs)

    def finish(self, index: int, reason: str) -> None:
        self.reasons[index] = reason

    def complete(self) -> None:
        pass

    def text(self, index: int) -> str:
        return "".join(self.texts[index])


class _StreamSink(SinkBase):
    """Streaming: one event per push, then the usage chunk; the stream writes the rest."""

    __slots__ = ("stream", "include_usage", "head", "_prefix", "_suffix")

    def __init__(self, *, choices: int, usage: Usage, include_usage: bool, head: dict[str, Any]) -> None:
        super().__init__(choices, usage)
        # Set by open(), once every generation has been admitted; nothing is sent before.
        self.stream: ResponseStream = None  # type: ignore[assignment]
        self.include_usage = include_usage
        self.head = head
        # Everything before the choices array, and after it, encoded once.
        encoded = orjson.dumps({**head, "choices": []})
        self._prefix = encoded[: encoded.rindex(b"[") + 1]
        self._suffix = b'],"usage":null}' if include_usage else b"]}"

    def open(self, stream: ResponseStream) -> None:
        """Start the response: the status line goes out only now, so a refusal
        (a full queue, say) can still be a proper error status."""
        self.stream = stream
        self.begin()

    def begin(self) -> None:
        """The stream is open: send what precedes the first tokens."""
        raise NotImplementedError

    def text_frames(self, template: bytes) -> list[tuple[bytes, bytes]]:
        """Per choice, a chunk carrying text and no log probabilities, as the bytes before and
        after the text's JSON. ``template`` is a text chunk's choice object (``_CHAT_TEXT``,
        ``_COMPLETION_TEXT``): ``%d`` its index, then ``%b`` the text and ``%b`` the logprobs.
        Splicing the text in costs half the format of the whole chunk (~0.4 us a token)."""
        head, tail = template.split(b"%b", 1)
        tail = tail % b"null" + self._suffix
        return [(self._prefix + head % index, tail) for index in range(self.remaining)]

    def text_chunk(self, template: bytes, index: int, text: str, logprobs: bytes) -> bytes:
        """A text chunk with its log probabilities (the rarer case ``text_frames`` leaves)."""
        return b"%b%b%b" % (self._prefix, template % (index, orjson.dumps(text), logprobs), self._suffix)

    def complete(self) -> None:
        if self.include_usage:
            self.stream.send(orjson.dumps({**self.head, "choices": [], "usage": self.usage.to_dict()}))


# A text chunk's choice object: (index, the text as JSON, logprobs); _StreamSink.text_frames.
_CHAT_TEXT = b'{"index":%d,"delta":{"content":%b},"logprobs":%b,"finish_reason":null}'
_COMPLETION_TEXT = b'{"index":%d,"text":%b,"logprobs":%b,"finish_reason":null}'


class ChatStream(_StreamSink):
    __slots__ = ("role", "logprobs", "started", "_content")

    def __init__(self, *, role: str, logprobs: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.role = role
        self.logprobs = logprobs
        self._content = self.text_frames(_CHAT_TEXT)

    def begin(self) -> None:
        # A message starts at its first non-space character: whitespace before it is the
        # chat template's framing ("Assistant:" then " My"), not the model's content.
        self.started = [False] * self.remaining
        role = self.role
        delta = orjson.dumps({"role": role, "content": ""})
        for index in range(self.remaining):
            self.stream.send(b'%b{"index":%d,"delta":%b,"logprobs":null,"finish_reason":null}%b'
                             % (self._prefix, index, delta, self._suffix))

    def on_tokens(self, index: int, text: str, token_ids: Sequence[int],
                  logprobs: Sequence[TokenLogprob] | None) -> None:
        if not self.started[index]:
            text = text.lstrip()
            self.started[index] = bool(text)
        if self.logprobs and logprobs:
            self.stream.send(self.text_chunk(_CHAT_TEXT, index, text, orjson.dumps(chat_logprobs(logprobs))))
        elif text or logprobs:
            head, tail = self._content[index]
            self.stream.send(head + orjson.dumps(text) + tail)

    def finish(self, index: int, reason: str) -> None:
        self.stream.send(b'%b{"index":%d,"delta":{},"logprobs":null,"finish_reason":"%b"}%b'
                         % (self._prefix, index, reason.encode(), self._suffix))


class CompletionStream(_StreamSink):
    __slots__ = ("logprobs", "echo", "offsets", "_text")

    def __init__(self, *, logprobs: bool, echo: list[str] | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.logprobs = logprobs
        self.echo = echo
        self.offsets = [0] * self.remaining
        self._text = self.text_frames(_COMPLETION_TEXT)

    def begin(self) -> None:
        if self.echo:
            for index, text in enumerate(self.echo):
                self.on_tokens(index, text, (), None)

    def on_tokens(self, index: int, text: str, token_ids: Sequence[int],
                  logprobs: Sequence[TokenLogprob] | None) -> None:
        if self.logprobs and logprobs:
            lp = orjson.dumps(completion_logprobs(logprobs, self.offsets[index]))
            self.stream.send(self.text_chunk(_COMPLETION_TEXT, index, text, lp))
        elif text or logprobs:
            head, tail = self._text[index]
            self.stream.send(head + orjson.dumps(text) + tail)
        self.offsets[index] += len(text)

    def finish(self, index: int, reason: str) -> None:
        self.stream.send(b'%b{"index":%d,"text":"","logprobs":null,"finish_reason":"%b"}%b'
                         % (self._prefix, index, reason.encode(), self._suffix))


class ToolEventsOf:
    """One choice's runnel.tools.ToolEvents: the parser's events, sent to ``sink`` with the
    choice's index (a sink of a request with tools has ``tool_text``, ``tool_call`` and
    ``tool_arguments``)."""

    __slots__ = ("sink", "index")

    def __init__(self, sink: Any, index: int) -> None:
        self.sink = sink
        self.index = index

    def on_text(self, text: str) -> None:
        self.sink.tool_text(self.index, text)

    def on_tool_call(self, call: int, call_id: str, name: str) -> None:
        self.sink.tool_call(self.index, call, call_id, name)

    def on_tool_arguments(self, call: int, piece: str) -> None:
        self.sink.tool_arguments(self.index, call, piece)


def tool_parsers(sink: Any, tool_use: ToolUse, choices: int, **kwargs: Any) -> list[ToolCallParser]:
    """One parser per choice of ``sink``, its events sent to the sink with the choice's index."""
    return [tool_use.parser(ToolEventsOf(sink, index), **kwargs) for index in range(choices)]


class ToolParsing:
    """For the sinks of a request with tools: each choice's text goes through its own parser
    (``parsers``: ``tool_parsers(sink, ...)``), which sends content and calls on; a reply that
    claims a call it does not make fails the request. Once failed, later pushes are dropped.
    A mixin: the sink class declares the ``parsers`` slot."""

    __slots__ = ()
    parsers: list[ToolCallParser]
    done: asyncio.Future[None]

    def on_tokens(self, index: int, text: str, token_ids: Sequence[int],
                  logprobs: Sequence[TokenLogprob] | None) -> None:
        if self.done.done():
            return
        try:
            self.parsers[index].feed(text)
        except HTTPError as error:
            self.on_error(error)  # type: ignore[attr-defined]

    def on_finish(self, index: int, reason: str, completion_tokens: int) -> None:
        if self.done.done():
            return
        parser = self.parsers[index]
        try:
            parser.finish(reason)
        except HTTPError as error:
            self.on_error(error)  # type: ignore[attr-defined]
            return
        if parser.calls and reason == "stop":
            reason = "tool_calls"
        super().on_finish(index, reason, completion_tokens)  # type: ignore[misc]


class ToolCollector(ToolParsing, Collector):
    """Not streamed, with tools: content and calls per choice."""

    __slots__ = ("parsers",)

    def __init__(self, choices: int, usage: Usage, tool_use: ToolUse) -> None:
        super().__init__(choices, usage)
        self.parsers = tool_parsers(self, tool_use, choices)

    def tool_text(self, index: int, text: str) -> None:
        self.texts[index].append(text)

    def tool_call(self, index: int, call: int, call_id: str, name: str) -> None:
        pass  # the parser keeps the calls

    def tool_arguments(self, index: int, call: int, piece: str) -> None:
        pass


class ToolChatStream(ToolParsing, ChatStream):
    """Streamed, with tools: content deltas as ChatStream's, and calls as OpenAI streams
    them: ``delta.tool_calls[i]`` with its index, id, type and name once, then the pieces of
    ``function.arguments``."""

    __slots__ = ("parsers",)

    def __init__(self, *, tool_use: ToolUse, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.parsers = tool_parsers(self, tool_use, self.remaining)

    def tool_text(self, index: int, text: str) -> None:
        # The parser has dropped the reply's leading whitespace: no `started` to keep here.
        head, tail = self._content[index]
        self.stream.send(head + orjson.dumps(text) + tail)

    def tool_call(self, index: int, call: int, call_id: str, name: str) -> None:
        delta = b'{"tool_calls":[{"index":%d,"id":%b,"type":"function","function":{"name":%b,"arguments":""}}]}' % (
            call, orjson.dumps(call_id), orjson.dumps(name))
        self._delta(index, delta)

    def tool_arguments(self, index: int, call: int, piece: str) -> None:
        self._delta(index, b'{"tool_calls":[{"index":%d,"function":{"arguments":%b}}]}' % (call, orjson.dumps(piece)))

    def _delta(self, index: int, delta: bytes) -> None:
        self.stream.send(b'%b{"index":%d,"delta":%b,"logprobs":null,"finish_reason":null}%b'
                         % (self._prefix, index, delta, self._suffix))


class IndexShift:
    """Lets one prompt's generation write into a sink shared by several prompts."""

    __slots__ = ("sink", "shift")

    def __init__(self, sink: TokenSink, shift: int) -> None:
        self.sink = sink
        self.shift = shift

    def on_tokens(self, index: int, text: str, token_ids: Sequence[int],
                  logprobs: Sequence[TokenLogprob] | None) -> None:
        self.sink.on_tokens(index + self.shift, text, token_ids, logprobs)

    def on_finish(self, index: int, reason: str, completion_tokens: int) -> None:
        self.sink.on_finish(index + self.shift, reason, completion_tokens)

    def on_error(self, error: BaseException) -> None:
        self.sink.on_error(error)


async def run_generations(app, prompts: Sequence[Sequence[int]], params: SamplingParams, n: int, sink: SinkBase,
                          opened: Callable[[], None] | None = None, *, request: Request | None = None) -> None:
    """Generate ``n`` choices for each prompt into ``sink`` (prompt k's at index k*n)
    until every choice is done; ``opened`` (a stream's start) runs once all are admitted.

    Any failure or cancellation (the client went away) cancels all of the work. Every
    surface that generates text runs its generations through here. With ``request``, the
    generation is recorded as ``request.generation`` (runnel.generation_record), which
    the metrics and the access log read once the request is finished.

    The request's ``X-Request-Deadline`` (runnel.deadlines) becomes ``params.deadline``, which
    the backend checks as it takes the work off its queue; one already past is refused here.
    """
    into: TokenSink = sink
    if request is not None:
        deadline = monotonic_deadline(request)  # a bad header: 400, before anything is recorded
        record = request.generation = GenerationRecord(app, started_at_of(request.started_at),
                                                       sum(map(len, prompts)), n * len(prompts))
        into = RecordingTap(sink, record)
        if deadline is not None:
            if time.monotonic() >= deadline:
                record.expired = True
                raise deadline_exceeded("The request's deadline (X-Request-Deadline) had passed before it "
                                        "reached the model's queue; it was not run.")
            params.deadline = deadline
    generations = []
    try:
        for number, tokens in enumerate(prompts):
            target = IndexShift(into, number * n) if number else into
            generations.append(app.generate(tokens, params, n, target))
        if opened is not None:
            # Backends push from loop callbacks, never inside generate(): nothing
            # has been missed, and a refused generate() above was still a plain error.
            opened()
        await sink.done
    except BaseException:
        # (Not `if not sink.done.done()`: cancelling this task cancels sink.done too.)
        for generation in generations:
            generation.cancel()
        raise
