"""Raw HTTP/1.1 over plain sockets: connect, send bytes, and the one reader of responses.

The reader parses what a server sent byte by byte, so a test can assert on the framing
itself (chunk boundaries, the exact wire body, headers sent twice) and not only on what
an HTTP client library makes of it. It reads off a live socket, one chunk at a time if the
test wants, or out of bytes already received (several pipelined responses in a row).
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from typing import Any

import orjson

_CHUNK_SIZE = re.compile(rb"[0-9a-fA-F]+")  # runnel sends no chunk extensions


def connect(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_closed(sock: socket.socket, limit: int = 64 * 1024 * 1024) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as a close)."""
    chunks, size = [], 0
    while size < limit:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
        size += len(data)
    return b"".join(chunks)


def recv_until(sock: socket.socket, marker: bytes, buffer: bytes = b"") -> bytes:
    """``buffer`` plus what arrives until ``marker`` is in it; ConnectionError if the server closes first."""
    while marker not in buffer:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed before {marker!r}; got {buffer!r}")
        buffer += data
    return buffer


def send_post(sock: socket.socket, path: str, body: Any, *, headers: dict[str, str] | None = None) -> None:
    """Write one JSON POST (``body`` as bytes already encoded, or anything orjson encodes) on ``sock``."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\n{extra}\r\n").encode()
    sock.sendall(head + data)


def raw_exchange(port: int, data: bytes, *, timeout: float = 10.0) -> bytes:
    """Send raw bytes, half-close nothing, and read until the server closes."""
    with connect(port, timeout=timeout) as sock:
        sock.sendall(data)
        return read_until_closed(sock)


@dataclass
class RawResponse:
    """One response as it went over the wire."""

    version: bytes
    status: int
    reason: bytes
    header_list: list[tuple[bytes, bytes]]  # names in lower case, in wire order
    body: bytes = b""  # with the transfer coding removed; complete once ``ended``
    wire_body: bytes = b""  # the body bytes exactly as sent
    chunks: list[bytes] = field(default_factory=list)  # chunk payloads, when chunked
    ended: bool = False  # the body's end was read (last chunk, Content-Length, or close)
    reader: ResponseReader | None = field(default=None, repr=False, compare=False)
    _wire: list[bytes] = field(default_factory=list, repr=False, compare=False)

    @property
    def status_line(self) -> bytes:
        return b"%b %d %b" % (self.version, self.status, self.reason)

    @property
    def headers(self) -> dict[bytes, bytes]:
        """Lower-case name -> value (the last one where a name was sent twice; see ``header``)."""
        return dict(self.header_list)

    def values(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.header_list if key == name]

    def header(self, name: bytes) -> bytes | None:
        values = self.values(name)
        assert len(values) <= 1, f"{name!r} sent {len(values)} times: {values}"
        return values[0] if values else None

    def json(self):
        return orjson.loads(self.body)

    @property
    def closes(self) -> bool:
        value = self.header(b"connection")
        return value is not None and b"close" in value.lower()

    def next_chunk(self) -> bytes | None:
        """Read the next chunk's payload off the wire; None at the terminating 0-length chunk."""
        assert self.reader is not None, "this response was read in full"
        return self.reader.next_chunk(self)

    def read_chunks(self) -> list[bytes]:
        """Read the rest of a chunked body; returns every chunk's payload."""
        while self.next_chunk() is not None:
            pass
        return self.chunks

    def read_body(self) -> bytes:
        """Read the rest of the body, however it is framed."""
        assert self.reader is not None, "this response was read in full"
        return self.reader.read_body(self).body


