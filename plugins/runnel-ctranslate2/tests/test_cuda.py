"""runnel_ctranslate2.cuda: finding and loading the CUDA 12 cuBLAS, and the GPU compute type.

Run on machines without a GPU: the wheel layout is faked in a temporary directory and the
loader is a recording stand-in, so what is opened, in which order, and what a failure
says are all checked without CUDA.
"""

from __future__ import annotations

import ctypes
import math
import struct

import pytest
from runnel_ctranslate2 import cuda
from runnel_ctranslate2.builtin import build_random_model


def fake_site(root, *names):
    """A site-packages directory holding the nvidia-cublas-cu12 wheel's files ``names``."""
    lib = root / "nvidia" / "cublas" / "lib"
    lib.mkdir(parents=True)
    for name in names:
        (lib / name).write_bytes(b"\x7fELF")
    return root


class RecordingLoader:
    def __init__(self, fail: str | None = None):
        self.opened: list[str] = []
        self.fail = fail

    def __call__(self, name: str) -> None:
        if self.fail and name.endswith(self.fail):
            raise OSError(f"{name}: cannot open shared object file: No such file or directory")
        self.opened.append(name)


def test_the_wheels_libraries_are_found_first_entry_first(tmp_path):
    first = fake_site(tmp_path / "a", "libcublas.so.12")
    second = fake_site(tmp_path / "b", "libcublas.so.12", "libcublasLt.so.12")
    found = cuda.find_wheel_libraries([str(tmp_path / "empty"), str(first), str(second)])
    assert found == {"libcublas.so.12": first / "nvidia/cublas/lib/libcublas.so.12",
                     "libcublasLt.so.12": second / "nvidia/cublas/lib/libcublasLt.so.12"}
    assert cuda.find_wheel_libraries([str(tmp_path / "empty")]) == {}


def test_the_wheels_files_are_loaded_by_path_lt_first(tmp_path):
    site = fake_site(tmp_path, "libcublasLt.so.12", "libcublas.so.12")
    loader = RecordingLoader()
    status = cuda.load_cublas([str(site)], load=loader)
    lib = site / "nvidia/cublas/lib"
    # Full paths: no loader path names the wheel's folder. libcublasLt first: libcublas needs it.
    assert loader.opened == [str(lib / "libcublasLt.so.12"), str(lib / "libcublas.so.12")]
    assert status.ok and status.loaded == tuple(loader.opened)


def test_without_the_wheel_the_sonames_are_loaded(tmp_path):
    # A system CUDA 12 toolkit (ldconfig, LD_LIBRARY_PATH) is used as before.
    loader = RecordingLoader()
    assert cuda.load_cublas([str(tmp_path)], load=loader).ok
    assert loader.opened == ["libcublasLt.so.12", "libcublas.so.12"]


def test_a_library_that_cannot_load_is_named_with_the_fix(tmp_path):
    loader = RecordingLoader(fail="libcublas.so.12")
    status = cuda.load_cublas([str(tmp_path)], load=loader)
    assert not status.ok and status.loaded == ("libcublasLt.so.12",)
    assert status.problem.startswith("CUDA 12 cuBLAS could not be loaded: libcublas.so.12 (not in the "
                                     "nvidia-cublas-cu12 wheel, nor on the loader path): libcublas.so.12: "
                                     "cannot open shared object file")
    assert status.problem.endswith('Install it with: pip install "runnel-ctranslate2[cuda]"')
    # A wheel's file that is there but broken is named by its path.
    site = fake_site(tmp_path / "site", "libcublasLt.so.12", "libcublas.so.12")
    status = cuda.load_cublas([str(site)], load=RecordingLoader(fail="libcublasLt.so.12"))
    assert f"could not be loaded: {site / 'nvidia/cublas/lib/libcublasLt.so.12'}: " in status.problem


def test_the_real_loader_opens_globally_and_fails_on_a_fake_file(tmp_path, monkeypatch):
    # The fake wheel's files are not libraries: dlopen refuses them, and the error says which.
    modes = []
    real_cdll = ctypes.CDLL
    monkeypatch.setattr(ctypes, "CDLL", lambda name, mode: modes.append(mode) or real_cdll(name, mode=mode))
    site = fake_site(tmp_path, "libcublasLt.so.12", "libcublas.so.12")
    status = cuda.load_cublas([str(site)])
    assert modes == [ctypes.RTLD_GLOBAL]  # global: CTranslate2's own dlopen must find its symbols
    assert "libcublasLt.so.12" in status.problem and "runnel-ctranslate2[cuda]" in status.problem


@pytest.mark.parametrize(("saved", "types", "on_gpu"), [
    ("float32", ("float32", "float32"), "float16"),
    ("float16", ("float16", "float16"), "float16"),
    ("int8", ("int8", "float32"), "int8_float16"),
    ("int8_float16", ("int8", "float16"), "int8_float16"),
])
def test_gpu_compute_type_follows_the_saved_weights(tmp_path, saved, types, on_gpu):
    model = build_random_model(tmp_path / saved, seed=0, quantization=saved)
    assert cuda.saved_weight_types(model) == types
    assert cuda.gpu_compute_type(model) == on_gpu


def write_model_bin(directory, variables):
    """A model.bin as CTranslate2's ModelSpec._serialize writes it: (name, shape, type id)."""
    def string(text):
        return struct.pack("<H", len(text) + 1) + text.encode() + b"\0"

    sizes = {0: 4, 1: 1, 4: 2, 5: 2}
    data = struct.pack("<I", 6) + string("TransformerDecoderSpec") + struct.pack("<II", 8, len(variables))
    for name, shape, type_id in variables:
        payload = bytes(sizes[type_id] * (1 if not shape else math.prod(shape)))
        data += (string(name) + struct.pack("<B", len(shape)) + struct.pack(f"<{len(shape)}I", *shape)
                 + struct.pack("<BI", type_id, len(payload)) + payload)
    (directory / "model.bin").write_bytes(data + struct.pack("<I", 0))
    return directory


@pytest.mark.parametrize(("weight", "other", "on_gpu"), [(5, 5, "bfloat16"), (1, 5, "int8_bfloat16")])
def test_bfloat16_models_stay_bfloat16(tmp_path, weight, other, on_gpu):
    # Written by hand: CTranslate2 needs torch to convert weights to bfloat16.
    model = write_model_bin(tmp_path, [("decoder/activation", (), 1), ("decoder/embeddings/weight", (8, 4), weight),
                                       ("decoder/embeddings/weight_scale", (8,), 0),
                                       ("decoder/layer_norm/gamma", (4,), other)])
    assert cuda.gpu_compute_type(model) == on_gpu


def test_an_unreadable_model_keeps_ctranslate2s_default(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\x06\x00\x00\x00garbage")
    assert cuda.saved_weight_types(tmp_path) is None
    assert cuda.gpu_compute_type(tmp_path) == "default"
    assert cuda.gpu_compute_type(tmp_path / "missing") == "default"
