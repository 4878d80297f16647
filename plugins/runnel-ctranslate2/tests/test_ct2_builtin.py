import json
import os
import subprocess
import sys

import ctranslate2
import pytest

from runnel_ctranslate2 import builtin
from runnel_ctranslate2.builtin import build_random_model, ensure_builtin
from runnel_ctranslate2.tokenizer import load_tokenizer

FILES = ["config.json", "model.bin", "tokenizer.model", "tokenizer_config.json", "vocabulary.json"]


def greedy(model_dir, prompt="The cat sees", n=24):
    tokenizer = load_tokenizer(model_dir)
    tokens = [tokenizer.id_to_token(i) for i in tokenizer.encode(prompt, add_bos=True)]
    generator = ctranslate2.Generator(str(model_dir), device="cpu", intra_threads=1)
    try:
        result = generator.generate_batch(
            [tokens], max_length=n, sampling_topk=1, include_prompt_in_result=False
        )
        return result[0].sequences_ids[0]
    finally:
        del generator  # see DESIGN: CTranslate2 objects must go before interpreter exit


def test_directory_is_a_complete_model(tiny_dir):
    assert sorted(os.listdir(tiny_dir)) == FILES
    vocabulary = json.loads((tiny_dir / "vocabulary.json").read_text())
    tokenizer = load_tokenizer(tiny_dir)
    # The model's vocabulary is the tokenizer's pieces in id order.
    assert vocabulary == [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]
    assert vocabulary[:3] == ["<unk>", "<s>", "</s>"]
    assert 300 <= len(vocabulary) <= 512
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<s>" and config["eos_token"] == "</s>"
    assert "add_generation_prompt" in config["chat_template"]


def test_the_model_carries_the_plain_chat_template(tiny_dir):
    from runnel.chat_template import BUILTIN_TEMPLATES, load_chat_template

    assert load_chat_template(tiny_dir) == BUILTIN_TEMPLATES["plain"]


def test_greedy_is_deterministic_across_generators(tiny_dir):
    first = greedy(tiny_dir)
    assert first == greedy(tiny_dir)
    assert len(first) == 24  # the random model never picks </s> greedily
    assert len(set(first)) > 3


def test_same_seed_same_bytes_other_seed_other_model(tiny_dir, tmp_path):
    again = build_random_model(tmp_path / "again", seed=0)
    for name in FILES:
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    other = build_random_model(tmp_path / "other", seed=1)
    assert (other / "model.bin").read_bytes() != (tiny_dir / "model.bin").read_bytes()
    assert greedy(other) != greedy(tiny_dir)


def test_generates_text_from_a_batch_with_a_callback(tiny_dir, sp_tokenizer):
    prompts = [
        [sp_tokenizer.id_to_token(i) for i in sp_tokenizer.encode(p, add_bos=True)]
        for p in ("User: hello", "The river")
    ]
    seen = []
    generator = ctranslate2.Generator(str(tiny_dir), device="cpu", intra_threads=1)
    try:
        results = generator.generate_batch(
            prompts,
            max_length=8,
            sampling_topk=1,
            include_prompt_in_result=False,
            callback=lambda step: seen.append((step.batch_id, step.token_id)),
        )
    finally:
        del generator
    for row, result in enumerate(results):
        assert [t for b, t in seen if b == row] == result.sequences_ids[0]
        assert sp_tokenizer.decode(result.sequences_ids[0]).strip()


def test_ensure_builtin_builds_once_then_reuses(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "_PACKAGED_MODELS", tmp_path / "no-packaged-models")
    cache = tmp_path / "cache"
    path = ensure_builtin("tiny", cache_dir=cache)
    model_bin = os.path.join(path, "model.bin")
    mtime = os.stat(model_bin).st_mtime_ns
    assert ensure_builtin("tiny", cache_dir=cache) == path
    assert os.stat(model_bin).st_mtime_ns == mtime
    # Only the model is left in the cache: no half-built temporary directories.
    assert os.listdir(cache) == [os.path.basename(path)]


def test_ensure_builtin_default_cache_from_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "_PACKAGED_MODELS", tmp_path / "no-packaged-models")
    monkeypatch.setenv("RUNNEL_CACHE_DIR", str(tmp_path / "env-cache"))
    path = ensure_builtin("tiny")
    assert os.path.dirname(path) == str(tmp_path / "env-cache")


def test_ensure_builtin_prefers_a_packaged_model(tmp_path, monkeypatch):
    packaged = tmp_path / "models"
    (packaged / "tiny").mkdir(parents=True)
    (packaged / "tiny" / "model.bin").write_bytes(b"trained")
    monkeypatch.setattr(builtin, "_PACKAGED_MODELS", packaged)
    assert ensure_builtin("tiny", cache_dir=tmp_path / "cache") == str(packaged / "tiny")
    assert not (tmp_path / "cache").exists()


def test_ensure_builtin_unknown_name_lists_known():
    with pytest.raises(ValueError, match="tiny"):
        ensure_builtin("huge")


def test_ensure_builtin_racing_processes_share_one_model(tmp_path):
    # Two processes build at once; both must answer the same complete directory.
    code = (
        "import sys; from runnel_ctranslate2 import builtin; "
        "builtin._PACKAGED_MODELS = builtin.Path(sys.argv[2]); "
        "print(builtin.ensure_builtin('tiny', cache_dir=sys.argv[1]))"
    )
    cache, nothing = str(tmp_path / "cache"), str(tmp_path / "none")
    procs = [
        subprocess.Popen([sys.executable, "-c", code, cache, nothing], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    paths = {p.communicate()[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(paths) == 1
    (path,) = paths
    assert sorted(os.listdir(path)) == FILES
    assert os.listdir(cache) == [os.path.basename(path)]


def test_write_decoder_model_leaves_the_callers_arrays_alone_and_tied_weights_tied(tmp_path):
    """CTranslate2 quantizes the arrays it is given in place: the writer hands it copies, so
    the same weights written twice give the same model."""
    import numpy as np

    import sentencepiece as spm

    sp_bytes = builtin._train_sentencepiece(builtin._corpus(0), 512)
    vocab = spm.SentencePieceProcessor(model_proto=sp_bytes).get_piece_size()
    rng = np.random.default_rng(0)
    d, ffn = 32, 64

    def linear(out_dim, in_dim):
        return rng.standard_normal((out_dim, in_dim), dtype=np.float32) / np.float32(np.sqrt(in_dim))

    weights = {"embeddings": rng.standard_normal((vocab, d), dtype=np.float32), "norm": np.ones(d, np.float32),
               "layers.0.attention_norm": np.ones(d, np.float32), "layers.0.qkv": linear(3 * d, d),
               "layers.0.out": linear(d, d), "layers.0.ffn_norm": np.ones(d, np.float32),
               "layers.0.gate": linear(ffn, d), "layers.0.up": linear(ffn, d), "layers.0.down": linear(d, ffn)}
    weights["projection"] = weights["embeddings"]  # tied
    before = {name: array.copy() for name, array in weights.items()}
    first = builtin.write_decoder_model(tmp_path / "a", weights, sp_bytes, heads=4, max_position=64,
                                        quantization="int8")
    assert all(np.array_equal(weights[name], before[name]) and weights[name].dtype == np.float32
               for name in weights)
    second = builtin.write_decoder_model(tmp_path / "b", weights, sp_bytes, heads=4, max_position=64,
                                         quantization="int8")
    assert (first / "model.bin").read_bytes() == (second / "model.bin").read_bytes()
