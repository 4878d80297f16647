"""OpenAI's Responses API: ``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``,
``POST /v1/responses/{id}/cancel``.

Built on the chat surface's pieces (``OpenAIAPI.app_by_model``, the app's chat template,
``fit_to_model``, ``run_generations``), with the Responses API's own names and shapes.
Stored responses (``store``, the default) and background ones are runs in the server's
run store (``runnel.runs``), of surface ``responses``: a stored response is recorded
finished once generated; a background one is submitted queued, executed by the
Runner (``ResponseRuns.call``), and read back, cancelled or deleted by id. A background
one with ``stream`` too is streamed as it is generated (its run's values are its events)
and resumed by ``GET /v1/responses/{id}?stream=true&starting_after=N``, OpenAI's
resumable stream (``runnel.surfaces.openai.resumable.follow_into`` writes both). Either way
it survives a restart and is kept ``[server] runs_retention`` seconds, for its caller
(principal) only; ``previous_response_id`` continues one: its input and output items
come before the new input (its ``instructions`` do not). Function tools go through
``runnel.tools`` as the chat surface's do (``OpenAIAPI.tool_use``, ``chat_prompt_tokens``);
the calls come back as ``function_call`` output items (``responses_output``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

from ...deadlines import unix_deadline
from ...errors import HTTPError
from ...generation import SamplingParams
from ...http import Response, json_response
from ...http.response import JSON
from ...runs import CANCELLED, QUEUED, RUNNING, SUCCEEDED, TERMINAL, Run
from ...tools import ToolUse, function_tool
from .api import NO_CACHE, OpenAIAPI, chat_prompt_tokens
from .offline import ChunkStream, fill
from .params import (
    MIN_TEMPERATURE,
    MIN_TOP_P,
    CompletionRequest,
    check_range,
    fit_to_model,
    invalid,
    typed_field,
)
from .responses_items import chat_messages, input_items, output_as_input
from .responses_output import EVENTS, ResponseOutput
from .resumable import follow_into, stream_headers, wants_resume_from
from .runs import ModelAppRuns
from .sinks import Usage, run_generations

SURFACE = "responses"
_SERVED = frozenset(("model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream",
                     "store", "background", "previous_response_id", "tools", "tool_choice", "parallel_tool_calls"))
# OpenAI's bookkeeping: accepted, echoed where the response has them, change nothing.
_NO_OPS = frozenset(("metadata", "user", "service_tier", "safety_identifier",
                     "prompt_cache_key", "prompt_cache_retention", "stream_options"))
# Known to the openai SDK, not served: a 400 naming them unless they hold their "off" value.
_UNSUPPORTED = ("include", "reasoning", "text", "truncation", "top_logprobs", "max_tool_calls", "prompt",
                "conversation", "context_management", "background_options", "image", "moderation",
                "access_programs", "prompt_cache_options")
_OFF: tuple[Any, ...] = (None, [], {}, "disabled", {"format": {"type": "text"}})
FIELDS = _SERVED | _NO_OPS | frozenset(_UNSUPPORTED)


def _unsupported(name: str) -> HTTPError:
    return invalid(name, f"'{name}' is not supported by this server.", "unsupported_parameter")


class ResponseRequest:
    """A validated ``POST /v1/responses``: the response's skeleton, the conversation, the sampling."""

    __slots__ = ("model", "items", "instructions", "params", "max_tokens_given", "stream", "store", "background",
                 "previous_response_id", "tools", "tools_shown", "tool_choice", "tool_choice_shown", "parallel")

    def __init__(self, body: dict) -> None:
        for name in _UNSUPPORTED:
            if body.get(name) not in _OFF:
                text = body.get("text")
                if name == "text" and type(text) is dict and set(text) <= {"format", "verbosity"}:
                    raise _unsupported("text.format" if text.get("format") not in (None, {"type": "text"})
                                       else "text.verbosity")
                raise _unsupported(name)
        self.tools, self.tools_shown = _tools(body)
        self.tool_choice, self.tool_choice_shown = _tool_choice(body)
        self.parallel = typed_field(body, "parallel_tool_calls", bool, True)
        self.model = typed_field(body, "model", str)
        if body.get("input") is None:
            raise invalid("input", "Missing required parameter: 'input'.", "missing_required_parameter")
        self.items = input_items(body["input"])
        self.instructions = typed_field(body, "instructions", str)
        max_tokens = typed_field(body, "max_output_tokens", int)
        if max_tokens is not None and max_tokens < 1:
            raise invalid("max_output_tokens", f"Invalid value for 'max_output_tokens': {max_tokens}; it must be "
                          "at least 1.")
        self.max_tokens_given = max_tokens is not None
        self.params = SamplingParams(max_tokens=max_tokens or 1,
                                     temperature=typed_field(body, "temperature", float, 1.0),
                                     top_p=typed_field(body, "top_p", float, 1.0))
        check_range("temperature", self.params.temperature, 0.0, 2.0)
        if 0 < self.params.temperature < MIN_TEMPERATURE:
            raise invalid("temperature", f"Invalid value for 'temperature': {self.params.temperature}; use 0 "
                          f"(greedy) or at least {MIN_TEMPERATURE}.")
        check_range("top_p", self.params.top_p, MIN_TOP_P, 1.0)
        self.stream = typed_field(body, "stream", bool, False)
        self.store = typed_field(body, "store", bool, True)
        self.background = typed_field(body, "background", bool, False)
        if self.background and not self.store:
            raise invalid("background", "Background responses must be stored: 'background' needs 'store' true.")
        if body.get("stream_options") is not None and not self.stream:
            raise invalid("stream_options", "The 'stream_options' parameter is only allowed when 'stream' is enabled.")
        self.previous_response_id = typed_field(body, "previous_response_id", str)
        typed_field(body, "metadata", dict)
        typed_field(body, "user", str)

    def completion(self) -> CompletionRequest:
        """As the chat surface's request, for its checks (``fit_to_model``, the backend's support)."""
        return CompletionRequest(model=self.model, params=self.params, max_tokens_given=self.max_tokens_given)


