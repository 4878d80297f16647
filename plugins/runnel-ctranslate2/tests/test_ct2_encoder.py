"""``task = "embed"``: a CTranslate2 encoder behind /v1/embeddings, driven by the openai SDK.

The model is a small BERT-like encoder (post-norm Transformer with learned positions and a
layer norm on the embeddings, as CTranslate2's converter writes BertModel) built here from
seeded numpy weights through ``ctranslate2.specs``, with a Hugging Face ``tokenizer.json``
(a word-level vocabulary) made with the ``tokenizers`` library. Attention and feed-forward
weights are small, so a token's output stays close to its own embedding: sentences that
share most words get close mean-pooled vectors, by construction rather than by luck.
"""

from __future__ import annotations

import base64
import math
from pathlib import Path

import ctranslate2
import numpy as np
import openai
import pytest
from ctranslate2.specs import common_spec, transformer_spec
from tokenizers import Tokenizer, models, pre_tokenizers


WORDS = ("the a cat dog sat on mat small red blue house river boat sings loudly at night quantum physics "
         "explains particles energy waves market prices rose sharply today").split()
HIDDEN = 32

RELATED = ("the small cat sat on the mat", "the small dog sat on the mat")
UNRELATED = "quantum physics explains particles"


def build_encoder(directory: Path, *, seed: int = 0, hidden: int = HIDDEN, layers: int = 2, heads: int = 4,
                  ffn: int = 64, max_positions: int = 64) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    vocabulary = ["[UNK]", "[CLS]", "[SEP]", *WORDS]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(vocabulary)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))

    spec = transformer_spec.TransformerEncoderModelSpec(transformer_spec.TransformerEncoderSpec(
        layers, heads, pre_norm=False, activation=common_spec.Activation.GELU, layernorm_embedding=True))
    rng = np.random.default_rng(seed)

    def linear(layer, out_dim: int, in_dim: int) -> None:
        layer.weight = rng.standard_normal((out_dim, in_dim), dtype=np.float32) * np.float32(0.1 / math.sqrt(in_dim))
        layer.bias = np.zeros(out_dim, dtype=np.float32)

    def norm(layer) -> None:
        layer.gamma = np.ones(hidden, dtype=np.float32)
        layer.beta = np.zeros(hidden, dtype=np.float32)

    encoder = spec.encoder
    encoder.scale_embeddings = False
    encoder.embeddings[0].weight = rng.standard_normal((len(vocabulary), hidden), dtype=np.float32)
    encoder.position_encodings.encodings = rng.standard_normal((max_positions, hidden), dtype=np.float32) * np.float32(0.1)
    norm(encoder.layernorm_embedding)
    for layer in encoder.layer:
        linear(layer.self_attention.linear[0], 3 * hidden, hidden)  # fused q, k, v
        linear(layer.self_attention.linear[1], hidden, hidden)
        norm(layer.self_attention.layer_norm)
        linear(layer.ffn.linear_0, ffn, hidden)
        linear(layer.ffn.linear_1, hidden, ffn)
        norm(layer.ffn.layer_norm)
    spec.config.unk_token = "[UNK]"
    spec.config.layer_norm_epsilon = 1e-12
    spec.register_vocabulary(vocabulary)
    spec.validate()
    spec.optimize(quantization="float32")
    spec.save(str(directory))
    return directory


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return build_encoder(tmp_path_factory.mktemp("encoder") / "mini-encoder")


@pytest.fixture(scope="module")
def pooled(encoder_dir):
    """Mean-pooled last hidden states computed here, one text at a time (no padding)."""
    tokenizer = Tokenizer.from_file(str(encoder_dir / "tokenizer.json"))
    encoder = ctranslate2.Encoder(str(encoder_dir), device="cpu", intra_threads=1)

    def pool(text: str) -> np.ndarray:
        tokens = tokenizer.encode(text, add_special_tokens=False).tokens
        hidden = np.asarray(encoder.forward_batch([tokens]).last_hidden_state)[0]
        assert hidden.shape == (len(tokens), HIDDEN)
        return hidden.mean(axis=0)

    yield pool
    encoder.unload_model()
    del encoder


