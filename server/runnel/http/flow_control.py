"""Flow control of one connection, both ways, in one place.

Reading: the protocol stops reading the socket while a request body waits unread
past a high-water mark, and while a pipelined request waits behind the current
one; it reads again when the handler catches up or the cycle ends. Writing: the
transport tells us when its buffer passes its high-water mark (``pause_writing``)
and when it drains (``resume_writing``); producers that can wait ``await drain()``.

Every method is idempotent (pausing twice is one pause), and ``connection_lost``
fails a pending ``drain()`` so a paused writer never hangs on a gone client.
The shape is uvicorn's ``flow_control.py``, with aiohttp's lazily created waiter.
"""

from __future__ import annotations

import asyncio


class FlowControl:
    __slots__ = ("_transport", "_loop", "reading_paused", "writing_paused", "lost", "_drain_waiter")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self.reading_paused = False
        self.writing_paused = False
        self.lost = False
        self._drain_waiter: asyncio.Future[None] | None = None  # made only when someone waits

    # -- reading ---------------------------------------------------------------------
    def pause_reading(self) -> None:
        if not self.reading_paused and not self.lost:
            self.reading_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and not self.lost:
            self.reading_paused = False
            self._transport.resume_reading()

    # -- writing ---------------------------------------------------------------------
    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self) -> None:
        """Return once the transport takes writes again; ConnectionResetError if the client has gone."""
        if self.lost:
            raise ConnectionResetError("client disconnected")
        if not self.writing_paused:
            return
        waiter = self._drain_waiter
        if waiter is None or waiter.done():
            waiter = self._drain_waiter = self._loop.create_future()
        await waiter

    def pending_bytes(self) -> int:
        """Bytes written but not yet taken by the kernel."""
        return self._transport.get_write_buffer_size()

    # -- the end ---------------------------------------------------------------------
    def connection_lost(self) -> None:
        self.lost = True
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("client disconnected"))
