"""Every hook a runnel plugin can implement.

Registration hooks are called once, at start-up, and fill plain dicts; only
``runnel_authenticate`` and ``runnel_request_finished`` are called per request.
No hook is ever called per token. Call hooks with keyword arguments only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # annotations only: importing this module stays cheap for plugins
    from .apps import App
    from .auth import Principal
    from .config import AppConfig, Config, Table
    from .http import Request
    from .routing import RegisterRoute, Route
    from .serializers import Serializer
    from .server import Server

hookspec = pluggy.HookspecMarker("runnel")
hookimpl = pluggy.HookimplMarker("runnel")

# What the registration hooks' ``register`` callbacks take.
BackendFactory = Callable[["AppConfig", "Table", "Server"], "App"]
# Returns a plugin object implementing ``runnel_authenticate``.
AuthFactory = Callable[["Table", "Config"], Any]


@hookspec
def runnel_register_backends(register: Callable[[str, BackendFactory], None]) -> None:
    """Add backends that build apps from ``[apps.NAME]`` tables.

    :param register: ``register(name, factory)``; ``factory(app_config, table, server)``
        returns an app (see ``runnel.apps.App``) without loading it yet. ``table`` is a
        ``runnel.config.Table`` over the app's options: read every key from it and call
        ``table.finish()`` so mistakes name the key and the file.
    """


@hookspec
def runnel_register_routes(register: RegisterRoute, server: Server) -> None:
    """Add HTTP routes.

    :param register: ``register(method, template, handler, *, public=False, errors=None,
        prepare=None)``. ``template`` is a path such as ``/v1/models/{model}``
        (``{rest:path}`` spans slashes); ``handler(request)`` is a coroutine function
        returning a ``runnel.http.Response``, or streaming through ``request.stream()``
        (and ending the stream) and returning None. The rest is the route's policy,
        applied by the dispatcher: ``public`` (a bool, or ``public(request) -> bool``
        decided once the path parameters are known) skips authentication;
        ``errors(request, error) -> body`` renders an ``HTTPError`` in the surface's
        own shape, for the response or, once a stream has started, its last event;
        ``prepare(request)`` runs before authentication (e.g. to set the request id
        that the surface's errors carry).
    :param server: the ``runnel.Server``; handlers reach apps through ``server.apps``.
    """


@hookspec
def runnel_register_serializers(register: Callable[[Serializer], None]) -> None:
    """Add stream framings chosen by the request's ``Accept`` header.

    :param register: ``register(serializer)``; a serializer has ``media_type``
        (bytes), ``encode(event) -> bytes`` (one framed event; ``bytes`` events are
        payloads encoded already), ``encode_error(error_body) -> bytes`` (the event
        that ends a stream early), optionally ``end`` (bytes a stream that finishes
        normally writes last) and ``payload_frame`` (``(prefix, suffix)`` around a
        bytes payload, for the stream's one-step path; see ``runnel.serializers.Serializer``).
        ``runnel.http.ResponseStream`` is the caller.
    """


@hookspec
def runnel_register_auth_kinds(register: Callable[[str, AuthFactory], None]) -> None:
    """Add kinds of authentication selectable with ``[auth] kind = "..."``.

    :param register: ``register(kind, factory)``; ``factory(table, config)`` returns an
        object implementing the ``runnel_authenticate`` hook; the server registers it
        as a plugin when its kind is the configured one.
    """


@hookspec(firstresult=True)
def runnel_authenticate(request: Request, route: Route) -> Principal | None:
    """Who is making this request. First non-None result wins.

    Called for every request to a non-public route. Return a
    ``runnel.auth.Principal``, return None to leave the decision to other plugins,
    or raise ``runnel.HTTPError`` (401 / 403) to refuse. A request nobody
    authenticates is refused with 401.
    """


@hookspec
def runnel_request_finished(request: Request, status: int, elapsed: float) -> None:
    """Observe a request whose response is complete (metrics, access logs).

    :param status: the status code sent; 499 when the client went away before the response
        was complete (nginx's "client closed request").
    :param elapsed: seconds from the request head to the last byte of the response.
    ``request.generation`` (a ``runnel.generation_record.GenerationRecord``, or None) is what
    its generation did; ``request.bytes_sent`` the size of a whole response (0 for a stream).
    Called only when some plugin implements it, so it costs nothing otherwise.
    """


@hookspec
def runnel_startup(server: Server) -> Awaitable[None] | None:
    """The server is about to accept connections. May return an awaitable."""


@hookspec
def runnel_shutdown(server: Server) -> Awaitable[None] | None:
    """The server has stopped serving requests. May return an awaitable."""
