"""What a handler answers with: a whole body, or a stream written as it is made."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from .flow_control import FlowControl

if TYPE_CHECKING:
    from ..errors import HTTPError
    from ..serializers import Serializer

JSON = b"application/json"

# Response headers as a handler gives them: (name, value) pairs; str is encoded (latin-1).
Headers = Sequence[tuple[bytes, bytes]]


class Response:
    """A response whose body is known in full when the handler returns."""

    __slots__ = ("status", "body", "headers", "media_type")

    def __init__(
        self,
        status: int = 200,
        body: bytes = b"",
        *,
        media_type: bytes | None = None,
        headers: Headers = (),
    ) -> None:
        self.status = status
        self.body = body
        self.media_type = media_type
        self.headers = headers


def json_response(content: Any, status: int = 200, headers: Headers = ()) -> Response:
    return Response(status, orjson.dumps(content), media_type=JSON, headers=headers)


def error_response(error: HTTPError) -> Response:
    """An HTTPError as a JSON response in the default (OpenAI-style) envelope."""
    return Response(error.status, orjson.dumps(error.to_dict()), media_type=JSON, headers=error.headers)


class ResponseStream:
    """A response body written piece by piece, as HTTP/1.1 chunks (or raw until close on HTTP/1.0).

    The stream owns its framing and its end: ``send(event)`` frames one event with
    the negotiated serializer (``bytes`` are a payload encoded already), ``fail(body)``
    writes the serializer's error event and ends, ``end()`` writes the serializer's
    terminator (``data: [DONE]`` for OpenAI) and the last chunk. Whoever opened the
    stream ends it; the request cycle completes when it does. Both are idempotent,
    and nothing is written after either.

    Back-pressure: a producer that can wait awaits ``drain()`` when ``paused`` is set.
    One that cannot (a model's batch row keeps decoding whatever the client does)
    may write past that, but only up to ``max_pending`` bytes waiting in the
    transport: past it the stream gives up on the client (``on_overflow``: the
    protocol aborts the connection, which cancels the handler and the generation
    it started), so a client that stops reading costs at most that much memory.
    """

    __slots__ = ("_transport", "_flow", "_chunked", "_discard", "_encode", "_prefix", "_suffix", "_framing",
                 "_max_pending", "_on_end", "_on_overflow", "serializer", "ended")

    def __init__(self, transport: asyncio.WriteTransport, flow: FlowControl, *, serializer: Serializer, chunked: bool,
                 discard: bool,
                 max_pending: int, on_end: Callable[[], None], on_overflow: Callable[[int], None]) -> None:
        self._transport = transport
        self._flow = flow
        self._chunked = chunked
        self._discard = discard  # HEAD: the head only
        self.serializer = serializer
        self._encode = serializer.encode
        # The per-token fast path: an encoded payload framed and chunked in one format.
        frame: tuple[bytes, bytes] | None = getattr(serializer, "payload_frame", None)
        self._prefix: bytes | None = None
        self._suffix = b""
        if frame is not None and chunked and not discard:
            self._prefix, self._suffix = frame
        self._framing = len(self._prefix or b"") + len(self._suffix)
        self._max_pending = max_pending
        self._on_end = on_end
        self._on_overflow = on_overflow
        self.ended = False

    @property
    def closed(self) -> bool:
        """True once the client has gone (or was dropped): writes are dropped from then on."""
        return self._flow.lost

    @property
    def paused(self) -> bool:
        """The transport's buffer is past its high-water mark: a producer that can wait should ``drain()``."""
        return self._flow.writing_paused

    async def drain(self) -> None:
        """Wait until the client has taken enough; ConnectionResetError once it has gone."""
        await self._flow.drain()

    def write(self, data: bytes) -> None:
        """Raw body bytes, unframed: for bodies that are not a sequence of events."""
        if self.ended or self._discard or not data or self._flow.lost:
            return
        if self._chunked:
            # Writing the chunk framing ourselves is ~25x cheaper than h11's Data event.
            self._transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self._transport.write(data)
        if self._flow.writing_paused:
            self._check_pending()

    def send(self, event: Any) -> None:
        """One event, framed by the serializer; ``bytes`` are an encoded payload (JSON, say)."""
        prefix = self._prefix
        if prefix is None or type(event) is not bytes:
            self.write(self._encode(event))
            return
        # == write(serializer.encode(event)), in one format instead of two (measured: ~0.1 us a token).
        if self.ended or self._flow.lost:
            return
        self._transport.write(b"%x\r\n%b%b%b\r\n" % (len(event) + self._framing, prefix, event, self._suffix))
        if self._flow.writing_paused:
            self._check_pending()

    def _check_pending(self) -> None:
        pending = self._flow.pending_bytes()
        if pending > self._max_pending:
            self.ended = True
            self._on_overflow(pending)

    def fail(self, error: dict[str, Any]) -> None:
        """End early with the serializer's error event carrying ``error`` (an error body)."""
        if not self.ended:
            self.write(self.serializer.encode_error(error))
            self._finish()

    def end(self) -> None:
        """End normally: the serializer's terminator, then the last chunk."""
        if not self.ended:
            terminator = getattr(self.serializer, "end", b"")  # optional for a plugin's framing
            if terminator:
                self.write(terminator)
            self._finish()

    def _finish(self) -> None:
        self.ended = True
        if self._chunked and not self._discard and not self._flow.lost:
            self._transport.write(b"0\r\n\r\n")
        self._on_end()
