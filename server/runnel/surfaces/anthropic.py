"""Built-in plugin: Anthropic's Messages API, ``POST /v1/messages`` and ``/v1/messages/count_tokens``.

Built on the OpenAI surface's pieces, so both follow one set of rules: the app is
chosen by ``OpenAIAPI.app_by_model``, the prompt is the app's chat template, the
limits are ``fit_to_model``'s and the generations run through ``run_generations``.
What differs is the request's names and bounds (``temperature`` is 0-1 here,
``max_tokens`` is required), the answer's shape, Anthropic's SSE events and its
error envelope ``{"type": "error", "error": {"type", "message"}}``.

Tools (``tools``, ``tool_use`` / ``tool_result`` blocks) are not served yet: a
request with them is a 400 naming them, never silently answered without them.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import orjson

from ..errors import HTTPError
from ..generation import SamplingParams, TokenLogprob
from ..hookspecs import hookimpl
from ..http import Response, json_response
from ..http.response import JSON
from .openai import NO_CACHE, OpenAIAPI, invalid
from .openai.api import chat_prompt_tokens
from .openai.params import (
    MAX_STOP_CHARS,
    MIN_TEMPERATURE,
    MIN_TOP_P,
    CompletionRequest,
    check_range,
    fit_to_model,
    typed_field,
)
from .openai.sinks import Collector, SinkBase, Usage, run_generations

MAX_STOP_SEQUENCES = 16  # each is scanned for at every token: a bound keeps that cheap
# Fields of a Messages request that runnel serves; any other is a 400 naming it.
_FIELDS = frozenset(("model", "messages", "system", "max_tokens", "stop_sequences", "temperature", "top_p",
                     "top_k", "metadata", "stream"))
_COUNT_FIELDS = frozenset(("model", "messages", "system"))
# Known to Anthropic, not served here (yet): named in the 400, as "not supported".
_UNSUPPORTED = ("tools", "tool_choice", "thinking", "container", "mcp_servers", "service_tier")

_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


def error_body(request, error: HTTPError) -> dict[str, Any]:
    """An HTTPError in Anthropic's envelope (the route's ``errors`` renderer)."""
    kind = _ERROR_TYPES.get(error.status) or ("api_error" if error.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


class AnthropicEvents:
    """Anthropic's SSE: ``event: <type>`` then ``data: <json>``. Every payload is a JSON
    object whose first key is its ``type``, which is the event's name, so an encoded
    payload (bytes, the per-token path) carries its own name."""

    media_type = b"text/event-stream"
    end = b""

    def encode(self, event: Any) -> bytes:
        payload = event if type(event) is bytes else orjson.dumps(event)
        # b'{"type":"NAME",...': the name sits between the 9th byte and the next quote.
        return b"event: %b\ndata: %b\n\n" % (payload[9 : payload.index(b'"', 9)], payload)

    def encode_error(self, error: dict[str, Any]) -> bytes:
        return b"event: error\ndata: %b\n\n" % orjson.dumps(error)


EVENTS = AnthropicEvents()


def _bad(param: str, message: str) -> HTTPError:
    return invalid(param, f"{param}: {message}")


def _text(content: Any, param: str) -> str:
    """A string, or text blocks joined; any other block is a 400 naming it."""
    if type(content) is str:
        return content
    if type(content) is not list:
        raise _bad(param, "Input should be a string or a list of content blocks.")
    texts = []
    for index, block in enumerate(content):
        kind = block.get("type") if type(block) is dict else None
        if kind != "text" or type(block.get("text")) is not str:
            what = "Tool use" if kind in ("tool_use", "tool_result") else f"Content block type {kind!r}"
            raise _bad(f"{param}.{index}", f"{what} is not supported by this server: only text blocks are.")
        texts.append(block["text"])
    return "".join(texts)


def _conversation(body: dict) -> list[dict]:
    """``system`` and ``messages`` as chat-template messages; consecutive turns of one
    role are combined into one turn, as Anthropic does."""
    out: list[dict] = []
    if body.get("system") is not None:
        out.append({"role": "system", "content": _text(body["system"], "system")})
    messages = body.get("messages")
    if messages is None:
        raise _bad("messages", "Field required")
    if type(messages) is not list or not messages:
        raise _bad("messages", "Input should be a non-empty list of messages.")
    for index, message in enumerate(messages):
        param = f"messages.{index}"
        if type(message) is not dict:
            raise _bad(param, "Input should be an object.")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise _bad(f"{param}.role", f"Input should be 'user' or 'assistant', not {role!r}.")
        content = _text(message.get("content"), f"{param}.content")
        if out and out[-1]["role"] == role:
            out[-1]["content"] += "\n\n" + content
        else:
            out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise _bad(f"messages.{len(messages) - 1}", "A final assistant message (a prefill) is not supported by "
                   "this server: the last message must be the user's.")
    return out


def _check_fields(body: Any, allowed: frozenset[str]) -> dict:
    if type(body) is not dict:
        raise invalid(None, "The request body must be a JSON object.", "invalid_type")
    for name in _UNSUPPORTED:
        if name in body:
            raise _bad(name, f"'{name}' is not supported by this server.")
    for name in body:
        if name not in allowed:
            raise _bad(name, "Extra inputs are not permitted")
    if type(body.get("model")) is not str:
        raise _bad("model", "Field required" if body.get("model") is None else "Input should be a string.")
    return body


def parse_messages(body: Any) -> tuple[CompletionRequest, bool]:
    """A Messages request as the OpenAI surface's validated request, and whether to stream."""
    body = _check_fields(body, _FIELDS)
    request = CompletionRequest(model=body["model"], messages=_conversation(body), max_tokens_given=True)
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise _bad("max_tokens", "Field required")
    max_tokens = typed_field(body, "max_tokens", int)
    if max_tokens < 1:
        raise _bad("max_tokens", f"Input should be greater than or equal to 1, not {max_tokens}.")
    stops = body.get("stop_sequences") or []
    if type(stops) is not list or not all(type(stop) is str and stop for stop in stops):
        raise _bad("stop_sequences", "Input should be a list of non-empty strings.")
    if len(stops) > MAX_STOP_SEQUENCES or any(len(stop) > MAX_STOP_CHARS for stop in stops):
        raise _bad("stop_sequences", f"At most {MAX_STOP_SEQUENCES} stop sequences of at most {MAX_STOP_CHARS} "
                   "characters each.")
    params = SamplingParams(max_tokens=max_tokens, temperature=typed_field(body, "temperature", float, 1.0),
                            top_p=typed_field(body, "top_p", float, 1.0), top_k=typed_field(body, "top_k", int, -1),
                            stop=tuple(stops))
    check_range("temperature", params.temperature, 0.0, 1.0)
    if 0 < params.temperature < MIN_TEMPERATURE:
        raise _bad("temperature", f"Use 0 (greedy) or at least {MIN_TEMPERATURE}.")
    check_range("top_p", params.top_p, MIN_TOP_P, 1.0)
    if "top_k" in body and params.top_k < 1:
        raise _bad("top_k", f"Input should be greater than or equal to 1, not {params.top_k}.")
    metadata = typed_field(body, "metadata", dict)
    if metadata is not None and type(metadata.get("user_id", "")) not in (str, type(None)):
        raise _bad("metadata.user_id", "Input should be a string.")
    request.params = params
    return request, typed_field(body, "stream", bool, False)


