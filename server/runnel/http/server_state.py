"""What every connection of one server shares: limits, clocks and where requests go."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .dates import DateHeader
from .response import error_response

if TYPE_CHECKING:
    from ..errors import HTTPError
    from ..serializers import Serializer
    from .cors import Cors
    from .protocol import HttpProtocol
    from .request import Request
    from .response import Response


def new_request_id() -> str:
    return os.urandom(12).hex()


def plain_failure(request: Request, error: HTTPError) -> Response | None:
    """``error`` in the default envelope: the stream's error event once one started, else the response."""
    stream = request.response_stream
    if stream is not None:
        stream.fail(error.to_dict())
        return None
    return error_response(error)


@dataclass(slots=True, eq=False)
class ServerState:
    """Per-server state every HttpProtocol shares (uvicorn's name for it); nothing here is global."""

    dispatch: Callable[[Request], Awaitable[Response | None]]
    negotiate: Callable[[Request], Serializer]
    # How an error the server raises itself (the shutdown cut) answers a request: in
    # its route's shape, as the dispatcher renders errors. Same contract as Dispatcher.fail.
    fail: Callable[[Request, HTTPError], Response | None] = plain_failure
    max_header_bytes: int = 16384
    max_body_bytes: int = 8 * 1024 * 1024
    # Paths whose bodies may be larger than max_body_bytes (a file upload), and their limit.
    body_limits: dict[str, int] = field(default_factory=dict)
    # Bytes a stream may have waiting in the transport before its client is dropped.
    max_stream_buffer_bytes: int = 4 * 1024 * 1024
    header_timeout: float = 10.0
    # [server] max_queue_wait: the deadline of a generation request without X-Request-Deadline.
    max_queue_wait: float | None = None
    keepalive_timeout: float = 5.0
    body_timeout: float = 30.0
    # Bytes a second a body must average (after body_timeout's grace) once the handler reads it; 0 = no floor.
    body_min_rate: float = 1024.0
    write_timeout: float = 30.0
    # Connections served at once; past it new ones are answered 503 and closed. 0 = no cap.
    max_connections: int = 0
    server_header: bytes = b"runnel"
    cors: Cors | None = None  # [server] cors_allow_origins; None: off
    # Called once per finished request with (request, status, seconds); None when nobody listens.
    # A request whose client went away first is reported too, with status 499 (protocol.CLIENT_GONE).
    finished: Callable[[Request, int, float], None] | None = None
    dates: DateHeader = field(default_factory=DateHeader)
    new_request_id: Callable[[], str] = new_request_id
    connections: set[HttpProtocol] = field(default_factory=set)
    refusing: int = 0  # of the connections, those refused (past max_connections) and about to close
    refused_total: int = 0  # connections refused since start (read by the metrics at scrape time)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("runnel.http"))
