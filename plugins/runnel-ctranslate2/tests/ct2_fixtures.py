"""Shared fixtures, imported by the test modules that use them.

Not a conftest.py: the core's tests do `from conftest import ...`, and a second conftest
module on the same run would shadow theirs. The model takes ~0.1 s to build.
"""

import pytest

from runnel_ctranslate2.builtin import build_random_model
from runnel_ctranslate2.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def sp_tokenizer(tiny_dir):
    return load_tokenizer(tiny_dir)
