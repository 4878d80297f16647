"""A request's deadline: ``X-Request-Deadline: <seconds>``, counted from the request's arrival.

One syntax: a relative number of seconds (``2.5``, ``30``, ``0``), up to 7 days (RunPod's
longest job ``ttl``). Relative rather than an absolute time so that no clock has to agree
with the client's: the server counts from when the request head arrived. Anything else (a
negative or huge number, a date, ``1e3``, ``inf``) is a 400 naming the header, in the
surface's own error shape.

What a deadline means where (the work that is dropped is never started):

- a generation (every surface that generates, through ``run_generations``; without the
  header, the server's ``[server] max_queue_wait`` if set): work still
  waiting in the model's queue at the deadline is dropped and the request answered 504
  (``runnel.generation.deadline_exceeded``); a deadline already past is refused at once;
  work already running is not affected;
- a run (an async submit: ``/v4 ...?async=true``, a background response, RunPod's ``/run``
  and ``/runsync``): a run still queued at its deadline is not executed but ends
  ``timed_out`` with code ``deadline_exceeded`` (``runnel.runs``); the deadline is stored
  with the run in unix seconds, since it outlives the process.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from .errors import HTTPError

__all__ = ["HEADER", "MAX_SECONDS", "monotonic_deadline", "seconds_of", "unix_deadline"]

HEADER = b"x-request-deadline"
HEADER_NAME = "X-Request-Deadline"
MAX_SECONDS = 7 * 24 * 3600.0
_SECONDS = re.compile(rb"[0-9]{1,7}(?:\.[0-9]{1,6})?")


def seconds_of(request: Any) -> float | None:
    """The seconds the request's ``X-Request-Deadline`` allows, None without one; HTTPError 400
    naming the header when it is not a number of seconds from 0 to ``MAX_SECONDS``."""
    value = None
    for name, header in request.headers:  # an OfflineRequest has headers too (none)
        if name == HEADER:
            if value is not None:
                raise HTTPError(400, f"{HEADER_NAME} was sent more than once", param=HEADER_NAME,
                                code="invalid_deadline")
            value = header
    if value is None:
        return None
    value = value.strip()
    seconds = float(value) if _SECONDS.fullmatch(value) else -1.0
    if not 0 <= seconds <= MAX_SECONDS:
        raise HTTPError(400, f"{HEADER_NAME} must be a number of seconds from 0 to {MAX_SECONDS:.0f} "
                        f"(such as 2.5), not {value[:40].decode('latin-1')!r}", param=HEADER_NAME,
                        code="invalid_deadline")
    return seconds


def _waited(request: Any) -> float:
    """Seconds since the request's head arrived (``request.started_at`` is a loop time)."""
    return max(0.0, asyncio.get_running_loop().time() - request.started_at)


def monotonic_deadline(request: Any) -> float | None:
    """The request's deadline as a ``time.monotonic()`` value (what ``SamplingParams.deadline``
    holds), or None; HTTPError 400 for a bad header. Without the header, the server's
    ``[server] max_queue_wait`` (an HTTP request's ``max_queue_wait``; work that came another
    way, a run or a batch line, has none)."""
    seconds = seconds_of(request)
    if seconds is None:
        seconds = getattr(request, "max_queue_wait", None)
    if seconds is None:
        return None
    return time.monotonic() - _waited(request) + seconds


def unix_deadline(request: Any) -> float | None:
    """The request's deadline in unix seconds (what a run keeps: it outlives the process), or
    None; HTTPError 400 for a bad header."""
    seconds = seconds_of(request)
    if seconds is None:
        return None
    return time.time() - _waited(request) + seconds
