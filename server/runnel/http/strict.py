"""Checks where RFC 9112 lets a server be stricter than h11 is.

h11 enforces its size limit only on a head that has not fully arrived, silently
unfolds obs-fold, and accepts a bare CR inside a chunk extension. Each is a
request-smuggling or resource risk, so the protocol runs these on the raw bytes
before (or beside) h11.
"""

from __future__ import annotations

import re

_HEAD_END = re.compile(rb"\n\r?\n")
# A line that starts with SP or HTAB continues the previous header: obs-fold.
_OBS_FOLD = re.compile(rb"\n[ \t]")
# The chunk-size line as h11 parses it (1*HEXDIG, extension, OWS), minus the bare
# CR it lets into the extension: the checker must never read a framing h11 doesn't.
_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;[^\r\n]*)?[ \t]*\r\n")


def check_head(buffer: bytes, max_bytes: int) -> tuple[int, str] | None:
    """Check the request head at the start of ``buffer``.

    Returns ``(status, reason)`` for a head that must be refused, else None
    (also when the head is still incomplete and within the limit).
    """
    end = _HEAD_END.search(buffer)
    if end is None:
        if len(buffer) > max_bytes:
            return 431, "request header block too large"
        return None
    if end.end() > max_bytes:
        return 431, "request header block too large"
    if _OBS_FOLD.search(buffer, 0, end.start() + 1):
        return 400, "obsolete line folding in header"
    return None


class ChunkedBodyChecker:
    """Follows the chunked framing of one request body in parallel with h11.

    It checks each chunk-size line (and trailer line) for a bare CR, which h11
    lets through inside a chunk extension. It stops looking once the body's
    last chunk and trailer section have passed; bytes after that belong to the
    next request.
    """

    __slots__ = ("_line", "_remaining", "_state")

    _SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)

    def __init__(self) -> None:
        self._line = bytearray()
        self._remaining = 0
        self._state = self._SIZE

    @property
    def done(self) -> bool:
        return self._state == self._DONE

    def feed(self, data: bytes) -> bool:
        """Consume raw bytes; False as soon as the framing is known to be bad."""
        pos, size = 0, len(data)
        while pos < size and self._state != self._DONE:
            state = self._state
            if state == self._DATA:
                take = min(self._remaining, size - pos)
                self._remaining -= take
                pos += take
                if self._remaining == 0:
                    self._state = self._DATA_END
                continue
            newline = data.find(b"\n", pos)
            if newline == -1:
                self._line += data[pos:]
                if len(self._line) > 4096:
                    return False
                return True
            self._line += data[pos : newline + 1]
            pos = newline + 1
            line, self._line = bytes(self._line), bytearray()
            if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
                return False
            if state == self._DATA_END:
                if line != b"\r\n":
                    return False
                self._state = self._SIZE
            elif state == self._SIZE:
                size_line = _CHUNK_SIZE_LINE.fullmatch(line)
                if size_line is None:
                    return False
                self._remaining = int(size_line[1], 16)
                self._state = self._DATA if self._remaining else self._TRAILER
            elif line == b"\r\n":  # the blank line that ends the trailer section
                self._state = self._DONE
        return True
