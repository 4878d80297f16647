"""The runnel plugin: ``backend = "llamacpp"`` apps.

    [apps.tiny]
    backend = "llamacpp"
    model = "builtin:tiny"          # or the path of a .gguf file
    context_length = 2048           # n_ctx; default: the model's own
    threads = 0                     # per context; 0: the cores shared among the contexts
    parallel = 1                    # contexts, each serving one stream at a time
    n_gpu_layers = 0                # layers offloaded, on a GPU build (-1: all)
    task = "generate"               # or "embed": /v1/embeddings from a GGUF embedding model
    pooling = "model"               # embed: the model's own, or "mean", "cls", "last"
"""

from __future__ import annotations

import os

from runnel import hookimpl

from .apps import POOLING, LlamaApp, LlamaEmbedApp


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
        from runnel.chat_template import BUILTIN_TEMPLATES

        if chat_template not in BUILTIN_TEMPLATES:
            raise table.error("chat_template", f"unknown chat template {chat_template!r}; built-in: "
                              f"{', '.join(BUILTIN_TEMPLATES)}")
    task = table.get("task", str, default="generate")
    common = dict(name=app_config.name, model=model,
                  served_model_name=table.get("served_model_name", str, default=None),
                  context_length=_positive(table, "context_length", int, None), threads=threads,
                  n_gpu_layers=table.get("n_gpu_layers", int, default=0),
                  close_wait=min(server.config.server.shutdown_grace, 5.0))
    if task == "embed":
        pooling = table.get("pooling", str, default="model")
        if pooling not in POOLING:
            raise table.error("pooling", f"must be one of {', '.join(POOLING)}")
        app = LlamaEmbedApp(**common, pooling=pooling, normalize=table.get("normalize", bool, default=True))
        table.finish()
        return app
    if task != "generate":
        raise table.error("task", f"must be 'generate' or 'embed', not {task!r}")
    app = LlamaApp(**common, parallel=_positive(table, "parallel", int, 1),
                   max_queue=_positive(table, "max_queue", int, 256),
                   default_max_tokens=_positive(table, "default_max_tokens", int, 16), chat_template=chat_template)
    table.finish()
    return app


@hookimpl
def runnel_register_backends(register):
    register("llamacpp", make_app)
