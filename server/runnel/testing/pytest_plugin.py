"""runnel's pytest fixtures: real servers on 127.0.0.1:0, stopped when the test ends.

Load it from a conftest.py at the root of a test suite (runnel's own does this):

    pytest_plugins = ["runnel.testing.pytest_plugin"]

The helpers the fixtures' servers are talked to with are in ``runnel.testing``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import pytest

import runnel

from .redis import RedisServer, running_redis
from .server import ServerThread, server_config

ECHO_CONFIG = {"apps": {"echo": {"backend": "echo"}}}
# The built-in CTranslate2 model as the app "tiny", on one CPU thread (needs runnel-ctranslate2).
TINY_CONFIG = {"apps": {"tiny": {"backend": "ctranslate2", "model": "builtin:tiny", "device": "cpu",
                                 "inter_threads": 1, "intra_threads": 1}}}

StartServer = Callable[..., ServerThread]


@pytest.fixture
def start_server() -> Iterator[StartServer]:
    """``start_server(config_dict_or_Config, plugins=())`` -> a running ServerThread (port 0 by default)."""
    started: list[ServerThread] = []

    def start(config: runnel.Config | dict | None = None, plugins: Iterable[object] = (),
              load_entrypoints: bool = True, ready: bool = True) -> ServerThread:
        thread = ServerThread(server_config(config), plugins, load_entrypoints).start()
        started.append(thread)
        if ready:
            thread.wait_ready()
        return thread

    yield start
    for thread in reversed(started):
        thread.stop()


@pytest.fixture
def echo_server(start_server: StartServer) -> ServerThread:
    """A server with the echo backend at /echo/echo, found through its entry point."""
    return start_server(ECHO_CONFIG)


@pytest.fixture(scope="module")
def tiny_server() -> Iterator[ServerThread]:
    """A server with the built-in model as app "tiny", shared by a test module (loading it takes a while)."""
    server = ServerThread(server_config(TINY_CONFIG)).start()
    assert server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real ``redis-server`` for the session (loopback, free port, AOF on). Missing, it fails
    the tests that need it (it is never skipped): ``make test`` installs it."""
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, emptied for this test: ``[server] runs`` for servers sharing runs."""
    assert redis_server.command("FLUSHALL").startswith(b"+OK")
    return redis_server.url()
