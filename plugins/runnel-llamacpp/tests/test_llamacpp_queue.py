"""The context pool's queue (runnel_llamacpp.engine.ContextPool), with decoding stood in for.

``decode_row`` is replaced by a stand-in that records the rows it is given and holds the
first until the test lets it go, so the pool's one context stays busy while the next rows
wait: what the pool does with waiting rows is what is tested, not llama.cpp.
"""

from __future__ import annotations

import asyncio
import threading
import time

from runnel.generation import SamplingParams
from runnel_llamacpp import engine


class Sink:
    def __init__(self) -> None:
        self.errors: list[BaseException] = []
        self.finished: list[str] = []

    def on_tokens(self, index, text, token_ids, logprobs) -> None:
        pass

    def on_finish(self, index, reason, completion_tokens) -> None:
        self.finished.append(reason)

    def on_error(self, error) -> None:
        self.errors.append(error)


def test_a_row_waiting_past_its_deadline_is_dropped_and_its_sink_gets_the_504(monkeypatch):
    release = threading.Event()
    decoded: list[list[int]] = []

    def decode_row(llama, row) -> None:
        decoded.append(row.prompt_ids)
        if len(decoded) == 1:
            release.wait(10)  # the first row holds the only context

    monkeypatch.setattr(engine, "decode_row", decode_row)

    async def main():
        pool = engine.ContextPool([object()], max_queue=8, eos_id=None, pieces=[b"a"], texts=["a"])
        first, late, patient = Sink(), Sink(), Sink()
        pool.submit([1], SamplingParams(max_tokens=2), 1, first)
        pool.submit([2], SamplingParams(max_tokens=2, deadline=time.monotonic() + 0.05), 2, late)
        pool.submit([3], SamplingParams(max_tokens=2), 1, patient)
        await asyncio.sleep(0.3)  # the late rows' deadline passes while they wait
        release.set()
        for _ in range(200):
            if patient.finished:
                break
            await asyncio.sleep(0.01)
        await pool.close(1.0)
        return first, late, patient

    first, late, patient = asyncio.run(main())
    assert [error.status for error in late.errors] == [504]  # once for its generation, not per row
    assert late.errors[0].code == "deadline_exceeded" and late.finished == []
    assert decoded == [[1], [3]]  # the late rows never reached a context
    assert first.finished == ["length"] and patient.finished == ["length"] and not patient.errors
