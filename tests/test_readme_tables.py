"""The README's table of what each backend supports is the code's, not a second copy
that drifts: each row is checked against the backends' ``supported`` sets."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from runnel.simple_model import SimpleModel

README = Path(__file__).resolve().parents[1] / "README.md"


def backends() -> dict[str, type]:
    from runnel_ctranslate2.apps import GeneratorApp
    from runnel_echo import EchoApp
    from runnel_llamacpp.apps import LlamaApp

    # runnel-markov is the README's example plugin, installed only by its own test: load its one file.
    spec = importlib.util.spec_from_file_location("runnel_markov", README.parent / "plugins" / "runnel-markov" /
                                                  "runnel_markov.py")
    assert spec is not None and spec.loader is not None
    markov = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(markov)
    return {"ctranslate2": GeneratorApp, "llamacpp": LlamaApp, "echo": EchoApp, "markov": markov.Markov}


def support_table() -> tuple[list[str], dict[str, list[str]]]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Endpoints and what each backend supports"):text.index("### Tool calling")]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    table = {}
    for row in rows[2:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        table[cells[0]] = cells[1:]
    return header[1:], table


def test_every_sampling_parameter_row_matches_the_backends_supported_sets():
    columns, table = support_table()
    classes = backends()
    assert columns == list(classes)
    checked = 0
    for label, cells in table.items():
        names = re.findall(r"`(\w+)`", label.split("(")[0])
        if not names or names[0] == "tools":
            continue
        for column, cell in zip(columns, cells):
            for name in names:
                assert (cell == "yes") == (name in classes[column].supported), (label, column)
                checked += 1
    assert checked >= 14 * 4


def test_the_tools_row_says_every_text_backend_can_be_given_a_parser():
    """Tools need only chat_prompt to take tools (runnel.generation.ModelApp): every backend
    here does; the built-in CTranslate2 model has a parser of its own."""
    import inspect

    columns, table = support_table()
    for column, cell in zip(columns, table["`tools` (needs a `tool_parser`)"]):
        chat_prompt = backends()[column].chat_prompt
        assert (cell == "yes") == ("tools" in inspect.signature(chat_prompt).parameters), column
    assert issubclass(backends()["markov"], SimpleModel)
