"""Daemon threads that run a backend's blocking calls for the event loop.

Why not ``concurrent.futures.ThreadPoolExecutor``: the interpreter joins its threads
at exit, so one call stuck inside a model (a batch that never ends) keeps the process
alive forever, and ``shutdown(wait=True)`` called on the loop freezes every
connection with it. These threads are daemons: a backend waits for its calls with a
deadline (``asyncio.wait_for`` on the futures ``run`` returns), then abandons what is
stuck, and the process still exits. An abandoned call keeps whatever it references
(a model) alive until it returns; if it never does, the thread is frozen at exit with
it, so that object is never destroyed mid-finalization.

Frozen, unless it calls back into Python: a model's C++ thread that runs a Python callback
(CTranslate2's step callback) while the interpreter finalizes is ended by CPython with
``pthread_exit``, whose unwinding through the C++ frames aborts or crashes the whole
process (measured: SIGABRT or SIGSEGV, 5 exits in 5). A server whose shutdown left such a
call running exits with ``exit_past_running_calls`` instead of finalizing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Done = Callable[[], None] | None

# Threads (their idents) inside a call now, of every DaemonThreads in the process. A set:
# add and discard are atomic under the GIL, so the threads keep it without a lock.
_in_call: set[int] = set()


class _Job:
    __slots__ = ("loop", "future", "call", "done", "skip_cancelled", "taken")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], call: Callable[[], Any],
                 done: _Done, skip_cancelled: bool) -> None:
        self.loop = loop
        self.future = future
        self.call: Callable[[], Any] | None = call
        self.done = done
        self.skip_cancelled = skip_cancelled
        # Whoever sets this first owns the job: a thread (runs it), a cancel before
        # that (a skip_cancelled job: skipped), or close(drop_queued=True) (dropped).
        self.taken = False


def _settle(future: asyncio.Future[Any], ok: bool, outcome: Any, done: _Done) -> None:
    if not future.done():  # else cancelled meanwhile: nobody waits for it
        if ok:
            future.set_result(outcome)
        else:
            future.set_exception(outcome)
    if done is not None:
        done()


def _drop(future: asyncio.Future[Any], done: _Done) -> None:
    future.cancel()
    if done is not None:
        done()


def _call_on(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        pass


class DaemonThreads:
    """``count`` daemon threads taking calls in order; started on first use."""

    __slots__ = ("name", "count", "_jobs", "_threads", "_closed", "_taking")

    def __init__(self, count: int, name: str) -> None:
        self.name = name
        self.count = count
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._taking = threading.Lock()  # guards _Job.taken

    def run(self, call: Callable[[], T], *, skip_cancelled: bool = False, done: _Done = None) -> asyncio.Future[T]:
        """Run ``call()`` on one of the threads; its result or exception comes back on
        the loop. Cancelling the future does not stop the call.

        ``skip_cancelled``: a call whose future is cancelled before a thread takes it up
        is not run at all (one already running still runs to its end). ``done``: called
        on the loop once the threads are done with the call (it returned or raised; or,
        at once, it was skipped or dropped by ``close(drop_queued=True)``), whether or
        not its future was cancelled meanwhile: what a caller needs to free what the
        call holds only when no thread holds it any more.
        """
        if self._closed:
            raise RuntimeError(f"{self.name}: closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        job = _Job(loop, future, call, done, skip_cancelled)
        if skip_cancelled:
            future.add_done_callback(functools.partial(self._cancelled, job))
        self._jobs.put(job)
        if len(self._threads) < self.count:
            thread = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return future

    def _take(self, job: _Job) -> bool:
        with self._taking:
            if job.taken:
                return False
            job.taken = True
            return True

    def _cancelled(self, job: _Job, future: asyncio.Future[Any]) -> None:
        """(On the loop) a skip_cancelled job's future is done: if cancelled before a thread took the job, skip it."""
        if future.cancelled() and self._take(job):
            job.call = None
            if job.done is not None:
                job.done()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.skip_cancelled and not self._take(job):
                continue  # cancelled while queued (its done was called then), or dropped
            loop, future, call, done = job.loop, job.future, job.call, job.done
            del job
            assert call is not None
            me = threading.get_ident()
            _in_call.add(me)
            try:
                outcome: tuple[bool, Any] = (True, call())
            except BaseException as error:  # handed to the loop, as an executor would
                outcome = (False, error)
            finally:
                _in_call.discard(me)
            # Drop the call (and what it holds, a model) before waiting for the next one.
            del call
            _call_on(loop, _settle, future, *outcome, done)
            del future, outcome, done

    def close(self, *, drop_queued: bool = False) -> None:
        """Let idle threads end; a thread still in a call ends after it (or with the process).

        ``drop_queued``: calls no thread has taken up yet are not run; their futures are
        cancelled (and their ``done`` called). Otherwise they still run first.
        """
        self._closed = True
        if drop_queued:
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                # (None: a previous close's, put back below; one taken already was skipped when cancelled)
                if job is not None and self._take(job):
                    job.call = None
                    _call_on(job.loop, _drop, job.future, job.done)
        for _ in self._threads:
            self._jobs.put(None)


def calls_running() -> int:
    """Calls a ``DaemonThreads`` thread of this process is inside now (abandoned ones included)."""
    return len(_in_call)


def exit_past_running_calls(code: int) -> None:
    """At the very end of a process: if calls are still running (abandoned at shutdown: a
    batch that did not stop in time), exit now with ``code``, logs and output flushed, without
    the interpreter's finalization that such a call could crash (see the module docstring).
    Returns, doing nothing, when none is running."""
    running = calls_running()
    if not running:
        return
    logging.getLogger("runnel").warning(
        "%d backend call(s) still running at exit: exiting without waiting for them", running)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


__all__ = ["DaemonThreads", "calls_running", "exit_past_running_calls"]
