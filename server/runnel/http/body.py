"""A request body as it arrives: fed by the protocol, read by the handler.

The protocol is the only writer (``feed``, ``finish``, ``fail``); the handler is the
only reader (``async for chunk in body``). The listener given at construction
is how reading talks back: ``body_wanted`` whenever the handler starts reading
(time to send ``100 Continue`` and start the body deadline) and ``body_consumed``
when it has taken what was buffered (time to read the socket again).

States: receiving -> complete (every byte arrived) or failed (``error`` is set: the
client went away, sent bad framing, too much, or too slowly). Both are final.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol


class BodyListener(Protocol):
    """Who is told as the handler reads (the protocol)."""

    def body_wanted(self) -> None:
        """The handler has started reading: time for ``100 Continue`` and the body deadline."""

    def body_consumed(self) -> None:
        """The handler has taken what was buffered: time to read the socket again."""


class RequestBody:
    __slots__ = ("_loop", "_listener", "_chunks", "buffered", "received", "complete", "error",
                 "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop, listener: BodyListener) -> None:
        self._loop = loop
        self._listener = listener
        self._chunks: list[bytes] = []
        self.buffered = 0  # bytes fed and not yet read
        self.received = 0  # bytes fed in all
        self.complete = False
        self.error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def done(self) -> bool:
        """Nothing more will arrive (complete or failed)."""
        return self.complete or self.error is not None

    # -- the protocol's side -------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self.buffered += len(data)
        self.received += len(data)
        self._wake()

    def finish(self) -> None:
        if not self.complete and self.error is None:  # not done (inlined: once per request)
            self.complete = True
            self._wake()

    def fail(self, error: BaseException) -> None:
        """The body will not arrive whole; a reader gets ``error``. Ignored once done."""
        if not self.done:
            self.error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the handler's side ----------------------------------------------------------------
    async def __aiter__(self) -> AsyncIterator[bytes]:
        self._listener.body_wanted()
        while True:
            if self._chunks:
                chunks, self._chunks = self._chunks, []
                self.buffered = 0
                self._listener.body_consumed()
                for chunk in chunks:
                    yield chunk
                continue
            if self.error is not None:
                raise self.error
            if self.complete:
                return
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
