"""Built-in plugin: the OpenAI-compatible API under /v1.

``OpenAIAPI`` holds the handlers; other surfaces (RunPod, Baseten) reuse them
with a different way of choosing the app and different per-app options.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from ...errors import HTTPError
from ...generation import unsupported
from ...http import Response, json_response
from ...http.response import JSON
from ...serializers import NDJSON as NDJSONFraming
from ...serializers import ServerSentEvents
from ...tools import ToolUse
from .params import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    EMBEDDING_FIELDS,
    MAX_EMBEDDING_INPUTS,
    CompletionRequest,
    check_fields,
    check_prompt_size,
    check_token_ids,
    fit_to_model,
    invalid,
    parse_chat,
    parse_completion,
    token_id_lists,
)
from .sinks import (
    ChatStream,
    Collector,
    CompletionStream,
    ToolChatStream,
    ToolCollector,
    Usage,
    chat_logprobs,
    completion_logprobs,
    run_generations,
)


class OpenAIEvents(ServerSentEvents):
    """SSE as OpenAI frames it: a stream ends with ``data: [DONE]``, and its error
    event is a plain ``data: {"error": ...}`` (no ``event:`` line)."""

    end = b"data: [DONE]\n\n"

    def encode_error(self, error: dict) -> bytes:
        return b"data: %b\n\n" % orjson.dumps(error)


SSE = OpenAIEvents()
NDJSON = NDJSONFraming()  # RunPod's non-raw output: bare JSON lines, no [DONE]
NO_CACHE = ((b"cache-control", b"no-cache"),)
RESUMABLE = b"x-runnel-resumable"  # a streamed request's opt-in to a resumable stream (.resumable)
# Templating or tokenizing more text than this runs on a worker thread, so the loop keeps
# answering meanwhile (the tokenizers release the GIL; a template is Python, which yields
# it every switch interval). Below it, a thread hop would cost more than the work.
OFF_LOOP_CHARS = 16_384


async def off_loop(chars: int, work, *args):
    """``work(*args)``: here when ``chars`` is small, else on a worker thread."""
    if chars <= OFF_LOOP_CHARS:
        return work(*args)
    return await asyncio.to_thread(work, *args)


@dataclass(frozen=True, slots=True)
class ReplyOptions:
    """How one surface answers for an app (RunPod lets a deployment change these)."""

    model_name: str | None = None  # the name in responses; None: the app's own
    role: str = "assistant"
    uuid_ids: bool = False  # Baseten answers with bare UUIDs as ids
    sse: bool = True  # False: stream bare JSON lines (RunPod with raw output off)


DEFAULT_REPLY = ReplyOptions()


async def chat_prompt_tokens(app, messages: list[dict], *, param: str = "messages",
                             tool_use: ToolUse | None = None) -> list[int]:
    """A conversation as the app's prompt tokens: checked for size before and after its
    chat template, off the loop when large. Every surface that chats prompts through here."""
    chars = sum(len(message["content"]) for message in messages)
    check_prompt_size(param, chars, app.context_length)
    if tool_use is None:
        render = functools.partial(app.chat_prompt, messages)
    else:
        render = functools.partial(app.chat_prompt, messages, tools=tool_use.tools, prefill=tool_use.prefill)
    prompt = await off_loop(chars, render)
    check_prompt_size(param, len(prompt), app.context_length)
    return await off_loop(len(prompt), app.tokenize, prompt)


def is_model_app(app) -> bool:
    return callable(getattr(app, "generate", None)) and callable(getattr(app, "tokenize", None))


def can_embed(app) -> bool:
    return callable(getattr(app, "embed", None))


def detokenizer(app, param: str):
    """The app's ``decode(token_ids) -> str`` (optional in runnel.generation.ModelApp), or a 400
    naming ``param`` where its backend cannot turn ids back into text."""
    decode = getattr(app, "decode", None)
    if not callable(decode):
        raise invalid(param, f"The backend of model `{app.model_id}` cannot detokenize: send text, not token ids.",
                      "unsupported_parameter")
    return decode


class OpenAIAPI:
    @classmethod
    def of(cls, server) -> OpenAIAPI:
        """The server's one instance, shared by every surface that speaks OpenAI."""
        api = server.state.get("openai")
        if api is None:
            api = server.state["openai"] = cls(server)
        return api

    def __init__(self, server) -> None:
        self.server = server
        self.created = int(time.time())  # what /v1/models reports as a model's creation time
        # Served model name -> app name, fixed once the apps are built.
        self.by_model: dict[str, str] = {}
        for name, app in server.apps.items():
            model_id = getattr(app, "model_id", None)
            if model_id and (is_model_app(app) or can_embed(app)):
                self.by_model.setdefault(model_id, name)
        # [apps.NAME.openai], read (and its typos refused) once, when the server is built.
        self.owned_by: dict[str, str | None] = {}
        config = server.config
        self.ignore_unknown_fields = config.server.ignore_unknown_fields
        self.tool_parsers = {name: app_config.tool_parser for name, app_config in config.apps.items()}
        for name, app_config in config.apps.items():
            table = config.table(f"apps.{name}.openai", app_config.surfaces.get("openai", {}))
            self.owned_by[name] = table.get("owned_by", str, default=None)
            table.finish()

    # -- choosing the app ---------------------------------------------------------
    def app_by_model(self, model: str | None, *, need=is_model_app):
        if model is None:
            candidates = [name for name in self.by_model.values() if need(self.server.apps.get(name))]
            if len(candidates) != 1:
                raise invalid("model", "Missing required parameter: 'model'.", "missing_required_parameter")
            return self.app_by_name(candidates[0], model)
        name = self.by_model.get(model)
        if name is None:
            raise HTTPError(404, f"The model `{model}` does not exist.", type="invalid_request_error",
                            param="model", code="model_not_found")
        return self.app_by_name(name, model, need=need)

    def app_by_name(self, name: str, model: str | None = None, *, need=is_model_app):
        app = self.server.apps.get(name)
        if app is None:
            state = self.server.apps.state(name)
            if state is None:
                raise HTTPError(404, f"The model `{model or name}` does not exist.", type="invalid_request_error",
                                param="model", code="model_not_found")
            raise HTTPError(503, f"The model `{model or name}` is {state}; try again shortly.",
                            type="server_error", code="model_not_ready", headers=((b"retry-after", b"1"),))
        if not need(app):
            what = "embeddings" if need is can_embed else "completions"
            raise invalid("model", f"The model `{model or name}` does not support {what}.", "model_not_supported")
        return app

    def tool_use(self, app, tools: list[dict], choice: str | None, parallel: bool, *, param: str = "tools",
                 choice_param: str = "tool_choice") -> ToolUse | None:
        """A request's tools for ``app``, whose format is its ``[apps.NAME] tool_parser``, else
        its backend's default (``tool_parser`` on the app); None when there is nothing to do."""
        if not tools and choice is None:  # most requests: nothing to look up
            return None
        parser = self.tool_parsers.get(self.by_model.get(app.model_id, ""))
        if parser is None:
            parser = getattr(app, "tool_parser", None)
        return ToolUse.create(parser, app.model_id, tools, choice, parallel, param=param, choice_param=choice_param)

    # -- /v1/models -----------------------------------------------------------------
    def model_card(self, app, name: str) -> dict:
        owned_by = self.owned_by.get(name)
        return {"id": app.model_id, "object": "model", "created": int(getattr(app, "created", self.created)),
                "owned_by": owned_by if owned_by is not None else getattr(app, "owned_by", "runnel")}

    async def models(self, request):
        data = []
        for name in self.by_model.values():
            app = self.server.apps.get(name)
            if app is not None:  # listed only once ready
                data.append(self.model_card(app, name))
        return json_response({"object": "list", "data": data})

    async def model(self, request):
        model = request.path_params["model"]
        name = self.by_model.get(model)
        app = self.server.apps.get(name) if name else None
        if app is None:
            raise HTTPError(404, f"The model `{model}` does not exist.", type="invalid_request_error",
                            param="model", code="model_not_found")
        return json_response(self.model_card(app, name))

    # -- completions ------------------------------------------------------------------
    async def body(self, request, known: frozenset[str], extra: frozenset[str]) -> Any:
        """The request's JSON, its fields checked against what the endpoint knows (plus the
        surface's own ``extra``) unless the server ignores unknown fields."""
        body = await request.json()
        if type(body) is not dict:
            raise invalid(None, "The request body must be a JSON object.", "invalid_type")
        if not self.ignore_unknown_fields:
            check_fields(body, known, extra)
        return body

    async def chat(self, request, app=None, reply: ReplyOptions = DEFAULT_REPLY, extra: frozenset[str] = frozenset()):
        parsed = parse_chat(await self.body(request, CHAT_FIELDS, extra))
        if app is None:
            app = self.app_by_model(parsed.model)
        self.check_supported(app, parsed)
        tool_use = None
        if parsed.messages is not None:
            tool_use = self.tool_use(app, parsed.tools, parsed.tool_choice, parsed.parallel_tool_calls)
            if tool_use is not None:
                tool_use.constrain(parsed.params, app)
            tokens = await chat_prompt_tokens(app, parsed.messages, tool_use=tool_use)
        else:
            prompt = parsed.prompt
            assert prompt is not None  # parse_chat: messages or a prompt
            check_prompt_size("prompt", len(prompt), app.context_length)
            tokens = await off_loop(len(prompt), app.tokenize, prompt)
        return await self._complete(request, app, parsed, [tokens], chat=True, reply=reply, tool_use=tool_use)

    async def completions(self, request, app=None, reply: ReplyOptions = DEFAULT_REPLY,
                          extra: frozenset[str] = frozenset()):
        parsed = parse_completion(await self.body(request, COMPLETION_FIELDS, extra))
        if app is None:
            app = self.app_by_model(parsed.model)
        self.check_supported(app, parsed)
        if parsed.prompt_ids is not None:
            prompts = parsed.prompt_ids
            check_token_ids("prompt", prompts, app)
            if parsed.echo:  # the prompt's text comes back: a backend that can detokenize
                decode = detokenizer(app, "echo")
                parsed.prompts = [await off_loop(len(ids), decode, ids) for ids in prompts]
        else:
            for prompt in parsed.prompts:
                check_prompt_size("prompt", len(prompt), app.context_length)
            prompts = [await off_loop(len(prompt), app.tokenize, prompt) for prompt in parsed.prompts]
        return await self._complete(request, app, parsed, prompts, chat=False, reply=reply)

    @staticmethod
    def check_supported(app, parsed: CompletionRequest) -> None:
        name = unsupported(parsed.params, app.supported)
        if name is not None:
            raise invalid(name, f"'{name}' is not supported by the backend of model `{app.model_id}`.",
                          "unsupported_parameter")

    async def _complete(self, request, app, parsed: CompletionRequest, prompts, *, chat: bool, reply: ReplyOptions,
                        tool_use: ToolUse | None = None):
        fit_to_model(parsed, app, max(len(tokens) for tokens in prompts), len(prompts))
        if parsed.stream and reply is DEFAULT_REPLY and request.header(RESUMABLE) is not None:
            from .resumable import resumable, start  # only opted-in requests import it

            if resumable(request):  # a run that outlives this request, which follows it
                return await start(self, request, app, chat=chat)
        n = parsed.n
        choices = n * len(prompts)
        usage = Usage(sum(len(tokens) for tokens in prompts))
        # Chosen by an offline caller (a resumable stream's run: its id is the completion's).
        completion_id = getattr(request, "completion_id", None)
        if completion_id is None:
            if reply.uuid_ids:
                completion_id = str(uuid.uuid4())
            else:
                completion_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": completion_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": reply.model_name or app.model_id}
        echo = [prompt for prompt in parsed.prompts for _ in range(n)] if parsed.echo else None
        sink: ChatStream | CompletionStream | Collector
        stream: ChatStream | CompletionStream | None = None
        collector: Collector | None = None
        if parsed.stream:
            common: dict[str, Any] = dict(choices=choices, usage=usage, include_usage=parsed.include_usage, head=head)
            if tool_use is not None:
                sink = stream = ToolChatStream(tool_use=tool_use, role=reply.role, logprobs=False, **common)
            elif chat:
                sink = stream = ChatStream(role=reply.role, logprobs=parsed.params.logprobs, **common)
            else:
                sink = stream = CompletionStream(logprobs=parsed.params.logprobs, echo=echo, **common)
        elif tool_use is not None:
            sink = collector = ToolCollector(choices, usage, tool_use)
        else:
            sink = collector = Collector(choices, usage)
        opened = None
        if stream is not None:
            serializer = SSE if reply.sse else NDJSON
            opened = lambda: stream.open(request.stream(serializer=serializer, headers=NO_CACHE))  # noqa: E731
        await run_generations(app, prompts, parsed.params, n, sink, opened, request=request)
        if stream is not None:
            stream.stream.end()
            return None
        assert collector is not None  # not streamed: collected
        return self._reply(collector, head, chat, parsed, echo, reply, usage)

    @staticmethod
    def _reply(sink: Collector, head: dict, chat: bool, parsed, echo, reply: ReplyOptions, usage: Usage) -> Response:
        choices = []
        for index, reason in enumerate(sink.reasons):
            text = sink.text(index)
            if chat:
                logprobs = chat_logprobs(sink.logprobs[index]) if parsed.params.logprobs else None
                # As in the stream: leading whitespace is the template's framing, not content.
                message: dict[str, Any] = {"role": reply.role, "content": text.lstrip()}
                if isinstance(sink, ToolCollector) and sink.parsers[index].calls:
                    message["content"] = message["content"] or None
                    message["tool_calls"] = [
                        {"id": call.call_id, "type": "function",
                         "function": {"name": call.name, "arguments": call.arguments}}
                        for call in sink.parsers[index].calls]
                choices.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason})
            else:
                prefix = echo[index] if echo else ""
                logprobs = (completion_logprobs(sink.logprobs[index], len(prefix))
                            if parsed.params.logprobs else None)
                choices.append({"index": index, "text": prefix + text, "logprobs": logprobs,
                                "finish_reason": reason})
        body = {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": usage.to_dict()}
        return Response(200, orjson.dumps(body), media_type=JSON)

    # -- embeddings -------------------------------------------------------------------
    async def embeddings(self, request, app=None, extra: frozenset[str] = frozenset()):
        body = await self.body(request, EMBEDDING_FIELDS, extra)
        if app is None:
            app = self.app_by_model(body.get("model") if type(body.get("model")) is str else None, need=can_embed)
        texts = body.get("input")
        if type(texts) is str:
            texts = [texts]
        ids = None
        if type(texts) is not list or not texts or not all(type(text) is str for text in texts):
            ids = token_id_lists("input", texts)  # LangChain's OpenAIEmbeddings sends token ids
        inputs = ids if ids is not None else texts
        if len(inputs) > MAX_EMBEDDING_INPUTS:
            raise invalid("input", f"'input' may hold at most {MAX_EMBEDDING_INPUTS} inputs, not {len(inputs)}.")
        context_length = getattr(app, "context_length", None)
        if ids is not None:
            check_token_ids("input", ids, app)
            if context_length:
                for index, row in enumerate(ids):
                    if len(row) > context_length:
                        raise invalid(f"input[{index}]", f"Input {index} is {len(row)} tokens; this model takes "
                                      f"at most {context_length}.", "context_length_exceeded")
            # A backend that can't embed ids as they are embeds their text.
            if not callable(getattr(app, "embed_tokens", None)):
                decode = detokenizer(app, "input")
                texts = [await off_loop(len(row), decode, row) for row in ids]
        elif context_length:  # each input is one sequence for the encoder
            for index, text in enumerate(texts):
                check_prompt_size(f"input[{index}]", len(text), context_length)
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise invalid("encoding_format", "'encoding_format' must be 'float' or 'base64'.")
        if body.get("dimensions") is not None:
            raise invalid("dimensions", "'dimensions' is not supported.", "unsupported_parameter")
        if ids is not None and callable(getattr(app, "embed_tokens", None)):
            vectors, tokens = await app.embed_tokens(ids)
        else:
            vectors, tokens = await app.embed(texts)
        data = []
        value: str | list[float]
        for index, vector in enumerate(vectors):
            if encoding == "base64":  # little-endian float32, as OpenAI sends them
                value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            else:
                value = [float(x) for x in vector]
            data.append({"object": "embedding", "index": index, "embedding": value})
        return json_response({"object": "list", "data": data, "model": app.model_id,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
