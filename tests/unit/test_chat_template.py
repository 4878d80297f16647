import json

import jinja2
import pytest

from runnel.chat_template import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    load_chat_template,
    render_chat,
    resolve_chat_template,
)

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there!"},
]

# Zephyr's template as shipped in its tokenizer_config.json (JSON escapes already undone).
ZEPHYR = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)


def test_hugging_face_template_with_and_without_generation_prompt():
    # trim_blocks/lstrip_blocks remove the template's own newlines, as in transformers.
    template = ChatTemplate(ZEPHYR, bos_token="<s>", eos_token="</s>")
    assert template.render(CONVERSATION, add_generation_prompt=True) == (
        "<|system|>\nYou are terse.</s>\n<|user|>\nHi there!</s>\n<|assistant|>\n"
    )
    assert template.render(CONVERSATION, add_generation_prompt=False) == (
        "<|system|>\nYou are terse.</s>\n<|user|>\nHi there!</s>\n"
    )


def test_builtin_templates():
    assert render_chat(BUILTIN_TEMPLATES["chatml"], CONVERSATION) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_chat(
        BUILTIN_TEMPLATES["llama2"], CONVERSATION, bos_token="<s>", eos_token="</s>"
    ) == "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there! [/INST]"
    plain = ChatTemplate(BUILTIN_TEMPLATES["plain"], bos_token="<s>")
    assert plain.render(CONVERSATION) == "<s>System: You are terse.\nUser: Hi there!\nAssistant:"
    assert plain.render(CONVERSATION, add_generation_prompt=False) == (
        "<s>System: You are terse.\nUser: Hi there!\n"
    )
    # An assistant turn ends with the eos token: the built-in model's end of turn.
    plain = ChatTemplate(BUILTIN_TEMPLATES["plain"], bos_token="<s>", eos_token="</s>")
    turns = [*CONVERSATION, {"role": "assistant", "content": " Hello. "}, {"role": "user", "content": "Bye."}]
    assert plain.render(turns) == (
        "<s>System: You are terse.\nUser: Hi there!\nAssistant: Hello.</s>\nUser: Bye.\nAssistant:"
    )


def test_raise_exception_and_sandbox():
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        render_chat(BUILTIN_TEMPLATES["llama2"], [{"role": "assistant", "content": "x"}])
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat("{{ messages.append(1) }}", CONVERSATION)
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat("{{ ''.__class__.__mro__ }}", CONVERSATION)


def test_helpers_match_transformers():
    rendered = render_chat(
        "{% for m in messages %}{% generation %}{{ m | tojson }}{% endgeneration %}"
        "{% if loop.first %}{% continue %}{% endif %}{% endfor %}",
        [{"role": "user", "content": "é <b>"}],
    )
    # Non-ASCII and HTML characters are kept, unlike Jinja's own tojson.
    assert rendered == '{"role": "user", "content": "é <b>"}'


def test_load_chat_template(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": BUILTIN_TEMPLATES["plain"]}))
    assert load_chat_template(model) == BUILTIN_TEMPLATES["plain"]
    assert load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}
        )
    )
    assert load_chat_template(tmp_path) == "D"
    assert resolve_chat_template(tmp_path) == "D"
    assert resolve_chat_template(tmp_path, "chatml") == BUILTIN_TEMPLATES["chatml"]
    with pytest.raises(ValueError, match="chatml"):
        resolve_chat_template(tmp_path, "nope")
