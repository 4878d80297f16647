"""OpenAI request bodies executed without an HTTP exchange: for work that outlives its
request (a run: a batch's line, an async job, a stream a client may reattach to).

``call`` runs one body through the same handler a live request takes (``OpenAIAPI.chat``,
``completions``, ``embeddings``), so a body means exactly what it means on the wire:
same validation, same errors, same response. What the handler reads from a request, an
``OfflineRequest`` provides; what it writes to a stream, a ``ChunkStream`` keeps.

``check`` refuses a body before it is kept to run later (the same 400s, without running it),
and ``http_error`` turns an error answer back into the HTTPError it was.

A streamed body (``"stream": true``) yields its chunks as they are made: ``stream``
returns a ``ChunkStream`` (an async iterator, so a run's ``ValueStream``) whose values are
the chunks' JSON, encoded once by the sinks and kept as ``orjson.Fragment``s (dumped again
as they are, never parsed here).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson

from ...auth import ANONYMOUS
from ...errors import HTTPError
from ...http.protocol import CLIENT_GONE
from .api import DEFAULT_REPLY, OpenAIAPI, ReplyOptions
from .params import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    EMBEDDING_FIELDS,
    check_fields,
    invalid,
    parse_chat,
    parse_completion,
)

logger = logging.getLogger("runnel.openai")

__all__ = ["ROUTES", "ChunkStream", "OfflineRequest", "call", "check", "fill", "http_error", "route_handler",
           "stream"]

# The routes a body may be sent to, and the handler (an OpenAIAPI method name) each takes.
ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/embeddings": "embeddings"}


def route_handler(api: OpenAIAPI, route: str, *, param: str = "url"):
    """The handler for ``route``; a 400 naming ``param`` when it is not one of ``ROUTES``."""
    name = ROUTES.get(route)
    if name is None:
        raise _unsupported(route, param)
    return getattr(api, name)


def _unsupported(route: str, param: str) -> HTTPError:
    return invalid(param, f"'{route[:200]}' is not supported: use one of {', '.join(ROUTES)}.", "invalid_value")


# What each route's body is parsed with (and the fields it knows), for ``check``.
_PARSERS = {"chat": (CHAT_FIELDS, parse_chat), "completions": (COMPLETION_FIELDS, parse_completion),
            "embeddings": (EMBEDDING_FIELDS, None)}


def check(api: OpenAIAPI, route: str, body: Any, *, param: str = "url", extra: frozenset[str] = frozenset()) -> None:
    """The HTTPError ``body`` would be answered with for what it says alone (its route, its
    fields, its values), raised now, before it is kept to run later. Needs no app: what
    depends on the model (prompt length, supported parameters) is checked when it runs."""
    name = ROUTES.get(route)
    if name is None:
        raise _unsupported(route, param)
    if type(body) is not dict:
        raise invalid(None, "The request body must be a JSON object.", "invalid_type")
    known, parse = _PARSERS[name]
    if not api.ignore_unknown_fields:
        check_fields(body, known, extra)
    if parse is not None:
        parse(body)


def http_error(status: int, body: dict[str, Any]) -> HTTPError:
    """The HTTPError an error answer (``{"error": {...}}``, as ``call`` returns it) was made from."""
    error = body.get("error") if type(body) is dict else None
    if type(error) is not dict:
        return HTTPError(status)
    return HTTPError(status, error.get("message"), type=error.get("type"), param=error.get("param"),
                     code=error.get("code"))


async def _handle(api: OpenAIAPI, route: str, request: OfflineRequest, app, reply: ReplyOptions):
    """The route's handler on ``request``; its generation, if it made one, counted in the
    server's generation metrics as a live request's is (it has no HTTP request whose end the
    metrics would see): 200, the error's status, or 499 when cancelled (its reader left)."""
    status = CLIENT_GONE
    try:
        handler = route_handler(api, route)
        if app is None:
            response = await handler(request)
        elif ROUTES[route] == "embeddings":  # no reply options: an embedding has no role or stream
            response = await handler(request, app)
        else:
            response = await handler(request, app, reply)
        status = 200 if response is None else response.status
        return response
    except HTTPError as error:
        status = error.status
        raise
    except Exception:
        status = 500
        raise
    finally:
        metrics = getattr(api.server, "metrics", None)
        if request.generation is not None and metrics is not None:
            metrics.generation_finished(request.generation, status)


