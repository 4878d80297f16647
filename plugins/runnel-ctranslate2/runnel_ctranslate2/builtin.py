"""The built-in models: a tiny Llama-style decoder built from a seed, cached on disk.

A fresh machine can serve ``model = "builtin:tiny"`` without any download: the weights are
drawn with numpy from a fixed seed and written through CTranslate2's own model spec, and
the vocabulary is a sentencepiece model trained on a corpus generated from the same seed.
Nothing here needs torch, and building takes a fraction of a second.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runnel.chat_template import BUILTIN_TEMPLATES

# Bump when the builder's output changes, so caches built by older code are not reused.
BUILD_VERSION = 2  # 2: the chat template ends assistant turns with </s>

KNOWN_MODELS = ("tiny",)

# A trained demo model may be shipped inside the package; it wins over the random one.
_PACKAGED_MODELS = Path(__file__).parent / "models"

# "Role: content" lines. Its `{{ bos_token }}` is rendered as text and recognised by the
# tokenizer, as with Hugging Face templates, so the prompt is encoded with add_bos=False.
TINY_CHAT_TEMPLATE = BUILTIN_TEMPLATES["plain"]
# How the trained built-in model writes tool calls (scripts/train_tiny.py): every backend
# that serves its weights names this format (runnel.tools.FORMATS).
TINY_TOOL_PARSER = "hermes"


def tool_parser_of(model: str) -> str | None:
    """The tool-call format an app's ``model`` setting implies: builtin:tiny's (its training
    script writes Hermes calls), None for a model of the user's (its app's ``tool_parser``
    setting says). Every backend that serves these weights asks here."""
    return TINY_TOOL_PARSER if model.startswith("builtin:") else None

_SUBJECTS = [
    "the cat", "a small dog", "my friend", "the river", "an old man", "the teacher",
    "a bird", "the engine", "our neighbour", "the children", "a robot", "the server",
    "la fille", "el niño", "the café owner", "a tired student",
]
_VERBS = [
    "sees", "likes", "builds", "carries", "finds", "opens", "reads", "writes", "follows",
    "watches", "answers", "paints", "cleans", "remembers", "sends", "counts",
]
_OBJECTS = [
    "a red ball", "the letter", "some bread", "the window", "a long story", "the map",
    "three apples", "the garden", "a new song", "the message", "a quiet room", "the door",
    "the résumé", "a crème brûlée", "the tokens", "a blue boat",
]
_PLACES = [
    "in the morning", "at night", "near the station", "by the sea", "after lunch",
    "in the park", "on monday", "before dinner", "at the market", "in the rain",
]
_QUESTIONS = [
    "What is your name?", "How are you today?", "Can you tell me a story?",
    "Where is the station?", "What time is it?", "Why is the sky blue?",
    "Do you like music?", "Who wrote this letter?",
]
_ROLES = ["System", "User", "Assistant"]


def _corpus(seed: int, lines: int = 1500) -> list[str]:
    """Simple sentences and chat turns, the same for the same seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        kind = rng.random()
        if kind < 0.6:
            s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
            if rng.random() < 0.5:
                s += f" {rng.choice(_PLACES)}"
            out.append(s[0].upper() + s[1:] + rng.choice([".", ".", "!", "?"]))
        elif kind < 0.8:
            out.append(f"User: {rng.choice(_QUESTIONS)}")
        else:
            s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
            out.append(f"{rng.choice(_ROLES)}: {s[0].upper()}{s[1:]}")
    out.extend(f"Number {i} is {i * 7 % 100}." for i in range(50))
    return out


