"""One request through the server: route -> policy (prepare, auth) -> handler -> errors.

The dispatcher is the one caller of the ``runnel_authenticate`` hook and the one
place an error becomes a body: as the response, in the route's own shape, or, when
the handler had already started a stream, as that stream's last event.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .auth import ANONYMOUS, Principal
from .errors import HTTPError
from .http import Request, Response, json_response
from .http.cors import Cors
from .routing import Router

logger = logging.getLogger("runnel.dispatch")


class Dispatcher:
    """Called by the HTTP layer for each request; never raises except on cancellation."""

    def __init__(self, router: Router, authenticate: Callable[..., Principal | None], cors: Cors | None = None) -> None:
        self._router = router
        self._authenticate = authenticate  # the pluggy hook caller (firstresult)
        self._cors = cors

    async def __call__(self, request: Request) -> Response | None:
        if self._cors is not None and request.method == "OPTIONS":
            preflight = self._cors.preflight(request)  # for any path, before auth: it has no credentials
            if preflight is not None:
                return preflight
        try:
            route, request.path_params = self._router.match(request.method, request.path)
            request.route = route
            if route.prepare is not None:
                route.prepare(request)
            public = route.public  # is_public(), inlined: this runs for every request
            if public is True or (public is not False and public(request)):
                request.principal = ANONYMOUS
            else:
                principal = self._authenticate(request=request, route=route)
                if principal is None:
                    raise HTTPError(401, "Request is not authenticated")
                request.principal = principal
            return await route.handler(request)
        except HTTPError as error:
            return self.fail(request, error)
        except Exception:
            logger.exception("unhandled error in %s %s (request id %s)", request.method, request.path,
                             request.request_id)
            internal = HTTPError(500, f"Internal server error (request id {request.request_id})", code="internal_error")
            return self.fail(request, internal)

    @staticmethod
    def fail(request: Request, error: HTTPError) -> Response | None:
        """``error`` as the answer to ``request``, in its route's shape (the default envelope before a route matched).

        Returns the response to send, or None when the request's stream had started:
        then the error is that stream's last event, and the stream has ended. The
        HTTP layer calls it too (``ServerState.fail``), for errors it raises itself.
        """
        route = request.route
        body = error.to_dict() if route is None else route.error_body(request, error)
        stream = request.response_stream
        if stream is not None:
            # The status line is gone already: the error becomes the stream's last event.
            stream.fail(error.to_dict() if isinstance(body, Response) else body)
            return None
        if isinstance(body, Response):
            return body
        return json_response(body, error.status, error.headers)
