"""What every connection of one server shares: limits, clocks and where requests go."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .dates import DateHeader

if TYPE_CHECKING:
    from ..serializers import Serializer
    from .protocol import HttpProtocol
    from .request import Request
    from .response import Response


def new_request_id() -> str:
    return os.urandom(12).hex()


@dataclass(slots=True, eq=False)
class ServerState:
    """Per-server state every HttpProtocol shares (uvicorn's name for it); nothing here is global."""

    dispatch: Callable[[Request], Awaitable[Response | None]]
    negotiate: Callable[[Request], Serializer]
    max_header_bytes: int = 16384
    max_body_bytes: int = 8 * 1024 * 1024
    # Bytes a stream may have waiting in the transport before its client is dropped.
    max_stream_buffer_bytes: int = 4 * 1024 * 1024
    header_timeout: float = 10.0
    keepalive_timeout: float = 5.0
    body_timeout: float = 30.0
    write_timeout: float = 30.0
    server_header: bytes = b"runnel"
    # Called once per finished request with (request, status, seconds); None when nobody listens.
    finished: Callable[[Request, int, float], None] | None = None
    dates: DateHeader = field(default_factory=DateHeader)
    new_request_id: Callable[[], str] = new_request_id
    connections: set[HttpProtocol] = field(default_factory=set)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("runnel.http"))
