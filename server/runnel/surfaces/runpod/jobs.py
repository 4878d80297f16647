"""RunPod's serverless job API, ``/v2/{endpoint_id}/...``, for python function apps and model apps.

A client written for a RunPod queue endpoint works by changing only its base URL.
Each python function app is an endpoint (``[apps.NAME.runpod] endpoint_id``, default
the app's name) whose jobs call one of its functions (``[apps.NAME.runpod] handler``,
default ``"handler"``). Jobs are runs in the server's run store (``runnel.runs``),
the same one ``/v4 ...?async=true`` uses: durable, recovered after a crash, purged
after ``[server] runs_retention``.

    POST /v2/{id}/run           {"input": ..., "webhook"?: URL,
                                 "policy"?: {"executionTimeout": ms, "ttl": ms, "lowPriority": bool}}
                                -> {"id", "status": "IN_QUEUE"}
    POST /v2/{id}/runsync       the same, then waits up to [server] runsync_timeout
                                (or ``?wait=`` ms, 1000 to 300000, as RunPod) -> the job's status
    GET  /v2/{id}/status/{job}  -> {"id", "status", "output"?, "error"?, "delayTime", "executionTime"}
    GET  /v2/{id}/stream/{job}  -> {"status", "stream": [{"output": value}, ...]}: what a
                                   generator handler yielded since the previous call
    POST /v2/{id}/cancel/{job}  -> {"id", "status"}
    POST /v2/{id}/retry/{job}   -> {"id", "status": "IN_QUEUE"}: a FAILED or TIMED_OUT job queued
                                   again, same id and input, its previous output gone (RunPod's
                                   semantics); any other job is a 409 saying its status
    POST /v2/{id}/purge-queue   -> {"removed": n, "status": "completed"}: the caller's queued jobs
                                   are cancelled; running ones go on
    GET  /v2/{id}/health        -> {"jobs": {"completed", "failed", "inProgress", "inQueue",
                                   "retried"}, "workers": {"idle", "running"}}

States: ``IN_QUEUE``, ``IN_PROGRESS``, ``COMPLETED``, ``FAILED``, ``CANCELLED``,
``TIMED_OUT`` (past ``policy.executionTimeout``, counted from the job's start; or still
queued ``policy.ttl`` ms after it was submitted: then it never runs, and its error says
so, code ``deadline_exceeded``). ``ttl`` is RunPod's, 10 s to 7 days: RunPod documents it
as the time a job may wait in the queue (its newer docs: the job's whole life, after
which RunPod deletes it even while running); here it bounds the wait only, and a job that
started in time runs under ``executionTimeout``. ``lowPriority`` (a bool) keeps a RunPod
job from scaling workers up; runnel has no autoscaling, so it changes nothing here. An
``X-Request-Deadline: <seconds>`` header sets the same queue deadline as ``ttl`` (the
earlier of the two applies), with no lower bound.

A handler whose only parameter is ``job`` (or ``event``) gets RunPod's job dict,
``{"id", "input"}``; any other function gets the input's keys as keyword arguments.
A generator handler's values are its output, as a list. A handler that returns a
dict with an ``"error"`` key fails its job, as RunPod's SDK has it. Cancelling a
queued job means it never runs; a running async handler is cancelled; a running
sync handler cannot be stopped (it runs in a thread) and its result is discarded.

A job belongs to the principal that submitted it (``runnel.auth.Principal.identity``:
the API key, or the JWT's project and subject): ``/status``, ``/stream`` and ``/cancel``
answer 404 to anyone else, as for an unknown job. Past ``[server] runs_max_queued``
queued runs, ``/run`` and ``/runsync`` answer 429 with ``Retry-After``. An
``Idempotency-Key`` header makes them safe to retry: the same key with the same body,
from the same principal to the same route, gets the first request's job (``/run``
answers ``IN_QUEUE`` again, ``/runsync`` waits for that job); a different body is a 422.

Model apps (echo, ctranslate2) take worker-vllm's job inputs (``model_jobs.py``: the
input shapes, and the outputs matched to worker-vllm's); besides, they keep
``/v2/{id}/openai/v1/...`` (``openai.py`` here). Their jobs are runs too, of their own
surface (``MODEL_SURFACE``), with the same routes, states, policy and ownership.
Errors are ``{"error": "<message>"}``. Routes are authenticated like the rest.
"""

