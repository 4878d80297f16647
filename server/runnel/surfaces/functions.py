"""Built-in plugin: serverless-style function endpoints, ``POST /v4/{project_id}/{app}/{function}``.

The paths of Cerebrium's Cortex: a client written for a deployed function works by
changing only its base URL. The project id is accepted as is (any value).

``POST /v4/{project_id}/{app}/{function}``
    The JSON body (an object; an empty body means no arguments) gives the keyword
    arguments of ``function`` in app ``app`` (see ``runnel.backends.python``). Answers
    ``200 {"run_id", "run_time_ms", "result"}``; ``X-Request-Id`` carries the run id
    (a uuid4 in hex, made here for every call; a client's own X-Request-Id is not
    used). A function picks its status by returning a dict with an int
    ``"status_code"``: the rest of the dict is the result. A generator streams when
    the client's ``Accept`` names a stream framing (``text/event-stream``: one
    ``data:`` event per value, strings as they are, anything else as JSON;
    ``application/x-ndjson`` works too); otherwise its values are collected into
    ``result`` as a list. For a model app (one with ``generate()``, e.g. echo or
    ctranslate2) the function ``run`` is chat completions: the body is an OpenAI chat
    request and ``result`` the chat completion (or the OpenAI stream when
    ``"stream": true``).

``POST /v4/{project_id}/{app}/{function}/chat/completions``, ``.../completions``, ``.../embedding(s)``
and ``GET .../models``
    So the openai SDK works with ``base_url=".../v4/{project_id}/{app}/{function}"``
    (``models`` lists a model app's card, and nothing for a python app).
    For a python app the OpenAI request body is the function's keyword arguments
    (e.g. ``def run(messages, model=None, stream=False, **kwargs)``) and its result is
    the body as is; with ``"stream": true`` and a generator, each yielded chunk is one
    SSE event and the stream ends with ``data: [DONE]`` (a generator called without
    ``stream`` has its chunks merged into one ``chat.completion``). For a model app
    these are the OpenAI surface's own chat completions and embeddings, whatever the
    function name.

``POST /v4/{project_id}/{app}/{function}?async=true[&webhookEndpoint=URL]``
    An async run: the arguments are checked (404 / 422 as for a sync call), the run is
    recorded durably (``runnel.runs``), and the answer is ``202 {"run_id"}``; the function
    then runs in the background, a generator's values collected into a list. For a model
    app the function is ``run`` and the body an OpenAI chat request, checked as the sync
    call checks it (400 naming the parameter) before it is recorded; it runs through the
    OpenAI surface's own handler (``runnel.surfaces.openai.runs``): ``result`` is the chat
    completion, or with ``"stream": true`` the list of its chunks; an error answer fails
    the run with that error. ``webhookEndpoint`` (implies ``async``) is where the
    finished run is POSTed (see ``runnel.runs.webhooks``); its host must be in ``[server]
    webhook_allowed_hosts``, else 400 and nothing is recorded. Past ``[server]
    runs_max_queued`` queued runs: 429 with ``Retry-After``. An ``Idempotency-Key``
    header makes a retry safe: the same key with the same arguments and webhook, from
    the same principal to the same function, answers the first request's 202 with its
    run id (while the run is kept); with anything else different it is a 422. An
    ``X-Request-Deadline: <seconds>`` header (``runnel.deadlines``) is the run's deadline: a
    run not started by then never runs, and ends ``timed_out`` (code ``deadline_exceeded``).

``GET /v4/{project_id}/{app}/runs/{run_id}``
    ``{"run_id", "status"}``, status one of ``queued``, ``running``, ``succeeded``,
    ``failed``, ``cancelled``; once done, plus what the sync call would have answered:
    ``"status_code"`` (its HTTP status) and ``"run_time_ms"`` and ``"result"``, or
    ``"error"``. This is also the webhook's body. Unknown, expired (older than
    ``[server] runs_retention``) and other apps' runs are 404, and so is a run another
    principal submitted (``runnel.auth.Principal.identity``: with JWT auth the token's
    project and subject, with API keys the key). With ``[apps.NAME.functions]
    idempotent = true`` a run a crash interrupted is run again at the next start,
    instead of failing with code ``interrupted``.

Errors, everywhere under /v4, are ``{"error": {message, type, param, code}, "run_id"}``
(the OpenAI envelope plus the run id); an exception in a function is a 500 whose
message is the exception's; mid-stream it becomes the stream's last event. A sync
function's call waits for one of its app's threads; past ``[apps.NAME] max_queue``
waiting calls it is a 429 with ``Retry-After`` (``runnel.backends.python``).

Authentication per app: ``[apps.NAME.functions] public = true`` lets anyone call the
app's /v4 routes (as a platform's "auth off" switch does). The routes' policy says
so to the dispatcher, which authenticates every other app (and unknown app names,
so a caller without credentials cannot tell which apps exist). Each call's run id
is made before authentication (the route's ``prepare``), so every error, a 401
included, carries it.
"""

