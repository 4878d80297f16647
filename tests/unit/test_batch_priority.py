"""A batch line waits while its model has live rows waiting (runnel.surfaces.openai.batches)."""

from __future__ import annotations

import asyncio

from runnel.surfaces.openai.batches import below_live_traffic


class Batcher:
    """An app whose batcher has ``waiting`` live rows until they are let through."""

    def __init__(self, waiting: int) -> None:
        self.waiting = waiting
        self.reads = 0

    def batching_stats(self) -> dict:
        self.reads += 1
        return {"waiting_rows": self.waiting, "running_rows": 0}


def test_a_line_starts_only_once_no_live_row_waits():
    async def main():
        app = Batcher(waiting=3)
        gate = asyncio.ensure_future(below_live_traffic(app))
        await asyncio.sleep(0.05)
        assert not gate.done() and app.reads > 1  # still waiting, still looking
        app.waiting = 0
        await asyncio.wait_for(gate, 1)

    asyncio.run(main())


def test_apps_without_a_batcher_are_not_waited_for():
    class Plain:
        pass

    class Idle:
        def batching_stats(self):
            return None  # not loaded yet

    async def main():
        await asyncio.wait_for(below_live_traffic(Plain()), 0.1)
        await asyncio.wait_for(below_live_traffic(Idle()), 0.1)
        await asyncio.wait_for(below_live_traffic(Batcher(waiting=0)), 0.1)

    asyncio.run(main())
