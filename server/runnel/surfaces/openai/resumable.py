"""Resumable streams: a streamed completion a client may lose and reattach to.

Opt-in, per request: ``X-Runnel-Resumable: true`` on a streamed ``/v1/chat/completions``
or ``/v1/completions`` (``OpenAIAPI._complete`` hands such a request here, once it is
validated). The generation becomes a run (``runnel.runs``, surface ``openai-stream``)
whose values are the stream's chunks: executed at once by the Runner (``submit(at_once=
True)``: not queued behind background runs; the app's own admission bounds it, as a live
request's), through ``offline.stream`` (the same handler, so the same chunks), and kept
in the run store when it ends. The request that started it only follows the run's values
(``Runner.follow``), writing each as an SSE event with ``id: N`` (N: its index, from 0);
when its client goes, the run goes on.

``GET /v1/chat/completions/{id}/stream`` (or ``/v1/completions/{id}/stream``) with
``Last-Event-ID: N`` (or ``?starting_after=N``) replays events N+1 on, follows live
until the end, then ``data: [DONE]``; without either, from the first. The id is the
completion id: the response head's ``X-Runnel-Stream-Id`` and every chunk's ``id``.
Only the principal that started the stream can reattach (anyone else: 404, as runs).
A finished stream is kept as long as finished runs are (``[server] runs_retention``),
so it replays after a restart, and on any server that shares a Redis run store; a
generation a restart interrupts ends, on reattaching, with an ``interrupted`` error.

Without the header nothing changes: a disconnect cancels the generation, and the
per-token path never reaches this module.

``follow_into`` is also how a background Responses stream is written and resumed
(``runnel.surfaces.openai.responses``: ``starting_after`` is its events' cursor).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import orjson

from ...errors import HTTPError
from ...http import Response, json_response
from ...runs import CANCELLED, FAILED, TIMED_OUT, Run
from ...serializers import Serializer
from .api import NO_CACHE, RESUMABLE, SSE, OpenAIAPI
from .offline import stream as offline_stream
from .params import invalid
from .runs import ModelAppRuns

__all__ = ["SURFACE", "ReattachAPI", "StreamRuns", "follow_into", "resumable", "start", "wants_resume_from"]

SURFACE = "openai-stream"  # Run.surface of a resumable stream
ROUTES = {True: "/v1/chat/completions", False: "/v1/completions"}  # by chat
# Bytes a follower writes before it waits for the client to drain: far below
# [server] max_stream_buffer_bytes (64 KiB at least), so catching up never overflows it.
WRITE_SLICE = 32 * 1024


def resumable(request) -> bool:
    """Whether a streamed request asked to be resumable (``X-Runnel-Resumable: true``)."""
    value = request.header(RESUMABLE)
    if value is None:
        return False
    value = value.strip().lower()
    if value not in (b"true", b"false"):
        raise invalid(None, "The X-Runnel-Resumable header must be 'true' or 'false'.", "invalid_header")
    return value == b"true"


class StreamRuns(ModelAppRuns):
    """Resumable streams as runs: executed through ``offline.stream``, their values the chunks."""

    name = SURFACE

    async def call(self, app, run: Run) -> Any:
        return offline_stream(self.api, run.input["route"], run.input["body"], app=app, completion_id=run.id)

    def render(self, run: Run) -> dict:
        return {"id": run.id, "object": "stream", "status": run.state, "error": run.error}


async def start(openai: OpenAIAPI, request, app, *, chat: bool) -> None:
    """Run a validated streamed request as a resumable stream, and follow it from its start."""
    route = ROUTES[chat]
    stream_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    body = await request.json()
    await openai.server.runs.submit(SURFACE, openai.by_model[app.model_id], "stream", {"route": route, "body": body},
                                    principal=request.principal.identity, run_id=stream_id, at_once=True)
    await follow_into(request, openai.server.runs, stream_id, 0, SSE,
                      stream_headers(stream_id, f"{route}/{stream_id}/stream"), opening=True)


def stream_headers(stream_id: str, url: str) -> tuple[tuple[bytes, bytes], ...]:
    """A resumable stream's response head: where to reattach."""
    return (*NO_CACHE, (b"x-runnel-stream-id", stream_id.encode()), (b"x-runnel-stream-url", url.encode()))


def wants_resume_from(request, query: str = "starting_after") -> int:
    """The index of the first event a reattaching client wants: after its ``Last-Event-ID``
    header or its ``query`` parameter (0: from the first)."""
    raw = request.header(b"last-event-id")
    param = "Last-Event-ID"
    if raw is None:
        raw = request.query_param(query)
        param = query
    elif isinstance(raw, bytes):
        raw = raw.decode("latin-1")
    if raw is None or raw.strip() == "":
        return 0
    try:
        after = int(raw.strip())
    except ValueError:
        after = -2
    if after < -1:
        raise invalid(param, f"'{param}' must be the number of an event (0 or more), not {raw!r}.")
    return after + 1


