"""A real runnel server in a background thread, and the waits tests need around it.

A server runs on its own uvloop event loop in a background thread, so tests talk
to it with ordinary blocking sockets, h11, curl or the openai SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

import runnel
from runnel.cli import run

T = TypeVar("T")


class ServerThread:
    """A ``runnel.Server`` running on a loop in a background thread."""

    def __init__(self, config: runnel.Config, plugins: Iterable[object] = (), load_entrypoints: bool = True) -> None:
        self.server = runnel.Server(config, plugins=plugins, load_entrypoints=load_entrypoints)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def main():
            self.loop = asyncio.get_running_loop()
            try:
                await self.server.start()
            except BaseException as exc:
                self._error = exc
                self._started.set()
                return
            self._started.set()
            await self.server.serve_forever()

        run(main())

    def start(self) -> ServerThread:
        self._thread.start()
        self._started.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run a coroutine on the server's loop and return its result."""
        assert self.loop is not None, "start() the server thread first"
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call_soon(self, fn: Callable[..., T], *args) -> T:
        """Run a plain function on the server's loop and return its result."""
        async def wrapper():
            return fn(*args)

        return self.call(wrapper())

    def wait_ready(self, timeout: float = 30) -> bool:
        return self.call(self.server.wait_ready(), timeout)

    def stop(self, grace: float = 5.0) -> None:
        if self.loop is not None and self._thread.is_alive():
            with contextlib.suppress(Exception):
                self.call(self.server.stop(grace), timeout=grace + 30)
        self._thread.join(30)

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return self.server.url


def server_config(config: runnel.Config | dict | None = None) -> runnel.Config:
    """A Config from a dict (or None), listening on port 0 unless the dict names a port."""
    if isinstance(config, runnel.Config):
        return config
    data = dict(config or {})
    data["server"] = {"port": 0, **data.get("server", {})}
    return runnel.config_from_dict(data)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for a subprocess server, or a refused connection)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.01) -> T:
    """Poll until predicate() is truthy; returns its value or fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            import pytest  # only here: the harness does not need pytest to be importable

            pytest.fail(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)
