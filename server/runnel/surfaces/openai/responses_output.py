"""A response's output as the generation makes it: its output items collected, and when
streamed, sent as the Responses API's typed events (``event: <type>``, each with its
``sequence_number``), as the openai SDK parses them.

``ResponseOutput`` is the generation's token sink. What the model says arrives through
``on_text`` (an assistant message, opened at its first text) and, from a tool-call
parser, ``on_tool_call`` / ``on_tool_arguments`` (a ``function_call`` item each); an
item is closed when the next one opens, or at the end. A streamed text token costs one
format of its delta event, whose constant part is encoded once per item.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import orjson

from ...errors import HTTPError
from ...generation import TokenLogprob
from ...serializers import TypedEvents
from ...tools import ToolCallParser, ToolUse
from .responses_items import message_item, text_part
from .sinks import SinkBase, Usage

__all__ = ["EVENTS", "ResponseEvents", "ResponseOutput", "usage_dict"]


def usage_dict(usage: Usage) -> dict[str, Any]:
    """Usage as the Responses API counts it, with the details objects the SDK expects."""
    return {"input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


class ResponseEvents(TypedEvents):
    """The Responses API's SSE: ``event: <type>`` and ``data: <json>``; no ``[DONE]``. An
    error that ends a stream before its response could fail is an ``error`` event, as
    OpenAI sends it."""

    def encode_error(self, error: dict[str, Any]) -> bytes:
        detail = error.get("error", {})
        return b"event: error\ndata: %b\n\n" % orjson.dumps(
            {"type": "error", "code": detail.get("code"), "message": detail.get("message"),
             "param": detail.get("param"), "sequence_number": 0})


EVENTS = ResponseEvents()


class ResponseOutput(SinkBase):
    """One response's output items; sent as events too once ``open`` gives it a stream."""

    __slots__ = ("stream", "response", "tool_use", "parser", "sequence", "output", "item", "pieces", "started",
                 "feed", "_delta")

    def __init__(self, usage: Usage, response: dict[str, Any], tool_use: ToolUse | None = None) -> None:
        super().__init__(1, usage)
        self.stream: Any = None  # set by open(): None, not streamed
        self.response = response  # the skeleton; finished by finish()
        self.tool_use = tool_use
        self.parser: ToolCallParser | None = None  # made by open(): a forced call's prefill makes events
        self.sequence = 0
        self.output: list[dict] = []  # the items closed so far
        self.item: dict | None = None  # the item being generated (its text or arguments in pieces)
        self.pieces: list[str] = []
        self.started = False  # the first non-space text has come
        # Where each push's text goes: here, or a tool-call parser that calls on_text and on_tool_*.
        self.feed = self.on_text
        self._delta = b""

    # -- events ----------------------------------------------------------------------
    def send(self, event: dict[str, Any]) -> None:
        if self.stream is not None:
            self.stream.send({**event, "sequence_number": self.sequence})
            self.sequence += 1

    def open(self, stream) -> None:
        """Start: the stream (None: not streamed), once every generation is admitted (so a
        refusal is still a status), then the tool-call parser, fed its prefill."""
        self.stream = stream
        self.send({"type": "response.created", "response": self.response})
        self.send({"type": "response.in_progress", "response": self.response})
        if self.tool_use is not None:
            self.parser = self.tool_use.parser(self)
            self.feed = self.parser.feed

    # -- what the model says ----------------------------------------------------------
    def on_tokens(self, index: int, text: str, token_ids: Sequence[int],
                  logprobs: Sequence[TokenLogprob] | None) -> None:
        if text and not self.done.done():  # failed (a call that does not parse): the rest is dropped
            try:
                self.feed(text)
            except HTTPError as error:
                self.on_error(error)

    def on_finish(self, index: int, reason: str, completion_tokens: int) -> None:
        if self.done.done():
            return
        if self.parser is not None:
            try:
                self.parser.finish(reason)
            except HTTPError as error:
                self.on_error(error)
                return
        super().on_finish(index, reason, completion_tokens)

    def on_text(self, text: str) -> None:
        if not self.started:  # as the chat surface: leading whitespace is the template's framing
            text = text.lstrip()
            if not text:
                return
            self.started = True
        if self.item is None or self.item["type"] != "message":
            self._open_message()
        self.pieces.append(text)
        if self.stream is not None:
            self.stream.send(b'%b%b,"sequence_number":%d}' % (self._delta, orjson.dumps(text), self.sequence))
            self.sequence += 1

    def on_tool_call(self, index: int, call_id: str, name: str) -> None:
        self._close("completed")
        self.item = {"type": "function_call", "id": "fc_" + uuid.uuid4().hex, "call_id": call_id, "name": name,
                     "arguments": "", "status": "in_progress"}
        self.send({"type": "response.output_item.added", "output_index": len(self.output), "item": self.item})
        self._delta = (b'{"type":"response.function_call_arguments.delta","item_id":"%b","output_index":%d,'
                       b'"delta":' % (self.item["id"].encode(), len(self.output)))

    def on_tool_arguments(self, index: int, piece: str) -> None:
        self.pieces.append(piece)
        if self.stream is not None:
            self.stream.send(b'%b%b,"sequence_number":%d}' % (self._delta, orjson.dumps(piece), self.sequence))
            self.sequence += 1

    def _open_message(self) -> None:
        self._close("completed")
        item_id = "msg_" + uuid.uuid4().hex
        self.item = {"type": "message", "id": item_id, "status": "in_progress", "role": "assistant", "content": []}
        index = len(self.output)
        self.send({"type": "response.output_item.added", "output_index": index, "item": self.item})
        self.send({"type": "response.content_part.added", "item_id": item_id, "output_index": index,
                   "content_index": 0, "part": text_part("")})
        self._delta = (b'{"type":"response.output_text.delta","item_id":"%b","output_index":%d,"content_index":0,'
                       b'"logprobs":[],"delta":' % (item_id.encode(), index))

    def _close(self, status: str) -> None:
        """Close the item being generated, if one is: its done events, and it joins ``output``."""
        item = self.item
        if item is None:
            return
        text, index = "".join(self.pieces), len(self.output)
        self.item, self.pieces = None, []
        if item["type"] == "message":
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            self.send({"type": "response.output_text.done", **where, "text": text, "logprobs": []})
            self.send({"type": "response.content_part.done", **where, "part": text_part(text)})
            item = message_item(item["id"], text, status)
        else:
            self.send({"type": "response.function_call_arguments.done", "item_id": item["id"], "output_index": index,
                       "arguments": text})
            item = {**item, "arguments": text, "status": status}
        self.output.append(item)
        self.send({"type": "response.output_item.done", "output_index": index, "item": item})

    # -- the end ----------------------------------------------------------------------
    def finish(self, index: int, reason: str) -> None:
        incomplete = reason == "length"
        if self.item is None and not self.output:
            self._open_message()  # no text at all: an empty message, as OpenAI answers
        self._close("incomplete" if incomplete else "completed")
        self.response = {**self.response, "status": "incomplete" if incomplete else "completed",
                         "completed_at": int(time.time()),
                         "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                         "output": self.output, "usage": usage_dict(self.usage)}
        self.send({"type": f"response.{self.response['status']}", "response": self.response})

    def complete(self) -> None:
        pass

    def fail(self, error: HTTPError) -> None:
        """The stream's last event, for a generation that failed once it had started."""
        self.response = {**self.response, "status": "failed",
                         "error": {"code": "server_error", "message": error.message}}
        self.send({"type": "response.failed", "response": self.response})