class ReattachAPI:
    """``GET /v1/chat/completions/{stream_id}/stream`` and ``/v1/completions/{stream_id}/stream``
    (reattach), and ``DELETE`` on them: stop the generation, if it still runs, and forget it
    (a stream no one will reattach to would otherwise run to its ``max_tokens``)."""

    def __init__(self, openai: OpenAIAPI) -> None:
        self.openai = openai
        self.runs = openai.server.runs

    async def chat(self, request) -> None:
        await self._reattach(request, chat=True)

    async def completions(self, request) -> None:
        await self._reattach(request, chat=False)

    async def delete_chat(self, request) -> Response:
        return await self._delete(request, chat=True)

    async def delete_completions(self, request) -> Response:
        return await self._delete(request, chat=False)

    async def _find(self, request, *, chat: bool) -> Run:
        stream_id = request.path_params["stream_id"]
        run = await self.runs.find(stream_id, surface=SURFACE, app=None, principal=request.principal.identity)
        if run is None or run.input.get("route") != ROUTES[chat]:
            raise not_found(stream_id)
        return run

    async def _delete(self, request, *, chat: bool) -> Response:
        run = await self._find(request, chat=chat)
        await self.runs.delete(run.id)  # cancelled first when still generating; a follower ends 410
        return json_response({"id": run.id, "object": "stream.deleted", "deleted": True})

    async def _reattach(self, request, *, chat: bool) -> None:
        stream_id = request.path_params["stream_id"]
        start_at = wants_resume_from(request)
        await self._find(request, chat=chat)
        await follow_into(request, self.runs, stream_id, start_at, SSE,
                          stream_headers(stream_id, f"{ROUTES[chat]}/{stream_id}/stream"))


async def _write(stream, frames: list[bytes]) -> bool:
    """Write ``frames`` as one chunk, then wait for the client to drain; False once it has gone
    (the run goes on without it)."""
    if frames:
        stream.write(b"".join(frames))
    if stream.paused:
        try:
            await stream.drain()
        except ConnectionError:
            return False
    return not stream.closed


def not_found(stream_id: str) -> HTTPError:
    return HTTPError(404, f"No resumable stream with id '{stream_id}' (it may have expired).",
                     type="invalid_request_error", code="stream_not_found")


def run_error(run: Run | None) -> HTTPError:
    """How a run that did not succeed ends its stream."""
    if run is None:  # deleted, or expired, while followed
        return HTTPError(410, "The stream is gone (it was deleted or expired).", code="stream_gone")
    error = run.error or {}
    if run.state == CANCELLED:
        return HTTPError(409, "The stream's generation was cancelled.", code="cancelled")
    return HTTPError(error.get("status", 500), error.get("message", "The stream's generation failed."),
                     type=error.get("type"), param=error.get("param"), code=error.get("code"))


async def follow_into(request, runs, run_id: str, start_at: int, serializer: Serializer,
                      headers: tuple[tuple[bytes, bytes], ...], final: Callable[[Any], Any] | None = None, *,
                      opening: bool = False) -> None:
    """Write a run's values from index ``start_at`` on to ``request`` as SSE events with ids,
    live until the run is done, then end the stream (its framing's end, or its error
    event when the run failed, unless ``final(last value)`` says the values ended it
    already: a Responses stream's ``response.failed``). ``opening``: this request started
    the run, and its response head waits for the first events, so that a run refused
    before any (a full queue) is answered with the refusal's status, as a live request is;
    a reattaching request always gets a stream (the error, if any, as its last event).

    One write per burst of values (``Runner.follow``), at most ``WRITE_SLICE`` bytes each,
    then the client's drain: a slow reader holds back only itself (what it has not read
    waits in the run's values, bounded by max_tokens, not in the socket's buffer)."""
    stream = None if opening else request.stream(serializer=serializer, headers=headers)
    index = start_at
    last = None
    async for burst in runs.follow(run_id, start_at):
        if stream is None:
            stream = request.stream(serializer=serializer, headers=headers)
        frames: list[bytes] = []
        size = 0
        for value in burst:
            frame = b"id: %d\n%b" % (index, serializer.encode(orjson.dumps(value)))
            index += 1
            frames.append(frame)
            size += len(frame)
            if size >= WRITE_SLICE:  # a burst that piled up while the client was slow
                if not await _write(stream, frames):
                    return
                frames.clear()
                size = 0
        last = burst[-1]
        if not await _write(stream, frames):
            return
    run = await runs.get(run_id)
    failed = run is None or run.state in (FAILED, CANCELLED, TIMED_OUT)
    if stream is None:
        if failed:
            raise run_error(run)
        stream = request.stream(serializer=serializer, headers=headers)
    if failed and not (final is not None and last is not None and final(last)):
        stream.fail(run_error(run).to_dict())
    else:
        stream.end()
