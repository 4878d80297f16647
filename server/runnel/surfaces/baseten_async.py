"""Baseten's async inference API: ``async_predict``, request status, cancel, queue status.

Baseten serves each model on its own host, ``model-{model_id}.api.baseten.co``; runnel is
one host, so a request names the model either way:

- a path prefix, ``/model-{model_id}/...``: a client changes only its base URL
  (``https://model-abcd1234.api.baseten.co`` -> ``http://runnel:8000/model-abcd1234``);
- the Host header, ``model-{model_id}.<anything>``, on the bare paths (a DNS name or
  proxy that keeps Baseten's host names).

    POST .../production/async_predict               the model's production deployment
    POST .../environments/production/async_predict  the same (the only environment here)
    POST .../development/async_predict              the deployment whose id is "development"
    POST .../deployment/{deployment_id}/async_predict
         {"model_input", "webhook_endpoint"?, "priority"? 0-2, "max_time_in_queue_seconds"? 10-259200
          (default 600), "inference_retry_config"? {"max_attempts" 1-10, "initial_delay_ms" 0-10000,
          "max_delay_ms" 0-60000}}  -> 201 {"request_id"}
    GET    .../async_request/{request_id}   -> {"request_id", "model_id", "deployment_id", "status",
                                               "webhook_status", "created_at", "status_at", "errors"}
    DELETE .../async_request/{request_id}   -> {"request_id", "canceled", "message"}: QUEUED only
    GET    .../{deployment path}/async_queue_status
                                            -> {"model_id", "deployment_id", "num_queued_requests",
                                                "num_in_progress_requests"}

Which app: ``[apps.NAME.baseten] model_id / deployment_id / production`` (read by
``baseten.BasetenBridge``). A python function app runs its function
``[apps.NAME.baseten] function`` (default ``predict``, Truss's name): a function whose
only parameter is ``model_input`` gets the input whole, as a Truss model's ``predict``
does; any other gets the input's keys as keyword arguments. A model app takes an OpenAI
body: ``messages`` makes it a chat completion, else a completion; checked before the
request is queued (a bad one is a 400), never streamed (Baseten's async is not).

Requests are runs in the server's run store (``runnel.runs``): durable, owned by the
principal that submitted them (anyone else gets 404), purged after ``runs_retention``.
``max_time_in_queue_seconds`` is the run's deadline (an ``X-Request-Deadline`` header
too: the earlier applies): a request not started by then never runs and is ``EXPIRED``.
A request runs for at most an hour (Baseten's limit), else ``FAILED``. ``priority`` and
``inference_retry_config`` are checked against Baseten's bounds and not honoured: runs
start in submission order, once each. An ``Idempotency-Key`` makes a submit safe to retry.

The outcome goes only to the webhook, as Baseten: ``{"request_id", "model_id",
"deployment_id", "type": "async_request_completed", "time", "data", "errors"}`` where
``data`` is the output (null unless it succeeded) and ``errors`` is ``[{"code",
"message"}]``; with ``[server] webhook_secret`` set it is signed ``X-BASETEN-SIGNATURE:
v1=<hex HMAC-SHA256(secret, body)>`` (besides runnel's own ``X-Webhook-Signature``).
``webhook_status`` is ``PENDING`` until delivery has ended (delivered or given up; which,
runnel does not record), then ``SUCCEEDED``. Errors are Baseten's ``{"error": "<message>"}``.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from datetime import UTC, datetime
from functools import partial
from typing import Any

from ..backends.python import is_function_app
from ..deadlines import unix_deadline
from ..errors import HTTPError
from ..http import json_response
from ..runs import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TIMED_OUT,
    Run,
    RunView,
    check_target,
    idempotency_of,
)
from .openai import OpenAIAPI, offline
from .openai.runs import OpenAIRuns

SURFACE = "baseten"  # runs of function apps
MODEL_SURFACE = "baseten_model"  # runs of model apps: OpenAI bodies
SURFACES = (SURFACE, MODEL_SURFACE)
DEFAULT_FUNCTION = "predict"
WEBHOOK_TYPE = "async_request_completed"
SIGNATURE_HEADER = "x-baseten-signature"
HOST_PREFIX = "model-"
# Baseten's bounds and defaults.
MIN_QUEUE_SECONDS, MAX_QUEUE_SECONDS, DEFAULT_QUEUE_SECONDS = 10, 72 * 3600, 600
MAX_PRIORITY = 2
RETRY_BOUNDS = {"max_attempts": (1, 10), "initial_delay_ms": (0, 10_000), "max_delay_ms": (0, 60_000)}
RUN_TIMEOUT_MS = 3600 * 1000  # "run for up to 1 hour"
FIELDS = frozenset({"model_input", "webhook_endpoint", "priority", "max_time_in_queue_seconds",
                    "inference_retry_config"})
CHAT_ROUTE, COMPLETION_ROUTE = "/v1/chat/completions", "/v1/completions"
STATUS = {QUEUED: "QUEUED", RUNNING: "IN_PROGRESS", SUCCEEDED: "SUCCEEDED", FAILED: "FAILED",
          CANCELLED: "CANCELED", TIMED_OUT: "FAILED"}


def status_of(run: Run) -> str:
    if run.state == TIMED_OUT and _expired(run):
        return "EXPIRED"
    return STATUS[run.state]


def _expired(run: Run) -> bool:
    return run.error is not None and run.error.get("code") == "deadline_exceeded"


def errors_of(run: Run) -> list[dict]:
    """Baseten's ``errors``: what went wrong, ``[]`` for a request that succeeded or is not done."""
    if run.state == CANCELLED:
        return [{"code": "REQUEST_CANCELED", "message": "The request was canceled before it ran."}]
    if run.error is None:
        return []
    if _expired(run):
        code = "REQUEST_EXPIRED"
    elif run.error.get("code") == "timed_out":
        code = "MODEL_PREDICT_TIMEOUT"
    elif run.error.get("status") in (400, 404, 422):
        code = "MODEL_INVALID_INPUT"
    elif run.error.get("code") == "interrupted":
        code = "INTERNAL_SERVER_ERROR"
    else:
        code = "MODEL_PREDICT_ERROR"
    return [{"code": code, "message": run.error.get("message", "")}]


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def signature(secret: str, body: bytes) -> str:
    """The ``X-BASETEN-SIGNATURE`` value: ``v1=`` and the hex HMAC-SHA256 of the whole body."""
    return "v1=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Deployments:
    """app name -> (model_id, deployment_id), from the bridge's config reading."""

    def __init__(self, bridge) -> None:
        self.bridge = bridge
        self.ids = {app: ids for ids, app in bridge.deployments.items()}

    def of(self, run: Run) -> tuple[str, str]:
        return self.ids.get(run.app, ("", run.app))


