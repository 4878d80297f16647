"""Token sinks that turn a generation into OpenAI's response objects.

The streaming sinks write each push as one SSE event straight to the response:
the constant parts of a chunk are encoded once per request, so a token costs
one orjson.dumps of its text and one transport write.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

import orjson

from ..errors import HTTPError
from ..generation import TokenLogprob

DONE = b"data: [DONE]\n\n"


def error_payload(error: BaseException) -> dict:
    if isinstance(error, HTTPError):
        return error.to_dict()
    return HTTPError(500, f"Generation failed: {error}", code="generation_failed").to_dict()


def chat_logprobs(items: Sequence[TokenLogprob]) -> dict:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [
            {**entry(item.token, item.logprob), "top_logprobs": [entry(token, lp) for token, lp in item.top]}
            for item in items
        ]
    }


def completion_logprobs(items: Sequence[TokenLogprob], offset: int) -> dict:
    tokens, token_logprobs, top, offsets = [], [], [], []
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


class _Sink:
    """What every sink shares: counting choices down to 'done'."""

    def __init__(self, choices: int, usage: Usage) -> None:
        self.usage = usage
        self.remaining = choices
        self.done = asyncio.get_running_loop().create_future()

    def on_finish(self, index: int, reason: str, completion_tokens: int) -> None:
        self.usage.completion_tokens += completion_tokens
        self.finish(index, reason)
        self.remaining -= 1
        if self.remaining == 0 and not self.done.done():
            self.complete()
            self.done.set_result(None)

    def on_error(self, error: BaseException) -> None:
        if not self.done.done():
            self.fail(error)


class Collector(_Sink):
    """Non-streaming: gathers each choice's text, log probs and finish reason."""

    def __init__(self, choices: int, usage: Usage) -> None:
        super().__init__(choices, usage)
        self.texts: list[list[str]] = [[] for _ in range(choices)]
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(choices)]
        self.reasons: list[str | None] = [None] * choices

    def on_tokens(self, index, text, token_ids, logprobs) -> None:
        if text:
            self.texts[index].append(text)
        if logprobs:
            self.logprobs[index].extend(logprobs)

    def finish(self, index: int, reason: str) -> None:
        self.reasons[index] = reason

    def complete(self) -> None:
        pass

    def fail(self, error: BaseException) -> None:
        self.done.set_exception(error if isinstance(error, HTTPError) else HTTPError(500, f"Generation failed: {error}"))

    def text(self, index: int) -> str:
        return "".join(self.texts[index])


class _StreamSink(_Sink):
    """Streaming: one SSE event per push, then the usage chunk and [DONE]."""

    def __init__(self, *, choices: int, usage: Usage, include_usage: bool, head: dict, sse: bool = True) -> None:
        super().__init__(choices, usage)
        self.stream = None  # set by open(), once every generation has been admitted
        self.include_usage = include_usage
        self.head = head
        # SSE as OpenAI frames it, or bare JSON lines (RunPod's non-raw output).
        self._open, self._close = (b"data: ", b"\n\n") if sse else (b"", b"\n")
        self._done = DONE if sse else b""
        # Everything before the choices array, and after it, encoded once.
        encoded = orjson.dumps({**head, "choices": []})
        self._prefix = self._open + encoded[: encoded.rindex(b"[") + 1]
        self._suffix = (b'],"usage":null}' if include_usage else b"]}") + self._close

    def open(self, stream) -> None:
        """Start the response: the status line goes out only now, so a refusal
        (a full queue, say) can still be a proper error status."""
        self.stream = stream
        self.begin()

    def _write_choice(self, choice: bytes) -> None:
        self.stream.write(self._prefix + choice + self._suffix)

    def _write_event(self, payload: dict) -> None:
        self.stream.write(self._open + orjson.dumps(payload) + self._close)

    def complete(self) -> None:
        if self.include_usage:
            self._write_event({**self.head, "choices": [], "usage": self.usage.to_dict()})
        self.stream.write(self._done)

    def fail(self, error: BaseException) -> None:
        # The status line is long gone: the error is the stream's last event.
        self._write_event(error_payload(error))
        self.done.set_result(None)


class ChatStream(_StreamSink):
    def __init__(self, *, role: str, logprobs: bool, **kwargs) -> None:
        super().__init__(**kwargs)
        self.role = role
        self.logprobs = logprobs

    def begin(self) -> None:
        # A message starts at its first non-space character: whitespace before it is the
        # chat template's framing ("Assistant:" then " My"), not the model's content.
        self.started = [False] * self.remaining
        role = self.role
        for index in range(self.remaining):
            delta = orjson.dumps({"role": role, "content": ""})
            self._write_choice(b'{"index":%d,"delta":%b,"logprobs":null,"finish_reason":null}' % (index, delta))

    def on_tokens(self, index, text, token_ids, logprobs) -> None:
        if not self.started[index]:
            text = text.lstrip()
            self.started[index] = bool(text)
        if not text and not logprobs:
            return
        lp = orjson.dumps(chat_logprobs(logprobs)) if self.logprobs and logprobs else b"null"
        self._write_choice(
            b'{"index":%d,"delta":{"content":%b},"logprobs":%b,"finish_reason":null}' % (index, orjson.dumps(text), lp)
        )

    def finish(self, index: int, reason: str) -> None:
        self._write_choice(b'{"index":%d,"delta":{},"logprobs":null,"finish_reason":"%b"}' % (index, reason.encode()))


class CompletionStream(_StreamSink):
    def __init__(self, *, logprobs: bool, echo: list[str] | None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.logprobs = logprobs
        self.echo = echo
        self.offsets = [0] * self.remaining

    def begin(self) -> None:
        if self.echo:
            for index, text in enumerate(self.echo):
                self.on_tokens(index, text, (), None)

    def on_tokens(self, index, text, token_ids, logprobs) -> None:
        if not text and not logprobs:
            return
        lp = b"null"
        if self.logprobs and logprobs:
            lp = orjson.dumps(completion_logprobs(logprobs, self.offsets[index]))
        self.offsets[index] += len(text)
        self._write_choice(
            b'{"index":%d,"text":%b,"logprobs":%b,"finish_reason":null}' % (index, orjson.dumps(text), lp)
        )

    def finish(self, index: int, reason: str) -> None:
        self._write_choice(b'{"index":%d,"text":"","logprobs":null,"finish_reason":"%b"}' % (index, reason.encode()))


class IndexShift:
    """Lets one prompt's generation write into a sink shared by several prompts."""

    __slots__ = ("sink", "shift")

    def __init__(self, sink, shift: int) -> None:
        self.sink = sink
        self.shift = shift

    def on_tokens(self, index, text, token_ids, logprobs) -> None:
        self.sink.on_tokens(index + self.shift, text, token_ids, logprobs)

    def on_finish(self, index, reason, completion_tokens) -> None:
        self.sink.on_finish(index + self.shift, reason, completion_tokens)

    def on_error(self, error) -> None:
        self.sink.on_error(error)
