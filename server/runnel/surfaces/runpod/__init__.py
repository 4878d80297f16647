"""Built-in plugin: RunPod's paths, ``/v2/{endpoint_id}/...``.

A client written for RunPod works by changing only its base URL. Each app is an
endpoint, configured by ``[apps.NAME.runpod]``:

    config.py   the one reader of ``[apps.NAME.runpod]``: one ``RunPodEndpoint`` per app
    openai.py   ``/v2/{id}/openai/v1/...``: the OpenAI API of model apps, as a vLLM worker has it
    jobs.py     ``/v2/{id}/run``, ``/runsync``, ``/status``, ``/stream``, ``/cancel``, ``/retry``,
                ``/purge-queue``, ``/health``: the job API, jobs being runs (``runnel.runs``)
    model_jobs.py  a model app's jobs: worker-vllm's input shapes and outputs
"""

from __future__ import annotations

from ...hookspecs import hookimpl
from . import jobs, openai
from .config import read_endpoints


@hookimpl
def runnel_register_routes(register, server):
    endpoints = read_endpoints(server.config)
    openai.register_routes(register, server, endpoints)
    jobs.register_routes(register, server, endpoints)
