"""Built-in plugin: the OpenAI-compatible API under /v1.

    api.py      OpenAIAPI: the handlers, shared with the RunPod, Baseten and /v4 surfaces
    params.py   request bodies validated into SamplingParams (400s naming the parameter)
    sinks.py    token sinks: a generation as OpenAI's objects, streamed or collected
    tokens.py   /tokenize and /detokenize (vLLM's shapes)
    responses.py  the Responses API, /v1/responses (responses_items.py: its input and output items)
    offline.py  OpenAI bodies executed without an HTTP exchange (for runs)
    resumable.py  resumable streams: X-Runnel-Resumable, reattached with Last-Event-ID
"""

from __future__ import annotations

from ...hookspecs import hookimpl
from .api import NO_CACHE, SSE, OpenAIAPI, ReplyOptions, can_embed, is_model_app
from .params import invalid
from .responses import ResponsesAPI
from .resumable import ReattachAPI, StreamRuns
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
    streams = ReattachAPI(api)
    server.runs.add_view(StreamRuns(api))
    register("GET", "/v1/chat/completions/{stream_id}/stream", streams.chat)
    register("GET", "/v1/completions/{stream_id}/stream", streams.completions)
    responses = ResponsesAPI(server)
    register("POST", "/v1/responses", responses.create)
    register("GET", "/v1/responses/{response_id}", responses.retrieve)
    register("DELETE", "/v1/responses/{response_id}", responses.delete)
    register("POST", "/v1/responses/{response_id}/cancel", responses.cancel)
    tokens = TokenEndpoints(api)
    register("POST", "/tokenize", tokens.tokenize)
    register("POST", "/detokenize", tokens.detokenize)
