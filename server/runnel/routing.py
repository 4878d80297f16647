"""Path templates to handlers: exact paths by dict lookup, templates by regex."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote

from .errors import HTTPError

if TYPE_CHECKING:
    from .http import Request, Response

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(:path)?\}")


Handler = Callable[["Request"], Awaitable["Response | None"]]
# Whether a request may skip authentication: a constant, or decided per request
# (a /v4 app made public by its config) once the path parameters are known.
Public = bool | Callable[["Request"], bool]
# An HTTPError as the body the surface's clients expect ({"error": "..."} for RunPod,
# OpenAI's envelope plus the run id for /v4), sent as JSON; the same body ends a
# stream early. A renderer may return a whole Response instead (errors that are not
# JSON): that is the response, and a stream that has started ends with the default body.
ErrorRenderer = Callable[["Request", HTTPError], Any]
# Runs before authentication; e.g. sets the request id the surface's errors carry.
Prepare = Callable[["Request"], None]


class Route:
    """A handler at a path template, and the policy the dispatcher applies around it.

    ``prepare(request)`` runs first, before authentication (a surface that gives
    every call its own id sets it there, so even a 401 carries it); then unless
    ``public`` says so, the ``runnel_authenticate`` hook must vouch for the caller;
    errors from any step are rendered by ``errors`` (default: OpenAI's envelope).
    """

    __slots__ = ("method", "template", "handler", "public", "errors", "prepare")

    def __init__(self, method: str, template: str, handler: Handler, *, public: Public = False,
                 errors: ErrorRenderer | None = None, prepare: Prepare | None = None) -> None:
        self.method = method
        self.template = template
        self.handler = handler
        self.public = public
        self.errors = errors
        self.prepare = prepare

    def is_public(self, request: Request) -> bool:
        public = self.public
        return public if type(public) is bool else bool(public(request))

    def error_body(self, request: Request, error: HTTPError) -> Any:
        return error.to_dict() if self.errors is None else self.errors(request, error)

    def __repr__(self) -> str:
        return f"Route({self.method} {self.template} -> {getattr(self.handler, '__qualname__', self.handler)})"


class RegisterRoute(Protocol):
    """The ``register`` that ``runnel_register_routes`` gets (``Router.add``)."""

    def __call__(self, method: str, template: str, handler: Handler, *, public: Public = False,
                 errors: ErrorRenderer | None = None, prepare: Prepare | None = None) -> Route: ...


def _compile(template: str) -> re.Pattern[str] | None:
    if "{" not in template:
        return None
    pattern, pos = [], 0
    for match in _PARAM.finditer(template):
        pattern.append(re.escape(template[pos : match.start()]))
        pattern.append(f"(?P<{match[1]}>.+)" if match[2] else f"(?P<{match[1]}>[^/]+)")
        pos = match.end()
    pattern.append(re.escape(template[pos:]))
    return re.compile("".join(pattern) + r"\Z")


class Router:
    def __init__(self) -> None:
        self._exact: dict[str, dict[str, Route]] = {}
        self._templates: list[tuple[re.Pattern[str], str, dict[str, Route]]] = []

    def add(self, method: str, template: str, handler: Handler, *, public: Public = False,
            errors: ErrorRenderer | None = None, prepare: Prepare | None = None) -> Route:
        if not template.startswith("/"):
            raise ValueError(f"route template must start with '/': {template!r}")
        method = method.upper()
        route = Route(method, template, handler, public=public, errors=errors, prepare=prepare)
        regex = _compile(template)
        if regex is None:
            methods = self._exact.setdefault(template, {})
        else:
            for _, known_template, methods in self._templates:  # noqa: B007 (methods is used after break)
                if known_template == template:
                    break
            else:
                methods = {}
                self._templates.append((regex, template, methods))
        if method in methods:
            raise ValueError(f"{method} {template} is registered twice: {methods[method]!r} and {route!r}")
        methods[method] = route
        return route

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """The route for this request, or HTTPError 404 / 405 (with Allow).

        Every route whose path matches is considered, exact paths first, so two
        templates that fit the same path with different methods both work.
        """
        allowed: set[str] = set()
        methods = self._exact.get(path)
        if methods is not None:
            route = _pick(methods, method)
            if route is not None:
                return route, {}
            allowed.update(methods)
        for regex, _, methods in self._templates:
            found = regex.match(path)
            if found is None:
                continue
            route = _pick(methods, method)
            if route is not None:
                return route, {name: unquote(value) for name, value in found.groupdict().items()}
            allowed.update(methods)
        if not allowed:
            raise HTTPError(404, f"No route for {path}", code="route_not_found")
        if "GET" in allowed:
            allowed.add("HEAD")
        allow = ", ".join(sorted(allowed))
        raise HTTPError(
            405,
            f"Method {method} is not allowed for {path}; allowed: {allow}",
            code="method_not_allowed",
            headers=((b"allow", allow.encode("ascii")),),
        )

    def __iter__(self) -> Iterator[Route]:
        for methods in self._exact.values():
            yield from methods.values()
        for _, _, methods in self._templates:
            yield from methods.values()


def _pick(methods: dict[str, Route], method: str) -> Route | None:
    route = methods.get(method)
    if route is None and method == "HEAD":  # HEAD is GET without the body
        route = methods.get("GET")
    return route