class _BasetenRender:
    """What both views share: a run as Baseten's webhook payload, signed Baseten's way."""

    deployments: Deployments

    def render(self, run: Run) -> dict:
        model_id, deployment_id = self.deployments.of(run)
        return {"request_id": run.id, "model_id": model_id, "deployment_id": deployment_id,
                "type": WEBHOOK_TYPE, "time": _utc(run.finished_at or time.time()),
                "data": run.output if run.state == SUCCEEDED else None, "errors": errors_of(run)}

    def webhook_headers(self, run: Run, body: bytes, secret: str) -> list[tuple[str, str]]:
        return [(SIGNATURE_HEADER, signature(secret, body))] if secret else []


class BasetenFunctionRuns(_BasetenRender, RunView):
    name = SURFACE

    def __init__(self, deployments: Deployments) -> None:
        self.deployments = deployments

    def arguments(self, app, run: Run) -> dict:
        function = app.function(run.function)
        if function.parameters == frozenset(("model_input",)) and not function.var_keyword:
            return {"model_input": run.input}
        if type(run.input) is not dict:
            raise HTTPError(422, f"model_input must be an object whose keys are the arguments of "
                            f"'{run.function}'", param="model_input", code="invalid_input")
        return dict(run.input)  # checked against the signature by invoke (422 fails the request)


class BasetenModelRuns(_BasetenRender, OpenAIRuns):
    name = MODEL_SURFACE

    def __init__(self, api: OpenAIAPI, deployments: Deployments) -> None:
        super().__init__(api)
        self.deployments = deployments


def render_error(request, error: HTTPError) -> dict:
    return {"error": error.message}


def _bad(message: str) -> HTTPError:
    return HTTPError(400, message, code="invalid_body")


