"""Built-in plugin: RunPod-style OpenAI paths, ``/v2/{endpoint_id}/openai/v1/...``.

A client written for a RunPod vLLM worker works by changing only its base URL.
Each app is an endpoint; ``[apps.NAME.runpod]`` holds what the worker's
environment variables would:

    endpoint_id = "abc123"                     # default: the app's name
    served_model_name_override = "my-model"    # OPENAI_SERVED_MODEL_NAME_OVERRIDE
    response_role = "assistant"                # OPENAI_RESPONSE_ROLE
    raw_openai_output = true                   # RAW_OPENAI_OUTPUT: SSE; false: JSON lines
    handler = "handler"                        # the function /run jobs call (runpod_jobs)
"""

from __future__ import annotations

from ..config import ConfigError
from ..errors import HTTPError
from ..hookspecs import hookimpl
from ..http import json_response
from .openai import OpenAIAPI, ReplyOptions, is_model_app


class RunPodEndpoints:
    def __init__(self, server) -> None:
        self.api = OpenAIAPI.of(server)
        self.server = server
        self.endpoints: dict[str, tuple[str, ReplyOptions]] = {}
        config = server.config
        for name, app_config in config.apps.items():
            table = config.table(f"apps.{name}.runpod", app_config.surfaces.get("runpod", {}))
            endpoint_id = table.get("endpoint_id", str, default=name)
            table.get("handler", str, default="handler")  # the job API's (runnel.surfaces.runpod_jobs)
            reply = ReplyOptions(
                model_name=table.get("served_model_name_override", str, default=None),
                role=table.get("response_role", str, default="assistant"),
                sse=table.get("raw_openai_output", bool, default=True),
            )
            table.finish()
            if endpoint_id in self.endpoints:
                raise ConfigError(f"endpoint id {endpoint_id!r} is used by two apps", key=f"apps.{name}.runpod.endpoint_id",
                                  source=config.source)
            self.endpoints[endpoint_id] = (name, reply)

    def _lookup(self, request) -> tuple[str, ReplyOptions]:
        endpoint_id = request.path_params["endpoint_id"]
        found = self.endpoints.get(endpoint_id)
        if found is None:
            raise HTTPError(404, f"No endpoint {endpoint_id!r}", code="endpoint_not_found")
        return found

    async def _endpoint(self, request):
        name, reply = self._lookup(request)
        app = self.api.app_by_name(name)
        served = reply.model_name or app.model_id
        body = await request.json()
        model = body.get("model") if type(body) is dict else None
        if model is not None and model != served:
            raise HTTPError(404, f"The model `{model}` does not exist on this endpoint; it serves `{served}`.",
                            type="invalid_request_error", param="model", code="model_not_found")
        return app, reply

    async def chat(self, request):
        app, reply = await self._endpoint(request)
        return await self.api.chat(request, app, reply)

    async def completions(self, request):
        app, reply = await self._endpoint(request)
        return await self.api.completions(request, app, reply)

    async def models(self, request):
        name, reply = self._lookup(request)
        app = self.server.apps.get(name)
        data = []
        if app is not None and is_model_app(app):
            card = self.api.model_card(app, name)
            data.append({**card, "id": reply.model_name or app.model_id})
        return json_response({"object": "list", "data": data})


@hookimpl
def runnel_register_routes(register, server):
    runpod = RunPodEndpoints(server)
    register("POST", "/v2/{endpoint_id}/openai/v1/chat/completions", runpod.chat)
    register("POST", "/v2/{endpoint_id}/openai/v1/completions", runpod.completions)
    register("GET", "/v2/{endpoint_id}/openai/v1/models", runpod.models)
