"""Daemon threads that run a backend's blocking calls for the event loop.

Why not ``concurrent.futures.ThreadPoolExecutor``: the interpreter joins its threads
at exit, so one call stuck inside a model (a batch that never ends) keeps the process
alive forever, and ``shutdown(wait=True)`` called on the loop freezes every
connection with it. These threads are daemons: a backend waits for its calls with a
deadline (``asyncio.wait_for`` on the futures ``run`` returns), then abandons what is
stuck, and the process still exits. An abandoned call keeps whatever it references
(a model) alive until it returns; if it never does, the thread is frozen at exit with
it, so that object is never destroyed mid-finalization.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def _settle(future: asyncio.Future[Any], ok: bool, outcome: Any) -> None:
    if future.done():  # cancelled meanwhile: nobody waits for it
        return
    if ok:
        future.set_result(outcome)
    else:
        future.set_exception(outcome)


class DaemonThreads:
    """``count`` daemon threads taking calls in order; started on first use."""

    __slots__ = ("name", "count", "_jobs", "_threads", "_closed")

    def __init__(self, count: int, name: str) -> None:
        self.name = name
        self.count = count
        self._jobs: queue.SimpleQueue[tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Callable[[], Any]] | None]
        self._jobs = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def run(self, call: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``call()`` on one of the threads; its result or exception comes back on
        the loop. Cancelling the future does not stop the call."""
        if self._closed:
            raise RuntimeError(f"{self.name}: closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, future, call))
        if len(self._threads) < self.count:
            thread = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return future

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            loop, future, call = job
            del job
            try:
                outcome: tuple[bool, Any] = (True, call())
            except BaseException as error:  # handed to the loop, as an executor would
                outcome = (False, error)
            # Drop the call (and what it holds, a model) before waiting for the next one.
            del call
            try:
                loop.call_soon_threadsafe(_settle, future, *outcome)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass
            del future, outcome

    def close(self) -> None:
        """Let idle threads end; a thread still in a call ends after it (or with the process)."""
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)


__all__ = ["DaemonThreads"]
