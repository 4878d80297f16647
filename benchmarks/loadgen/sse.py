"""Server-sent events, parsed incrementally, and the tokens an event carries.

Only what a load client needs of the SSE grammar (WHATWG HTML, "Parsing an event
stream"): lines end with LF, CRLF or CR; a blank line ends an event; ``data:`` lines
(one optional space after the colon removed) are joined with LF; comments (``:``) and
the other fields (``event``, ``id``, ``retry``) are ignored; an event without data
lines is not dispatched.
"""

from __future__ import annotations

import orjson

DONE = b"[DONE]"
MAX_LINE = 1 << 24  # a line longer than this (16 MiB) is a broken stream, not a slow one


class SSEParser:
    """Feed it response body bytes as they arrive; it returns the data of each event
    completed so far (bytes), keeping the partial line and event across calls."""

    __slots__ = ("_pending", "_data", "_cr")

    def __init__(self) -> None:
        self._pending = b""  # the last line, not yet terminated
        self._data: list[bytes] | None = None  # data lines of the event being read
        self._cr = False  # the previous chunk ended with CR: a LF opening this one is its pair

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._cr:
            self._cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\r" in chunk:
            self._cr = chunk[-1:] == b"\r"
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = (self._pending + chunk if self._pending else chunk).split(b"\n")
        self._pending = lines.pop()
        if len(self._pending) > MAX_LINE:
            raise ValueError("SSE line too long")
        events = []
        data = self._data
        for line in lines:
            if not line:
                if data is not None:
                    events.append(data[0] if len(data) == 1 else b"\n".join(data))
                    data = None
            elif line[:5] == b"data:":
                value = line[6:] if line[5:6] == b" " else line[5:]
                if data is None:
                    data = [value]
                else:
                    data.append(value)
            elif line == b"data":
                if data is None:
                    data = [b""]
                else:
                    data.append(b"")
        self._data = data
        return events


def count_tokens(data: bytes) -> int:
    """Tokens in one event's data: -1 for an error event.

    An OpenAI chunk (a JSON object with a ``choices`` list) carries one token per
    choice whose ``delta.content`` (chat) or ``text`` (completions) is a non-empty
    string, so role-only, finish and usage chunks count 0. An object with an
    ``error`` key and no ``choices`` is an error event (how OpenAI-style servers end
    a failed stream). Any other event is one token.
    """
    if data[:1] != b"{":
        return 1
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return 1
    choices = obj.get("choices")
    if type(choices) is list:
        n = 0
        for choice in choices:
            if type(choice) is dict:
                delta = choice.get("delta")
                piece = delta.get("content") if type(delta) is dict else choice.get("text")
                if piece and type(piece) is str:
                    n += 1
        return n
    if "error" in obj:
        return -1
    return 1


class StreamTokens:
    """Tokens of one streamed answer and when they came: feed it the body bytes of
    each socket read with that read's time (``perf_counter_ns``)."""

    __slots__ = ("parser", "tokens", "first", "last", "gaps", "done", "error")

    def __init__(self) -> None:
        self.parser = SSEParser()
        self.tokens = 0
        self.first = 0  # time of the first token; 0 while there is none
        self.last = 0
        self.gaps: list[float] = []  # ms between consecutive token-bearing events
        self.done = False  # [DONE] seen: what follows is not counted
        self.error = False  # an error event came

    def feed(self, data: bytes, t: int) -> None:
        for payload in self.parser.feed(data):
            if self.done:
                continue
            if payload == DONE:
                self.done = True
                continue
            n = count_tokens(payload)
            if n > 0:
                self.tokens += n
                if self.first:
                    self.gaps.append((t - self.last) * 1e-6)
                else:
                    self.first = t
                self.last = t
            elif n < 0:
                self.error = True
