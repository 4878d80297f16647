"""Framings for streamed responses, chosen by the request's Accept header.

A framing (a "serializer") owns everything about how a stream's events look on the
wire: ``encode(event)`` frames one event (``bytes`` are a payload encoded already,
which is what the per-token paths send), ``encode_error(body)`` frames the error
that ends a stream early, and ``end`` is what a stream that finishes normally
writes last (``data: [DONE]`` for OpenAI's SSE, nothing for plain SSE or NDJSON).
``runnel.http.ResponseStream`` is their only caller: handlers ``send``, ``fail``
and ``end`` a stream and never write framing bytes themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from .hookspecs import hookimpl

if TYPE_CHECKING:
    from .http import Request


class Serializer(Protocol):
    """A stream framing, as ``runnel_register_serializers`` adds it. It may also have
    ``end`` (bytes a stream that finishes normally writes last; none when absent) and
    ``payload_frame`` (``(prefix, suffix)`` with ``prefix + payload + suffix ==
    encode(payload)`` for bytes payloads: the stream's one-step fast path)."""

    media_type: bytes

    def encode(self, event: Any) -> bytes: ...

    def encode_error(self, error: dict[str, Any]) -> bytes: ...


class ServerSentEvents:
    """``text/event-stream``: each event is ``data: <payload>\\n\\n``.

    Strings go as they are (one ``data:`` line per line), bytes as a payload
    already encoded, anything else as JSON.
    """

    media_type = b"text/event-stream"
    end = b""
    # An encoded payload (bytes, no line breaks: JSON) is framed as prefix + payload + suffix;
    # the stream writes it in one step with the chunk framing (the per-token path).
    payload_frame = (b"data: ", b"\n\n")

    def encode(self, event: Any) -> bytes:
        if type(event) is bytes:
            return b"data: %b\n\n" % event
        if isinstance(event, str):
            if "\n" in event or "\r" in event:
                lines = event.replace("\r\n", "\n").replace("\r", "\n").split("\n")
                return "".join(f"data: {line}\n" for line in lines).encode() + b"\n"
            return b"data: %b\n\n" % event.encode()
        return b"data: %b\n\n" % orjson.dumps(event)

    def encode_error(self, error: dict[str, Any]) -> bytes:
        return b"event: error\ndata: %b\n\n" % orjson.dumps(error)


class TypedEvents:
    """SSE with an ``event:`` line naming each event, as Anthropic's Messages API and
    OpenAI's Responses API frame them: every payload is a JSON object whose first key is
    its ``type``, which is the event's name, so an encoded payload (bytes, the per-token
    path) carries its own name. A surface subclasses it for its error event."""

    media_type = b"text/event-stream"
    end = b""

    def encode(self, event: Any) -> bytes:
        payload = event if type(event) is bytes else orjson.dumps(event)
        # b'{"type":"NAME",...': the name sits between the 9th byte and the next quote.
        return b"event: %b\ndata: %b\n\n" % (payload[9 : payload.index(b'"', 9)], payload)

    def encode_error(self, error: dict[str, Any]) -> bytes:
        return b"event: error\ndata: %b\n\n" % orjson.dumps(error)


class NDJSON:
    """``application/x-ndjson``: one JSON document per line."""

    media_type = b"application/x-ndjson"
    end = b""
    payload_frame = (b"", b"\n")

    def encode(self, event: Any) -> bytes:
        if type(event) is bytes:
            return event + b"\n"
        return orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE)

    def encode_error(self, error: dict[str, Any]) -> bytes:
        return orjson.dumps(error, option=orjson.OPT_APPEND_NEWLINE)


def parse_accept(value: bytes) -> list[tuple[float, str]]:
    """Media ranges of an Accept header with their q-values, best first."""
    ranges: list[tuple[float, int, str]] = []
    for index, part in enumerate(value.decode("latin-1").split(",")):
        media, *params = part.split(";")
        media = media.strip().lower()
        if not media:
            continue
        quality = 1.0
        for param in params:
            name, _, raw = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(raw)
                except ValueError:
                    quality = 0.0
        ranges.append((quality, index, media))
    ranges.sort(key=lambda item: (-item[0], item[1]))
    return [(quality, media) for quality, _, media in ranges]


class Negotiator:
    """Picks a stream serializer for a request; the default when Accept names none we have."""

    def __init__(self, serializers: dict[bytes, Serializer], default: bytes = b"text/event-stream") -> None:
        self.serializers = serializers
        self.default = serializers[default]
        self._by_name = {media.decode(): serializer for media, serializer in serializers.items()}

    def __call__(self, request: Request) -> Serializer:
        accept = request.header(b"accept")
        if not accept:
            return self.default
        for quality, media in parse_accept(accept):
            if quality <= 0:
                continue
            serializer = self._by_name.get(media)
            if serializer is not None:
                return serializer
            if media == "*/*":
                return self.default
            if media.endswith("/*"):  # e.g. application/*: the first framing of that type
                prefix = media[:-1]
                for name, candidate in self._by_name.items():
                    if name.startswith(prefix):
                        return candidate
        return self.default

    def named(self, request: Request) -> Serializer | None:
        """The serializer the client's Accept names explicitly (best first), else None:
        for routes that stream only when asked to (a generator's values otherwise come
        back collected)."""
        accept = request.header(b"accept")
        if not accept:
            return None
        for quality, media in parse_accept(accept):
            if quality > 0 and media in self._by_name:
                return self._by_name[media]
        return None

    def wants(self, request: Request, media_type: bytes) -> bool:
        """Whether the client explicitly asked for this media type (e.g. SSE)."""
        accept = request.header(b"accept")
        if not accept:
            return False
        name = media_type.decode()
        return any(media == name and quality > 0 for quality, media in parse_accept(accept))


@hookimpl
def runnel_register_serializers(register: Callable[[Serializer], None]) -> None:
    """The built-in framings: SSE (the default) and NDJSON."""
    register(ServerSentEvents())
    register(NDJSON())