def _integer(body: dict, key: str, low: int, high: int, default: int, where: str = "") -> int:
    """``body[key]`` (``default`` when absent), an integer from ``low`` to ``high`` (else 400)."""
    value = body.get(key, default)
    if type(value) is not int or not low <= value <= high:
        raise _bad(f"'{where}{key}' must be an integer from {low} to {high}, inclusive")
    return value


def check_retry_config(config: Any) -> None:
    """Baseten's ``inference_retry_config``: known keys, each within its bounds."""
    if config is None:
        return
    if type(config) is not dict:
        raise _bad("'inference_retry_config' must be an object")
    unknown = sorted(set(config) - set(RETRY_BOUNDS))
    if unknown:
        raise _bad(f"'inference_retry_config' has unknown fields: {', '.join(map(repr, unknown))}")
    for key, (low, high) in RETRY_BOUNDS.items():
        _integer(config, key, low, high, low, "inference_retry_config.")


class BasetenAsyncAPI:
    def __init__(self, server, bridge, functions: dict[str, str]) -> None:
        self.bridge = bridge
        self.apps = server.apps
        self.runs = server.runs
        self.openai = OpenAIAPI.of(server)
        self.functions = functions  # function app name -> the function its requests call
        self.deployments = Deployments(bridge)
        self.runs.add_view(BasetenFunctionRuns(self.deployments))
        self.runs.add_view(BasetenModelRuns(self.openai, self.deployments))

    # -- naming --------------------------------------------------------------------------
    @staticmethod
    def model_id(request) -> str:
        """The model a request names: the path's ``/model-{id}``, else the Host's ``model-{id}.``."""
        model_id = request.path_params.get("model_id")
        if model_id is None:
            host = (request.header(b"host") or b"").decode("latin-1").lower()
            label = host.split(".", 1)[0] if "." in host else ""
            if label.startswith(HOST_PREFIX):
                model_id = label[len(HOST_PREFIX):]
        if not model_id:
            raise HTTPError(404, "Name the model: a path starting /model-{model_id}/, or the Host "
                            "model-{model_id}.<domain>", code="model_not_found")
        return model_id

    def app_name(self, request, deployment: str) -> str:
        """The app of the deployment a request names: ``deployment`` is how its path names it
        (``production``, ``development``, ``environment``: ``/environments/{environment}``, or
        ``deployment``: ``/deployment/{deployment_id}``)."""
        model_id = self.model_id(request)
        params = request.path_params
        if deployment == "environment" and params["environment"] != "production":
            name, what = None, f"environment {params['environment']!r} (only 'production' is served)"
        elif deployment in ("production", "environment"):
            name, what = self.bridge.production.get(model_id), "production deployment"
        else:
            deployment_id = params["deployment_id"] if deployment == "deployment" else "development"
            name, what = self.bridge.deployments.get((model_id, deployment_id)), f"deployment {deployment_id!r}"
        if name is None:
            raise HTTPError(404, f"Model {model_id!r} has no {what} here", code="model_not_found")
        return name

    async def _request(self, request) -> Run:
        request_id = request.path_params["request_id"]
        run = await self.runs.find(request_id, surface=SURFACES, app=None, principal=request.principal.identity)
        if run is None or self.deployments.of(run)[0] != self.model_id(request):
            raise HTTPError(404, f"No async request {request_id!r} for this model (unknown, or finished "
                            "and expired)", code="request_not_found")
        return run

    # -- handlers ------------------------------------------------------------------------
    async def async_predict(self, request, deployment: str):
        name = self.app_name(request, deployment)
        body = await request.json()
        if type(body) is not dict or "model_input" not in body:
            raise _bad("The request body must be a JSON object with 'model_input'")
        unknown = sorted(set(body) - FIELDS)
        if unknown:
            raise _bad(f"Unknown fields: {', '.join(map(repr, unknown))}")
        _integer(body, "priority", 0, MAX_PRIORITY, 0)
        queue_seconds = _integer(body, "max_time_in_queue_seconds", MIN_QUEUE_SECONDS, MAX_QUEUE_SECONDS,
                                 DEFAULT_QUEUE_SECONDS)
        check_retry_config(body.get("inference_retry_config"))
        webhook = body.get("webhook_endpoint")
        if webhook is not None:
            try:
                check_target(webhook, self.runs.allowed_hosts)
            except ValueError as exc:
                raise _bad(str(exc)) from None
        if self.apps.state(name) == "failed":
            raise HTTPError(503, f"The deployment's app {name!r} failed to start", code="app_not_ready")
        model_input = body["model_input"]
        app = self.apps.get(name)
        function = self.functions.get(name)
        if function is not None:
            surface = SURFACE
            if app is not None and function not in app.functions:  # loading: checked when it runs
                raise HTTPError(404, f"App '{name}' has no function '{function}' to run requests with "
                                f"(set [apps.{name}.baseten] function)", code="function_not_found")
        else:
            surface, function = MODEL_SURFACE, self._model_route(model_input)
        deadlines = [d for d in (unix_deadline(request), time.time() + queue_seconds) if d is not None]
        idempotency = idempotency_of(request, f"{SURFACE}/{name}/{function}", body)
        run = await self.runs.submit(surface, name, function, model_input, principal=request.principal.identity,
                                     webhook=webhook, timeout_ms=RUN_TIMEOUT_MS, idempotency=idempotency,
                                     deadline=min(deadlines))
        return json_response({"request_id": run.id}, 201)

    def _model_route(self, model_input: Any) -> str:
        """The OpenAI route a model app's input goes to, the input checked now (400, not a failed run)."""
        if type(model_input) is not dict:
            raise _bad("A model's 'model_input' must be an OpenAI chat completion (or completion) body")
        if model_input.get("stream") not in (None, False):
            raise _bad("Async inference is not compatible with streaming output: leave 'model_input.stream' out")
        route = CHAT_ROUTE if "messages" in model_input else COMPLETION_ROUTE
        offline.check(self.openai, route, model_input, param="model_input")
        return route

    async def status(self, request):
        run = await self._request(request)
        model_id, deployment_id = self.deployments.of(run)
        if not run.webhook:
            webhook_status = "NO_WEBHOOK_PROVIDED"
        else:
            webhook_status = "PENDING" if run.webhook_pending else "SUCCEEDED"
        return json_response({
            "request_id": run.id, "model_id": model_id, "deployment_id": deployment_id,
            "status": status_of(run), "webhook_status": webhook_status, "created_at": _utc(run.created_at),
            "status_at": _utc(run.finished_at or run.started_at or run.created_at), "errors": errors_of(run),
        })

    async def cancel(self, request):
        run = await self._request(request)
        run = await self.runs.cancel(run.id, queued_only=True) or run
        if run.state == CANCELLED:
            return json_response({"request_id": run.id, "canceled": True, "message": "The request was canceled."})
        return json_response({"request_id": run.id, "canceled": False,
                              "message": f"The request is {status_of(run)}: only QUEUED requests can be canceled."})

    async def queue_status(self, request, deployment: str):
        name = self.app_name(request, deployment)
        model_id, deployment_id = self.deployments.ids[name]
        counts = await self.runs.counts(name, MODEL_SURFACE if name not in self.functions else SURFACE)
        return json_response({"model_id": model_id, "deployment_id": deployment_id,
                              "num_queued_requests": counts[QUEUED], "num_in_progress_requests": counts[RUNNING]})


