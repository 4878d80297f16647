"""The test harness: real runnel servers on real sockets, and raw clients to talk to them.

For runnel's own tests and for plugin authors' alike. Nothing in runnel imports this
package at run time, and it needs pytest only for its fixtures
(``runnel.testing.pytest_plugin``, which a conftest.py loads with
``pytest_plugins = ["runnel.testing.pytest_plugin"]``) and to fail a ``wait_until``.

- ``server``: ServerThread (a server on its own loop in a thread), free_port, wait_until;
- ``process``: ServeProcess (``runnel serve`` in a subprocess, for SIGKILL and several servers);
- ``redis``: RedisServer (a real redis-server on a free port, AOF on; fixtures ``redis_server``,
  ``redis_url``);
- ``wire``: raw sockets and the one reader of raw HTTP responses (RawResponse,
  ResponseReader, parse_all, exchange) and of SSE bodies (sse_events);
- ``client``: H11Client, a keep-alive client on h11, and ``request``;
- ``errors``: the OpenAI error envelope (error_body, assert_error).
"""

from __future__ import annotations

from .client import H11Client, Reply, request
from .errors import assert_error, error_body
from .process import ServeProcess
from .redis import RedisServer
from .server import ServerThread, free_port, server_config, wait_until
from .wire import (
    RawResponse,
    ResponseReader,
    connect,
    exchange,
    parse_all,
    parse_response,
    raw_exchange,
    read_head,
    read_response,
    read_until_closed,
    recv_until,
    send_post,
    sse_events,
)

__all__ = [
    "H11Client",
    "RawResponse",
    "RedisServer",
    "Reply",
    "ResponseReader",
    "ServeProcess",
    "ServerThread",
    "assert_error",
    "connect",
    "error_body",
    "exchange",
    "free_port",
    "parse_all",
    "parse_response",
    "raw_exchange",
    "read_head",
    "read_response",
    "read_until_closed",
    "recv_until",
    "request",
    "send_post",
    "server_config",
    "sse_events",
    "wait_until",
]
