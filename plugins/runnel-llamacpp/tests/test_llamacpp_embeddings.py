"""/v1/embeddings from a GGUF through llama.cpp: builtin:tiny's GGUF, mean-pooled."""

from __future__ import annotations

import math

import openai
import pytest

from runnel.testing import ServerThread, server_config


@pytest.fixture(scope="module")
def embed_client(gguf_cache):
    server = ServerThread(server_config({"apps": {"tiny-embed": {
        "backend": "llamacpp", "model": "builtin:tiny", "task": "embed", "pooling": "mean"}}})).start()
    assert server.wait_ready()
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60) as client:
        yield client
    server.stop()


def cosine(a, b) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_vectors_are_unit_length_and_the_same_alone_or_in_a_batch(embed_client):
    texts = ["The cat sees a red ball.", "A small dog reads the map.", "The cat sees a red ball."]
    batch = embed_client.embeddings.create(model="tiny-embed", input=texts)
    vectors = [item.embedding for item in batch.data]
    assert [len(vector) for vector in vectors] == [160] * 3  # the model's width
    assert all(math.isclose(math.sqrt(cosine(v, v)), 1, abs_tol=1e-4) for v in vectors)
    alone = embed_client.embeddings.create(model="tiny-embed", input=texts[1]).data[0].embedding
    assert cosine(alone, vectors[1]) == pytest.approx(1, abs=1e-5)
    assert cosine(vectors[0], vectors[2]) == pytest.approx(1, abs=1e-5)
    assert cosine(vectors[0], vectors[1]) < 0.999
    assert batch.usage.prompt_tokens > 3


def test_token_ids_in_are_the_text_they_decode_to(embed_client):
    from runnel_ctranslate2.builtin import ensure_builtin
    from runnel_ctranslate2.tokenizer import load_tokenizer

    ids = load_tokenizer(ensure_builtin("tiny")).encode("The cat sees", add_bos=False)
    by_ids = embed_client.embeddings.create(model="tiny-embed", input=[ids]).data[0].embedding
    # A llama piece keeps its word's space: the ids' text is " The cat sees".
    by_text = embed_client.embeddings.create(model="tiny-embed", input=" The cat sees").data[0].embedding
    assert cosine(by_ids, by_text) == pytest.approx(1, abs=1e-5)


def test_an_input_longer_than_the_model_takes_is_a_400_naming_it(embed_client):
    with pytest.raises(openai.BadRequestError) as raised:
        embed_client.embeddings.create(model="tiny-embed", input=["short", "word " * 2000])
    assert raised.value.body["param"] == "input[1]"
