"""The ways models write tool calls, one ``ToolCallFormat`` each (``[apps.NAME] tool_parser``).

Every format here writes a call as a JSON object ``{"name": ..., "arguments": {...}}``
("parameters" in Llama 3's); what differs is what surrounds the objects:

    hermes        text <tool_call>{...}</tool_call> <tool_call>{...}</tool_call>   (Hermes, Qwen 2/2.5/3)
    llama3_json   {...}; {...}   the whole reply, maybe after <|python_tag|>        (Llama 3.1/3.2/3.3)
    mistral       text [TOOL_CALLS] [{...}, {...}]                                  (Mistral v0.3 tokenizers)

A format also says how to force a call (``tool_choice`` "required" or a named function)
without constrained decoding: the assistant's turn is begun with ``prefill(name)``, and the
model writes what follows.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson


@dataclass(frozen=True, slots=True)
class ToolCallFormat:
    name: str
    opening: str  # where calls begin inside the text
    closing: str = ""  # what ends each call ("" when the next separator or the end does)
    separators: str = ""  # what may stand between two calls besides whitespace
    skip_before: str = ""  # what may stand between the opening and the first object
    # The reply may be calls from its first character, without the opening (Llama 3).
    leading_object: bool = False
    arguments_key: str = "arguments"  # how prefills name the arguments

    def prefill(self, function: str | None) -> str:
        """The text the assistant's turn starts with to force a call (of ``function``, if named)."""
        if self.leading_object:  # a reply that starts with an object is a call
            start = ""
        else:
            start = self.opening + (" [" if self.skip_before == "[" else "")
        if function is None:
            return start or "{"
        name = orjson.dumps(function).decode()
        return f'{start}{{"name": {name}, "{self.arguments_key}":'


FORMATS: dict[str, ToolCallFormat] = {
    "hermes": ToolCallFormat("hermes", opening="<tool_call>", closing="</tool_call>"),
    "llama3_json": ToolCallFormat("llama3_json", opening="<|python_tag|>", separators=";", leading_object=True,
                                  arguments_key="parameters"),
    "mistral": ToolCallFormat("mistral", opening="[TOOL_CALLS]", separators=",]", skip_before="["),
}
