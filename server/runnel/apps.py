"""The apps a server runs, built by backend plugins, and whether each is ready.

An app's state goes ``loading -> ready | failed`` once, in ``start_all``; ``close_all``
puts every app back to ``loading``. Each app has an event that is set exactly while
its state is not ``loading``, so ``wait_settled`` wakes the moment loading ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, ItemsView
from typing import Protocol

logger = logging.getLogger("runnel.apps")

LOADING, READY, FAILED = "loading", "ready", "failed"


class App(Protocol):
    """What a backend factory returns for one ``[apps.NAME]`` table.

    The factory only validates and remembers its settings; ``start`` does the slow
    part (loading weights, warming up) while the server already answers
    ``/health`` with 503. ``close`` releases what ``start`` took.
    """

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class AppRegistry:
    def __init__(self) -> None:
        self._apps: dict[str, App] = {}
        self._states: dict[str, str] = {}
        self._settled: dict[str, asyncio.Event] = {}  # set while the app is not loading
        self._watchers: list[Callable[[str, str], None]] = []

    def add(self, name: str, app: App) -> None:
        if name in self._apps:
            raise ValueError(f"app {name!r} is defined twice")
        self._apps[name] = app
        self._states[name] = LOADING
        self._settled[name] = asyncio.Event()  # binds no loop until waited on

    def get(self, name: str) -> App | None:
        """The app called ``name`` if it is ready to serve, else None."""
        if self._states.get(name) == READY:
            return self._apps[name]
        return None

    def state(self, name: str) -> str | None:
        return self._states.get(name)

    async def wait_settled(self, name: str) -> str | None:
        """Wait until app ``name`` is no longer loading; its state then (None: no such app).
        No deadline of its own: an app loads as long as it takes; wrap it in one if needed."""
        settled = self._settled.get(name)
        if settled is not None:
            await settled.wait()
        return self._states.get(name)

    def watch(self, callback: Callable[[str, str], None]) -> None:
        """Call ``callback(name, state)`` on every state change from now on (on the loop)."""
        self._watchers.append(callback)

    def _set_state(self, name: str, state: str) -> None:
        self._states[name] = state
        if state == LOADING:
            self._settled[name].clear()
        else:
            self._settled[name].set()
        for callback in self._watchers:
            callback(name, state)

    def states(self) -> dict[str, str]:
        return dict(self._states)

    def items(self) -> ItemsView[str, App]:
        return self._apps.items()

    def __len__(self) -> int:
        return len(self._apps)

    async def start_all(self) -> None:
        await asyncio.gather(*(self._start(name, app) for name, app in self._apps.items()))

    async def _start(self, name: str, app: App) -> None:
        try:
            await app.start()
        except Exception:
            logger.exception("app %r failed to start", name)
            self._set_state(name, FAILED)
        else:
            self._set_state(name, READY)
            logger.info("app %r is ready", name)

    async def close_all(self) -> None:
        for name, app in self._apps.items():
            try:
                await app.close()
            except Exception:
                logger.exception("app %r failed to close", name)
            self._set_state(name, LOADING)
