"""What a handler answers with: a whole body, or a stream written as it is made."""

from __future__ import annotations

from typing import Any

import orjson

JSON = b"application/json"


class Response:
    """A response whose body is known in full when the handler returns."""

    __slots__ = ("status", "body", "headers", "media_type")

    def __init__(
        self,
        status: int = 200,
        body: bytes = b"",
        *,
        media_type: bytes | None = None,
        headers: tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]] = (),
    ) -> None:
        self.status = status
        self.body = body
        self.media_type = media_type
        self.headers = headers


def json_response(content: Any, status: int = 200, headers=()) -> Response:
    return Response(status, orjson.dumps(content), media_type=JSON, headers=headers)


def error_response(error) -> Response:
    """An HTTPError as a JSON response in the default (OpenAI-style) envelope."""
    return Response(error.status, orjson.dumps(error.to_dict()), media_type=JSON, headers=error.headers)


class ResponseStream:
    """A response body written piece by piece as HTTP/1.1 chunks.

    ``write`` and ``send`` are synchronous so a producer can call them straight
    from a loop callback; a producer that can wait should ``await drain()`` when
    ``paused`` is set, which is how a slow reader holds the producer back.
    """

    __slots__ = ("_protocol", "_transport", "_chunked", "_discard", "serializer", "ended")

    def __init__(self, protocol, transport, *, chunked: bool, discard: bool, serializer) -> None:
        self._protocol = protocol
        self._transport = transport
        self._chunked = chunked
        self._discard = discard  # HEAD: headers only
        self.serializer = serializer
        self.ended = False

    @property
    def closed(self) -> bool:
        """True once the client has gone: writes are dropped from then on."""
        return self._protocol.lost

    @property
    def paused(self) -> bool:
        return self._protocol.write_paused

    def write(self, data: bytes) -> None:
        if self._discard or not data or self._protocol.lost:
            return
        if self._chunked:
            # Writing the chunk framing ourselves is ~25x cheaper than h11's Data event.
            self._transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self._transport.write(data)

    def send(self, event: Any) -> None:
        """Frame one event with the negotiated serializer (SSE, NDJSON, ...) and write it."""
        self.write(self.serializer.encode(event))

    async def drain(self) -> None:
        await self._protocol.drain()

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self._protocol.end_stream()
