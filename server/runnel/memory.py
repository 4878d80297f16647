"""Giving the heap back to the OS once a burst of work is over.

A model's threads allocate their working memory (a batch's KV cache, activations) in
glibc's per-thread arenas; freed, it stays mapped: after a burst of 16 streams on a ~114M
model a server held ~530 MB against ~290 MB idle, and ``malloc_trim(0)`` brought it to
~230 MB (issue 17). Trimming costs ~20 ms of a thread and holds the arenas' locks, so it
runs on a thread of its own, only after the work has been idle for a while (``IdleTrim``),
never between the batches of a busy server. Where the C library has no ``malloc_trim``
(musl, macOS) it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Callable

logger = logging.getLogger("runnel")

__all__ = ["IDLE_SECONDS", "IdleTrim", "malloc_trim"]

IDLE_SECONDS = 1.0  # how long the work must stay idle before the heap is trimmed


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


malloc_trim = _malloc_trim()  # glibc's, or None


class IdleTrim:
    """Trim the heap once its owner has been idle ``after`` seconds: the owner calls ``busy()``
    when work starts and ``idle()`` when it has none left (both on the loop). Invariant: at
    most one timer is pending, and none while busy; a trim runs at most once per idle spell."""

    __slots__ = ("loop", "after", "trim", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, after: float | None = None,
                 trim: Callable[[int], int] | None = None) -> None:
        self.loop = loop
        self.after = IDLE_SECONDS if after is None else after
        self.trim = trim if trim is not None else malloc_trim
        self._timer: asyncio.TimerHandle | None = None

    def busy(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def idle(self) -> None:
        if self.trim is not None and self._timer is None:
            self._timer = self.loop.call_later(self.after, self._start)

    def close(self) -> None:
        self.busy()

    def _start(self) -> None:
        self._timer = None
        threading.Thread(target=self._run, name="runnel-heap-trim", daemon=True).start()

    def _run(self) -> None:
        trim = self.trim
        if trim is None:  # idle() schedules only when there is one
            return
        try:
            trim(0)
        except Exception:  # never worth more than a log line
            logger.exception("trimming the heap failed")