def function_apps(server, bridge, functions: dict[str, str]) -> dict[str, str]:
    """The function each Baseten-served python function app runs (``function``, default ``predict``)."""
    apps = dict(server.apps.items())
    return {name: functions.get(name, DEFAULT_FUNCTION) for name in bridge.deployments.values()
            if is_function_app(apps.get(name))}


# How a path names the deployment, and what it is called in ``BasetenAsyncAPI.app_name``.
DEPLOYMENT_PATHS = {"/production": "production", "/development": "development",
                    "/environments/{environment}": "environment", "/deployment/{deployment_id}": "deployment"}


def register_routes(register, server, bridge, functions: dict[str, str]) -> None:
    api = BasetenAsyncAPI(server, bridge, function_apps(server, bridge, functions))
    for prefix in ("", "/model-{model_id}"):
        for path, deployment in DEPLOYMENT_PATHS.items():
            register("POST", f"{prefix}{path}/async_predict", partial(api.async_predict, deployment=deployment),
                     errors=render_error)
            register("GET", f"{prefix}{path}/async_queue_status", partial(api.queue_status, deployment=deployment),
                     errors=render_error)
        register("GET", f"{prefix}/async_request/{{request_id}}", api.status, errors=render_error)
        register("DELETE", f"{prefix}/async_request/{{request_id}}", api.cancel, errors=render_error)
