"""The HTTP/1.1 layer: h11 driven from an asyncio Protocol."""

from .protocol import HttpProtocol
from .request import Request
from .response import Response, ResponseStream, json_response
from .server_state import ServerState

__all__ = ["HttpProtocol", "Request", "Response", "ResponseStream", "ServerState", "json_response"]
