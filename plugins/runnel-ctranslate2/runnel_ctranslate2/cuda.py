"""Running CTranslate2 on an NVIDIA GPU: the cuBLAS it needs, and the settings a GPU wants.

CTranslate2's PyPI wheel links the CUDA runtime statically but ``dlopen``s
``libcublas.so.12`` the first time it multiplies on the GPU, so a machine without the
CUDA 12 cuBLAS fails only then. ``pip install "runnel-ctranslate2[cuda]"`` brings it as
the ``nvidia-cublas-cu12`` wheel (``site-packages/nvidia/cublas/lib/``), which no loader
path names: ``load_cublas`` opens those files by their full path with ``RTLD_GLOBAL``
first, and CTranslate2's later ``dlopen("libcublas.so.12")`` finds the library already
loaded under that soname (no ``LD_LIBRARY_PATH``). Without the wheel it loads the soname
itself, so a system CUDA 12 toolkit on the loader path is used as before.
"""

from __future__ import annotations

import ctypes
import functools
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

# libcublas.so.12 needs libcublasLt.so.12: loaded first, it is there when libcublas asks.
CUBLAS_LIBRARIES = ("libcublasLt.so.12", "libcublas.so.12")
# Where the nvidia-cublas-cu12 wheel puts them, under a site-packages directory.
WHEEL_LIBRARY_DIR = Path("nvidia", "cublas", "lib")
INSTALL_HINT = 'pip install "runnel-ctranslate2[cuda]"'


class CudaUnavailable(RuntimeError):
    """``device = "cuda"`` cannot run here; the message names what is missing and the fix."""


@dataclass(frozen=True)
class CublasStatus:
    loaded: tuple[str, ...]  # what was opened, full paths or sonames, in load order
    problem: str | None  # None: every library loaded

    @property
    def ok(self) -> bool:
        return self.problem is None


def find_wheel_libraries(search_paths: Iterable[str]) -> dict[str, Path]:
    """Each of CUBLAS_LIBRARIES found in an ``nvidia/cublas/lib`` under ``search_paths``
    (sys.path's entries), the first entry that has it winning, as imports do."""
    found: dict[str, Path] = {}
    for entry in search_paths:
        directory = Path(entry or ".") / WHEEL_LIBRARY_DIR
        for name in CUBLAS_LIBRARIES:
            if name not in found and (directory / name).is_file():
                found[name] = directory / name
    return found


def _load_global(name: str) -> None:
    ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)


def load_cublas(search_paths: Iterable[str] | None = None,
                load: Callable[[str], None] = _load_global) -> CublasStatus:
    """Load the CUDA 12 cuBLAS libraries, from the wheel where it is installed, else by soname.

    ``load`` opens one library (a path or a soname) and raises OSError when it cannot."""
    found = find_wheel_libraries(sys.path if search_paths is None else search_paths)
    loaded: list[str] = []
    for name in CUBLAS_LIBRARIES:
        target = str(found.get(name, name))
        try:
            load(target)
        except OSError as error:
            where = target if name in found else f"{name} (not in the nvidia-cublas-cu12 wheel, nor on the loader path)"
            return CublasStatus(tuple(loaded), f"CUDA 12 cuBLAS could not be loaded: {where}: {error}. "
                                               f"Install it with: {INSTALL_HINT}")
        loaded.append(target)
    return CublasStatus(tuple(loaded), None)


@functools.cache
def cublas_status() -> CublasStatus:
    """load_cublas() once per process: a loaded library stays loaded, a failure stays one."""
    return load_cublas()


def cuda_problem() -> str | None:
    """Why ``device = "cuda"`` cannot run here, or None when it can."""
    import ctranslate2

    if ctranslate2.get_cuda_device_count() == 0:
        return ("no CUDA GPU is visible to CTranslate2 (get_cuda_device_count() is 0: no NVIDIA driver or "
                "GPU, or CUDA_VISIBLE_DEVICES hides them); device = \"auto\" runs on the CPU instead")
    return cublas_status().problem


# -- the settings a GPU wants -------------------------------------------------------------------

# Batching where the config sets none, by device (GeneratorApp resolves them at load, once the
# device is known). CPU: measured on 2 cores (benchmarks/results/inference.md). GPU: chosen,
# not yet measured (benchmarks/gpu/run.sh measures them): a decoding step costs nearly the same
# for 1 row as for 64, since it reads every weight once either way (CTranslate2's own advice
# for GPUs: the largest batch possible), so rows are gathered for longer and batched wider.
# 64 rows keep the KV cache of a 7B model at 2k context under ~40 GB in float16.
BATCH_DEFAULTS = {"cpu": (16, 0.002), "cuda": (64, 0.005)}  # (max_batch_size, window in s)


# model.bin stores each variable's type as an index into this (CTranslate2's DataType enum).
_MODEL_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")


def saved_weight_types(model_dir: str | Path) -> tuple[str, str] | None:
    """The types a CTranslate2 model.bin was saved with: (linear weights, other float
    variables), e.g. ("int8", "float32") for an int8 model; None if the file is not one
    this reader knows (binary version < 4). Reads the headers only, seeking past the data."""
    weight_type = other_type = None
    try:
        with open(Path(model_dir) / "model.bin", "rb") as f:

            def read(fmt: str):
                fmt = "<" + fmt  # little-endian, unpadded: as CTranslate2 writes it
                return struct.unpack(fmt, f.read(struct.calcsize(fmt)))

            def read_string() -> str:
                (length,) = read("H")
                return f.read(length)[:-1].decode("utf-8")

            (version,) = read("I")
            if version < 4:
                return None
            read_string(), read("I")  # the spec's name and revision
            (count,) = read("I")
            for _ in range(count):
                name = read_string()
                (rank,) = read("B")
                read(f"{rank}I")
                type_id, size = read("BI")
                kind = _MODEL_DTYPES[type_id]
                # As CTranslate2 infers a model's type (Model::infer_compute_type): "*weight"
                # variables are the quantizable ones; the other float ones, scales and
                # scalars left out, give the float type.
                if name.endswith("weight"):
                    weight_type = weight_type or kind
                elif rank > 0 and "_scale" not in name and kind in ("float32", "float16", "bfloat16"):
                    other_type = other_type or kind
                if weight_type and other_type:
                    return weight_type, other_type
                f.seek(size, 1)
    except (OSError, struct.error, IndexError, UnicodeDecodeError):
        return None
    return (weight_type, other_type or "float32") if weight_type else None


def gpu_compute_type(model_dir: str | Path) -> str:
    """``compute_type = "default"`` on a GPU: the model's own type, made GPU-friendly.

    CTranslate2's "default" keeps the saved type, so a float32 model would run in float32
    (twice the memory, no tensor cores) and an int8 one in int8_float32. Here float32 and
    float16 models run in float16 (no quantization the user did not ask for), int8 models in
    int8_float16, bfloat16 ones in (int8_)bfloat16 as saved. CTranslate2's "auto" picks
    int8_float16 for every model on a GPU of compute capability >= 7 (its src/types.cc).
    """
    saved = saved_weight_types(model_dir)
    if saved is None:
        return "default"
    weights, others = saved
    if weights == "int8":
        return "int8_bfloat16" if others == "bfloat16" else "int8_float16"
    return "bfloat16" if weights == "bfloat16" else "float16"
