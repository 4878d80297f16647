"""``model = "builtin:tiny"`` for llama.cpp: a GGUF written from the very weights CTranslate2 serves.

The trained demo model ships with runnel-ctranslate2 as a CTranslate2 directory (int8
``model.bin``, per-row scales, tied embeddings; sentencepiece ``tokenizer.model``). It is
read here with the format's own layout (``ctranslate2.specs.model_spec._serialize``, binary
version 6) and dequantized (``weight / scale``: CTranslate2 quantizes ``round(w * 127 /
amax)``), then written as an F32 GGUF of llama.cpp's ``llama`` architecture, tensor for
tensor. F32 rather than a GGUF quantization: CTranslate2 run with ``compute_type="float32"``
dequantizes the same way, so both engines compute with the same numbers (the greedy test).

Two layout differences are handled: CTranslate2 (as Hugging Face) rotates each head's
halves, llama.cpp adjacent pairs, so q and k rows are permuted as llama.cpp's own
converter does; and the sentencepiece vocabulary goes in as the ``llama`` tokenizer, its
user-defined symbols (``<tool_call>``) marked so llama.cpp matches them in text as
sentencepiece does.

The file is cached (``runnel_ctranslate2.builtin.default_cache_dir``), named by a hash of
what it is made from, so a retrained model or a newer writer never reuses a stale one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

# Bump when the written GGUF changes for the same input.
WRITER_VERSION = 1

_CT2_DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, None)  # None: bfloat16, unused here


def read_ct2_variables(model_bin: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every variable of a CTranslate2 ``model.bin`` (aliases resolved), as stored."""
    data = Path(model_bin).read_bytes()
    offset = 0

    def take(fmt: str):
        nonlocal offset
        values = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return values[0]

    def string() -> str:
        nonlocal offset
        size = take("<H")  # counts the trailing NUL
        text = data[offset : offset + size - 1].decode("utf-8")
        offset += size
        return text

    version = take("<I")
    if version < 5:
        raise ValueError(f"{model_bin}: CTranslate2 binary version {version} is too old (need >= 5)")
    string()  # spec name
    take("<I")  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(take("<I")):
        name = string()
        shape = [take("<I") for _ in range(take("<B"))]
        dtype = _CT2_DTYPES[take("<B")]
        size = take("<I")
        if dtype is None:
            raise ValueError(f"{model_bin}: variable {name} is bfloat16, which this reader does not take")
        variables[name] = np.frombuffer(data, dtype=dtype, count=size // np.dtype(dtype).itemsize,
                                        offset=offset).reshape(shape)
        offset += size
    for _ in range(take("<I")):
        alias, target = string(), string()
        variables[alias] = variables[target]
    return variables


def _float(variables: dict[str, np.ndarray], name: str) -> np.ndarray:
    """A weight as float32: int8 ones divided by their per-row scale."""
    value = variables[name]
    if value.dtype == np.int8:
        scale = variables[name + "_scale"].astype(np.float32)
        return value.astype(np.float32) / scale.reshape(-1, *([1] * (value.ndim - 1)))
    return value.astype(np.float32)