def _tools(body: dict) -> tuple[list[dict], list[dict]]:
    """Function tools, in runnel.tools' terms and as the response shows them; a built-in
    tool (web_search, file_search, ...) is a 400 naming it."""
    tools = body.get("tools")
    if tools is None:
        return [], []
    if type(tools) is not list:
        raise invalid("tools", "Invalid type for 'tools': expected an array.", "invalid_type")
    internal, shown = [], []
    for index, tool in enumerate(tools):
        param = f"tools[{index}]"
        kind = tool.get("type") if type(tool) is dict else None
        if kind != "function":
            raise invalid(param, f"Tool type {kind!r} is not supported by this server: only function tools are.",
                          "unsupported_parameter")
        strict = typed_field(tool, "strict", bool)  # honoured as far as runnel.tools checks a call
        internal.append(function_tool(tool.get("name"), tool.get("description"), tool.get("parameters"), param))
        shown.append({"type": "function", "name": tool["name"], "description": tool.get("description"),
                      "parameters": tool.get("parameters"), "strict": strict})
    return internal, shown


def _tool_choice(body: dict) -> tuple[str | None, str | dict]:
    """``tool_choice`` in runnel.tools' terms ("none", "auto", "required" or a function's name;
    None: not given), and as the response shows it."""
    choice = body.get("tool_choice")
    if choice is None:
        return None, "auto"
    if choice in ("none", "auto", "required"):
        return choice, choice
    if type(choice) is dict and choice.get("type") == "function":
        if type(choice.get("name")) is not str:
            raise invalid("tool_choice.name", "Missing required parameter: 'tool_choice.name'.",
                          "missing_required_parameter")
        return choice["name"], {"type": "function", "name": choice["name"]}
    raise invalid("tool_choice", "'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', "
                  "'name': ...}: other tool choices are not supported by this server.", "unsupported_parameter")


def fit(app, request: CompletionRequest, tokens: list[int]) -> None:
    """``fit_to_model``, except that no ``max_output_tokens`` means as many as the context
    leaves (the Responses API has no short default), and its errors name it."""
    if not request.max_tokens_given:
        request.params.max_tokens = max(app.context_length - len(tokens), 1)
        request.max_tokens_given = True
    try:
        fit_to_model(request, app, len(tokens))
    except HTTPError as error:
        if error.param == "max_tokens":
            error.param = "max_output_tokens"
        raise


