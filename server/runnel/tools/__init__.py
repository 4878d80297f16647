"""Tool calling for every surface that generates text (OpenAI chat, Responses, Anthropic).

    formats.py  how models write calls: hermes, llama3_json, mistral ([apps.NAME] tool_parser)
    parser.py   ToolCallParser: a reply as it streams -> content, call names, argument pieces
    use.py      ToolUse: one request's tools (template, forced-call prefill, parsers)

Models see tools through their chat template (``ModelApp.chat_prompt(messages, tools=...,
prefill=...)``); no backend does anything else for them.
"""

from __future__ import annotations

from .formats import FORMATS, ToolCallFormat
from .parser import ToolCall, ToolCallParser, ToolEvents, invalid_tool_call, new_call_id
from .use import AUTO, MAX_TOOLS, REQUIRED, ToolUse, check_tools, function_tool, tool_parser_names

__all__ = [
    "AUTO",
    "FORMATS",
    "MAX_TOOLS",
    "REQUIRED",
    "ToolCall",
    "ToolCallFormat",
    "ToolCallParser",
    "ToolEvents",
    "ToolUse",
    "check_tools",
    "function_tool",
    "invalid_tool_call",
    "new_call_id",
    "tool_parser_names",
]
