"""The Date header, formatted at most once a second."""

from __future__ import annotations

import time
from collections.abc import Callable
from email.utils import formatdate


class DateHeader:
    __slots__ = ("_second", "_value", "_clock")

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._second = -1
        self._value = b""

    def value(self) -> bytes:
        now = int(self._clock())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode("ascii")
        return self._value
