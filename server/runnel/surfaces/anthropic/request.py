"""A Messages request -> the OpenAI surface's validated request and runnel.tools' terms;
every mistake a 400 naming the field, in Anthropic's words."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...errors import HTTPError
from ...generation import SamplingParams
from ...tools import REQUIRED, function_tool
from ..openai import invalid
from ..openai.params import (
    MAX_STOP_CHARS,
    MIN_TEMPERATURE,
    MIN_TOP_P,
    CompletionRequest,
    check_range,
    typed_field,
)

MAX_STOP_SEQUENCES = 16  # each is scanned for at every token: a bound keeps that cheap
# Fields of a Messages request that runnel serves; any other is a 400 naming it.
MESSAGE_FIELDS = frozenset(("model", "messages", "system", "max_tokens", "stop_sequences", "temperature", "top_p",
                     "top_k", "metadata", "stream", "tools", "tool_choice"))
COUNT_FIELDS = frozenset(("model", "messages", "system", "tools", "tool_choice"))
# Known to Anthropic, not served here (yet): named in the 400, as "not supported".
_UNSUPPORTED = ("thinking", "container", "mcp_servers", "service_tier")

def _bad(param: str, message: str) -> HTTPError:
    return invalid(param, f"{param}: {message}")


def _text(content: Any, param: str) -> str:
    """A string, or text blocks joined; any other block is a 400 naming it."""
    if type(content) is str:
        return content
    if type(content) is not list:
        raise _bad(param, "Input should be a string or a list of content blocks.")
    return "".join(_text_block(block, f"{param}.{index}") for index, block in enumerate(content))


def _text_block(block: Any, param: str) -> str:
    kind = block.get("type") if type(block) is dict else None
    if kind != "text" or type(block.get("text")) is not str:
        raise _bad(param, f"Content block type {kind!r} is not supported here: only text blocks (and tool_use "
                   "blocks in assistant turns, tool_result blocks in user turns) are.")
    return block["text"]


def _turns(role: str, content: Any, param: str) -> list[dict]:
    """One message as chat-template turns: an assistant's text and tool_use blocks are one
    turn with tool calls; a user's tool_result blocks are tool turns, before its text."""
    if type(content) is str or role == "user" and not any(
            type(block) is dict and block.get("type") == "tool_result" for block in content or ()):
        return [{"role": role, "content": _text(content, param)}]
    if type(content) is not list:
        raise _bad(param, "Input should be a string or a list of content blocks.")
    texts: list[str] = []
    turns: list[dict] = []
    calls: list[dict] = []
    for index, block in enumerate(content):
        where = f"{param}.{index}"
        kind = block.get("type") if type(block) is dict else None
        if role == "assistant" and kind == "tool_use":
            if type(block.get("id")) is not str or type(block.get("name")) is not str or \
                    type(block.get("input")) is not dict:
                raise _bad(where, "A tool_use block has an 'id', a 'name' and an 'input' object.")
            calls.append({"id": block["id"], "type": "function",
                          "function": {"name": block["name"], "arguments": block["input"]}})
        elif role == "user" and kind == "tool_result":
            if type(block.get("tool_use_id")) is not str:
                raise _bad(f"{where}.tool_use_id", "Field required")
            result = block.get("content", "")
            text = _text(result, f"{where}.content") if result is not None else ""
            if block.get("is_error"):
                text = "Error: " + text
            turns.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
        else:
            texts.append(_text_block(block, where))
    if role == "assistant":
        turn: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
        if calls:
            turn["tool_calls"] = calls
        return [turn]
    if texts:
        turns.append({"role": "user", "content": "".join(texts)})
    return turns


def conversation(body: dict) -> list[dict]:
    """``system`` and ``messages`` as chat-template messages; consecutive text turns of one
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
        for turn in _turns(role, message.get("content"), f"{param}.content"):
            last = out[-1] if out else None
            if (last is not None and last["role"] == turn["role"] != "tool" and "tool_calls" not in last
                    and "tool_calls" not in turn):
                last["content"] += "\n\n" + turn["content"]
            else:
                out.append(turn)
    if out[-1]["role"] == "assistant":
        raise _bad(f"messages.{len(messages) - 1}", "A final assistant message (a prefill) is not supported by "
                   "this server: the last message must be the user's.")
    return out


@dataclass(slots=True)
class _Tools:
    """A request's ``tools`` and ``tool_choice``, in runnel.tools' terms."""

    tools: list[dict] = field(default_factory=list)
    choice: str | None = None  # None (auto), "none", "required" or a function's name
    parallel: bool = True


def request_tools(body: dict) -> _Tools:
    out = _Tools()
    tools = body.get("tools")
    if tools is not None:
        if type(tools) is not list:
            raise _bad("tools", "Input should be a list.")
        for index, tool in enumerate(tools):
            param = f"tools.{index}"
            if type(tool) is not dict or tool.get("type", "custom") != "custom":
                kind = tool.get("type") if type(tool) is dict else None
                raise _bad(param, f"Tool type {kind!r} is not supported by this server: only custom tools "
                           "({'name', 'description', 'input_schema'}) are.")
            if type(tool.get("input_schema")) is not dict:
                raise _bad(f"{param}.input_schema", "Field required")
            out.tools.append(function_tool(tool.get("name"), tool.get("description"), tool["input_schema"], param))
    choice = body.get("tool_choice")
    if choice is not None:
        kind = choice.get("type") if type(choice) is dict else None
        if kind not in ("auto", "any", "tool", "none"):
            raise _bad("tool_choice", "Input should be {'type': 'auto' | 'any' | 'tool' | 'none'}.")
        if kind == "tool":
            if type(choice.get("name")) is not str:
                raise _bad("tool_choice.name", "Field required")
            out.choice = choice["name"]
        else:
            out.choice = {"auto": None, "any": REQUIRED, "none": "none"}[kind]
        out.parallel = not typed_field(choice, "disable_parallel_tool_use", bool, False)
    return out


def check_fields(body: Any, allowed: frozenset[str]) -> dict:
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
    body = check_fields(body, MESSAGE_FIELDS)
    request = CompletionRequest(model=body["model"], messages=conversation(body), max_tokens_given=True)
    tools = request_tools(body)
    request.tools, request.tool_choice, request.parallel_tool_calls = tools.tools, tools.choice, tools.parallel
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


