"""OpenAI request bodies -> validated, typed requests, with errors OpenAI's way.

Every mistake is a 400 naming the parameter, in the shape the openai SDKs parse:
``{"error": {"message", "type": "invalid_request_error", "param", "code"}}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from ...errors import HTTPError
from ...generation import ModelApp, SamplingParams
from ...tools import function_tool

# Bounds every request meets whatever the backend; ``fit_to_model`` adds the backend's
# own (context length, vocabulary). Each keeps a value from wedging or crashing a model,
# or one request from holding the event loop (README, "The OpenAI surface").
MAX_N = 128
MAX_STOP = 4  # as OpenAI
MAX_STOP_CHARS = 1024  # per stop string: the held-back text is at most this long
MAX_STOP_TOKEN_IDS = 256
MAX_TOP_LOGPROBS = 20
MAX_SEED = 2**64 - 1  # seeds are 64-bit: [-2**63, 2**64 - 1]
MIN_SEED = -(2**63)
# Below these a float32 becomes 0 or a denormal and a sampler divides by it.
MIN_TEMPERATURE = 1e-3  # or exactly 0: greedy
MIN_TOP_P = 1e-6
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
MAX_TOP_K = 2**31 - 1  # a C int, for a backend whose vocabulary is not fixed
# A prompt longer than this many characters per token of context can't fit it: it is
# refused before it is tokenized (no tokenizer makes tokens this long on average).
MAX_PROMPT_CHARS_PER_TOKEN = 32
MAX_EMBEDDING_INPUTS = 2048  # as OpenAI

# OpenAI parameters that change what the answer means. Ignoring one silently
# would hand back something the client did not ask for, so setting one is a 400.
# (functions and function_call are the deprecated spelling of tools: send tools.)
_UNSUPPORTED_FEATURES = ("functions", "function_call", "audio", "prediction", "web_search_options")
MAX_LOGIT_BIAS = 1024  # entries: each is work for every step of every choice


# Every field a request may carry; anything else is a 400 naming it, as OpenAI does, unless
# [server] ignore_unknown_fields. The no-ops are OpenAI's bookkeeping, which the openai SDKs
# pass through from callers and which cannot change an answer here.
_NO_OP_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"})
_SAMPLING_FIELDS = frozenset({"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
                              "stop", "stop_token_ids", "presence_penalty", "frequency_penalty", "repetition_penalty",
                              "no_repeat_ngram_size", "ignore_eos", "min_tokens", "n", "stream", "stream_options",
                              "response_format", "logit_bias", *_UNSUPPORTED_FEATURES}) | _NO_OP_FIELDS
CHAT_FIELDS = _SAMPLING_FIELDS | {"messages", "prompt", "logprobs", "top_logprobs", "tools", "tool_choice",
                                   "parallel_tool_calls"}
COMPLETION_FIELDS = _SAMPLING_FIELDS | {"prompt", "echo", "logprobs", "best_of", "suffix"}
EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})


def check_fields(body: dict, known: frozenset[str], extra: frozenset[str] = frozenset()) -> None:
    """A 400 naming the first field that is neither ``known`` nor one of the surface's ``extra``."""
    for name in body:
        if name not in known and name not in extra:
            raise invalid(name, f"Unrecognized request argument supplied: {name}", "unknown_parameter")


def invalid(param: str | None, message: str, code: str = "invalid_value") -> HTTPError:
    return HTTPError(400, message, type="invalid_request_error", param=param, code=code)


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array",
               dict: "an object"}


def typed_field(body: dict, name: str, kind: type, default=None):
    value = body.get(name)
    if value is None:
        return default
    ok = type(value) is kind or (kind is float and type(value) is int)
    if not ok:
        got = "null" if value is None else _TYPE_NAMES.get(type(value), type(value).__name__)
        raise invalid(name, f"Invalid type for '{name}': expected {_TYPE_NAMES[kind]}, but got {got} instead.",
                      "invalid_type")
    return float(value) if kind is float else value


