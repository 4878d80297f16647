"""One HTTP request as a handler sees it."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson

from ..errors import HTTPError

if TYPE_CHECKING:
    from ..auth import Principal
    from ..generation_record import GenerationRecord
    from ..routing import Route
    from ..serializers import Serializer
    from .body import RequestBody
    from .protocol import HttpProtocol
    from .response import Headers, ResponseStream


_UNREAD = object()

# RFC 9112 3.2.2 absolute-form for http(s): an authority (host and optional port; no
# userinfo, RFC 9110 4.2.4), then the path and query; a fragment is never part of a target.
_ABSOLUTE_FORM = re.compile(
    rb"(?i:https?)://(?:\[[0-9A-Fa-f:.]+\]|[-A-Za-z0-9._~%!$&'()*+,;=]+)(?::[0-9]*)?"
    rb"(?P<path>/[^?#]*)?(?:\?(?P<query>[^#]*))?"
)


def split_target(method: str, target: bytes) -> tuple[bytes, bytes]:
    """The path and query of a request-target (RFC 9112 3.2); ValueError for any other form.

    Origin-form (``/path?query``) is what clients send to a server; absolute-form
    (``http://host/path``, what a proxy is sent) must be accepted too, and its path
    is used; ``*`` is the target of ``OPTIONS`` only. Anything else (``a/b/health``,
    CONNECT's ``host:port``) is refused rather than guessed at.
    """
    if target[:1] == b"/":  # origin-form: nearly every request
        path, _, query = target.partition(b"?")
        return path, query
    if target == b"*":
        if method != "OPTIONS":
            raise ValueError("the request target '*' is only for OPTIONS")
        return target, b""
    absolute = _ABSOLUTE_FORM.fullmatch(target)
    if absolute is None:
        raise ValueError("the request target must be a path starting with '/' or an absolute http(s) URI")
    return absolute["path"] or b"/", absolute["query"] or b""


class Request:
    """The head of a request, its body as it arrives, and a way to answer.

    Header names are lower-case bytes, as h11 gives them. The body is read with
    ``await body()``, ``await json()`` or ``async for chunk in stream_body()``;
    a client that sent ``Expect: 100-continue`` is told to go on only then.

    ``status`` is what has been sent so far: 0 nothing, 100 an interim
    ``100 Continue``, >= 200 the final status line (the response has started and
    can no longer become an error response). The protocol writes it; handlers read it.
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
        "generation",
        "bytes_sent",
        "incoming",
        "_protocol",
        "_query_params",
        "_response_stream",
        "_body",
        "_json",
    )

    def __init__(self, protocol: HttpProtocol, method: str, target: bytes, headers: Sequence[tuple[bytes, bytes]],
                 http_version: bytes, incoming: RequestBody) -> None:
        self._protocol = protocol
        self.method = method
        self.target = target
        path, query = split_target(method, target)  # ValueError: a target this server does not serve
        self.path = path.decode("latin-1")
        self.query = query.decode("latin-1")
        self.headers = headers
        self.http_version = http_version
        self.request_id = ""
        self.route: Route | None = None  # set by the dispatcher once matched
        self.path_params: dict[str, str] = {}
        self.principal: Principal | None = None  # set by the dispatcher before the handler runs
        self.started_at = 0.0  # loop.time() when its head arrived
        self.status = 0
        # What its generation did (runnel.generation_record), for the metrics and the access log.
        self.generation: GenerationRecord | None = None
        self.bytes_sent = 0  # a whole response's head and body; 0 for a stream (never counted per token)
        self.incoming = incoming  # the body as the protocol feeds it
        self._query_params: dict[str, list[str]] | None = None
        self._response_stream: ResponseStream | None = None
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
        params = self._query_params
        if params is None:
            params = self._query_params = parse_qs(self.query, keep_blank_values=True)
        return params

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
            parts = [chunk async for chunk in self.incoming]
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

    def stream_body(self) -> AsyncIterator[bytes]:
        """The body's pieces as they arrive."""
        return self.incoming.__aiter__()

    # -- answering ----------------------------------------------------------
    def stream(
        self,
        status: int = 200,
        *,
        headers: Headers = (),
        serializer: Serializer | None = None,
        media_type: bytes | None = None,
    ) -> ResponseStream:
        """Send the response head now and return the ResponseStream for the body.

        ``serializer`` defaults to the one the client's ``Accept`` asks for among
        the registered stream serializers (SSE when it asks for none). The caller
        ends the stream (``end()`` or ``fail()``); one left open when the handler
        returns is ended then.
        """
        if self._response_stream is not None:
            raise RuntimeError("the response has started already")
        protocol = self._protocol
        if serializer is None:
            serializer = protocol.server_state.negotiate(self)
        self._response_stream = protocol.start_stream(self, status, headers, media_type or serializer.media_type,
                                                      serializer)
        return self._response_stream

    @property
    def response_stream(self) -> ResponseStream | None:
        """The stream this request is answered with, once ``stream()`` was called."""
        return self._response_stream

    @property
    def max_queue_wait(self) -> float | None:
        """The server's ``[server] max_queue_wait``: how long a generation may wait for its
        model when the request sets no deadline of its own (runnel.deadlines)."""
        return self._protocol.server_state.max_queue_wait

    @property
    def response_started(self) -> bool:
        return self._response_stream is not None
