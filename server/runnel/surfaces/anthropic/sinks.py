"""Anthropic's answer: its SSE framing, and the sinks that make a message, streamed or
collected, with or without tools."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import orjson

from ...generation import TokenLogprob
from ...serializers import TypedEvents
from ...tools import ToolUse
from ..openai.sinks import Collector, SinkBase, ToolParsing, Usage, tool_parsers

EVENTS = TypedEvents()  # Anthropic's SSE: ``event: <type>`` then ``data: <json>``

def stop_reason(reason: str | None, stop_sequence: str | None) -> str:
    if reason == "length":
        return "max_tokens"
    if reason == "tool_calls":
        return "tool_use"
    return "stop_sequence" if stop_sequence is not None else "end_turn"


def tool_use_id() -> str:
    return "toolu_" + uuid.uuid4().hex[:24]


def _input(arguments: str) -> dict:
    """A call's arguments as a tool_use block's input; a call cut by max_tokens may not parse."""
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {}
    return value if type(value) is dict else {}


class MessageCollector(Collector):
    """Not streamed: the text, and the stop sequence that ended it, if one did."""

    __slots__ = ("stop_sequence",)

    def __init__(self, usage: Usage) -> None:
        super().__init__(1, usage)
        self.stop_sequence: str | None = None

    def on_stop_string(self, index: int, stop: str) -> None:
        self.stop_sequence = stop


class MessageStream(SinkBase):
    """Streamed: Anthropic's events for one text block; the per-token event is one format."""

    __slots__ = ("stream", "message", "stop_sequence", "started")

    def __init__(self, usage: Usage, message: dict[str, Any]) -> None:
        super().__init__(1, usage)
        self.stream: Any = None  # set by open()
        self.message = message
        self.stop_sequence: str | None = None
        self.started = False

    def open(self, stream) -> None:
        self._start_message(stream)
        stream.send(b'{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}')
        stream.send(b'{"type":"ping"}')

    def _start_message(self, stream) -> None:
        self.stream = stream
        message = {**self.message, "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self.usage.prompt_tokens, "output_tokens": 0}}
        stream.send({"type": "message_start", "message": message})

    def on_tokens(self, index: int, text: str, token_ids: Sequence[int],
                  logprobs: Sequence[TokenLogprob] | None) -> None:
        if not self.started:  # as the chat surface: leading whitespace is the template's framing
            text = text.lstrip()
            self.started = bool(text)
        if text:
            self.stream.send(b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":%b}}'
                             % orjson.dumps(text))

    def on_stop_string(self, index: int, stop: str) -> None:
        self.stop_sequence = stop

    def finish(self, index: int, reason: str) -> None:
        self.stream.send(b'{"type":"content_block_stop","index":0}')
        self._end(reason)

    def _end(self, reason: str) -> None:
        send = self.stream.send
        send({"type": "message_delta",
              "delta": {"stop_reason": stop_reason(reason, self.stop_sequence), "stop_sequence": self.stop_sequence},
              "usage": {"output_tokens": self.usage.completion_tokens}})
        send(b'{"type":"message_stop"}')

    def complete(self) -> None:
        pass


class MessageToolCollector(ToolParsing, MessageCollector):
    """Not streamed, with tools: the text, and the calls the parser keeps."""

    __slots__ = ("parsers",)

    def __init__(self, usage: Usage, tool_use: ToolUse) -> None:
        super().__init__(usage)
        self.parsers = tool_parsers(self, tool_use, 1, new_id=tool_use_id)

    def tool_text(self, index: int, text: str) -> None:
        self.texts[0].append(text)

    def tool_call(self, index: int, call: int, call_id: str, name: str) -> None:
        pass

    def tool_arguments(self, index: int, call: int, piece: str) -> None:
        pass

    def content(self) -> list[dict[str, Any]]:
        text = self.text(0)
        blocks: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
        blocks += [{"type": "tool_use", "id": call.call_id, "name": call.name, "input": _input(call.arguments)}
                   for call in self.parsers[0].calls]
        return blocks or [{"type": "text", "text": ""}]


class MessageToolStream(ToolParsing, MessageStream):
    """Streamed, with tools: a content block per stretch of text and per call (opened when
    its first piece is certain), a call's input as ``input_json_delta`` pieces."""

    __slots__ = ("parsers", "block", "block_kind")

    def __init__(self, usage: Usage, message: dict[str, Any], tool_use: ToolUse) -> None:
        super().__init__(usage, message)
        self.parsers = tool_parsers(self, tool_use, 1, new_id=tool_use_id)
        self.block = -1  # the open block's index; -1 before the first
        self.block_kind = ""

    def open(self, stream) -> None:
        self._start_message(stream)  # the blocks open as their first pieces come
        stream.send(b'{"type":"ping"}')

    def _start(self, kind: str, block: dict[str, Any]) -> None:
        if self.block != -1:
            self.stream.send(b'{"type":"content_block_stop","index":%d}' % self.block)
        self.block += 1
        self.block_kind = kind
        self.stream.send({"type": "content_block_start", "index": self.block, "content_block": block})

    def tool_text(self, index: int, text: str) -> None:
        if self.block_kind != "text":
            self._start("text", {"type": "text", "text": ""})
        self.stream.send(b'{"type":"content_block_delta","index":%d,"delta":{"type":"text_delta","text":%b}}'
                         % (self.block, orjson.dumps(text)))

    def tool_call(self, index: int, call: int, call_id: str, name: str) -> None:
        self._start("tool_use", {"type": "tool_use", "id": call_id, "name": name, "input": {}})

    def tool_arguments(self, index: int, call: int, piece: str) -> None:
        self.stream.send(b'{"type":"content_block_delta","index":%d,"delta":{"type":"input_json_delta",'
                         b'"partial_json":%b}}' % (self.block, orjson.dumps(piece)))

    def finish(self, index: int, reason: str) -> None:
        if self.block == -1:  # an empty reply is one empty text block
            self._start("text", {"type": "text", "text": ""})
        self.stream.send(b'{"type":"content_block_stop","index":%d}' % self.block)
        self.block = -1
        self._end(reason)


