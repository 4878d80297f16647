"""Fixtures shared by the CTranslate2 tests: a random model of builtin:tiny's shape.

The model takes ~0.1 s to build. The server fixtures (``start_server``) come from
runnel's test harness, loaded by the repository's root conftest.py.
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