def check_range(name: str, value, low, high, *, low_open: bool = False):
    if value is None:
        return
    if value < low or (low_open and value == low) or value > high:
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise invalid(name, f"Invalid value for '{name}': {value} is outside {bound}.")


@dataclass(slots=True)
class CompletionRequest:
    """A chat or text completion request, validated; the prompt is text until the app tokenizes it."""

    model: str | None
    prompt: str | None = None  # raw prompt (completions, or chat with `prompt`)
    prompts: list[str] = field(default_factory=list)  # completions: one or more prompts
    prompt_ids: list[list[int]] | None = None  # completions: prompts given as token ids instead
    # chat: the conversation as chat templates take it: {"role", "content": str}, plus
    # "tool_calls" [{"id", "type": "function", "function": {"name", "arguments": dict}}] on
    # assistant turns and "tool_call_id" on "tool" turns (runnel.generation.ModelApp.chat_prompt)
    messages: list[dict] | None = None
    tools: list[dict] = field(default_factory=list)  # function tools, runnel.tools.function_tool's shape
    tool_choice: str | None = None  # "auto", "none", "required" or a function's name; None: not given
    parallel_tool_calls: bool = True
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens_given: bool = False
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    completion_logprobs: int | None = None  # completions API: top-N logprobs per token


def _messages(body: dict) -> list[dict]:
    messages = body["messages"]
    if type(messages) is not list:
        raise invalid("messages", "Invalid type for 'messages': expected an array.", "invalid_type")
    if not messages:
        raise invalid("messages", "'messages' must contain at least one message.")
    out = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if type(message) is not dict:
            raise invalid(param, f"Invalid type for '{param}': expected an object.", "invalid_type")
        role = message.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise invalid(f"{param}.role", f"Invalid value for '{param}.role': {role!r}; supported roles are "
                          "'system', 'user', 'assistant' and 'tool'.")
        if message.get("function_call") is not None:
            raise invalid(f"{param}.function_call", "'function_call' is deprecated and not supported: send "
                          "'tool_calls'.", "unsupported_parameter")
        turn = {"role": role, "content": _content(message.get("content"), f"{param}.content")}
        if role == "assistant" and message.get("tool_calls") is not None:
            turn["tool_calls"] = _tool_calls(message["tool_calls"], f"{param}.tool_calls")
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if type(call_id) is not str:
                raise invalid(f"{param}.tool_call_id", f"Missing required parameter: '{param}.tool_call_id'.",
                              "missing_required_parameter")
            turn["tool_call_id"] = call_id
        out.append(turn)
    return out


def _tool_calls(calls: Any, param: str) -> list[dict]:
    """An assistant turn's calls, their arguments parsed: templates write them as JSON themselves."""
    if type(calls) is not list:
        raise invalid(param, f"Invalid type for '{param}': expected an array.", "invalid_type")
    out = []
    for i, call in enumerate(calls):
        where = f"{param}[{i}]"
        function = call.get("function") if type(call) is dict else None
        if type(function) is not dict or type(call.get("id")) is not str or call.get("type", "function") != "function":
            raise invalid(where, f"Invalid '{where}': expected {{'id', 'type': 'function', 'function': {{'name', "
                          "'arguments'}}}.")
        name, arguments = function.get("name"), function.get("arguments")
        if type(name) is not str:
            raise invalid(f"{where}.function.name", f"Missing required parameter: '{where}.function.name'.",
                          "missing_required_parameter")
        try:
            parsed = orjson.loads(arguments) if type(arguments) is str else None
        except orjson.JSONDecodeError:
            parsed = None
        if type(parsed) is not dict:
            raise invalid(f"{where}.function.arguments", f"Invalid '{where}.function.arguments': expected a JSON "
                          "object, as a string.")
        out.append({"id": call["id"], "type": "function", "function": {"name": name, "arguments": parsed}})
    return out