from __future__ import annotations

import logging
import time
import uuid

import orjson

from ..backends.python import FunctionStream, is_function_app
from ..deadlines import unix_deadline
from ..errors import HTTPError
from ..hookspecs import hookimpl
from ..http import Response, json_response
from ..http.response import JSON
from ..runs import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, TIMED_OUT, RunView, check_target, idempotency_of
from .openai import NO_CACHE, OpenAIAPI, can_embed, is_model_app, offline
from .openai import SSE as OPENAI_SSE
from .openai.runs import OpenAIRuns

logger = logging.getLogger("runnel.cortex")  # the name operators filter on: kept as it was

MODEL_FUNCTION = "run"  # a model app's function: chat completions
SURFACE = "cortex"  # the runs this surface submits (the name stored with them: kept as it was)
MODEL_SURFACE = "cortex-openai"  # its async runs of model apps: OpenAI bodies (runnel.surfaces.openai.runs)
CHAT_ROUTE = "/v1/chat/completions"  # what a model app's function MODEL_FUNCTION is
RUN_STATUS = {QUEUED: "queued", RUNNING: "running", SUCCEEDED: "succeeded", FAILED: "failed",
              CANCELLED: "cancelled", TIMED_OUT: "failed"}
_TRUE, _FALSE = ("true", "1", "yes", ""), ("false", "0", "no")  # a bare ?async is true