def _train_sentencepiece(
    corpus: list[str], vocab_size: int, user_defined_symbols: Sequence[str] = ()
) -> bytes:
    """A BPE sentencepiece model; ``user_defined_symbols`` always encode as one piece each,
    wherever they stand (e.g. ``<tool_call>``, so a prompt that ends with it encodes as the
    same pieces as the text that goes on)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        # Llama's layout: <unk>, <s>, </s>, then the 256 byte pieces, then learned pieces.
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,  # any UTF-8 text encodes, unseen characters as bytes
        character_coverage=1.0,
        split_digits=True,
        num_threads=1,  # multi-threaded training is not reproducible
        hard_vocab_limit=False,  # a small corpus may not yield vocab_size pieces
        # As Llama: no NFKC (which also stores a 240 KB table) and keep runs of spaces.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
        user_defined_symbols=list(user_defined_symbols),
    )
    return model.getvalue()


def build_random_model(
    directory: str | os.PathLike,
    *,
    seed: int = 0,
    vocab_size: int = 512,
    d_model: int = 64,
    layers: int = 2,
    heads: int = 4,
    ffn: int = 256,
    max_position: int = 512,
    tokenizer_corpus: list[str] | None = None,
    quantization: str = "float32",
) -> Path:
    """Write a complete CTranslate2 decoder model directory with seeded random weights.

    The directory gets model.bin, config.json, vocabulary.json (CTranslate2), tokenizer.model
    (sentencepiece) and tokenizer_config.json (chat template, special tokens and
    ``model_max_length``). The same arguments always give byte-identical files.

    ``max_position`` is only recorded (as ``model_max_length``, where Hugging Face keeps it)
    for the server to enforce: rotary positions have no table that would limit them.
    ``tokenizer_corpus`` replaces the generated text the vocabulary is trained on.
    ``quantization`` is the type the weights are saved in ("float16" halves a large model's
    files and its load time on a GPU).
    """
    import sentencepiece as spm

    if d_model % heads:
        raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")

    sp_bytes = _train_sentencepiece(tokenizer_corpus or _corpus(seed), vocab_size)
    sp = spm.SentencePieceProcessor(model_proto=sp_bytes)
    n_vocab = sp.get_piece_size()

    rng = np.random.default_rng(seed)

    def linear(out_dim: int, in_dim: int) -> np.ndarray:
        # std 1/sqrt(in) keeps activations, and the final logits, around unit scale, so
        # a random model still prefers some tokens over others.
        w = rng.standard_normal((out_dim, in_dim), dtype=np.float32)
        return w / np.float32(np.sqrt(in_dim))

    def ones() -> np.ndarray:
        return np.ones(d_model, dtype=np.float32)

    # Drawn in this order so that the same seed keeps giving the same weights.
    weights = {"embeddings": rng.standard_normal((n_vocab, d_model), dtype=np.float32),
               "norm": ones()}
    for i in range(layers):
        weights[f"layers.{i}.attention_norm"] = ones()
        weights[f"layers.{i}.qkv"] = linear(3 * d_model, d_model)
        weights[f"layers.{i}.out"] = linear(d_model, d_model)
        weights[f"layers.{i}.ffn_norm"] = ones()
        weights[f"layers.{i}.gate"] = linear(ffn, d_model)
        weights[f"layers.{i}.up"] = linear(ffn, d_model)
        weights[f"layers.{i}.down"] = linear(d_model, ffn)
    projection = linear(n_vocab, d_model)
    # Zero the logits of <unk>, <s>, </s> and the byte pieces: the random model then writes
    # pieces of words rather than stray bytes, and greedy decoding runs to max_length
    # (predictable lengths for tests and benchmarks). Sampling can still pick them.
    for i in range(n_vocab):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
            projection[i] = 0
    weights["projection"] = projection

    return write_decoder_model(
        directory, weights, sp_bytes, heads=heads, max_position=max_position, quantization=quantization
    )


def write_decoder_model(
    directory: str | os.PathLike,
    weights: dict[str, np.ndarray],
    sp_bytes: bytes,
    *,
    heads: int,
    max_position: int,
    quantization: str = "float32",
    chat_template: str = TINY_CHAT_TEMPLATE,
) -> Path:
    """Write a Llama-style CTranslate2 decoder model directory from numpy weights.

    Used by build_random_model and by ``scripts/train_tiny.py`` (the trained demo model),
    so both get the same architecture and files. ``weights`` holds float32 arrays named
    ``embeddings`` (vocab, d), ``norm`` (d), ``projection`` (vocab, d; may be the same
    array as ``embeddings`` for tied embeddings) and, for each layer ``i``:
    ``layers.{i}.attention_norm`` (d), ``layers.{i}.qkv`` (3d, d: q, k, v stacked),
    ``layers.{i}.out`` (d, d), ``layers.{i}.ffn_norm`` (d), ``layers.{i}.gate`` (ffn, d;
    SiLU applied), ``layers.{i}.up`` (ffn, d) and ``layers.{i}.down`` (d, ffn). Linear
    weights are (out, in), as torch stores them. The model is: RMSNorm (eps 1e-6) before
    attention and FFN, rotary positions on every dimension of each head in Hugging Face's
    rotate_half layout (base 10000), no biases, a final RMSNorm, then the projection.
    ``sp_bytes`` is the sentencepiece model; its pieces in id order are the vocabulary.
    The caller's arrays are left as they were (CTranslate2 quantizes the ones it is given
    in place: it gets copies, one per distinct array, so tied weights stay tied).
    """
    import sentencepiece as spm
    from ctranslate2.specs import common_spec, transformer_spec

    copies: dict[int, np.ndarray] = {}
    for array in weights.values():
        if id(array) not in copies:
            copies[id(array)] = np.array(array, copy=True)
    weights = {name: copies[id(array)] for name, array in weights.items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = sum(1 for name in weights if name.endswith(".qkv"))

    sp = spm.SentencePieceProcessor(model_proto=sp_bytes)
    # CTranslate2 works on token strings: its vocabulary is the pieces, in id order.
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]

    # The same options as CTranslate2's own Llama converter.
    spec = transformer_spec.TransformerDecoderModelSpec.from_config(
        layers,
        heads,
        activation=common_spec.Activation.SWISH,
        pre_norm=True,
        ffn_glu=True,
        rms_norm=True,
        rotary_dim=0,  # rotate every dimension of each head
        rotary_interleave=False,  # Hugging Face's rotate_half layout
        # Plain multi-head attention. Leaving this None (as the Llama converter does) works
        # the same but writes "multi_query_attention": true into config.json.
        num_heads_kv=heads,
    )

    decoder = spec.decoder
    decoder.scale_embeddings = False
    decoder.embeddings.weight = weights["embeddings"]
    decoder.layer_norm.gamma = weights["norm"]
    for i, layer in enumerate(decoder.layer):
        attention = layer.self_attention
        attention.layer_norm.gamma = weights[f"layers.{i}.attention_norm"]
        attention.linear[0].weight = weights[f"layers.{i}.qkv"]  # fused q, k, v
        attention.linear[1].weight = weights[f"layers.{i}.out"]  # output
        layer.ffn.layer_norm.gamma = weights[f"layers.{i}.ffn_norm"]
        layer.ffn.linear_0.weight = weights[f"layers.{i}.gate"]  # gate (SiLU)
        layer.ffn.linear_0_noact.weight = weights[f"layers.{i}.up"]  # up
        layer.ffn.linear_1.weight = weights[f"layers.{i}.down"]  # down
    decoder.projection.weight = weights["projection"]

    spec.config.layer_norm_epsilon = 1e-6
    spec.register_vocabulary(pieces)
    spec.validate()
    spec.optimize(quantization=quantization)
    spec.save(str(directory))

    (directory / "tokenizer.model").write_bytes(sp_bytes)
    tokenizer_config = {
        "bos_token": sp.id_to_piece(sp.bos_id()),
        "eos_token": sp.id_to_piece(sp.eos_id()),
        "unk_token": sp.id_to_piece(sp.unk_id()),
        "model_max_length": max_position,
        "chat_template": chat_template,
    }
    with open(directory / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return directory


def default_cache_dir() -> Path:
    """``$RUNNEL_CACHE_DIR``, else ``$XDG_CACHE_HOME/runnel/models`` (``~/.cache/...``)."""
    if env := os.environ.get("RUNNEL_CACHE_DIR"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "runnel" / "models"


def ensure_builtin(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Return the directory of built-in model ``name``, building it into the cache if needed."""
    if name not in KNOWN_MODELS:
        raise ValueError(
            f"unknown built-in model {name!r}; known: {', '.join(KNOWN_MODELS)}"
        )
    packaged = _PACKAGED_MODELS / name
    if (packaged / "model.bin").is_file():
        return str(packaged)

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / f"{name}-v{BUILD_VERSION}"
    # The target only ever appears through the rename below, so if it exists it is whole.
    if (target / "model.bin").is_file():
        return str(target)

    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-building-", dir=cache))
    try:
        build_random_model(tmp, seed=0)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (the target is a non-empty directory now):
            # use theirs. Anything else is a real error.
            if not (target / "model.bin").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
