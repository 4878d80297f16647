"""Tool calls out of a model's text, as it streams: content, then each call's name, then
its arguments in pieces, never the format's markup.

One ``ToolCallParser`` per choice. ``feed(text)`` with each push of generated text (the
prefill first, when the turn was begun for the model), ``finish(reason)`` at the end.
Events go to a ``ToolEvents`` target as soon as they are certain:

- ``on_text(piece)``: content. Whitespace at the start of the reply, and at the end of each
  stretch of content (before a call, or the end), is not content; text that might still
  become the opening of a call (``<tool_`` ...) is held until it can't.
- ``on_tool_call(index, call_id, name)``: a call begins; its ``name`` is complete.
- ``on_tool_arguments(index, piece)``: the pieces of that call's arguments, a JSON object
  as the model wrote it; they join into the arguments (``calls[index].arguments``).

What reaches the target does not depend on how the text was cut into pushes: a reply
streamed token by token and the same reply collected whole give the same content and
the same calls (tests/test_tool_parser.py feeds every cut). That is what makes a
streamed answer join into exactly the non-streamed one.

States (``_state``): TEXT (content; looking for the opening), BEFORE (an opening seen,
waiting for the call's ``{``), OBJECT (inside a call: scanning JSON for its end),
AFTER (a call ended: its closing, a separator, more calls or text), DONE (the one call a
request wanted is made; the rest is dropped). Invariant: ``_buffer`` holds only text not
yet decided, and in OBJECT ``_object`` holds the call's text so far, of which
``_scanned`` characters have been through the JSON scanner.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from ..errors import HTTPError
from .formats import ToolCallFormat

TEXT, BEFORE, OBJECT, AFTER, DONE = range(5)
# The start of a call whose name and arguments can be streamed: {"name": "...", "arguments": {
_CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')
# A call whose head has not matched within this many characters is collected whole and
# sent when complete (its keys in another order, say): bounds the matching work.
_HEAD_WINDOW = 512


class ToolEvents(Protocol):
    def on_text(self, text: str) -> None: ...

    def on_tool_call(self, index: int, call_id: str, name: str) -> None: ...

    def on_tool_arguments(self, index: int, piece: str) -> None: ...


@dataclass(slots=True)
class ToolCall:
    call_id: str
    name: str
    arguments: str  # a JSON object, as text


def invalid_tool_call(message: str) -> HTTPError:
    """The model's output claims a call it does not make: an error the client sees (as
    OpenAI's "The model produced invalid content"), never silent text."""
    return HTTPError(500, f"The model produced an invalid tool call: {message}", type="server_error",
                     code="invalid_tool_call")


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ToolCallParser:
    __slots__ = ("_format", "_events", "_functions", "_new_id", "_single", "_forced", "_state", "_buffer",
                 "_held_space", "_spoken", "_object", "_scanned", "_depth", "_in_string", "_escaped",
                 "_head_done", "_arguments_from", "_arguments_to", "_arguments_sent", "calls")

    def __init__(self, format: ToolCallFormat, events: ToolEvents, *, functions: Mapping[str, Mapping[str, Any]],
                 new_id: Callable[[], str] = new_call_id, single: bool = False, forced: bool = False) -> None:
        self._format = format
        self._events = events
        self._functions = functions  # name -> its JSON schema ({} when none): what may be called
        self._new_id = new_id
        self._single = single  # parallel_tool_calls false: one call, the rest dropped
        self._forced = forced  # tool_choice required or named: no call is an error
        self._state = TEXT
        self._buffer = ""
        self._held_space = ""  # whitespace after content: content only if more content follows
        self._spoken = False  # any content sent yet (leading whitespace is not content)
        self.calls: list[ToolCall] = []

    # -- input --------------------------------------------------------------------------
    def feed(self, text: str) -> None:
        """Raises the HTTPError of ``invalid_tool_call`` when the text cannot be a call."""
        if self._state == TEXT and not self._buffer and self._spoken and self._format.opening[0] not in text:
            self._content(text)  # the common push: content that cannot hold an opening, straight on
            return
        if self._state == DONE or not text:
            return
        self._buffer += text
        self._advance(False)

    def finish(self, reason: str) -> None:
        """The reply ended (``reason`` "stop" or "length"). Raises when a call was begun but
        not completed although the model stopped by itself, or when a forced call is missing."""
        if self._state != DONE:
            self._advance(True)
        if self._state in (BEFORE, OBJECT) and reason != "length":
            raise invalid_tool_call("it ends inside a call")
        if self._forced and not self.calls and reason != "length":
            raise invalid_tool_call("a call was required, and the reply is not one")

    # -- the state machine ----------------------------------------------------------------
    def _advance(self, final: bool) -> None:
        while True:
            state = self._state
            if state == TEXT:
                if not self._text(final):
                    return
            elif state == BEFORE:
                if not self._before():
                    return
            elif state == OBJECT:
                if not self._object_text():
                    return
            elif state == AFTER:
                if not self._after(final):
                    return
            else:
                self._buffer = ""
                return

    def _text(self, final: bool) -> bool:
        buffer, fmt = self._buffer, self._format
        if fmt.leading_object and not self._spoken and not self.calls:
            start = buffer.lstrip()
            if not start:
                if final:
                    self._buffer = ""
                return False
            if start[0] == "{":
                self._buffer = start
                self._start_object()
                return True
        at = buffer.find(fmt.opening)
        if at != -1:
            self._content(buffer[:at])
            self._held_space = ""  # whitespace before a call is not content
            self._buffer = buffer[at + len(fmt.opening):]
            self._state = BEFORE
            return True
        keep = 0 if final else _partial_suffix(buffer, fmt.opening)
        self._content(buffer[: len(buffer) - keep])
        self._buffer = buffer[len(buffer) - keep:]
        if final:
            self._held_space = ""
        return False

    def _before(self) -> bool:
        buffer = self._buffer.lstrip()
        skip = self._format.skip_before
        if skip and buffer[:1] and buffer[0] in skip:
            buffer = buffer[1:].lstrip()
        self._buffer = buffer
        if not buffer:
            return False
        if buffer[0] != "{":
            raise invalid_tool_call(f"expected a JSON object after {self._format.opening!r}, got {buffer[:20]!r}")
        self._start_object()
        return True

    def _start_object(self) -> None:
        self._state = OBJECT
        self._object = ""
        self._scanned = 0
        self._depth = 0
        self._in_string = self._escaped = False
        self._head_done = False
        self._arguments_from = self._arguments_to = -1
        self._arguments_sent = 0

    def _object_text(self) -> bool:
        """Scan the call's JSON; stream its name and arguments once they are certain."""
        self._object += self._buffer
        self._buffer = ""
        text = self._object
        if not self._head_done:  # before scanning: the scanner must know where the arguments start
            match = _CALL_HEAD.match(text)
            if match is not None:
                self._head_done = True
                self._begin_call(orjson.loads(b'"%b"' % match.group(1).encode()))
                self._arguments_from = match.end()
            elif len(text) > _HEAD_WINDOW:
                self._head_done = True  # collected whole, sent when complete
        end = self._scan(text)
        if self._arguments_from != -1:
            stop = self._arguments_to if self._arguments_to != -1 else self._scanned
            start = self._arguments_from + self._arguments_sent
            if stop > start:
                piece = text[start:stop]
                self.calls[-1].arguments += piece  # so far: a call cut by max_tokens keeps what it has
                self._events.on_tool_arguments(len(self.calls) - 1, piece)
                self._arguments_sent = stop - self._arguments_from
        if end == -1:
            return False
        self._buffer = text[end:]
        self._object = text[:end]
        self._end_call()
        return True

    def _scan(self, text: str) -> int:
        """Advance the JSON scanner over ``text`` from ``_scanned``: the end of the object
        (one past its closing brace) or -1; marks where the arguments value closes."""
        depth, in_string, escaped = self._depth, self._in_string, self._escaped
        arguments_from = self._arguments_from
        end = -1
        i = self._scanned
        size = len(text)
        while i < size:
            char = text[i]
            i += 1
            if in_string:
                if escaped:
                    escaped = False
                elif char == "\\":
                    escaped = True
                elif char == '"':
                    in_string = False
            elif char == '"':
                in_string = True
            elif char == "{" or char == "[":
                depth += 1
            elif char == "}" or char == "]":
                depth -= 1
                if depth == 1 and arguments_from != -1 and self._arguments_to == -1:
                    self._arguments_to = i
                elif depth == 0:
                    end = i
                    break
        self._scanned = i
        self._depth, self._in_string, self._escaped = depth, in_string, escaped
        return end

    def _begin_call(self, name: str) -> None:
        if name not in self._functions:
            raise invalid_tool_call(f"it calls `{name}`, which is not among the request's tools")
        call = ToolCall(self._new_id(), name, "")
        self._events.on_tool_call(len(self.calls), call.call_id, name)
        self.calls.append(call)

    def _end_call(self) -> None:
        try:
            value = orjson.loads(self._object)
        except orjson.JSONDecodeError:
            raise invalid_tool_call(f"{self._object[:80]!r} is not JSON") from None
        if type(value) is not dict or type(value.get("name")) is not str:
            raise invalid_tool_call(f"{self._object[:80]!r} has no function name")
        arguments = value.get("arguments", value.get("parameters", {}))
        if type(arguments) is str:  # some models write the arguments as a JSON string
            try:
                arguments = orjson.loads(arguments)
            except orjson.JSONDecodeError:
                arguments = None
        if type(arguments) is not dict:
            raise invalid_tool_call(f"the arguments of `{value['name']}` are not a JSON object")
        if self._arguments_from == -1:  # not streamed: sent whole now
            self._begin_call(value["name"])
            self.calls[-1].arguments = text = orjson.dumps(arguments).decode()
            self._events.on_tool_arguments(len(self.calls) - 1, text)
        call = self.calls[-1]
        _check_arguments(call.name, arguments, self._functions[call.name])
        self._state = DONE if self._single else AFTER

    def _after(self, final: bool) -> bool:
        buffer = self._buffer.lstrip()
        self._buffer = buffer
        if not buffer:
            return False
        fmt = self._format
        if fmt.closing:
            if buffer.startswith(fmt.closing):
                self._buffer = buffer[len(fmt.closing):]
                self._state = TEXT
                return True
            if not final and fmt.closing.startswith(buffer):
                return False  # maybe the closing, still arriving
        if buffer[0] in fmt.separators:
            self._buffer = buffer[1:]
            self._state = TEXT if buffer[0] == "]" else BEFORE
            return True
        if buffer[0] == "{" and not fmt.closing:
            self._start_object()
            return True
        self._state = TEXT  # no closing: what follows is text (or the next opening)
        return True

    def _content(self, text: str) -> None:
        if not text:
            return
        if not self._spoken:
            text = text.lstrip()
            if not text:
                return
        if self._held_space:
            text = self._held_space + text
        if text[-1].isspace():
            body = text.rstrip()
            self._held_space = text[len(body):]
            if not body:
                return
        else:
            body = text
            self._held_space = ""
        self._spoken = True
        self._events.on_text(body)


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that is a proper start of ``marker``: only
    the places that hold the marker's first character are tried."""
    first = marker[0]
    at = text.find(first, max(0, len(text) - len(marker) + 1))
    while at != -1:
        if marker.startswith(text[at:]):
            return len(text) - at
        at = text.find(first, at + 1)
    return 0


def _check_arguments(name: str, arguments: dict, schema: Mapping[str, Any]) -> None:
    """What a schema says that can be checked without constrained decoding: its required
    properties are there, and no others where it forbids additional ones."""
    required = schema.get("required")
    if type(required) is list:
        missing = [key for key in required if type(key) is str and key not in arguments]
        if missing:
            raise invalid_tool_call(f"the call of `{name}` lacks the required argument(s) {', '.join(missing)}")
    properties = schema.get("properties")
    if schema.get("additionalProperties") is False and isinstance(properties, dict):
        extra = [key for key in arguments if key not in properties]
        if extra:
            raise invalid_tool_call(f"the call of `{name}` has unknown argument(s) {', '.join(extra)}")


def functions_by_name(tools: Collection[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """name -> parameters schema, from tools in the chat shape {"type": "function", "function": {...}}."""
    return {tool["function"]["name"]: tool["function"].get("parameters") or {} for tool in tools}
