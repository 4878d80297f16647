"""Built-in plugin: the OpenAI-compatible API under /v1.

    api.py      OpenAIAPI: the handlers, shared with the RunPod, Baseten and /v4 surfaces
    params.py   request bodies validated into SamplingParams (400s naming the parameter)
    sinks.py    token sinks: a generation as OpenAI's objects, streamed or collected
    tokens.py   /tokenize and /detokenize (vLLM's shapes)
    responses.py  the Responses API, /v1/responses (responses_items.py: its input and output items)
    offline.py  an OpenAI body executed without an HTTP exchange (batch lines, async runs, resumable streams)
    runs.py     OpenAI bodies as runs (/v4 ...?async=true, RunPod model jobs)
    files.py    /v1/files: uploads (multipart, streamed to disk) and batches' output files
    batches.py  the Batch API, /v1/batches: shards of lines as runs (batch_files.py: their files)
    resumable.py  resumable streams: X-Runnel-Resumable, reattached with Last-Event-ID
"""

from __future__ import annotations

from ...hookspecs import hookimpl
from .api import NO_CACHE, SSE, OpenAIAPI, ReplyOptions, can_embed, is_model_app
from .batches import BatchesAPI
from .files import MULTIPART_OVERHEAD, FilesAPI, FileStore, files_dir
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
    register("DELETE", "/v1/chat/completions/{stream_id}/stream", streams.delete_chat)
    register("DELETE", "/v1/completions/{stream_id}/stream", streams.delete_completions)
    responses = ResponsesAPI(server)
    register("POST", "/v1/responses", responses.create)
    register("GET", "/v1/responses/{response_id}", responses.retrieve)
    register("DELETE", "/v1/responses/{response_id}", responses.delete)
    register("POST", "/v1/responses/{response_id}/cancel", responses.cancel)
    settings = server.config.server
    files = FileStore(files_dir(server.config))
    uploads = FilesAPI(files, settings.files_max_bytes)
    server.body_limits["/v1/files"] = settings.files_max_bytes + MULTIPART_OVERHEAD
    register("POST", "/v1/files", uploads.create)
    register("GET", "/v1/files", uploads.index)
    register("GET", "/v1/files/{file_id}", uploads.retrieve)
    register("DELETE", "/v1/files/{file_id}", uploads.delete)
    register("GET", "/v1/files/{file_id}/content", uploads.content)
    batches = server.state["batches"] = BatchesAPI(server, files)
    register("POST", "/v1/batches", batches.create)
    register("GET", "/v1/batches", batches.index)
    register("GET", "/v1/batches/{batch_id}", batches.retrieve)
    register("POST", "/v1/batches/{batch_id}/cancel", batches.cancel)
    tokens = TokenEndpoints(api)
    register("POST", "/tokenize", tokens.tokenize)
    register("POST", "/detokenize", tokens.detokenize)


@hookimpl
def runnel_startup(server):
    server.state["batches"].start()  # resumes the batches a previous process left unfinished


@hookimpl
async def runnel_shutdown(server):
    await server.state["batches"].stop()