class FunctionEndpoints:
    def __init__(self, server) -> None:
        self.server = server
        self.openai = OpenAIAPI.of(server)
        self.public: set[str] = set()
        self.runs = server.runs
        self.runs.add_view(FunctionRuns())
        self.runs.add_view(ModelRuns(self.openai))
        config = server.config
        for name, app_config in config.apps.items():
            table = config.table(f"apps.{name}.functions", app_config.surfaces.get("functions", {}))
            if table.get("public", bool, default=False):
                self.public.add(name)
            if table.get("idempotent", bool, default=False):
                self.runs.idempotent.add(name)
            table.finish()

    # -- handlers --------------------------------------------------------------------
    async def call(self, request):
        return await self._run(request, self._call)

    async def chat(self, request):
        return await self._run(request, self._chat)

    async def embedding(self, request):
        return await self._run(request, self._embedding)

    async def completions(self, request):
        return await self._run(request, self._completions)

    async def models(self, request):
        """``client.models.list()`` with the function's base URL: a model app's card; none otherwise."""
        name, app = self._app(request)
        data = []
        if is_model_app(app) or can_embed(app):
            data.append(self.openai.model_card(app, name))
        return json_response({"object": "list", "data": data})

    async def _run(self, request, handler):
        started = time.perf_counter()
        name, app = self._app(request)
        try:
            return await handler(request, name, app, request.request_id, started)
        except HTTPError:
            raise
        except Exception as exc:
            function = request.path_params["function"]
            logger.exception("function %r of app %r failed (run %s)", function, name, request.request_id)
            raise HTTPError(500, f"Function '{function}' failed: {type(exc).__name__}: {exc}",
                            code="function_error") from None

    async def run_status(self, request):
        run_id = request.path_params["run_id"]
        name = request.path_params["app"]
        run = await self.runs.find(run_id, surface=(SURFACE, MODEL_SURFACE), app=name,
                                   principal=request.principal.identity)
        if run is None:
            raise HTTPError(404, f"No run '{run_id}' in app '{name}' (unknown, or finished and expired)",
                            param="run_id", code="run_not_found")
        return json_response(FunctionRuns.render(run))

    # -- the routes' policy ------------------------------------------------------------
    def is_public(self, request) -> bool:
        return request.path_params["app"] in self.public

    @staticmethod
    def new_run(request) -> None:
        """Every call is a run with its own id, sent back as X-Request-Id (a client's own is not used)."""
        request.request_id = uuid.uuid4().hex

    @staticmethod
    def error_body(request, error: HTTPError) -> dict:
        """OpenAI's envelope plus the run id: the call's own, or the one a status request names."""
        return {**error.to_dict(), "run_id": request.path_params.get("run_id") or request.request_id}

    async def _call(self, request, name, app, run_id, started):
        function = request.path_params["function"]
        background, webhook = self._background(request)
        if background:
            return await self._submit(request, name, app, function, run_id, webhook)
        if is_function_app(app):
            result = await app.invoke(function, await self._arguments(request), run_id)
            if isinstance(result, FunctionStream):
                framing = self.server.negotiator.named(request)
                if framing is not None:
                    return await self._stream(request, result, framing)
                result = await _collect(result)
            return self._result(result, function, run_id, started)
        if is_model_app(app) and function == MODEL_FUNCTION:
            response = await self.openai.chat(request, self.openai.app_by_name(name))
            if response is None:  # streamed
                return None
            return self._result(orjson.loads(response.body), function, run_id, started)
        raise _no_function(name, function)

    async def _chat(self, request, name, app, run_id, started):
        self._no_background(request)
        if is_function_app(app):
            function = request.path_params["function"]
            arguments = await self._arguments(request)
            result = await app.invoke(function, arguments, run_id)
            if isinstance(result, FunctionStream):
                if arguments.get("stream") is True:
                    return await self._stream(request, result, OPENAI_SSE)
                result = merge_chat_chunks(await _collect(result))
            return _body(result, function)
        if is_model_app(app):
            return await self.openai.chat(request, self.openai.app_by_name(name))
        raise _no_function(name, request.path_params["function"])

    async def _completions(self, request, name, app, run_id, started):
        self._no_background(request)
        if is_function_app(app):
            return await self._collected(request, app, run_id)
        if is_model_app(app):
            return await self.openai.completions(request, self.openai.app_by_name(name))
        raise _no_function(name, request.path_params["function"])

    async def _collected(self, request, app, run_id):
        """A python app's function called with the OpenAI body as its arguments; its result is the body."""
        function = request.path_params["function"]
        result = await app.invoke(function, await self._arguments(request), run_id)
        if isinstance(result, FunctionStream):
            result = await _collect(result)
        return _body(result, function)

    async def _embedding(self, request, name, app, run_id, started):
        self._no_background(request)
        if is_function_app(app):
            return await self._collected(request, app, run_id)
        if can_embed(app):
            return await self.openai.embeddings(request, self.openai.app_by_name(name, need=can_embed))
        if is_model_app(app):
            # Let the OpenAI surface say it in its words: this model does not embed.
            self.openai.app_by_name(name, need=can_embed)
        raise _no_function(name, request.path_params["function"])

    # -- async runs ------------------------------------------------------------------
    @staticmethod
    def _background(request) -> tuple[bool, str | None]:
        """Whether the call is to run in the background, and the webhook URL if one is given."""
        flag = request.query_param("async")
        webhook = request.query_param("webhookEndpoint")
        wanted = None
        if flag is not None:
            if flag.lower() not in _TRUE + _FALSE:
                raise HTTPError(400, f"async must be true or false, got {flag!r}", param="async",
                                code="invalid_async")
            wanted = flag.lower() in _TRUE
        if webhook is not None:
            if wanted is False:
                raise HTTPError(400, "webhookEndpoint needs an async run; drop async=false",
                                param="webhookEndpoint", code="invalid_async")
            wanted = True
        return bool(wanted), webhook

    def _no_background(self, request) -> None:
        if self._background(request)[0]:
            raise HTTPError(400, "Async runs are for POST /v4/{project_id}/{app}/{function} only",
                            param="async", code="async_not_supported")

    async def _submit(self, request, name, app, function, run_id, webhook):
        """Check the call as a sync one would be, record the run, answer 202."""
        arguments = await self._arguments(request)
        surface, runs_function = SURFACE, function
        if is_function_app(app):
            app.function(function).arguments(arguments, run_id)  # 404 / 422 now, not later in the run
        elif is_model_app(app) and function == MODEL_FUNCTION:
            offline.check(self.openai, CHAT_ROUTE, arguments)  # 400 now, not later in the run
            surface, runs_function = MODEL_SURFACE, CHAT_ROUTE
        else:
            raise _no_function(name, function)
        if webhook is not None:
            try:
                check_target(webhook, self.runs.allowed_hosts)
            except ValueError as exc:
                raise HTTPError(400, str(exc), param="webhookEndpoint", code="webhook_not_allowed") from None
        idempotency = idempotency_of(request, f"{SURFACE}/{name}/{function}", [arguments, webhook])
        run = await self.runs.submit(surface, name, runs_function, arguments, principal=request.principal.identity,
                                     run_id=run_id, webhook=webhook, idempotency=idempotency,
                                     deadline=unix_deadline(request))
        request.request_id = run.id  # a retry's answer is the first one's, X-Request-Id too
        return json_response({"run_id": run.id}, status=202)

    # -- pieces ----------------------------------------------------------------------
    def _app(self, request):
        """The app: 404 unknown, 503 not ready."""
        name = request.path_params["app"]
        app = self.server.apps.get(name)
        if app is None:
            state = self.server.apps.state(name)
            if state is None:
                raise HTTPError(404, f"No app '{name}'", param="app", code="app_not_found")
            raise HTTPError(503, f"App '{name}' is {state}; try again shortly.", code="app_not_ready",
                            headers=((b"retry-after", b"1"),))
        return name, app

    @staticmethod
    async def _arguments(request) -> dict:
        body = await request.body()
        if not body.strip():
            return {}
        arguments = await request.json()
        if type(arguments) is not dict:
            raise HTTPError(400, "The request body must be a JSON object whose keys are the function's arguments",
                            code="invalid_body")
        return arguments

    @staticmethod
    def _result(result, function: str, run_id: str, started: float) -> Response:
        status, result = split_status(result, function)
        elapsed = int((time.perf_counter() - started) * 1000)
        try:
            body = orjson.dumps({"run_id": run_id, "run_time_ms": elapsed, "result": result},
                                option=orjson.OPT_SERIALIZE_NUMPY)
        except orjson.JSONEncodeError as exc:
            raise _not_serializable(function, exc) from None
        return Response(status, body, media_type=JSON)

    @staticmethod
    async def _stream(request, values: FunctionStream, framing):
        """Each value as one event, holding back while the client reads slowly. An error
        mid-way propagates: the dispatcher makes it the stream's last event."""
        try:
            stream = request.stream(serializer=framing, headers=NO_CACHE)
            try:
                async for value in values:
                    if stream.closed:
                        return None
                    stream.send(value)
                    if stream.paused:
                        await stream.drain()
            except Exception:
                if stream.closed:  # the client has gone (drain raised): nothing to tell
                    return None
                raise
            stream.end()
            return None
        finally:
            await values.aclose()  # stops the function if we stopped early


