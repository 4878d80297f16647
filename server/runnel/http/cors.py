"""Cross-origin access for browser clients: ``[server] cors_allow_origins``.

Off by default (no origins). When on, every response to a request from an allowed
``Origin`` carries ``Access-Control-Allow-Origin`` (the protocol adds it to each head:
errors and streams included), and a preflight (``OPTIONS`` with
``Access-Control-Request-Method``) from an allowed origin is answered here for any
path, before routing and authentication: a browser sends no credentials with it.
Credentials are headers (Authorization, x-api-key), never cookies, so
``Access-Control-Allow-Credentials`` is not needed.
"""

from __future__ import annotations

from collections.abc import Sequence

from .request import Request
from .response import Response

PREFLIGHT_MAX_AGE = b"600"  # seconds a browser may cache a preflight's answer
# Response headers a script may read: the run id, and when to retry after a 429/503.
EXPOSED = b"x-request-id, retry-after"


class Cors:
    __slots__ = ("_origins", "_any")

    def __init__(self, origins: Sequence[str]) -> None:
        self._any = "*" in origins
        self._origins = frozenset(origin.encode("latin-1") for origin in origins if origin != "*")

    def _allowed(self, request: Request) -> bytes | None:
        """The value of Access-Control-Allow-Origin for this request, or None."""
        origin = request.header(b"origin")
        if origin is None:
            return None
        if self._any:
            return b"*"
        return origin if origin in self._origins else None

    def fields(self, request: Request) -> bytes:
        """Header lines for an actual response (empty unless its origin is allowed)."""
        allow = self._allowed(request)
        if allow is None:
            return b""
        vary = b"" if self._any else b"vary: origin\r\n"
        return b"access-control-allow-origin: %b\r\naccess-control-expose-headers: %b\r\n%b" % (allow, EXPOSED, vary)

    def preflight(self, request: Request) -> Response | None:
        """The answer to a preflight from an allowed origin (its CORS fields come with the head); else None."""
        method = request.header(b"access-control-request-method")
        if method is None or self._allowed(request) is None:
            return None
        headers = [(b"access-control-allow-methods", method), (b"access-control-max-age", PREFLIGHT_MAX_AGE)]
        requested = request.header(b"access-control-request-headers")
        if requested:
            headers.append((b"access-control-allow-headers", requested))
        return Response(204, b"", headers=headers)