from __future__ import annotations

import time

import orjson

from ...backends.python import is_function_app
from ...deadlines import unix_deadline
from ...errors import HTTPError
from ...http import json_response
from ...runs import (
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
from ..openai import OpenAIAPI
from .config import RunPodEndpoint
from .model_jobs import MODEL_SURFACE, RunPodModelJobs, check_job, model_job
from .openai import check_model, reply_options

SURFACE = "runpod"
STATUS = {QUEUED: "IN_QUEUE", RUNNING: "IN_PROGRESS", SUCCEEDED: "COMPLETED", FAILED: "FAILED",
          CANCELLED: "CANCELLED", TIMED_OUT: "TIMED_OUT"}
JOB_PARAMETERS = (frozenset(("job",)), frozenset(("event",)))
# RunPod's bounds for /runsync?wait= (milliseconds).
MIN_RUNSYNC_WAIT_MS, MAX_RUNSYNC_WAIT_MS = 1000, 300_000
# RunPod's bounds for policy.ttl (milliseconds): at least 10 s, at most a week.
MIN_TTL_MS, MAX_TTL_MS = 10_000, 7 * 24 * 3600 * 1000


class RunPodJobs(RunView):
    """How a job calls its handler, and how RunPod shows a job."""

    name = SURFACE

    def arguments(self, app, run) -> dict:
        function = app.function(run.function)
        if function.parameters in JOB_PARAMETERS and not function.var_keyword:
            (parameter,) = function.parameters
            return {parameter: {"id": run.id, "input": run.input}}
        if type(run.input) is not dict:
            raise HTTPError(422, f"The input must be an object whose keys are the arguments of '{run.function}'",
                            param="input", code="invalid_input")
        return dict(run.input)  # checked against the signature by invoke (422 fails the job)

    def check(self, run, result):
        if type(result) is dict and "error" in result:
            error = result["error"]
            raise HTTPError(500, error if type(error) is str else orjson.dumps(error).decode(), code="handler_error")
        return result

    @staticmethod
    def render(run) -> dict:
        body = {"id": run.id, "status": STATUS[run.state]}
        if run.state == SUCCEEDED:
            body["output"] = run.output
        elif run.error is not None:
            body["error"] = run.error["message"]
        now = time.time()
        body["delayTime"] = _ms((run.started_at or run.finished_at or now) - run.created_at)
        body["executionTime"] = _ms((run.finished_at or now) - run.started_at) if run.started_at else 0
        return body


def _ms(seconds: float) -> int:
    return max(0, int(seconds * 1000))


class StreamCursors:
    """How many of each job's values ``/stream`` has handed out, so each call returns
    only what is new. RunPod's cursor, kept here: the runner only offers a running
    generator's values so far. Entries untouched for ``retention`` seconds (the job
    has expired by then) are dropped."""

    def __init__(self, retention: float) -> None:
        self.retention = retention
        self._seen: dict[str, tuple[int, float]] = {}  # job id -> (values handed out, when)
        self._pruned = time.monotonic()

    def forget(self, run_id: str) -> None:
        """The job runs again (``/retry``): its values start anew."""
        self._seen.pop(run_id, None)

    def take(self, run: Run, so_far: list | None) -> list:
        """The values of ``run`` not handed out before: ``so_far`` (a running generator's
        values), or once the job is done its recorded values (a non-generator's output)."""
        values = so_far
        if values is None:
            if not run.done:
                return []  # not started, or finishing right now: the next call has them
            if run.streamed and type(run.output) is list:
                values = run.output
            else:
                values = [run.output] if run.state == SUCCEEDED else []
        now = time.monotonic()
        if now - self._pruned > min(max(self.retention / 2, 0.05), 60.0):
            self._pruned = now
            self._seen = {key: value for key, value in self._seen.items() if value[1] >= now - self.retention}
        seen = self._seen.get(run.id, (0, 0.0))[0]
        self._seen[run.id] = (max(seen, len(values)), now)
        return values[seen:]


def render_error(request, error: HTTPError) -> dict:
    return {"error": error.message}


class RunPodJobAPI:
    def __init__(self, server, endpoints: dict[str, RunPodEndpoint]) -> None:
        self.apps = server.apps
        self.runs = server.runs
        self.runs.add_view(RunPodJobs())
        self.openai = OpenAIAPI.of(server)
        self.replies = {endpoint.app: reply_options(endpoint) for endpoint in endpoints.values()}
        self.runs.add_view(RunPodModelJobs(self.openai, self.replies, RunPodJobs.render))
        self.cursors = StreamCursors(server.config.server.runs_retention)
        self.runsync_timeout = server.config.server.runsync_timeout
        # endpoint id -> (app, handler, surface); a model app's handler is None.
        self.endpoints: dict[str, tuple[str, str | None, str]] = {}
        apps = dict(server.apps.items())
        for endpoint_id, endpoint in endpoints.items():
            if is_function_app(apps.get(endpoint.app)):
                self.endpoints[endpoint_id] = (endpoint.app, endpoint.handler, SURFACE)
            else:
                self.endpoints[endpoint_id] = (endpoint.app, None, MODEL_SURFACE)

    def _endpoint(self, request) -> tuple[str, str | None, str]:
        endpoint_id = request.path_params["endpoint_id"]
        found = self.endpoints.get(endpoint_id)
        if found is None:
            raise HTTPError(404, f"No endpoint {endpoint_id!r}", code="endpoint_not_found")
        return found

    async def _job(self, request):
        name, _, surface = self._endpoint(request)
        job_id = request.path_params["job_id"]
        run = await self.runs.find(job_id, surface=surface, app=name, principal=request.principal.identity)
        if run is None:
            raise HTTPError(404, f"No job {job_id!r} on this endpoint (unknown, or finished and expired)",
                            code="job_not_found")
        return run

    async def _submit(self, request, route: str):
        name, handler, surface = self._endpoint(request)
        body = await request.json()
        if type(body) is not dict or "input" not in body:
            raise HTTPError(400, 'The request body must be a JSON object with the job\'s "input"',
                            param="input", code="invalid_body")
        policy = body.get("policy", {})
        if type(policy) is not dict:
            raise HTTPError(400, '"policy" must be an object', param="policy", code="invalid_body")
        timeout = policy.get("executionTimeout")
        if timeout is not None and (type(timeout) is not int or timeout <= 0):
            raise HTTPError(400, '"policy.executionTimeout" must be a positive integer (milliseconds)',
                            param="policy.executionTimeout", code="invalid_body")
        ttl = policy.get("ttl")
        if ttl is not None and (type(ttl) is not int or not MIN_TTL_MS <= ttl <= MAX_TTL_MS):
            raise HTTPError(400, f'"policy.ttl" must be an integer of milliseconds from {MIN_TTL_MS} to {MAX_TTL_MS}',
                            param="policy.ttl", code="invalid_body")
        if type(policy.get("lowPriority", False)) is not bool:
            raise HTTPError(400, '"policy.lowPriority" must be true or false', param="policy.lowPriority",
                            code="invalid_body")
        webhook = body.get("webhook")
        if webhook is not None:
            try:
                check_target(webhook, self.runs.allowed_hosts)
            except ValueError as exc:
                raise HTTPError(400, str(exc), param="webhook", code="webhook_not_allowed") from None
        state = self.apps.state(name)
        if state == "failed":
            raise HTTPError(503, f"The app of endpoint {request.path_params['endpoint_id']!r} failed to start",
                            code="app_not_ready")
        app = self.apps.get(name)
        if handler is None:  # a model app: its input is a request, checked now (400), not when it runs
            job = model_job(body["input"])
            check_job(self.openai, job)
            if app is not None:  # loading: checked when it runs
                check_model(job.body, app, self.replies[name], param="input.openai_input.model")
            function = job.route
        elif app is not None and handler not in app.functions:  # loading: jobs wait, as on a cold endpoint
            raise HTTPError(404, f"App '{name}' has no function '{handler}' to run jobs with "
                            f"(set [apps.{name}.runpod] handler)", code="handler_not_found")
        else:
            function = handler
        idempotency = idempotency_of(request, f"{SURFACE}/{name}/{handler or 'model'}/{route}", body)
        # The earlier of policy.ttl (counted from the submission) and an X-Request-Deadline header.
        deadlines = [d for d in (unix_deadline(request), None if ttl is None else time.time() + ttl / 1000)
                     if d is not None]
        deadline = min(deadlines) if deadlines else None
        return await self.runs.submit(surface, name, function, body["input"], principal=request.principal.identity,
                                      webhook=webhook, timeout_ms=timeout, idempotency=idempotency,
                                      deadline=deadline)

    # -- handlers --------------------------------------------------------------------
    async def run(self, request):
        run = await self._submit(request, "run")
        # What the first request was answered, for a retry too (the job was queued then).
        return json_response({"id": run.id, "status": STATUS[QUEUED]})

    async def runsync(self, request):
        timeout = self._runsync_wait(request)  # checked first: a bad value submits nothing
        run = await self._submit(request, "runsync")
        return json_response(RunPodJobs.render(await self.runs.wait(run.id, timeout) or run))

    def _runsync_wait(self, request) -> float:
        """Seconds ``/runsync`` waits: RunPod's ``?wait=`` (milliseconds), else the configured default."""
        wait = request.query_param("wait")
        if wait is None:
            return self.runsync_timeout
        if not wait.isdigit() or not MIN_RUNSYNC_WAIT_MS <= int(wait) <= MAX_RUNSYNC_WAIT_MS:
            raise HTTPError(400, f"'wait' must be milliseconds between {MIN_RUNSYNC_WAIT_MS} and "
                            f"{MAX_RUNSYNC_WAIT_MS}, not {wait[:20]!r}", param="wait")
        return int(wait) / 1000

    async def status(self, request):
        return json_response(RunPodJobs.render(await self._job(request)))

    async def stream(self, request):
        run = await self._job(request)
        values = self.cursors.take(run, await self.runs.values_so_far(run.id))
        body = {"status": STATUS[run.state], "stream": [{"output": value} for value in values]}
        if run.error is not None:
            body["error"] = run.error["message"]
        return json_response(body)

    async def cancel(self, request):
        run = await self._job(request)
        run = await self.runs.cancel(run.id) or run
        return json_response({"id": run.id, "status": STATUS[run.state]})

    async def retry(self, request):
        """RunPod's ``/retry``: a FAILED or TIMED_OUT job queued again under its id, with its input."""
        run = await self._job(request)
        if not await self.runs.retry(run.id):
            run = await self._job(request)  # as it is now
            raise HTTPError(409, f"Job {run.id!r} is {STATUS[run.state]}: only a FAILED or TIMED_OUT job "
                            "can be retried", code="job_not_retryable")
        self.cursors.forget(run.id)
        return json_response({"id": run.id, "status": STATUS[QUEUED]})

    async def purge_queue(self, request):
        """RunPod's ``/purge-queue``: the caller's jobs still queued on this endpoint are
        cancelled (they never run); running ones go on."""
        name, _, surface = self._endpoint(request)
        removed = await self.runs.purge_queue(surface=surface, app=name, principal=request.principal.identity)
        return json_response({"removed": removed, "status": "completed"})

    async def health(self, request):
        name, _, surface = self._endpoint(request)
        counts = await self.runs.counts(name, surface)
        busy = self.runs.busy
        return json_response({
            "jobs": {"completed": counts[SUCCEEDED], "failed": counts[FAILED] + counts[TIMED_OUT],
                     "inProgress": counts[RUNNING], "inQueue": counts[QUEUED], "retried": counts["retried"]},
            "workers": {"idle": max(0, self.runs.workers - busy), "running": busy},
        })


def register_routes(register, server, endpoints: dict[str, RunPodEndpoint]) -> None:
    api = RunPodJobAPI(server, endpoints)
    # Three segments, or four with a fixed second: none overlaps /v2/{id}/openai/v1/...
    register("POST", "/v2/{endpoint_id}/run", api.run, errors=render_error)
    register("POST", "/v2/{endpoint_id}/runsync", api.runsync, errors=render_error)
    register("GET", "/v2/{endpoint_id}/health", api.health, errors=render_error)
    register("POST", "/v2/{endpoint_id}/purge-queue", api.purge_queue, errors=render_error)
    for method in ("GET", "POST"):
        register(method, "/v2/{endpoint_id}/status/{job_id}", api.status, errors=render_error)
        register(method, "/v2/{endpoint_id}/stream/{job_id}", api.stream, errors=render_error)
    register("POST", "/v2/{endpoint_id}/cancel/{job_id}", api.cancel, errors=render_error)
    register("POST", "/v2/{endpoint_id}/retry/{job_id}", api.retry, errors=render_error)

