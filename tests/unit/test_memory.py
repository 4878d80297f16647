"""IdleTrim: the heap is trimmed once, on a thread, after the work has stayed idle; work that
starts again before that cancels it (a busy server is never trimmed between its batches)."""

from __future__ import annotations

import asyncio
import threading

from runnel.memory import IdleTrim, malloc_trim


def test_trims_once_on_a_thread_after_the_idle_delay_and_not_while_busy():
    calls: list[tuple[int, str]] = []
    trimmed = threading.Event()

    def trim(pad: int) -> int:
        calls.append((pad, threading.current_thread().name))
        trimmed.set()
        return 1

    async def main() -> None:
        loop = asyncio.get_running_loop()
        trimmer = IdleTrim(loop, after=0.05, trim=trim)
        trimmer.idle()
        trimmer.busy()  # work came back first: no trim
        await asyncio.sleep(0.15)
        assert calls == []
        trimmer.idle()
        trimmer.idle()  # one timer, however often it is told
        await loop.run_in_executor(None, trimmed.wait, 5)
        await asyncio.sleep(0.1)
        trimmer.close()

    asyncio.run(main())
    assert calls == [(0, "runnel-heap-trim")]


def test_glibc_trim_is_found_here():
    assert malloc_trim is not None and malloc_trim(0) in (0, 1)  # the CI machines run glibc
