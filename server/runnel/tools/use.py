"""A request's tools, as every surface hands them to the model and reads its calls back.

Surfaces differ in how a client names tools (OpenAI chat's ``{"type": "function",
"function": {...}}``, the Responses API's flat ``{"type": "function", "name": ...}``,
Anthropic's ``{"name", "input_schema"}``) and ``tool_choice``; each turns its own into
``function_tool(...)`` dicts and a choice of "auto", "required" or a function's name,
and from there one ``ToolUse`` does the rest: the tools for the chat template, the
prefill that forces a call, and a parser per choice.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import HTTPError
from ..generation import SamplingParams
from .formats import FORMATS, ToolCallFormat
from .parser import ToolCallParser, ToolEvents, functions_by_name, new_call_id

MAX_TOOLS = 128  # as OpenAI
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
AUTO, REQUIRED = "auto", "required"


def _invalid(param: str, message: str) -> HTTPError:
    return HTTPError(400, message, type="invalid_request_error", param=param, code="invalid_value")


def function_tool(name: Any, description: Any, parameters: Any, param: str) -> dict[str, Any]:
    """One function tool, checked, in the chat-template shape
    ``{"type": "function", "function": {"name", "description"?, "parameters"?}}``;
    ``param`` names the tool in a 400."""
    if type(name) is not str or not _FUNCTION_NAME.fullmatch(name):
        raise _invalid(f"{param}.name", f"Invalid '{param}.name': a function name is 1 to 64 letters, digits, "
                       "underscores or dashes.")
    function: dict[str, Any] = {"name": name}
    if description is not None:
        if type(description) is not str:
            raise _invalid(f"{param}.description", f"Invalid type for '{param}.description': expected a string.")
        function["description"] = description
    if parameters is not None:
        if type(parameters) is not dict:
            raise _invalid(f"{param}.parameters", f"Invalid type for '{param}.parameters': expected a JSON "
                           "schema object.")
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def check_tools(tools: Sequence[Mapping[str, Any]], param: str) -> None:
    """At most MAX_TOOLS, names unique (a call names one function)."""
    if len(tools) > MAX_TOOLS:
        raise _invalid(param, f"'{param}' may hold at most {MAX_TOOLS} tools, not {len(tools)}.")
    seen: set[str] = set()
    for index, tool in enumerate(tools):
        name = tool["function"]["name"]
        if name in seen:
            raise _invalid(f"{param}[{index}]", f"Two tools in '{param}' are named `{name}`.")
        seen.add(name)


def tool_parser_names() -> tuple[str, ...]:
    return tuple(FORMATS)


class ToolUse:
    """One request's tools: what the template shows, how a call is forced, the parsers."""

    __slots__ = ("format", "tools", "choice", "single", "functions")

    def __init__(self, format: ToolCallFormat, tools: list[dict[str, Any]], choice: str, single: bool,
                 functions: Mapping[str, Mapping[str, Any]]) -> None:
        self.format = format
        self.tools = tools  # for the chat template
        self.choice = choice  # AUTO, REQUIRED or a function's name
        self.single = single  # parallel_tool_calls false
        if choice not in (AUTO, REQUIRED):
            functions = {choice: functions[choice]}  # a named call may only be that one
        self.functions = functions  # name -> parameters schema: what the reply may call

    @classmethod
    def create(cls, parser: str | None, model_id: str, tools: list[dict[str, Any]], choice: str | None,
               parallel: bool, *, param: str = "tools", choice_param: str = "tool_choice") -> ToolUse | None:
        """None when there is nothing to do (no tools, or ``choice`` "none"). ``parser`` is the
        app's tool-call format (None: it has none, and tools are a 400 naming ``param``)."""
        if choice is None:
            choice = AUTO
        if not tools:
            if choice not in (AUTO, "none"):
                raise _invalid(choice_param, f"'{choice_param}' is only allowed when '{param}' are given.")
            return None
        check_tools(tools, param)
        if choice == "none":
            return None
        functions = functions_by_name(tools)
        if choice not in (AUTO, REQUIRED) and choice not in functions:
            raise _invalid(choice_param, f"Invalid '{choice_param}': no tool named `{choice}` in '{param}'.")
        if parser is None:
            raise HTTPError(400, f"Model `{model_id}` has no tool-call parser, so it cannot be given tools: set "
                            "tool_parser in its app's config (runnel's README, \"Tool calling\").",
                            type="invalid_request_error", param=param, code="unsupported_parameter")
        return cls(FORMATS[parser], tools, choice, not parallel, functions)

    @property
    def forced(self) -> bool:
        return self.choice != AUTO

    @property
    def prefill(self) -> str:
        """The text the assistant's turn starts with ("" unless a call is forced)."""
        if self.choice == AUTO:
            return ""
        return self.format.prefill(None if self.choice == REQUIRED else self.choice)

    @property
    def constraint(self) -> dict[str, Any] | None:
        """What a forced call's reply must be after the prefill, for a backend that decodes by
        grammar (runnel.generation.SamplingParams.tool_call): one JSON value and the text that
        closes the call. None when no call is forced, or when the prefill leaves no whole value
        to follow (Llama 3's required call begins with "{")."""
        if self.choice == AUTO:
            return None
        form = self.format
        closing = form.closing or ("]" if form.skip_before == "[" else "")
        if self.choice != REQUIRED:  # the prefill ends '"arguments":'
            return {"schema": self.functions[self.choice], "suffix": "}" + closing}
        if form.leading_object:
            return None
        calls = [{"type": "object", "properties": {"name": {"const": name}, form.arguments_key: parameters},
                  "required": ["name", form.arguments_key]} for name, parameters in self.functions.items()]
        return {"schema": calls[0] if len(calls) == 1 else {"anyOf": calls}, "suffix": closing}

    def constrain(self, params: SamplingParams, app: Any) -> None:
        """Hold a forced call to its schemas where ``app``'s backend can ("tool_call" in its
        ``supported``); elsewhere the prefill alone forces it."""
        if "tool_call" in getattr(app, "supported", ()):
            params.tool_call = self.constraint

    def parser(self, events: ToolEvents, new_id: Callable[[], str] = new_call_id) -> ToolCallParser:
        """A parser for one choice, already fed the prefill (which the model continues)."""
        parser = ToolCallParser(self.format, events, functions=self.functions, new_id=new_id, single=self.single,
                                forced=self.forced)
        parser.feed(self.prefill)
        return parser
