"""One request through the server: route -> auth -> handler, errors made into bodies."""

from __future__ import annotations

import logging

from .errors import HTTPError
from .http.response import error_response

logger = logging.getLogger("runnel.dispatch")


class Dispatcher:
    """Called by the HTTP layer for each request; never raises except on cancellation."""

    def __init__(self, router, authenticate) -> None:
        self._router = router
        self._authenticate = authenticate  # the pluggy hook caller (firstresult)

    async def __call__(self, request):
        route = None
        try:
            route, request.path_params = self._router.match(request.method, request.path)
            request.route = route
            if not route.public:
                principal = self._authenticate(request=request, route=route)
                if principal is None:
                    raise HTTPError(401, "Request is not authenticated")
                request.principal = principal
            return await route.handler(request)
        except HTTPError as error:
            return self._fail(request, route, error)
        except Exception:
            logger.exception("unhandled error in %s %s (request id %s)", request.method, request.path, request.request_id)
            error = HTTPError(500, f"Internal server error (request id {request.request_id})", code="internal_error")
            return self._fail(request, route, error)

    @staticmethod
    def _fail(request, route, error: HTTPError):
        stream = request._stream
        if stream is not None:
            # The status line is gone already: the error becomes the stream's last event.
            if not stream.ended:
                stream.write(stream.serializer.encode_error(error.to_dict()))
                stream.end()
            return None
        if route is not None and route.errors is not None:
            return route.errors(error)
        return error_response(error)
