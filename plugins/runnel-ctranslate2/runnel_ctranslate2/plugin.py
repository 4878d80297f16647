"""The runnel plugin: ``backend = "ctranslate2"`` apps.

    [apps.tiny]
    backend = "ctranslate2"
    model = "builtin:tiny"          # or the path of a converted CTranslate2 model directory
    task = "generate"               # or "embed" for an encoder (sentence embeddings)
"""

from __future__ import annotations

import os

from runnel import hookimpl

from .apps import DeviceSettings, EncoderApp, GeneratorApp
from .cuda import cuda_problem

COMPUTE_TYPES = ("default", "auto", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16",
                 "bfloat16", "float32")


def _device(table) -> DeviceSettings:
    device = table.get("device", str, default="auto")
    if device not in ("auto", "cpu", "cuda"):
        raise table.error("device", f"must be 'auto', 'cpu' or 'cuda', not {device!r}")
    compute_type = table.get("compute_type", str, default="default")
    if compute_type not in COMPUTE_TYPES:
        raise table.error("compute_type", f"must be one of {', '.join(COMPUTE_TYPES)}")
    if device == "cuda" and (problem := cuda_problem()) is not None:
        # Now, with the key: a server that started would keep the app failed for good.
        raise table.error("device", f'"cuda" cannot run here: {problem}')
    settings = DeviceSettings(
        device=device,
        device_index=table.get("device_index", int, default=None),
        compute_type=compute_type,
        inter_threads=table.get("inter_threads", int, default=0),
        intra_threads=table.get("intra_threads", int, default=0),
    )
    for name in ("device_index", "inter_threads", "intra_threads"):
        if (getattr(settings, name) or 0) < 0:
            raise table.error(name, "must be >= 0 (0 = chosen for the machine)")
    return settings


def _positive(table, name: str, kind: type, default):
    value = table.get(name, kind, default=default)
    if value is not None and value <= 0:
        raise table.error(name, "must be > 0")
    return value


def _at_least_zero(table, name: str, default: float | None) -> float | None:
    value = table.get(name, float, default=default)
    if value is not None and value < 0:
        raise table.error(name, "must be >= 0")
    return value


def _milliseconds(value: float | None) -> float | None:
    return None if value is None else value / 1000


def _check_model_dir(table, path: str) -> None:
    """Refuse a model path that cannot load, now: a server that starts anyway keeps the app
    (and /health) failed for good. Loading itself (a corrupt model.bin) can still fail later."""
    if not os.path.isdir(path):
        raise table.error("model", f"no such model directory: {path} (a converted CTranslate2 model "
                          "directory, or \"builtin:tiny\")")
    if not os.path.isfile(os.path.join(path, "model.bin")):
        raise table.error("model", f"not a CTranslate2 model directory: no model.bin in {path}")
    if not any(os.path.isfile(os.path.join(path, name)) for name in ("tokenizer.model", "tokenizer.json")):
        raise table.error("model", f"no tokenizer in {path}: expected tokenizer.model (sentencepiece) "
                          "or tokenizer.json (Hugging Face tokenizers)")


def make_app(app_config, table, server):
    model = table.get("model", str)
    if not model.startswith("builtin:"):
        model = table.path("model", server.config.base_dir)
        _check_model_dir(table, model)
    task = table.get("task", str, default="generate")
    served = table.get("served_model_name", str, default=None)
    device = _device(table)
    # At shutdown, how long to wait for running work once its requests are gone (a stopped
    # row ends at its batch's next step); past it, stuck work is abandoned and the process exits.
    close_wait = min(server.config.server.shutdown_grace, 5.0)
    if task == "embed":
        app = EncoderApp(name=app_config.name, model=model, served_model_name=served, device=device,
                         normalize=table.get("normalize", bool, default=True),
                         max_batch_size=_positive(table, "max_batch_size", int, 32), close_wait=close_wait)
    elif task == "generate":
        app = GeneratorApp(
            name=app_config.name, model=model, served_model_name=served, device=device,
            context_length=_positive(table, "context_length", int, None),
            default_max_tokens=_positive(table, "default_max_tokens", int, 16),
            chat_template=table.get("chat_template", str, default=None),
            # Unset: the device's defaults (cuda.BATCH_DEFAULTS), chosen once the device is.
            max_batch_size=_positive(table, "max_batch_size", int, None),
            batch_window=_milliseconds(_at_least_zero(table, "batch_window_ms", None)),
            max_queue=_positive(table, "max_queue", int, 256),
            seed=table.get("seed", int, default=None),
            close_wait=close_wait,
            fold=table.get("fold", bool, default=True),
        )
    else:
        raise table.error("task", f"must be 'generate' or 'embed', not {task!r}")
    table.finish()
    return app


@hookimpl
def runnel_register_backends(register):
    register("ctranslate2", make_app)
