"""Built-in plugin: the OpenAI-compatible API under /v1.

    api.py      OpenAIAPI: the handlers, shared with the RunPod, Baseten and /v4 surfaces
    params.py   request bodies validated into SamplingParams (400s naming the parameter)
    sinks.py    token sinks: a generation as OpenAI's objects, streamed or collected
    tokens.py   /tokenize and /detokenize (vLLM's shapes)
"""

from __future__ import annotations

from ...hookspecs import hookimpl
from .api import NO_CACHE, SSE, OpenAIAPI, ReplyOptions, can_embed, is_model_app
from .params import invalid
from .tokens import TokenEndpoints

__all__ = ["NO_CACHE", "SSE", "OpenAIAPI", "ReplyOptions", "can_embed", "invalid", "is_model_app"]


@hookimpl
def runnel_register_routes(register, server):
    api = OpenAIAPI.of(server)
    register("GET", "/v1/models", api.models)
    register("GET", "/v1/models/{model:path}", api.model)
    register("POST", "/v1/chat/completions", api.chat)
    register("POST", "/v1/completions", api.completions)
    register("POST", "/v1/embeddings", api.embeddings)
    tokens = TokenEndpoints(api)
    register("POST", "/tokenize", tokens.tokenize)
    register("POST", "/detokenize", tokens.detokenize)