def split_status(result, function: str) -> tuple[int, object]:
    """A function's HTTP status and the result to send: a dict with an int ``"status_code"``
    picks the status (the rest of the dict is the result); anything else is 200 as it is.
    HTTPError 500 for a status outside 200-599. The one place this rule lives, for sync
    calls, async runs (checked when they finish) and their rendering."""
    if type(result) is dict and type(result.get("status_code")) is int:
        result = dict(result)
        status = result.pop("status_code")
        if not 200 <= status <= 599:
            raise HTTPError(500, f"Function '{function}' returned an invalid status_code {status}",
                            code="invalid_status_code")
        return status, result
    return 200, result


class FunctionRuns(RunView):
    """Async runs of the /v4 routes: called with the body's keys as arguments."""

    name = SURFACE

    def check(self, run, result):
        split_status(result, run.function)  # fails the run now, as the sync call would
        return result

    @staticmethod
    def render(run) -> dict:
        """``{"run_id", "status"}``, plus, once done, what the sync call would have answered."""
        body = {"run_id": run.id, "status": RUN_STATUS[run.state]}
        if run.state == SUCCEEDED:
            status, result = split_status(run.output, run.function)  # checked when it finished
            body.update(status_code=status, run_time_ms=run.run_time_ms or 0, result=result)
        elif run.error is not None:
            error = dict(run.error)
            body.update(status_code=error.pop("status"), error=error)
        return body