async def generate(app, tokens: list[int], params: SamplingParams, response: dict[str, Any],
                   tool_use: ToolUse | None, request=None) -> dict[str, Any]:
    """One response, not streamed: ``response`` finished, with its output. ``request``: the
    HTTP request it answers, whose metrics record it (a background run has none)."""
    output = ResponseOutput(Usage(len(tokens)), response, tool_use)
    await run_generations(app, [tokens], params, 1, output, lambda: output.open(None), request=request)
    return output.response


class ResponseRuns(ModelAppRuns):
    """Responses as runs: a background one is executed here; every one is shown as a response."""

    name = SURFACE

    async def call(self, app, run: Run) -> dict[str, Any] | ChunkStream:
        """The response; for a streamed background one, its events as they come (the run's
        values: what a client follows, and resumes after a ``sequence_number``)."""
        data = run.input
        tool_use = self.api.tool_use(app, data["tools"], data["tool_choice"], data["parallel"])
        messages = chat_messages(data["response"]["instructions"], data["items"])
        tokens = await chat_prompt_tokens(app, messages, param="input", tool_use=tool_use)
        params = SamplingParams(**data["params"])
        if tool_use is not None:
            tool_use.constrain(params, app)
        if not data.get("stream"):
            return await generate(app, tokens, params, data["response"], tool_use)

        async def events(chunks: ChunkStream) -> None:
            sink = ResponseOutput(Usage(len(tokens)), {**data["response"], "status": "in_progress"}, tool_use)
            try:
                await run_generations(app, [tokens], params, 1, sink, lambda: sink.open(chunks))
            except HTTPError as error:
                if sink.stream is None:  # refused before it started: the run fails with it
                    raise
                sink.fail(error)  # its last event: response.failed

        return fill(events, what="background response")

    def check(self, run: Run, result: Any) -> Any:
        """A streamed response that ended ``response.failed`` fails its run (its events kept)."""
        if type(result) is list and result and _ended(result[-1]) == "response.failed":
            error = result[-1]["response"]["error"]
            raise HTTPError(500, error["message"], code=error["code"])
        return result

    def render(self, run: Run) -> dict[str, Any]:
        if run.state == SUCCEEDED and run.output is not None:
            # A streamed one's output is its events, the last of which holds the response.
            return run.output[-1]["response"] if run.streamed else run.output
        response = run.input["response"]
        if run.state == QUEUED:
            return response
        if run.state == RUNNING:
            return {**response, "status": "in_progress"}
        if run.state == CANCELLED:
            return {**response, "status": "cancelled"}
        error = run.error or {}
        return {**response, "status": "failed",
                "error": {"code": "server_error", "message": error.get("message", "The response failed.")}}


def _ended(event: Any) -> str | None:
    """The type of a response's last event (``response.completed``, ``.incomplete`` or
    ``.failed``: plain dicts, never a token's delta); None for any other event."""
    if type(event) is dict and event.get("type") in ("response.completed", "response.incomplete", "response.failed"):
        return event["type"]
    return None


