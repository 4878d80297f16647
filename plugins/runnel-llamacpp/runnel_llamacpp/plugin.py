"""The runnel plugin: ``backend = "llamacpp"`` apps.

    [apps.tiny]
    backend = "llamacpp"
    model = "builtin:tiny"          # or the path of a .gguf file
    context_length = 2048           # n_ctx; default: the model's own
    threads = 0                     # per context; 0: the cores shared among the contexts
    parallel = 1                    # contexts, each serving one stream at a time
    n_gpu_layers = 0                # layers offloaded, on a GPU build (-1: all)
"""

from __future__ import annotations

import os

from runnel import hookimpl

from .apps import LlamaApp


def _positive(table, name: str, kind: type, default):
    value = table.get(name, kind, default=default)
    if value is not None and value <= 0:
        raise table.error(name, "must be > 0")
    return value


def make_app(app_config, table, server):
    model = table.get("model", str)
    if model.startswith("builtin:"):
        if model != "builtin:tiny":
            raise table.error("model", f"unknown built-in model {model!r}; known: builtin:tiny")
    else:
        model = table.path("model", server.config.base_dir)
        if not os.path.isfile(model):
            raise table.error("model", f"no such GGUF file: {model} (a .gguf file, or \"builtin:tiny\")")
    threads = table.get("threads", int, default=0)
    if threads < 0:
        raise table.error("threads", "must be >= 0 (0 = chosen for the machine)")
    chat_template = table.get("chat_template", str, default=None)
    if chat_template is not None:
        from runnel_ctranslate2.chat_template import BUILTIN_TEMPLATES

        if chat_template not in BUILTIN_TEMPLATES:
            raise table.error("chat_template", f"unknown chat template {chat_template!r}; built-in: "
                              f"{', '.join(BUILTIN_TEMPLATES)}")
    app = LlamaApp(
        name=app_config.name, model=model, served_model_name=table.get("served_model_name", str, default=None),
        context_length=_positive(table, "context_length", int, None), threads=threads,
        n_gpu_layers=table.get("n_gpu_layers", int, default=0), parallel=_positive(table, "parallel", int, 1),
        max_queue=_positive(table, "max_queue", int, 256),
        default_max_tokens=_positive(table, "default_max_tokens", int, 16), chat_template=chat_template,
        close_wait=min(server.config.server.shutdown_grace, 5.0),
    )
    table.finish()
    return app


@hookimpl
def runnel_register_backends(register):
    register("llamacpp", make_app)
