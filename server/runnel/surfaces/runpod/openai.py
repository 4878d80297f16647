"""RunPod-style OpenAI paths for model apps, ``/v2/{endpoint_id}/openai/v1/...``.

A client written for a RunPod vLLM worker works by changing only its base URL.
Each app is an endpoint, configured by ``[apps.NAME.runpod]`` (``config.py``).
"""

from __future__ import annotations

from ...errors import HTTPError
from ...http import json_response
from ..openai import OpenAIAPI, ReplyOptions, can_embed, is_model_app
from .config import RunPodEndpoint


def reply_options(endpoint: RunPodEndpoint) -> ReplyOptions:
    """How an endpoint answers for its model: its served name, role and stream framing."""
    return ReplyOptions(model_name=endpoint.model_name, role=endpoint.role, sse=endpoint.sse)


def check_model(body, app, reply: ReplyOptions, param: str = "model") -> None:
    """A body's ``model``, when it names one, must be the one the endpoint serves (404, as vLLM)."""
    served = reply.model_name or app.model_id
    model = body.get("model") if type(body) is dict else None
    if model is not None and model != served:
        raise HTTPError(404, f"The model `{model}` does not exist on this endpoint; it serves `{served}`.",
                        type="invalid_request_error", param=param, code="model_not_found")


class RunPodEndpoints:
    def __init__(self, server, endpoints: dict[str, RunPodEndpoint]) -> None:
        self.api = OpenAIAPI.of(server)
        self.server = server
        self.endpoints: dict[str, tuple[str, ReplyOptions]] = {
            endpoint_id: (endpoint.app, reply_options(endpoint))
            for endpoint_id, endpoint in endpoints.items()
        }

    def _lookup(self, request) -> tuple[str, ReplyOptions]:
        endpoint_id = request.path_params["endpoint_id"]
        found = self.endpoints.get(endpoint_id)
        if found is None:
            raise HTTPError(404, f"No endpoint {endpoint_id!r}", code="endpoint_not_found")
        return found

    async def _endpoint(self, request, need=is_model_app):
        name, reply = self._lookup(request)
        app = self.api.app_by_name(name, need=need)
        check_model(await request.json(), app, reply)
        return app, reply

    async def chat(self, request):
        app, reply = await self._endpoint(request)
        return await self.api.chat(request, app, reply)

    async def completions(self, request):
        app, reply = await self._endpoint(request)
        return await self.api.completions(request, app, reply)

    async def embeddings(self, request):
        app, _ = await self._endpoint(request, need=can_embed)
        return await self.api.embeddings(request, app)

    async def models(self, request):
        name, reply = self._lookup(request)
        app = self.server.apps.get(name)
        data = []
        if app is not None and (is_model_app(app) or can_embed(app)):
            card = self.api.model_card(app, name)
            data.append({**card, "id": reply.model_name or app.model_id})
        return json_response({"object": "list", "data": data})


def register_routes(register, server, endpoints: dict[str, RunPodEndpoint]) -> None:
    runpod = RunPodEndpoints(server, endpoints)
    register("POST", "/v2/{endpoint_id}/openai/v1/chat/completions", runpod.chat)
    register("POST", "/v2/{endpoint_id}/openai/v1/completions", runpod.completions)
    register("POST", "/v2/{endpoint_id}/openai/v1/embeddings", runpod.embeddings)
    register("GET", "/v2/{endpoint_id}/openai/v1/models", runpod.models)
