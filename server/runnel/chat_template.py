"""Chat templates: messages -> prompt text, rendered as Hugging Face's apply_chat_template does.

Models ship a Jinja template in ``tokenizer_config.json``; rendering it with the same
environment as transformers (sandboxed, trim_blocks, lstrip_blocks, loop controls,
``raise_exception``, a non-escaping ``tojson``, ``strftime_now``, ``{% generation %}``) gives
the exact prompt the model was trained on. The prompt is tokenized with ``add_bos=False``:
templates that want a bos token write ``{{ bos_token }}`` themselves.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Templates for models that ship none; choose one by name in the app's config.
BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Llama-2-chat's own: the system prompt is folded into the first user turn.
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}"
        "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
        "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ ' '  + content.strip() + ' ' + eos_token }}"
        "{% endif %}"
        "{% endfor %}"
    ),
    # "Role: content" lines, then "Assistant:" to prompt a reply (the built-in model's).
    # Each assistant turn ends with the eos token: the model learns to end its turn with
    # it, and generation stops there, rather than going on to write the user's next line.
    # Tools, when offered, are one first line, "Tools: name(param, ...), ..."; a call is
    # the Hermes format, <tool_call>{"name": ..., "arguments": {...}}</tool_call>, in the
    # assistant's turn (tool_parser "hermes"); a tool's result is a "Tool: ..." line.
    "plain": (
        "{{ bos_token }}"
        "{% if tools %}Tools: "
        "{% for tool in tools %}{% set f = tool['function'] if tool['function'] is defined else tool %}"
        "{{ f['name'] }}({{ (f['parameters'] or {}).get('properties', {}) | join(', ') }})"
        "{{ ', ' if not loop.last else '' }}{% endfor %}{{ '\\n' }}"
        "{% endif %}"
        "{% for message in messages %}"
        "{{ message['role'] | capitalize }}: "
        "{% if message['role'] == 'assistant' and message['tool_calls'] %}"
        "{% if message['content'] %}{{ message['content'] | trim }} {% endif %}"
        "{% for call in message['tool_calls'] %}{% set f = call['function'] %}"
        "<tool_call>{{ {'name': f['name'], 'arguments': f['arguments']} | tojson }}</tool_call>"
        "{% endfor %}"
        "{% else %}{{ message['content'] | trim }}{% endif %}"
        "{{ eos_token if message['role'] == 'assistant' else '' }}\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}"
    ),
}


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks in
    transformers; for inference it only has to render its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(
            lineno
        )

    def _render(self, caller: Any) -> str:
        return caller()


class TemplateRaised(jinja2.exceptions.TemplateError):
    """The template refused the conversation (``raise_exception``): the client's mistake,
    where any other TemplateError is the template's."""


class CannotContinue(ValueError):
    """The template does not write an assistant's text as given, so a reply can't be begun for the model."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters; transformers replaces it with plain json.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class ChatTemplate:
    """A compiled chat template with its model's special tokens; compile once per app
    (compiling costs far more than rendering)."""

    def __init__(
        self, source: str, *, bos_token: str | None = None, eos_token: str | None = None
    ):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationTag, jinja2.ext.loopcontrols],
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.source = source
        self._template = env.from_string(source)  # raises TemplateSyntaxError when broken
        self._tokens = {"bos_token": bos_token or "", "eos_token": eos_token or ""}

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """Render ``messages`` (dicts with role and content) into the prompt text.

        Raises jinja2.TemplateError where the template calls ``raise_exception`` (e.g. roles
        that do not alternate) or fails while rendering.
        """
        return self._template.render(
            messages=list(messages),
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **{**self._tokens, **extra},
        )


    def continue_reply(self, messages: Sequence[Mapping[str, Any]], prefill: str, **extra: Any) -> str:
        """The prompt with the assistant's reply begun as ``prefill``, for the model to go on
        from (transformers' ``continue_final_message``): the conversation is rendered with
        ``prefill`` as a final assistant message, and cut just after it. Whitespace around
        ``prefill`` is the template's to place (templates trim content)."""
        text = prefill.strip()
        rendered = self.render([*messages, {"role": "assistant", "content": text}], add_generation_prompt=False,
                               **extra)
        at = rendered.rfind(text) if text else -1
        if at == -1:
            raise CannotContinue("its chat template does not write an assistant's text as given")
        return rendered[: at + len(text)]


def chat_prompt(template: ChatTemplate | None, model_id: str, messages: list[dict], *,
                tools: list[dict] | None = None, prefill: str = "") -> str:
    """An app's ``chat_prompt`` (runnel.generation.ModelApp): the messages through ``template``,
    what the client got wrong as a 400 (no template, a conversation the template refuses, a
    reply that can't be begun for a forced tool call)."""
    from runnel import HTTPError

    if template is None:
        raise HTTPError(400, f"Model `{model_id}` has no chat template; use /v1/completions or set "
                        "chat_template in its config.", param="messages", code="no_chat_template")
    try:
        if not prefill:
            return template.render(messages, add_generation_prompt=True, tools=tools or None)
        return template.continue_reply(messages, prefill, tools=tools or None)
    except TemplateRaised as error:  # e.g. roles that do not alternate: a 400, not a 500
        raise HTTPError(400, f"The model's chat template refused the messages: {error}", param="messages",
                        code="invalid_messages") from None
    except CannotContinue as error:
        raise HTTPError(400, f"Model `{model_id}` cannot be made to call a tool: {error}",
                        param="tool_choice", code="unsupported_parameter") from None


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **extra: Any,
) -> str:
    """One-off rendering; see ChatTemplate."""
    return ChatTemplate(template, bos_token=bos_token, eos_token=eos_token).render(
        messages, add_generation_prompt=add_generation_prompt, **extra
    )


def load_chat_template(model_dir: str | os.PathLike) -> str | None:
    """The ``chat_template`` of a model directory's ``tokenizer_config.json``, if any.

    A list of named templates (``[{"name": ..., "template": ...}]``) gives the "default" one.
    A ``chat_template.jinja`` file (newer transformers saves it apart) is read too.
    """
    model_dir = Path(model_dir)
    template = None
    config_path = model_dir / "tokenizer_config.json"
    if config_path.is_file():
        with open(config_path, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def resolve_chat_template(model_dir: str | os.PathLike, name: str | None = None) -> str | None:
    """The template to use: a built-in one by ``name`` if given, else the model's own."""
    if name is not None:
        try:
            return BUILTIN_TEMPLATES[name]
        except KeyError:
            raise ValueError(
                f"unknown chat template {name!r}; built-in: {', '.join(BUILTIN_TEMPLATES)}"
            ) from None
    return load_chat_template(model_dir)