def _rotate_pairs(weight: np.ndarray, heads: int) -> np.ndarray:
    """q/k rows from rotate-half order to llama.cpp's adjacent pairs (its converter's ``permute``)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _token_types(sp) -> tuple[list[bytes], list[float], list[int]]:
    import gguf

    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        piece, score = sp.id_to_piece(i), sp.get_score(i)
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        elif sp.is_unused(i):
            kind = gguf.TokenType.UNUSED
        elif score == 0.0 and math.copysign(1.0, score) > 0 and sp.encode(piece + piece) [-2:] == [i, i]:
            # A user-defined symbol: sentencepiece gives it score +0.0 (learned BPE pieces
            # score -rank, the first -0.0) and matches it whole wherever it stands.
            kind = gguf.TokenType.USER_DEFINED
        else:
            kind = gguf.TokenType.NORMAL
        tokens.append(piece.encode("utf-8"))
        scores.append(score)
        types.append(int(kind))
    return tokens, scores, types


def write_gguf(model_dir: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Write the Llama-style CTranslate2 decoder in ``model_dir`` as an F32 GGUF at ``target``."""
    import gguf
    import sentencepiece as spm

    model_dir, target = Path(model_dir), Path(target)
    variables = read_ct2_variables(model_dir / "model.bin")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))

    layers = sum(1 for name in variables if name.endswith("/self_attention/linear_0/weight"))
    heads = int(variables["decoder/num_heads"])
    heads_kv = int(variables["decoder/layer_0/self_attention/num_heads_kv"])
    vocab, width = variables["decoder/embeddings/weight"].shape
    ffn = variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]
    head_dim = width // heads
    rotary_dim = int(variables["decoder/layer_0/self_attention/rotary_dim"]) or head_dim
    interleaved = bool(variables["decoder/layer_0/self_attention/rotary_interleave"])
    if rotary_dim != head_dim or variables.get("decoder/scale_embeddings", np.array(False)).item():
        raise ValueError(f"{model_dir}: not a plain Llama-style decoder (partial rotary or scaled embeddings)")

    writer = gguf.GGUFWriter(str(target), "llama")
    writer.add_name("runnel builtin:tiny")
    writer.add_context_length(int(tokenizer_config.get("model_max_length", 2048)))
    writer.add_embedding_length(width)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(variables["decoder/layer_0/self_attention/rotary_base"]))
    writer.add_layer_norm_rms_eps(float(config.get("layer_norm_epsilon", 1e-6)))
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    tokens, scores, types = _token_types(sp)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(sp.encode("a", out_type=str)[0].startswith("\u2581"))
    if tokenizer_config.get("chat_template"):
        writer.add_chat_template(tokenizer_config["chat_template"])

    writer.add_tensor("token_embd.weight", _float(variables, "decoder/embeddings/weight"))
    if variables["decoder/projection/weight"] is not variables["decoder/embeddings/weight"]:
        writer.add_tensor("output.weight", _float(variables, "decoder/projection/weight"))
    writer.add_tensor("output_norm.weight", _float(variables, "decoder/layer_norm/gamma"))
    for i in range(layers):
        prefix = f"decoder/layer_{i}"
        qkv = _float(variables, f"{prefix}/self_attention/linear_0/weight")
        q, k, v = np.split(qkv, [width, width + heads_kv * head_dim])
        if not interleaved:
            q, k = _rotate_pairs(q, heads), _rotate_pairs(k, heads_kv)
        block = f"blk.{i}"
        writer.add_tensor(f"{block}.attn_norm.weight", _float(variables, f"{prefix}/self_attention/layer_norm/gamma"))
        writer.add_tensor(f"{block}.attn_q.weight", np.ascontiguousarray(q))
        writer.add_tensor(f"{block}.attn_k.weight", np.ascontiguousarray(k))
        writer.add_tensor(f"{block}.attn_v.weight", np.ascontiguousarray(v))
        writer.add_tensor(f"{block}.attn_output.weight", _float(variables, f"{prefix}/self_attention/linear_1/weight"))
        writer.add_tensor(f"{block}.ffn_norm.weight", _float(variables, f"{prefix}/ffn/layer_norm/gamma"))
        writer.add_tensor(f"{block}.ffn_gate.weight", _float(variables, f"{prefix}/ffn/linear_0/weight"))
        writer.add_tensor(f"{block}.ffn_up.weight", _float(variables, f"{prefix}/ffn/linear_0_noact/weight"))
        writer.add_tensor(f"{block}.ffn_down.weight", _float(variables, f"{prefix}/ffn/linear_1/weight"))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def _source_digest(model_dir: Path) -> str:
    digest = hashlib.sha256(f"writer-{WRITER_VERSION}".encode())
    for name in ("model.bin", "config.json", "tokenizer.model", "tokenizer_config.json"):
        digest.update((model_dir / name).read_bytes())
    return digest.hexdigest()[:16]


def ensure_builtin_gguf(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """The GGUF of built-in model ``name``, written into the cache on first use.

    The weights are runnel-ctranslate2's (its package ships the trained model), so that
    plugin must be installed for ``builtin:`` models; a GGUF path needs nothing else.
    """
    try:
        from runnel_ctranslate2.builtin import default_cache_dir, ensure_builtin
    except ImportError:
        raise ValueError("builtin: models are written from runnel-ctranslate2's weights: "
                         "pip install runnel-ctranslate2, or give a GGUF path") from None
    model_dir = Path(ensure_builtin(name))
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / f"{name}-{_source_digest(model_dir)}.gguf"
    if target.is_file():  # appears only through the rename below, so it is whole
        return str(target)
    cache.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".gguf.part", dir=cache)
    os.close(handle)
    try:
        write_gguf(model_dir, tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the cache from other users of it
        os.replace(tmp, target)  # two writers race harmlessly: the files are identical
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(target)