def _tools(body: dict, request: CompletionRequest) -> None:
    tools = body.get("tools")
    if tools is not None:
        if type(tools) is not list:
            raise invalid("tools", "Invalid type for 'tools': expected an array.", "invalid_type")
        for i, tool in enumerate(tools):
            param = f"tools[{i}]"
            function = tool.get("function") if type(tool) is dict else None
            if type(tool) is not dict or tool.get("type") != "function" or type(function) is not dict:
                raise invalid(param, f"Invalid '{param}': only function tools are supported: "
                              "{'type': 'function', 'function': {...}}.")
            typed_field(function, "strict", bool)  # honoured as far as runnel.tools checks a schema
            request.tools.append(function_tool(function.get("name"), function.get("description"),
                                               function.get("parameters"), f"{param}.function"))
    choice = body.get("tool_choice")
    if choice is not None:
        if type(choice) is dict and choice.get("type") == "function" and type(choice.get("function")) is dict:
            choice = choice["function"].get("name")
            if type(choice) is not str:
                raise invalid("tool_choice", "Missing required parameter: 'tool_choice.function.name'.",
                              "missing_required_parameter")
        elif choice not in ("none", "auto", "required"):
            raise invalid("tool_choice", "Invalid 'tool_choice': expected 'none', 'auto', 'required' or "
                          "{'type': 'function', 'function': {'name': ...}}.")
        request.tool_choice = choice
    request.parallel_tool_calls = typed_field(body, "parallel_tool_calls", bool, True)


def _content(content: Any, param: str) -> str:
    if type(content) is str:
        return content
    if content is None:
        return ""
    if type(content) is not list:
        raise invalid(param, f"Invalid type for '{param}': expected a string or an array of content parts.",
                      "invalid_type")
    texts = []
    for i, part in enumerate(content):
        if type(part) is not dict or part.get("type") != "text" or type(part.get("text")) is not str:
            kind = part.get("type") if type(part) is dict else None
            raise invalid(f"{param}[{i}]", f"Content part type {kind!r} is not supported: only 'text' parts are.",
                          "unsupported_parameter")
        texts.append(part["text"])
    return "".join(texts)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if type(stop) is str:
        return (stop,)
    if type(stop) is not list or not all(type(item) is str for item in stop):
        raise invalid("stop", "Invalid type for 'stop': expected a string or an array of strings.", "invalid_type")
    if len(stop) > MAX_STOP:
        raise invalid("stop", f"'stop' may hold at most {MAX_STOP} strings.")
    for item in stop:
        if len(item) > MAX_STOP_CHARS:
            raise invalid("stop", f"Invalid value for 'stop': a stop string may be at most {MAX_STOP_CHARS} "
                          f"characters long, not {len(item)}.")
    return tuple(stop)


def _int_list(body: dict, name: str) -> tuple[int, ...]:
    value = body.get(name)
    if value is None:
        return ()
    if type(value) is not list or not all(type(item) is int for item in value):
        raise invalid(name, f"Invalid type for '{name}': expected an array of integers.", "invalid_type")
    if len(value) > MAX_STOP_TOKEN_IDS:
        raise invalid(name, f"'{name}' may hold at most {MAX_STOP_TOKEN_IDS} ids.")
    if any(item < 0 for item in value):
        raise invalid(name, f"Invalid value for '{name}': token ids are 0 or more.")
    return tuple(value)


def _logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"token id": bias}`` as sorted (id, bias) pairs; the ids are checked against
    the model's vocabulary with the rest (fit_to_model)."""
    value = typed_field(body, "logit_bias", dict)
    if not value:
        return ()
    if len(value) > MAX_LOGIT_BIAS:
        raise invalid("logit_bias", f"'logit_bias' may hold at most {MAX_LOGIT_BIAS} tokens.")
    pairs = []
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 9):
            raise invalid("logit_bias", f"Invalid 'logit_bias': {key[:20]!r} is not a token id.")
        if type(bias) not in (int, float) or not -100 <= bias <= 100:
            raise invalid("logit_bias", f"Invalid 'logit_bias' for token {key}: a number from -100 to 100.")
        pairs.append((int(key), float(bias)))
    return tuple(sorted(pairs))