class ResponsesAPI:
    def __init__(self, server) -> None:
        self.openai = OpenAIAPI.of(server)
        self.runs = server.runs
        self.view = ResponseRuns(self.openai)
        self.runs.add_view(self.view)

    async def _find(self, request, response_id: str, param: str | None = None) -> Run:
        run = await self.runs.find(response_id, surface=SURFACE, app=None, principal=request.principal.identity)
        if run is None:
            if param is not None:
                raise invalid(param, f"Previous response with id '{response_id}' not found.",
                              "previous_response_not_found")
            raise HTTPError(404, f"Response with id '{response_id}' not found.", type="invalid_request_error")
        return run

    async def create(self, request) -> Response | None:
        body = await self.openai.body(request, FIELDS, frozenset())
        parsed = ResponseRequest(body)
        app = self.openai.app_by_model(parsed.model)
        completion = parsed.completion()
        OpenAIAPI.check_supported(app, completion)
        items = parsed.items
        if parsed.previous_response_id is not None:
            previous = await self._find(request, parsed.previous_response_id, "previous_response_id")
            if previous.state != SUCCEEDED:
                raise invalid("previous_response_id", f"Previous response with id '{previous.id}' is "
                              f"{self.view.render(previous)['status']}: only a finished one can be continued.")
            items = previous.input["items"] + output_as_input(self.view.render(previous)["output"]) + items
        tool_use = self.openai.tool_use(app, parsed.tools, parsed.tool_choice, parsed.parallel)
        tokens = await chat_prompt_tokens(app, chat_messages(parsed.instructions, items), param="input",
                                          tool_use=tool_use)
        fit(app, completion, tokens)
        params = parsed.params
        if tool_use is not None:
            tool_use.constrain(params, app)
        response = {
            "id": "resp_" + uuid.uuid4().hex, "object": "response", "created_at": int(time.time()),
            "status": "queued" if parsed.background else "in_progress", "background": parsed.background,
            "completed_at": None, "error": None, "incomplete_details": None, "instructions": parsed.instructions,
            "max_output_tokens": params.max_tokens if parsed.max_tokens_given else None, "model": app.model_id,
            "output": [], "parallel_tool_calls": parsed.parallel,
            "previous_response_id": parsed.previous_response_id, "reasoning": {"effort": None, "summary": None},
            "store": parsed.store, "temperature": params.temperature, "text": {"format": {"type": "text"}},
            "tool_choice": parsed.tool_choice_shown, "tools": parsed.tools_shown, "top_p": params.top_p,
            "truncation": "disabled", "usage": None, "user": body.get("user"), "metadata": body.get("metadata") or {},
        }
        name = self.openai.by_model[app.model_id]
        data = {"response": response, "items": items, "tools": parsed.tools, "tool_choice": parsed.tool_choice,
                "parallel": parsed.parallel, "stream": parsed.background and parsed.stream,
                "params": {"max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p}}
        principal = request.principal.identity
        if parsed.background:
            run = await self.runs.submit(SURFACE, name, "respond", data, principal=principal, run_id=response["id"],
                                         deadline=unix_deadline(request))
            if parsed.stream:  # followed live here; resumed by GET .../{id}?stream=true&starting_after=N
                await follow_into(request, self.runs, run.id, 0, EVENTS, self._stream_headers(run.id), _ended,
                                  opening=True)
                return None
            return json_response(self.view.render(run))
        if parsed.stream:
            sink = ResponseOutput(Usage(len(tokens)), response, tool_use)
            opened = lambda: sink.open(request.stream(serializer=EVENTS, headers=NO_CACHE))  # noqa: E731
            try:
                await run_generations(app, [tokens], params, 1, sink, opened, request=request)
            except HTTPError as error:
                if sink.stream is None:  # refused before the stream started: a plain error status
                    raise
                sink.fail(error)  # the stream's last event: response.failed
                sink.stream.end()
                return None
            if parsed.store:  # before the stream ends: a client that saw it end finds it
                await self._record(name, data, sink.response, principal)
            sink.stream.end()
            return None
        result = await generate(app, tokens, params, response, tool_use, request)
        if parsed.store:
            await self._record(name, data, result, principal)
        return Response(200, orjson.dumps(result), media_type=JSON)

    async def _record(self, app: str, data: dict, result: dict, principal: str) -> None:
        now = time.time()
        await self.runs.record(Run(id=result["id"], surface=SURFACE, app=app, function="respond", input=data,
                                   state=SUCCEEDED, output=result, created_at=result["created_at"], started_at=now,
                                   finished_at=now, principal=principal))

    async def retrieve(self, request) -> Response | None:
        stream = request.query_param("stream", "false")
        if stream not in ("true", "false"):
            raise invalid("stream", f"'stream' must be true or false, not {stream!r}.")
        start_at = wants_resume_from(request) if stream == "true" else 0
        run = await self._find(request, request.path_params["response_id"])
        if stream == "false":
            return json_response(self.view.render(run))
        if not run.input.get("stream"):
            raise invalid("stream", "Only a response created with background=true and stream=true can be streamed.")
        await follow_into(request, self.runs, run.id, start_at, EVENTS, self._stream_headers(run.id), _ended)
        return None

    @staticmethod
    def _stream_headers(response_id: str) -> tuple[tuple[bytes, bytes], ...]:
        return stream_headers(response_id, f"/v1/responses/{response_id}?stream=true")

    async def delete(self, request) -> Response:
        run = await self._find(request, request.path_params["response_id"])
        await self.runs.delete(run.id)
        return json_response({"id": run.id, "object": "response.deleted", "deleted": True})

    async def cancel(self, request) -> Response:
        run = await self._find(request, request.path_params["response_id"])
        if not run.input["response"]["background"]:
            raise invalid(None, "Only responses created with background=true can be cancelled.")
        if run.state not in TERMINAL:
            run = await self.runs.cancel(run.id) or run
        return json_response(self.view.render(run))
