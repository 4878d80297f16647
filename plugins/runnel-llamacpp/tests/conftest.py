"""Fixtures for the llama.cpp tests: builtin:tiny written as GGUF into a fresh cache, the
server serving it, and CTranslate2 on the same weights as the reference.

The server fixtures come from runnel's test harness (the repository's root conftest.py).
"""

from __future__ import annotations

import pytest

from runnel.testing import ServerThread, server_config

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make install builds it)")


def llama_config(**options) -> dict:
    return {"apps": {"tiny": {"backend": "llamacpp", "model": "builtin:tiny", **options}}}


@pytest.fixture
def app_config():
    """``app_config(**options)``: a server config with builtin:tiny on llama.cpp as app "tiny"."""
    return llama_config


@pytest.fixture(scope="session", autouse=True)
def gguf_cache(tmp_path_factory):
    """Each test session writes the GGUF anew (the first-use path), into its own cache."""
    cache = tmp_path_factory.mktemp("runnel-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RUNNEL_CACHE_DIR", str(cache))
        yield cache


@pytest.fixture(scope="module")
def llama_server(gguf_cache):
    server = ServerThread(server_config(llama_config())).start()
    assert server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(llama_server):
    import openai

    with openai.OpenAI(base_url=llama_server.url + "/v1", api_key="x", max_retries=0, timeout=60) as client:
        yield client


class Float32Reference:
    """Greedy decoding by CTranslate2 computing in float32 on the shipped weights: the
    numbers the GGUF holds (int8 weights divided by their scales)."""

    def __init__(self) -> None:
        import ctranslate2
        from runnel_ctranslate2.builtin import ensure_builtin
        from runnel_ctranslate2.tokenizer import load_tokenizer

        model_dir = ensure_builtin("tiny")
        self.tokenizer = load_tokenizer(model_dir)
        self.generator = ctranslate2.Generator(model_dir, device="cpu", compute_type="float32", intra_threads=1)

    def greedy_ids(self, prompt_ids: list[int], max_tokens: int, ignore_eos: bool = False) -> list[int]:
        start = [self.tokenizer.id_to_token(i) for i in prompt_ids]
        result = self.generator.generate_batch([start], max_length=max_tokens, sampling_topk=1,
                                               include_prompt_in_result=False,
                                               **({"end_token": []} if ignore_eos else {}))
        return list(result[0].sequences_ids[0])

    def close(self) -> None:
        self.generator.unload_model()
        del self.generator


@pytest.fixture(scope="module")
def reference():
    ref = Float32Reference()
    yield ref
    ref.close()