class ResponseReader:
    """Reads HTTP/1.1 responses, one after another, off a socket or out of bytes already received.

    Bytes stand for everything a connection delivered before it closed: their end is the
    close, which ends a body framed by neither Content-Length nor chunked.
    """

    def __init__(self, source: socket.socket | bytes | memoryview) -> None:
        if isinstance(source, socket.socket):
            self._sock: socket.socket | None = source
            self._data = bytearray()
            self._closed = False
        else:
            self._sock = None
            self._data = bytearray(source)
            self._closed = True
        self._pos = 0  # invariant: _data[:_pos] is consumed, _data[_pos:] is not
        self.consumed = 0  # bytes consumed since the start, over every response

    @property
    def pending(self) -> bytes:
        """What was received and not consumed yet."""
        return bytes(self._data[self._pos :])

    def _fill(self) -> bool:
        sock = self._sock
        if self._closed or sock is None:  # no socket: closed from the start
            return False
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self._closed = True
            return False
        if self._pos > 1 << 20:  # drop what is consumed, so that a long stream stays linear
            del self._data[: self._pos]
            self._pos = 0
        self._data += data
        return True

    def _take(self, size: int) -> bytes:
        data = bytes(self._data[self._pos : self._pos + size])
        self._pos += size
        self.consumed += size
        return data

    def _until(self, marker: bytes, what: str) -> bytes:
        """The bytes up to ``marker`` (consumed with it, not returned with it)."""
        while (end := self._data.find(marker, self._pos)) == -1:
            if not self._fill():
                raise ConnectionError(f"closed before {what}; have {self.pending[:300]!r}")
        data = self._take(end - self._pos)
        self._take(len(marker))
        return data

    def _exact(self, size: int, what: str) -> bytes:
        while len(self._data) - self._pos < size:
            if not self._fill():
                raise ConnectionError(f"closed before {what} ({size} bytes); have {self.pending[:300]!r}")
        return self._take(size)

    def _rest(self) -> bytes:
        while self._fill():
            pass
        return self._take(len(self._data) - self._pos)

    def at_end(self) -> bool:
        """True once everything is consumed and the connection has closed (waits for one or the other)."""
        return self._pos == len(self._data) and not self._fill()

    def read_head(self) -> RawResponse:
        """The status line and headers of the next response; its body is read after."""
        head = self._until(b"\r\n\r\n", "the end of a response head")
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        assert len(parts) >= 2, f"malformed status line {lines[0]!r}"
        version, status, reason = parts if len(parts) == 3 else (*parts, b"")
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            assert sep and name and name == name.strip(), f"malformed header line {line!r}"
            headers.append((name.lower(), value.strip(b" \t")))
        return RawResponse(version, int(status), reason, headers, reader=self)

    def next_chunk(self, response: RawResponse) -> bytes | None:
        """The next chunk's payload of a chunked ``response``; None at its terminating 0-length chunk."""
        te = response.header(b"transfer-encoding")
        assert te is not None and te.lower() == b"chunked", f"not chunked: {response.header_list}"
        if response.ended:
            return None
        size_line = self._until(b"\r\n", "a chunk size line")
        assert _CHUNK_SIZE.fullmatch(size_line), f"bad chunk size line {size_line!r}"
        size = int(size_line, 16)
        response._wire.append(size_line + b"\r\n")
        if size == 0:
            assert self._exact(2, "the end of the last chunk") == b"\r\n", "trailers or garbage after the last chunk"
            response._wire.append(b"\r\n")
            response.body = b"".join(response.chunks)
            response.wire_body = b"".join(response._wire)
            response.ended = True
            return None
        data = self._exact(size, "the end of a chunk")
        assert self._exact(2, "a chunk's CRLF") == b"\r\n", "chunk not followed by CRLF"
        response._wire += (data, b"\r\n")
        response.chunks.append(data)
        return data

    def read_body(self, response: RawResponse, *, head: bool = False) -> RawResponse:
        """Read the rest of ``response``'s body; ``head``: it answers a HEAD request, so it has none."""
        if response.ended:
            return response
        if head or 100 <= response.status < 200 or response.status in (204, 304):
            response.ended = True
            return response
        te = response.header(b"transfer-encoding")
        if te is not None:
            while self.next_chunk(response) is not None:
                pass
            return response
        length = response.header(b"content-length")
        if length is not None:
            response.body = response.wire_body = self._exact(int(length), "the end of the body")
        else:
            response.body = response.wire_body = self._rest()
        response.ended = True
        return response

    def read_response(self, *, head: bool = False) -> RawResponse:
        """The next whole response; ``head``: it answers a HEAD request."""
        return self.read_body(self.read_head(), head=head)


def read_head(sock: socket.socket) -> RawResponse:
    """The head of the response arriving on ``sock``; read its body with the response's methods."""
    return ResponseReader(sock).read_head()


def read_response(sock: socket.socket, *, head: bool = False) -> RawResponse:
    """The whole response arriving on ``sock``."""
    return ResponseReader(sock).read_response(head=head)


def parse_response(data: bytes, pos: int = 0, *, head: bool = False) -> tuple[RawResponse, int]:
    """Parse one response starting at ``data[pos]``; returns it and where the next begins.

    A body framed by neither Content-Length nor chunked runs to the end of ``data``
    (the server closed the connection to end it).
    """
    reader = ResponseReader(memoryview(data)[pos:])
    response = reader.read_response(head=head)
    response.reader = None
    return response, pos + reader.consumed


def parse_all(data: bytes, heads: tuple[int, ...] = ()) -> list[RawResponse]:
    """Every response in ``data``; ``heads`` lists the indexes that answer a HEAD request."""
    reader = ResponseReader(data)
    responses: list[RawResponse] = []
    while not reader.at_end():
        response = reader.read_response(head=len(responses) in heads)
        response.reader = None
        responses.append(response)
    return responses


def exchange(port: int, data: bytes, heads: tuple[int, ...] = ()) -> list[RawResponse]:
    """Send ``data`` in one write, read until the server closes, parse every response."""
    return parse_all(raw_exchange(port, data), heads)


def sse_events(body: bytes) -> list[bytes]:
    """The payloads of a body of SSE events, each exactly ``data: <payload>\\n\\n``."""
    assert body.endswith(b"\n\n"), body[-50:]
    payloads = []
    for event in body[:-2].split(b"\n\n"):
        assert event.startswith(b"data: "), event
        assert b"\n" not in event and b"\r" not in event, event
        payloads.append(event[len(b"data: "):])
    return payloads
