"""One HTTP request as a handler sees it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson

from ..errors import HTTPError

if TYPE_CHECKING:
    from .protocol import HttpProtocol


_UNREAD = object()


class Request:
    """The head of a request, its body as it arrives, and a way to answer.

    Header names are lower-case bytes, as h11 gives them. The body is read with
    ``await body()``, ``await json()`` or ``async for chunk in stream_body()``;
    a client that sent ``Expect: 100-continue`` is told to go on only then.
    """

    __slots__ = (
        "method",
        "target",
        "path",
        "query",
        "headers",
        "http_version",
        "request_id",
        "route",
        "path_params",
        "principal",
        "started_at",
        "status",
        "_protocol",
        "_query_params",
        "_content_length",
        "_chunks",
        "_buffered",
        "_received",
        "_complete",
        "_error",
        "_waiter",
        "_stream",
        "_body",
        "_json",
    )

    def __init__(self, protocol: HttpProtocol, method: str, target: bytes, headers, http_version: bytes) -> None:
        self._protocol = protocol
        self.method = method
        self.target = target
        path, _, query = target.partition(b"?")
        if not path.startswith(b"/"):  # absolute-form: http://host/path
            path = b"/" + path.split(b"/", 3)[3] if path.count(b"/") >= 3 else b"/"
        self.path = path.decode("latin-1")
        self.query = query.decode("latin-1")
        self.headers = headers
        self.http_version = http_version
        self.request_id = ""
        self.route = None
        self.path_params: dict[str, str] = {}
        self.principal = None
        self.started_at = 0.0
        self.status = 0
        self._query_params = None
        self._content_length: int | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._received = 0
        self._complete = False
        self._error: BaseException | None = None
        self._waiter = None
        self._stream = None
        self._body: bytes | None = None
        self._json: Any = _UNREAD

    # -- head ---------------------------------------------------------------
    def header(self, name: bytes, default: bytes | None = None) -> bytes | None:
        """The first value of a header (name in lower case)."""
        for key, value in self.headers:
            if key == name:
                return value
        return default

    @property
    def query_params(self) -> dict[str, list[str]]:
        if self._query_params is None:
            self._query_params = parse_qs(self.query, keep_blank_values=True)
        return self._query_params

    def query_param(self, name: str, default: str | None = None) -> str | None:
        values = self.query_params.get(name)
        return values[0] if values else default

    @property
    def client(self) -> tuple[str, int] | None:
        return self._protocol.peer

    # -- body ---------------------------------------------------------------
    async def body(self) -> bytes:
        """The whole body (read once, then kept). Raises HTTPError 413 past the configured limit."""
        if self._body is None:
            parts = [chunk async for chunk in self.stream_body()]
            self._body = parts[0] if len(parts) == 1 else b"".join(parts)
        return self._body

    async def json(self) -> Any:
        """The body parsed as JSON (once, then kept); invalid JSON is a 400."""
        if self._json is _UNREAD:
            body = await self.body()
            try:
                self._json = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise HTTPError(400, f"Request body is not valid JSON: {exc}", code="invalid_json") from None
        return self._json

    async def stream_body(self):
        protocol = self._protocol
        protocol.body_wanted(self)
        while True:
            if self._chunks:
                chunks, self._chunks = self._chunks, []
                self._buffered = 0
                protocol.body_consumed()
                for chunk in chunks:
                    yield chunk
                continue
            if self._error is not None:
                raise self._error
            if self._complete:
                return
            self._waiter = protocol.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    # Called by the protocol as h11 hands over the body.
    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self._wake()

    def _finish(self, error: BaseException | None = None) -> None:
        if error is not None:
            self._error = error
        else:
            self._complete = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- answering ----------------------------------------------------------
    def stream(
        self,
        status: int = 200,
        *,
        headers: tuple[tuple[bytes, bytes], ...] | list = (),
        serializer=None,
        media_type: bytes | None = None,
    ):
        """Send the response head now and return a ResponseStream for the body.

        ``serializer`` defaults to the one the client's ``Accept`` asks for among
        the registered stream serializers (SSE when it asks for none).
        """
        if serializer is None:
            serializer = self._protocol.site.negotiate(self)
        self._stream = self._protocol.start_stream(
            self, status, headers, media_type or serializer.media_type, serializer
        )
        return self._stream

    @property
    def response_started(self) -> bool:
        return self._stream is not None