class ModelRuns(OpenAIRuns):
    """Async runs of a model app's ``run``: an OpenAI chat body, shown as a function's run is."""

    name = MODEL_SURFACE
    render = staticmethod(FunctionRuns.render)


async def _collect(values: FunctionStream) -> list:
    try:
        return [value async for value in values]
    finally:
        await values.aclose()


def _body(result, function: str) -> Response:
    try:
        return Response(200, orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY), media_type=JSON)
    except orjson.JSONEncodeError as exc:
        raise _not_serializable(function, exc) from None


def _not_serializable(function: str, exc: Exception) -> HTTPError:
    # orjson names the type: "Type is not JSON serializable: set".
    return HTTPError(500, f"The result of function '{function}' cannot be sent as JSON: {exc}",
                     code="result_not_serializable")


def _no_function(app: str, function: str) -> HTTPError:
    return HTTPError(404, f"No function '{function}' in app '{app}'", param="function", code="function_not_found")


def merge_chat_chunks(chunks: list):
    """``chat.completion.chunk`` dicts merged into one ``chat.completion`` (content only);
    anything else is returned as it is."""
    if not chunks or not all(type(chunk) is dict and type(chunk.get("choices")) is list for chunk in chunks):
        return chunks
    choices: dict[int, dict] = {}
    usage = None
    for chunk in chunks:
        for choice in chunk["choices"]:
            if type(choice) is not dict:
                continue
            index = choice.get("index", 0)
            merged = choices.setdefault(index, {"index": index, "message": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None})
            delta = choice.get("delta") or {}
            if delta.get("role"):
                merged["message"]["role"] = delta["role"]
            if delta.get("content"):
                merged["message"]["content"] += delta["content"]
            if choice.get("finish_reason"):
                merged["finish_reason"] = choice["finish_reason"]
        if chunk.get("usage"):
            usage = chunk["usage"]
    first = chunks[0]
    body = {"id": first.get("id"), "object": "chat.completion", "created": first.get("created"),
            "model": first.get("model"), "choices": [choices[index] for index in sorted(choices)]}
    if usage is not None:
        body["usage"] = usage
    return body


@hookimpl
def runnel_register_routes(register, server):
    endpoints = FunctionEndpoints(server)
    call = dict(public=endpoints.is_public, errors=endpoints.error_body, prepare=endpoints.new_run)
    register("POST", "/v4/{project_id}/{app}/{function}", endpoints.call, **call)
    register("POST", "/v4/{project_id}/{app}/{function}/chat/completions", endpoints.chat, **call)
    register("POST", "/v4/{project_id}/{app}/{function}/embedding", endpoints.embedding, **call)
    register("POST", "/v4/{project_id}/{app}/{function}/embeddings", endpoints.embedding, **call)
    register("POST", "/v4/{project_id}/{app}/{function}/completions", endpoints.completions, **call)
    register("GET", "/v4/{project_id}/{app}/runs/{run_id}", endpoints.run_status, public=endpoints.is_public,
             errors=endpoints.error_body)
    # After runs/{run_id}, which keeps .../runs/models: a function named "runs" lists no models.
    register("GET", "/v4/{project_id}/{app}/{function}/models", endpoints.models, public=endpoints.is_public,
             errors=endpoints.error_body)
