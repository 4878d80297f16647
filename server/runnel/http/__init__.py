"""The HTTP/1.1 layer: h11 driven from an asyncio Protocol."""

from .protocol import HttpProtocol
from .request import Request
from .response import Response, ResponseStream, json_response
from .site import Site

__all__ = ["HttpProtocol", "Request", "Response", "ResponseStream", "Site", "json_response"]