def embed_config(directory, **options) -> dict:
    app = {"backend": "ctranslate2", "task": "embed", "model": str(directory), "device": "cpu",
           "intra_threads": 1, **options}
    return {"apps": {"minilm": app}}


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="test", max_retries=0, timeout=30)


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_embeddings_are_normalized_mean_pooled_vectors(start_server, encoder_dir, pooled):
    server = start_server(embed_config(encoder_dir))
    texts = [*RELATED, UNRELATED]
    with client_for(server) as client:
        reply = client.embeddings.create(model="mini-encoder", input=texts, encoding_format="float")
    assert reply.object == "list"
    assert reply.model == "mini-encoder"  # the model directory's name
    assert [item.index for item in reply.data] == [0, 1, 2]
    vectors = [item.embedding for item in reply.data]
    for text, vector in zip(texts, vectors):
        assert len(vector) == HIDDEN
        assert math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-5)
        expected = pooled(text)
        np.testing.assert_allclose(vector, expected / np.linalg.norm(expected), atol=1e-5)
    words = sum(len(text.split()) for text in texts)
    assert reply.usage.prompt_tokens == words
    assert reply.usage.total_tokens == words
    # Sentences sharing most words are closer than unrelated ones.
    assert cosine(vectors[0], vectors[1]) > 0.8
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.3
    assert cosine(vectors[1], vectors[0]) > cosine(vectors[1], vectors[2]) + 0.3


def test_base64_encoding_is_the_same_float32_vectors(start_server, encoder_dir):
    server = start_server(embed_config(encoder_dir))
    texts = ["the red boat", "market prices rose sharply today"]
    with client_for(server) as client:
        floats = client.embeddings.create(model="mini-encoder", input=texts, encoding_format="float")
        packed = client.embeddings.create(model="mini-encoder", input=texts, encoding_format="base64")
    for as_floats, as_base64 in zip(floats.data, packed.data):
        assert isinstance(as_base64.embedding, str)
        decoded = np.frombuffer(base64.b64decode(as_base64.embedding), dtype="<f4")
        assert decoded.shape == (HIDDEN,)
        assert decoded.tolist() == np.asarray(as_floats.embedding, dtype=np.float32).tolist()


def test_normalize_false_gives_the_raw_mean(start_server, encoder_dir, pooled):
    server = start_server(embed_config(encoder_dir, normalize=False, served_model_name="raw"))
    with client_for(server) as client:
        reply = client.embeddings.create(model="raw", input="the blue house by the river", encoding_format="float")
    vector = reply.data[0].embedding
    assert len(vector) == HIDDEN
    assert abs(np.linalg.norm(vector) - 1.0) > 0.1
    np.testing.assert_allclose(vector, pooled("the blue house by the river"), atol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_batched_inputs_of_different_lengths_match_single_ones(start_server, encoder_dir, pooled, normalize):
    # Padding inside a batch (and the split into max_batch_size chunks) must not leak into
    # any vector: each equals the text embedded on its own.
    server = start_server(embed_config(encoder_dir, max_batch_size=3, normalize=normalize, served_model_name="enc"))
    texts = ["cat", "the dog sings loudly at night on the mat", "a red house", "waves", "energy particles rose"]
    with client_for(server) as client:
        batched = client.embeddings.create(model="enc", input=texts, encoding_format="float").data
        single = [client.embeddings.create(model="enc", input=text, encoding_format="float").data[0]
                  for text in texts]
    for text, many, one in zip(texts, batched, single):
        np.testing.assert_allclose(many.embedding, one.embedding, atol=1e-5, err_msg=text)
        expected = pooled(text)
        if normalize:
            expected = expected / np.linalg.norm(expected)
        np.testing.assert_allclose(many.embedding, expected, atol=1e-5, err_msg=text)


def test_an_encoder_does_not_serve_completions(start_server, encoder_dir):
    server = start_server(embed_config(encoder_dir))
    with client_for(server) as client:
        assert [model.id for model in client.models.list()] == ["mini-encoder"]
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(model="mini-encoder", prompt="the cat", max_tokens=2)
    assert caught.value.status_code in (400, 404)


def test_embed_app_releases_its_encoder_on_stop(start_server, encoder_dir):
    server = start_server(embed_config(encoder_dir))
    app = server.server.apps.get("minilm")
    assert app.encoder is not None
    server.stop()
    assert app.encoder is None


def test_token_id_inputs_are_embedded_as_their_text(start_server, encoder_dir):
    server = start_server(embed_config(encoder_dir))
    ids = {word: index for index, word in enumerate(["[UNK]", "[CLS]", "[SEP]", *WORDS])}
    with client_for(server) as client:
        texts = client.embeddings.create(model="mini-encoder", input=[*RELATED])
        rows = [[ids[word] for word in text.split()] for text in RELATED]
        reply = client.embeddings.create(model="mini-encoder", input=rows)
        np.testing.assert_allclose([item.embedding for item in reply.data],
                                   [item.embedding for item in texts.data], atol=1e-5)
        assert reply.usage.prompt_tokens == texts.usage.prompt_tokens
        with pytest.raises(openai.BadRequestError) as raised:
            client.embeddings.create(model="mini-encoder", input=[[ids["cat"], len(ids)]])
        assert raised.value.body["param"] == "input"