class ChunkStream:
    """What a handler streams into, kept instead of written: the chunks in order, each the
    JSON a client would get as one SSE ``data:`` (OpenAI's framing, ``[DONE]``, is not kept).

    Invariants: chunks are only appended, ``ended`` is set once (``end`` or ``fail``), and
    ``error`` is the error body a failure ended it with. A reader iterating it (``async
    for``) gets every chunk once, in order, then stops (raising the failure as HTTPError)."""

    __slots__ = ("chunks", "ended", "error", "_woken", "_task")

    def __init__(self) -> None:
        self.chunks: collections.deque[Any] = collections.deque()
        self.ended = False
        self.error: dict | None = None
        self._woken: asyncio.Event = asyncio.Event()
        self._task: asyncio.Task | None = None  # the handler filling it (``stream``)

    # -- the handler's side: what ResponseStream offers it ------------------------------
    closed = False  # a kept stream has no client to lose
    paused = False

    async def drain(self) -> None:
        return None

    def send(self, event: Any) -> None:
        if not self.ended:
            self.chunks.append(orjson.Fragment(event) if type(event) is bytes else event)
            self._woken.set()

    def write(self, data: bytes) -> None:  # raw bytes: no handler of ROUTES writes them
        raise RuntimeError("an offline stream keeps events, not raw bytes")

    def fail(self, error: dict[str, Any]) -> None:
        if not self.ended:
            self.error = error
            self.ended = True
            self._woken.set()

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self._woken.set()

    # -- the reader's side ----------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        while not self.chunks:
            if self.ended:
                if self.error is not None:
                    raise http_error(self.error.get("status", 500), self.error)
                raise StopAsyncIteration
            self._woken.clear()
            await self._woken.wait()
        return self.chunks.popleft()

    async def aclose(self) -> None:
        """Stop the handler (the reader has stopped reading)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


class OfflineRequest:
    """What the OpenAI handlers read from a request, for a body that came by another way."""

    __slots__ = ("body", "principal", "started_at", "generation", "path_params", "headers", "response_stream",
                 "completion_id")

    def __init__(self, body: Any, principal=ANONYMOUS, completion_id: str | None = None) -> None:
        self.body = body
        self.principal = principal
        self.started_at = asyncio.get_running_loop().time()
        self.generation = None  # runnel.generation_record: set by run_generations, read by no one here
        self.path_params: dict[str, str] = {}
        self.headers: tuple = ()
        self.response_stream: ChunkStream | None = None
        # The id its completion gets (OpenAIAPI._complete), when its caller chose it: a resumable
        # stream's chunks carry the id the stream is reattached by.
        self.completion_id = completion_id

    def header(self, name: bytes, default: bytes | None = None) -> bytes | None:
        return default

    async def json(self) -> Any:
        return self.body

    def query_param(self, name: str, default: str | None = None) -> str | None:
        return default

    def stream(self, status: int = 200, *, headers=(), serializer=None, media_type=None) -> ChunkStream:
        if self.response_stream is None:
            self.response_stream = ChunkStream()
        return self.response_stream


async def call(api: OpenAIAPI, route: str, body: Any, *, app=None, principal=ANONYMOUS,
               reply: ReplyOptions = DEFAULT_REPLY) -> tuple[int, Any]:
    """Execute ``body`` as a request to ``route`` (one of ``ROUTES``; for ``app``, or the app its
    ``model`` names; ``reply``: how a surface answers for ``app``, as its live route would):
    ``(status, response body)``, the body an error one for a 4xx/5xx. A
    streamed body is answered whole here: (200, its chunks as a list). Raises only
    CancelledError; an unknown route is a 400 like any other bad request."""
    request = OfflineRequest(body, principal)
    try:
        response = await _handle(api, route, request, app, reply)
    except HTTPError as error:
        return error.status, error.to_dict()
    if response is None:  # streamed
        stream = request.response_stream
        assert stream is not None and stream.ended
        if stream.error is not None:
            return stream.error.get("status", 500), {"error": stream.error["error"]}
        return 200, list(stream.chunks)
    return response.status, orjson.loads(response.body)


def stream(api: OpenAIAPI, route: str, body: Any, *, app=None, principal=ANONYMOUS,
           reply: ReplyOptions = DEFAULT_REPLY, completion_id: str | None = None) -> ChunkStream:
    """Start ``body`` (a streamed one) as a request to ``route`` and return its chunks as they
    come (iterate it; ``aclose`` stops the generation). A failure, before or after the first
    chunk, ends the iteration with its HTTPError. ``completion_id``: the id its chunks carry
    (else a new one). Call on the event loop."""
    request = OfflineRequest(body, principal, completion_id)
    chunks = request.response_stream = ChunkStream()

    async def handle(chunks: ChunkStream) -> None:
        response = await _handle(api, route, request, app, reply)
        if response is not None:  # answered whole after all: keep the body as one chunk
            chunks.send(response.body)

    return fill(handle, chunks, route)


def fill(produce: Callable[[ChunkStream], Awaitable[None]], chunks: ChunkStream | None = None,
         what: str = "stream") -> ChunkStream:
    """``produce(chunks)`` started as a task filling ``chunks`` (a new ChunkStream when None),
    which it returns: ended when ``produce`` returns, failed with the HTTPError it raises (or a
    500 for a bug, logged as ``what``); ``aclose`` cancels it. Call on the event loop."""
    if chunks is None:
        chunks = ChunkStream()

    async def handle() -> None:
        try:
            await produce(chunks)
            chunks.end()
        except HTTPError as error:
            chunks.fail({"status": error.status, **error.to_dict()})
        except asyncio.CancelledError:
            chunks.end()
            raise
        except Exception as exc:  # a bug below: the reader sees a 500, the log the traceback
            logger.exception("offline %s request failed", what)
            chunks.fail({"status": 500, "error": {"message": f"{type(exc).__name__}: {exc}", "type": "server_error",
                                                  "param": None, "code": "internal_error"}})

    chunks._task = asyncio.get_running_loop().create_task(handle())
    return chunks