def _stop_reason(reason: str | None, stop_sequence: str | None) -> str:
    if reason == "length":
        return "max_tokens"
    return "stop_sequence" if stop_sequence is not None else "end_turn"


class MessageCollector(Collector):
    """Not streamed: the text, and the stop sequence that ended it, if one did."""

    __slots__ = ("stop_sequence",)

    def __init__(self, usage: Usage) -> None:
        super().__init__(1, usage)
        self.stop_sequence: str | None = None

    def on_stop_string(self, index: int, stop: str) -> None:
        self.stop_sequence = stop


class MessageStream(SinkBase):
    """Streamed: Anthropic's events for one text block; the per-token event is one format."""

    __slots__ = ("stream", "message", "stop_sequence", "started")

    def __init__(self, usage: Usage, message: dict[str, Any]) -> None:
        super().__init__(1, usage)
        self.stream: Any = None  # set by open()
        self.message = message
        self.stop_sequence: str | None = None
        self.started = False

    def open(self, stream) -> None:
        self.stream = stream
        send = stream.send
        message = {**self.message, "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self.usage.prompt_tokens, "output_tokens": 0}}
        send({"type": "message_start", "message": message})
        send(b'{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}')
        send(b'{"type":"ping"}')

    def on_tokens(self, index: int, text: str, token_ids: Sequence[int],
                  logprobs: Sequence[TokenLogprob] | None) -> None:
        if not self.started:  # as the chat surface: leading whitespace is the template's framing
            text = text.lstrip()
            self.started = bool(text)
        if text:
            self.stream.send(b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":%b}}'
                             % orjson.dumps(text))

    def on_stop_string(self, index: int, stop: str) -> None:
        self.stop_sequence = stop

    def finish(self, index: int, reason: str) -> None:
        send = self.stream.send
        send(b'{"type":"content_block_stop","index":0}')
        send({"type": "message_delta",
              "delta": {"stop_reason": _stop_reason(reason, self.stop_sequence), "stop_sequence": self.stop_sequence},
              "usage": {"output_tokens": self.usage.completion_tokens}})
        send(b'{"type":"message_stop"}')

    def complete(self) -> None:
        pass


class AnthropicAPI:
    def __init__(self, server) -> None:
        self.openai = OpenAIAPI.of(server)

    async def messages(self, request) -> Response | None:
        parsed, stream = parse_messages(await request.json())
        app = self.openai.app_by_model(parsed.model)
        OpenAIAPI._check_supported(app, parsed)
        assert parsed.messages is not None  # parse_messages makes them
        tokens = await chat_prompt_tokens(app, parsed.messages)
        fit_to_model(parsed, app, len(tokens))
        usage = Usage(len(tokens))
        message = {"id": "msg_" + uuid.uuid4().hex, "type": "message", "role": "assistant", "model": app.model_id}
        if stream:
            sink = MessageStream(usage, message)
            opened = lambda: sink.open(request.stream(serializer=EVENTS, headers=NO_CACHE))  # noqa: E731
            await run_generations(app, [tokens], parsed.params, 1, sink, opened)
            sink.stream.end()
            return None
        collector = MessageCollector(usage)
        await run_generations(app, [tokens], parsed.params, 1, collector)
        body = {**message, "content": [{"type": "text", "text": collector.text(0).lstrip()}],
                "stop_reason": _stop_reason(collector.reasons[0], collector.stop_sequence),
                "stop_sequence": collector.stop_sequence,
                "usage": {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens}}
        return Response(200, orjson.dumps(body), media_type=JSON)

    async def count_tokens(self, request) -> Response:
        body = _check_fields(await request.json(), _COUNT_FIELDS)
        tokens = await chat_prompt_tokens(self.openai.app_by_model(body["model"]), _conversation(body))
        return json_response({"input_tokens": len(tokens)})


@hookimpl
def runnel_register_routes(register, server):
    api = AnthropicAPI(server)
    register("POST", "/v1/messages", api.messages, errors=error_body)
    register("POST", "/v1/messages/count_tokens", api.count_tokens, errors=error_body)
