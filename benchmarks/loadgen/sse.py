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


def parse_event(data: bytes) -> tuple[int, dict | None]:
    """(tokens, usage) of one event's data: tokens is -1 for an error event; usage is
    the ``usage`` object of an OpenAI chunk that has one (the
    ``stream_options.include_usage`` chunk), else None (``usage_counts`` reads it).

    An OpenAI chunk (a JSON object with a ``choices`` list) carries one token per
    choice whose ``delta.content`` (chat) or ``text`` (completions) is a non-empty
    string, so role-only, finish and usage chunks count 0. An object with an
    ``error`` key and no ``choices`` is an error event (how OpenAI-style servers end
    a failed stream). Any other event is one token.
    """
    if data[:1] != b"{":
        return 1, None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return 1, None
    choices = obj.get("choices")
    if type(choices) is list:
        n = 0
        for choice in choices:
            if type(choice) is dict:
                delta = choice.get("delta")
                piece = delta.get("content") if type(delta) is dict else choice.get("text")
                if piece and type(piece) is str:
                    n += 1
        usage = obj.get("usage")
        return n, usage if type(usage) is dict else None
    if "error" in obj:
        return -1, None
    return 1, None


def usage_counts(usage: dict) -> tuple[int | None, int | None]:
    """(completion tokens, prompt tokens) of a ``usage`` object; None where it has no
    count (missing, not an integer, or negative)."""
    out, prompt = usage.get("completion_tokens"), usage.get("prompt_tokens")
    return (out if type(out) is int and out >= 0 else None, prompt if type(prompt) is int and prompt >= 0 else None)


def count_tokens(data: bytes) -> int:
    """Tokens in one event's data, -1 for an error event (``parse_event``'s first half)."""
    return parse_event(data)[0]


class TokenWindow:
    """Output tokens counted by when they arrive: every token read at or after ``start``
    (ns) counts, whether its request ends inside the window, after it, or is cut at
    its end. A token-bearing event counts its choices; when the request's usage later
    says how many tokens it made (a server may put several in one event), the
    difference is spread over its events in proportion, so the window gets its share.
    """

    __slots__ = ("start", "tokens")

    def __init__(self, start: int = 0) -> None:
        self.start = start
        self.tokens = 0.0

    def settle(self, counted: int, windowed: int, reported: int | None, end: int) -> None:
        """Correct for a request that ended at ``end``: ``counted`` token-bearing
        pieces were read, ``windowed`` of them inside the window, and the server
        reported ``reported`` tokens (None: it did not say)."""
        if reported is None or reported == counted:
            return
        if counted:
            self.tokens += (reported - counted) * windowed / counted
        elif end >= self.start:  # nothing streamed: every token arrived with the end
            self.tokens += reported


class StreamTokens:
    """Tokens of one streamed answer and when they came: feed it the body bytes of
    each socket read with that read's time (``perf_counter_ns``). With a
    ``TokenWindow``, the tokens read inside it are added to it as they arrive."""

    __slots__ = ("parser", "tokens", "windowed", "window", "reported", "prompt_tokens", "first", "last", "gaps",
                 "done", "error")

    def __init__(self, window: TokenWindow | None = None) -> None:
        self.parser = SSEParser()
        self.tokens = 0
        self.windowed = 0  # of ``tokens``, those read inside the window
        self.window = window if window is not None else TokenWindow(1 << 62)
        self.reported: int | None = None  # the completion tokens the stream's usage reported
        self.prompt_tokens: int | None = None  # and its prompt tokens
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
            n, usage = parse_event(payload)
            if n > 0:
                self.tokens += n
                if t >= self.window.start:
                    self.windowed += n
                    self.window.tokens += n
                if self.first:
                    self.gaps.append((t - self.last) * 1e-6)
                else:
                    self.first = t
                self.last = t
            elif n < 0:
                self.error = True
            if usage is not None:
                self.reported, self.prompt_tokens = usage_counts(usage)

    @property
    def output_tokens(self) -> int:
        """What the server says it made when it says so, else the pieces counted."""
        return self.tokens if self.reported is None else self.reported