def _sampling(body: dict) -> tuple[SamplingParams, bool]:
    max_tokens = typed_field(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = typed_field(body, "max_tokens", int)
        name = "max_tokens"
    else:
        name = "max_completion_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise invalid(name, f"Invalid value for '{name}': {max_tokens}; it must be at least 1.")
    params = SamplingParams(
        max_tokens=max_tokens or 1,
        temperature=typed_field(body, "temperature", float, 1.0),
        top_p=typed_field(body, "top_p", float, 1.0),
        top_k=typed_field(body, "top_k", int, -1),
        seed=typed_field(body, "seed", int),
        stop=_stop(body),
        stop_token_ids=_int_list(body, "stop_token_ids"),
        presence_penalty=typed_field(body, "presence_penalty", float, 0.0),
        frequency_penalty=typed_field(body, "frequency_penalty", float, 0.0),
        repetition_penalty=typed_field(body, "repetition_penalty", float, 1.0),
        no_repeat_ngram_size=typed_field(body, "no_repeat_ngram_size", int, 0),
        ignore_eos=typed_field(body, "ignore_eos", bool, False),
        min_tokens=typed_field(body, "min_tokens", int, 0),
        logit_bias=_logit_bias(body),
    )
    check_range("temperature", params.temperature, 0.0, 2.0)
    if 0 < params.temperature < MIN_TEMPERATURE:
        raise invalid("temperature", f"Invalid value for 'temperature': {params.temperature}; use 0 (greedy) or "
                      f"at least {MIN_TEMPERATURE}.")
    check_range("top_p", params.top_p, MIN_TOP_P, 1.0)
    if params.top_k != -1 and not 1 <= params.top_k <= MAX_TOP_K:
        raise invalid("top_k", f"Invalid value for 'top_k': {params.top_k}; use -1 (no limit) or a positive integer.")
    if params.seed is not None:
        check_range("seed", params.seed, MIN_SEED, MAX_SEED)
    check_range("presence_penalty", params.presence_penalty, -2.0, 2.0)
    check_range("frequency_penalty", params.frequency_penalty, -2.0, 2.0)
    check_range("repetition_penalty", params.repetition_penalty, MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)
    if params.no_repeat_ngram_size < 0:
        raise invalid("no_repeat_ngram_size", "Invalid value for 'no_repeat_ngram_size': it must be 0 (off) or more.")
    if params.min_tokens < 0 or (max_tokens is not None and params.min_tokens > max_tokens):
        raise invalid("min_tokens", "Invalid value for 'min_tokens': it must be between 0 and max_tokens.")
    return params, max_tokens is not None


def _common(body: dict, request: CompletionRequest) -> None:
    for name in _UNSUPPORTED_FEATURES:
        if body.get(name) not in (None, [], {}):
            raise invalid(name, f"'{name}' is not supported by this server.", "unsupported_parameter")
    typed_field(body, "user", str)
    request.params, request.max_tokens_given = _sampling(body)
    request.params.response_format = _response_format(body)
    request.n = typed_field(body, "n", int, 1)
    check_range("n", request.n, 1, MAX_N)
    request.stream = typed_field(body, "stream", bool, False)
    options = typed_field(body, "stream_options", dict)
    if options is not None:
        if not request.stream:
            raise invalid("stream_options", "The 'stream_options' parameter is only allowed when 'stream' is enabled.")
        request.include_usage = bool(options.get("include_usage"))


def _response_format(body: dict) -> dict | None:
    """None for plain text; else the format, for a backend that can constrain its output
    to it (one with "response_format" in ``supported``; any other answers 400)."""
    value = typed_field(body, "response_format", dict)
    if value is None or value == {"type": "text"}:
        return None
    kind = value.get("type")
    if kind == "json_object" and len(value) == 1:
        return value
    if kind == "json_schema":
        schema = value.get("json_schema")
        if (type(schema) is dict and type(schema.get("name")) is str
                and type(schema.get("schema", {})) is dict and type(schema.get("strict", False)) is bool):
            return value
    raise invalid("response_format", "Invalid 'response_format': expected {'type': 'text'}, {'type': 'json_object'} "
                  "or {'type': 'json_schema', 'json_schema': {'name', 'schema', 'strict'}}.")


def parse_chat(body: Any) -> CompletionRequest:
    if type(body) is not dict:
        raise invalid(None, "The request body must be a JSON object.", "invalid_type")
    request = CompletionRequest(model=typed_field(body, "model", str))
    has_messages = body.get("messages") is not None
    has_prompt = body.get("prompt") is not None
    if has_messages == has_prompt:
        raise invalid("messages", "Exactly one of 'messages' and 'prompt' is required."
                      if has_messages else "Missing required parameter: 'messages' (or a raw 'prompt').",
                      "invalid_value" if has_messages else "missing_required_parameter")
    if has_messages:
        request.messages = _messages(body)
        _tools(body, request)
    else:
        request.prompt = typed_field(body, "prompt", str)
        for name in ("tools", "tool_choice"):
            if body.get(name) is not None:
                raise invalid(name, f"'{name}' needs 'messages': a raw 'prompt' has no chat template to show tools.")
    _common(body, request)
    logprobs = typed_field(body, "logprobs", bool, False)
    top = typed_field(body, "top_logprobs", int)
    if top is not None:
        if not logprobs:
            raise invalid("top_logprobs", "'top_logprobs' requires 'logprobs' to be true.")
        check_range("top_logprobs", top, 0, MAX_TOP_LOGPROBS)
    if logprobs and request.tools and request.tool_choice != "none":
        raise invalid("logprobs", "'logprobs' together with 'tools' is not supported.", "unsupported_parameter")
    request.params.logprobs = logprobs
    request.params.top_logprobs = top or 0
    return request


def parse_completion(body: Any) -> CompletionRequest:
    if type(body) is not dict:
        raise invalid(None, "The request body must be a JSON object.", "invalid_type")
    request = CompletionRequest(model=typed_field(body, "model", str))
    prompt = body.get("prompt")
    if prompt is None:
        raise invalid("prompt", "Missing required parameter: 'prompt'.", "missing_required_parameter")
    if type(prompt) is str:
        request.prompts = [prompt]
    elif type(prompt) is list and prompt and all(type(item) is str for item in prompt):
        request.prompts = list(prompt)
    else:
        request.prompt_ids = token_id_lists("prompt", prompt)
    _common(body, request)
    request.echo = typed_field(body, "echo", bool, False)
    logprobs = typed_field(body, "logprobs", int)
    if logprobs is not None:
        check_range("logprobs", logprobs, 0, 5)
        request.params.logprobs = True
        request.params.top_logprobs = logprobs
    request.completion_logprobs = logprobs
    if typed_field(body, "best_of", int, 1) != 1:
        raise invalid("best_of", "'best_of' other than 1 is not supported.", "unsupported_parameter")
    typed_field(body, "suffix", str)
    if body.get("suffix"):
        raise invalid("suffix", "'suffix' is not supported.", "unsupported_parameter")
    return request


def token_id_lists(param: str, value: Any) -> list[list[int]]:
    """Token-id input: an array of ids, or an array of such arrays (as the openai SDKs send
    them); the ids are checked against the model by ``check_token_ids``."""
    if type(value) is list and value and all(type(item) is int for item in value):
        return [value]
    if (type(value) is list and value
            and all(type(row) is list and row and all(type(item) is int for item in row) for row in value)):
        return value
    raise invalid(param, f"Invalid type for '{param}': expected a string, a non-empty array of strings, a "
                  "non-empty array of token ids, or a non-empty array of such arrays.", "invalid_type")


def check_token_ids(param: str, rows: list[list[int]], app: Any) -> None:
    """Every id names a token of the model: ``vocab_size`` bounds them where the vocabulary is
    fixed, else ``known_tokens`` (a vocabulary that grows: the ids handed out so far)."""
    limit = getattr(app, "vocab_size", None)
    if limit is None:
        limit = getattr(app, "known_tokens", None)
    for row in rows:
        for token_id in row:
            if token_id < 0 or (limit is not None and token_id >= limit):
                raise invalid(param, f"Invalid value for '{param}': {token_id} is not a token id of model "
                              f"`{app.model_id}`" + (f" (its vocabulary has {limit})." if limit is not None else "."))


def fit_to_model(request: CompletionRequest, app: ModelApp, longest_prompt: int, prompts: int = 1) -> None:
    """The bounds the backend sets (``ModelApp.context_length`` and ``vocab_size``), once
    the prompts are tokenized; sets the default ``max_tokens``. One place for every
    backend: a backend declares its limits, it does not check them."""
    params = request.params
    context_length = app.context_length
    vocab_size = getattr(app, "vocab_size", None)  # a backend written before vocab_size: not fixed
    max_choices = getattr(app, "max_choices", None)
    choices = request.n * prompts
    if max_choices is not None and choices > max_choices:
        raise invalid("n", f"This request asks for {choices} choices ({prompts} prompt(s) x n={request.n}); "
                      f"model `{app.model_id}` holds at most {max_choices} at once.", "too_many_choices")
    if not request.max_tokens_given:
        params.max_tokens = min(app.default_max_tokens, max(context_length - longest_prompt, 1))
    if longest_prompt + params.max_tokens > context_length:
        raise invalid("max_tokens", f"This model's maximum context length is {context_length} tokens. "
                      f"However, you requested {longest_prompt + params.max_tokens} tokens ({longest_prompt} in the "
                      f"prompt, {params.max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                      "context_length_exceeded")
    if params.min_tokens > params.max_tokens:
        raise invalid("min_tokens", f"Invalid value for 'min_tokens': {params.min_tokens} is more than max_tokens "
                      f"({params.max_tokens}).")
    if params.no_repeat_ngram_size > context_length:
        raise invalid("no_repeat_ngram_size", f"Invalid value for 'no_repeat_ngram_size': "
                      f"{params.no_repeat_ngram_size} is more than the model's context length ({context_length}).")
    if vocab_size is not None:
        if params.top_k > vocab_size:
            raise invalid("top_k", f"Invalid value for 'top_k': {params.top_k} is more than the model's vocabulary "
                          f"size ({vocab_size}).")
        for token_id in params.stop_token_ids:
            if token_id >= vocab_size:
                raise invalid("stop_token_ids", f"Invalid value for 'stop_token_ids': {token_id} is not a token id "
                              f"of this model (its vocabulary has {vocab_size}).")
        if params.logit_bias and params.logit_bias[-1][0] >= vocab_size:  # sorted: the last is the largest
            raise invalid("logit_bias", f"Invalid 'logit_bias': {params.logit_bias[-1][0]} is not a token id of "
                          f"this model (its vocabulary has {vocab_size}).")


def check_prompt_size(param: str, chars: int, context_length: int) -> None:
    """Refuse, before tokenizing it, a prompt too long to fit any context of this length."""
    limit = context_length * MAX_PROMPT_CHARS_PER_TOKEN
    if chars > limit:
        raise invalid(param, f"The prompt is {chars} characters long; this model's context of {context_length} "
                      f"tokens takes at most {limit}. Please reduce the prompt.", "context_length_exceeded")
