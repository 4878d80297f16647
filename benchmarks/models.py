"""The benchmark models: builtin:tiny and random Llama-style decoders of realistic sizes, cached.

``small`` (~114M parameters) and ``medium`` (~404M) are built once with the plugin's own
builder (``runnel_ctranslate2.builtin.build_random_model``, seeded, so the same files every
time) into ~/.cache/runnel-bench, and served int8; at their sizes a token costs milliseconds
of matrix work, so the figures show where the server's per-token overhead is not the whole
story. ``gguf_path`` gives the same weights as a GGUF for llama.cpp, written by the llamacpp
plugin's converter and quantized to Q8_0 by llama.cpp's own quantizer (int8 on both sides).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

# Llama-style: gated FFN (3 matrices), tied embeddings. vocab_size is what the builder asks
# sentencepiece for; its generated corpus yields fewer pieces (987), so the parameters are in
# the layers: small ~114M, medium ~404M.
SHAPES = {
    "tiny": dict(vocab_size=512, d_model=64, layers=2, heads=4, ffn=256),  # ct2_layout's tiny, not builtin:tiny
    "small": dict(vocab_size=8000, d_model=768, layers=12, heads=12, ffn=3072),
    "medium": dict(vocab_size=8000, d_model=1024, layers=24, heads=16, ffn=4096),
}
CHOICES = ("tiny", "small", "medium")  # what --model takes: tiny is builtin:tiny, the trained demo model
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "runnel-bench"


def parameters(name: str) -> int:
    """The parameter count of a shape (embeddings counted once: they are tied), with the
    vocabulary the built model has when it is built."""
    shape = SHAPES[name]
    width, ffn, vocab = shape["d_model"], shape["ffn"], shape["vocab_size"]
    built = CACHE / f"layout-{name}" / "vocabulary.json"
    if built.exists():
        vocab = len(json.loads(built.read_text(encoding="utf-8")))
    return shape["layers"] * (4 * width * width + 3 * width * ffn) + vocab * width


def model_dir(name: str) -> str:
    """The CTranslate2 directory of a shape, built into the cache on first use.

    Built in a temporary sibling and renamed into place, so an interrupted build never
    leaves a directory that looks complete."""
    from runnel_ctranslate2.builtin import build_random_model

    directory = CACHE / f"layout-{name}"  # the name ct2_layout.py has cached them under
    if not (directory / "model.bin").exists():
        print(f"building the {name} model ({parameters(name) / 1e6:.0f}M parameters) in {directory} (once)",
              flush=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=CACHE))
        try:
            build_random_model(building, max_position=4096, **SHAPES[name])
            os.rename(building, directory)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return str(directory)


def model_spec(name: str) -> tuple[str, str | None]:
    """(the ``model`` setting for runnel's config, its ``compute_type`` or None for the default)."""
    if name == "tiny":
        return "builtin:tiny", None
    return model_dir(name), "int8"


def gguf_path(name: str) -> str:
    """The same weights as a GGUF for llama.cpp: builtin:tiny's own (F32, as the plugin serves it);
    for the built shapes, the plugin's F32 conversion quantized to Q8_0 by llama.cpp."""
    if name == "tiny":
        from runnel_llamacpp.builtin import ensure_builtin_gguf

        return ensure_builtin_gguf("tiny")
    target = Path(model_dir(name)) / "model-q8_0.gguf"
    if target.exists():
        return str(target)
    import llama_cpp
    from runnel_llamacpp.builtin import write_gguf

    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        f32 = write_gguf(model_dir(name), Path(tmp) / "model-f32.gguf")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
        params.nthread = 2
        partial = Path(tmp) / target.name
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(partial).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {f32} to Q8_0")
        os.rename(partial, target)
    return str(target)
