"""AppRegistry: waiting for an app to leave the loading state wakes on an event."""

import asyncio

from runnel.apps import AppRegistry


class Gated:
    def __init__(self, release: asyncio.Event | None = None) -> None:
        self.release = release

    async def start(self) -> None:
        if self.release is None:
            raise RuntimeError("cannot load")
        await self.release.wait()

    async def close(self) -> None:
        pass


async def turns(n: int = 5) -> None:
    """A few turns of the event loop, with no time passing."""
    for _ in range(n):
        await asyncio.sleep(0)


def test_wait_settled_wakes_as_loading_ends_not_on_a_timer():
    async def main():
        release = asyncio.Event()
        apps = AppRegistry()
        apps.add("slow", Gated(release))
        apps.add("broken", Gated())
        loading = asyncio.get_running_loop().create_task(apps.start_all())
        waiter = asyncio.get_running_loop().create_task(apps.wait_settled("slow"))
        assert await apps.wait_settled("broken") == "failed"
        assert await apps.wait_settled("nope") is None
        await turns()
        assert not waiter.done() and apps.state("slow") == "loading"
        release.set()
        await turns()  # a poll would need its interval to pass
        assert waiter.done() and waiter.result() == "ready"
        assert await apps.wait_settled("slow") == "ready"
        await loading
        await apps.close_all()  # loading again until started again
        again = asyncio.get_running_loop().create_task(apps.wait_settled("slow"))
        await turns()
        assert not again.done()
        again.cancel()

    asyncio.run(main())
