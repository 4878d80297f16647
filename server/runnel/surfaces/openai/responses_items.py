"""The Responses API's items: what a request's ``input`` holds, as the chat messages an
app's template renders, and a response's ``output`` items.

Items are kept (in a stored response, for ``previous_response_id``) in one canonical
form, whatever shape the client sent them in::

    {"type": "message", "role": "user"|"system"|"developer"|"assistant", "content": str}
    {"type": "function_call", "call_id": str, "name": str, "arguments": str (JSON object)}
    {"type": "function_call_output", "call_id": str, "output": str}
"""

from __future__ import annotations

from typing import Any

import orjson

from .params import invalid

_ROLES = ("user", "system", "developer", "assistant")
_TEXT_PARTS = ("input_text", "output_text")


def _unsupported(param: str, what: str):
    return invalid(param, f"{what} is not supported by this server.", "unsupported_parameter")


def _string(item: dict, name: str, param: str) -> str:
    value = item.get(name)
    if type(value) is not str:
        raise invalid(f"{param}.{name}", f"Invalid type for '{param}.{name}': expected a string.", "invalid_type")
    return value


def _text(content: Any, param: str) -> str:
    """A string, or text parts (``input_text`` / ``output_text``) joined; any other part is a 400."""
    if type(content) is str:
        return content
    if type(content) is not list:
        raise invalid(param, f"Invalid type for '{param}': expected a string or an array of content parts.",
                      "invalid_type")
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if type(part) is dict else None
        if kind not in _TEXT_PARTS or type(part.get("text")) is not str:
            raise _unsupported(f"{param}[{index}]", f"Content part type {kind!r}")
        texts.append(part["text"])
    return "".join(texts)


def input_items(value: Any) -> list[dict]:
    """A request's ``input`` as canonical items (400s naming ``input[i]...``)."""
    if type(value) is str:
        return [{"type": "message", "role": "user", "content": value}]
    if type(value) is not list:
        raise invalid("input", "Invalid type for 'input': expected a string or an array of items.", "invalid_type")
    items = []
    for index, item in enumerate(value):
        param = f"input[{index}]"
        if type(item) is not dict:
            raise invalid(param, f"Invalid type for '{param}': expected an object.", "invalid_type")
        kind = item.get("type", "message")  # an "easy" message has no type
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise invalid(f"{param}.role", f"Invalid value for '{param}.role': {role!r}; supported roles are "
                              "'user', 'system', 'developer' and 'assistant'.")
            items.append({"type": "message", "role": role, "content": _text(item.get("content"), f"{param}.content")})
        elif kind == "function_call":
            arguments = _string(item, "arguments", param)
            try:
                parsed = orjson.loads(arguments)
            except orjson.JSONDecodeError:
                parsed = None
            if type(parsed) is not dict:
                raise invalid(f"{param}.arguments", f"Invalid value for '{param}.arguments': expected a JSON object.")
            items.append({"type": "function_call", "call_id": _string(item, "call_id", param),
                          "name": _string(item, "name", param), "arguments": arguments})
        elif kind == "function_call_output":
            items.append({"type": "function_call_output", "call_id": _string(item, "call_id", param),
                          "output": _text(item.get("output"), f"{param}.output")})
        else:
            raise _unsupported(f"{param}.type", f"Input item type {kind!r}")
    if not items:
        raise invalid("input", "'input' must contain at least one item.")
    return items


def output_as_input(output: list[dict]) -> list[dict]:
    """A finished response's ``output`` items as canonical input items (for the response
    that continues it)."""
    items = []
    for item in output:
        if item["type"] == "message":
            text = "".join(part["text"] for part in item["content"] if part["type"] == "output_text")
            items.append({"type": "message", "role": "assistant", "content": text})
        elif item["type"] == "function_call":
            items.append({"type": "function_call", "call_id": item["call_id"], "name": item["name"],
                          "arguments": item["arguments"]})
    return items


def chat_messages(instructions: str | None, items: list[dict]) -> list[dict]:
    """Canonical items as the messages an app's chat template takes: ``instructions`` first
    as a system message, consecutive function calls as one assistant message's
    ``tool_calls`` (joined to the assistant text before them), their outputs as tool messages."""
    messages: list[dict] = [{"role": "system", "content": instructions}] if instructions else []
    for item in items:
        kind = item["type"]
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": item["content"]})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": orjson.loads(item["arguments"])}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "content": item["output"], "tool_call_id": item["call_id"]})
    return messages


def message_item(item_id: str, text: str, status: str) -> dict:
    """An output message of one text part, as the openai SDK parses it."""
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [text_part(text)]}


def text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
