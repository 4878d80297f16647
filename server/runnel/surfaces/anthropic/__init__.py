"""Built-in plugin: Anthropic's Messages API, ``POST /v1/messages`` and ``/v1/messages/count_tokens``.

    request.py  a Messages request -> the OpenAI surface's validated request (400s in Anthropic's words)
    sinks.py    Anthropic's SSE framing and the sinks that make a message, streamed or not

Built on the OpenAI surface's pieces, so both follow one set of rules: the app is
chosen by ``OpenAIAPI.app_by_model``, the prompt is the app's chat template, the
limits are ``fit_to_model``'s and the generations run through ``run_generations``.
What differs is the request's names and bounds (``temperature`` is 0-1 here,
``max_tokens`` is required), the answer's shape, Anthropic's SSE events and its
error envelope ``{"type": "error", "error": {"type", "message"}}``.

Tools are runnel.tools' as on the chat surface: ``tools`` (``{"name", "description",
"input_schema"}``) and ``tool_choice`` (auto, any, tool, none) become a ToolUse, the
conversation's ``tool_use`` / ``tool_result`` blocks become assistant tool calls and tool
turns, and the reply's calls come back as ``tool_use`` blocks (streamed: a block per call,
its input as ``input_json_delta`` pieces) with ``stop_reason`` "tool_use".
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from ...errors import HTTPError
from ...hookspecs import hookimpl
from ...http import Response, json_response
from ...http.response import JSON
from ...tools import ToolUse
from ..openai import NO_CACHE, OpenAIAPI
from ..openai.api import chat_prompt_tokens
from ..openai.params import CompletionRequest, fit_to_model
from ..openai.sinks import Usage, run_generations
from .request import COUNT_FIELDS, check_fields, conversation, parse_messages, request_tools
from .sinks import EVENTS, MessageCollector, MessageStream, MessageToolCollector, MessageToolStream, stop_reason

_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error",
                529: "overloaded_error"}


def error_body(request, error: HTTPError) -> dict[str, Any]:
    """An HTTPError in Anthropic's envelope (the route's ``errors`` renderer)."""
    kind = _ERROR_TYPES.get(error.status) or ("api_error" if error.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}

class AnthropicAPI:
    def __init__(self, server) -> None:
        self.openai = OpenAIAPI.of(server)

    def _tool_use(self, app, parsed: CompletionRequest) -> ToolUse | None:
        return self.openai.tool_use(app, parsed.tools, parsed.tool_choice, parsed.parallel_tool_calls)

    async def messages(self, request) -> Response | None:
        parsed, stream = parse_messages(await request.json())
        app = self.openai.app_by_model(parsed.model)
        OpenAIAPI.check_supported(app, parsed)
        assert parsed.messages is not None  # parse_messages makes them
        tool_use = self._tool_use(app, parsed)
        if tool_use is not None:
            tool_use.constrain(parsed.params, app)
        tokens = await chat_prompt_tokens(app, parsed.messages, tool_use=tool_use)
        fit_to_model(parsed, app, len(tokens))
        usage = Usage(len(tokens))
        message = {"id": "msg_" + uuid.uuid4().hex, "type": "message", "role": "assistant", "model": app.model_id}
        if stream:
            sink = MessageStream(usage, message) if tool_use is None else MessageToolStream(usage, message, tool_use)
            opened = lambda: sink.open(request.stream(serializer=EVENTS, headers=NO_CACHE))  # noqa: E731
            await run_generations(app, [tokens], parsed.params, 1, sink, opened, request=request)
            sink.stream.end()
            return None
        collector = MessageCollector(usage) if tool_use is None else MessageToolCollector(usage, tool_use)
        await run_generations(app, [tokens], parsed.params, 1, collector, request=request)
        content = (collector.content() if isinstance(collector, MessageToolCollector)
                   else [{"type": "text", "text": collector.text(0).lstrip()}])
        body = {**message, "content": content,
                "stop_reason": stop_reason(collector.reasons[0], collector.stop_sequence),
                "stop_sequence": collector.stop_sequence,
                "usage": {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens}}
        return Response(200, orjson.dumps(body), media_type=JSON)

    async def count_tokens(self, request) -> Response:
        body = check_fields(await request.json(), COUNT_FIELDS)
        app = self.openai.app_by_model(body["model"])
        tools = request_tools(body)
        tool_use = self.openai.tool_use(app, tools.tools, tools.choice, tools.parallel)
        tokens = await chat_prompt_tokens(app, conversation(body), tool_use=tool_use)
        return json_response({"input_tokens": len(tokens)})


@hookimpl
def runnel_register_routes(register, server):
    api = AnthropicAPI(server)
    register("POST", "/v1/messages", api.messages, errors=error_body)
    register("POST", "/v1/messages/count_tokens", api.count_tokens, errors=error_body)

