"""Shared test harness: real servers on 127.0.0.1:0 and raw HTTP clients.

A server runs on its own uvloop event loop in a background thread, so tests talk
to it with ordinary blocking sockets, h11, curl or the openai SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field

import h11
import pytest

import runnel
from runnel.cli import run


class ServerThread:
    """A ``runnel.Server`` running on a loop in a background thread."""

    def __init__(self, config: runnel.Config, plugins=(), load_entrypoints: bool = True) -> None:
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

    def call(self, coro, timeout: float = 30):
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call_soon(self, fn, *args):
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


@pytest.fixture
def start_server():
    """``start_server(config_dict_or_Config, plugins=())`` -> a running ServerThread (port 0 by default)."""
    started: list[ServerThread] = []

    def start(config=None, plugins=(), load_entrypoints: bool = True, ready: bool = True) -> ServerThread:
        if config is None or isinstance(config, dict):
            data = dict(config or {})
            data["server"] = {"port": 0, **data.get("server", {})}
            config = runnel.config_from_dict(data)
        thread = ServerThread(config, plugins, load_entrypoints).start()
        started.append(thread)
        if ready:
            thread.wait_ready()
        return thread

    yield start
    for thread in reversed(started):
        thread.stop()


ECHO_CONFIG = {"apps": {"echo": {"backend": "echo"}}}


@pytest.fixture
def echo_server(start_server):
    """A server with the echo backend at /echo/echo, found through its entry point."""
    return start_server(ECHO_CONFIG)


# -- raw clients -------------------------------------------------------------------


def connect(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_closed(sock: socket.socket, limit: int = 64 * 1024 * 1024) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks, size = [], 0
    while size < limit:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
        size += len(data)
    return b"".join(chunks)


def raw_exchange(port: int, data: bytes, *, timeout: float = 10.0) -> bytes:
    """Send raw bytes, half-close nothing, and read until the server closes."""
    with connect(port, timeout=timeout) as sock:
        sock.sendall(data)
        return read_until_closed(sock)


@dataclass
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    header_list: list = field(default_factory=list)
    reason: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        return self.headers.get(name)

    def json(self):
        import orjson

        return orjson.loads(self.body)


class H11Client:
    """A raw HTTP/1.1 client on h11 over one keep-alive connection."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = connect(port, host, timeout)
        self.conn = h11.Connection(h11.CLIENT)

    def send(self, method: str, target: str, *, headers=(), body: bytes | None = None) -> None:
        all_headers = [("host", "127.0.0.1"), *headers]
        if body is not None:
            all_headers.append(("content-length", str(len(body))))
        data = self.conn.send(h11.Request(method=method, target=target, headers=all_headers))
        if body:
            data += self.conn.send(h11.Data(data=body))
        data += self.conn.send(h11.EndOfMessage())
        self.sock.sendall(data)

    def next_event(self):
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = self.sock.recv(65536)
                self.conn.receive_data(data)
                continue
            return event

    def receive(self) -> Reply:
        """The next complete response (informational responses skipped)."""
        while True:
            event = self.next_event()
            if type(event) is h11.Response:
                break
            if type(event) is h11.ConnectionClosed:
                raise ConnectionError("server closed the connection")
        body = []
        while True:
            item = self.next_event()
            if type(item) is h11.Data:
                body.append(bytes(item.data))
            elif type(item) is h11.EndOfMessage:
                break
        headers = {name: value for name, value in event.headers}
        reply = Reply(event.status_code, headers, b"".join(body), list(event.headers), bytes(event.reason))
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return reply

    def request(self, method: str, target: str, *, headers=(), body: bytes | None = None) -> Reply:
        self.send(method, target, headers=headers, body=body)
        return self.receive()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def request(port: int, method: str, target: str, *, headers=(), body: bytes | None = None) -> Reply:
    with H11Client(port) as client:
        return client.request(method, target, headers=headers, body=body)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01):
    """Poll until predicate() is truthy; returns its value or fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)
