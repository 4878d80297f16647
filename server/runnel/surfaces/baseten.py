"""Built-in plugin: the Baseten bridge, ``/v1/direct/chat/completions`` and ``/v1/direct/completions``.

Clients of Baseten's OpenAI bridge pick the model in the body, not the path:
``extra_body={"baseten": {"model_id": "abcd1234", "deployment_id": "..."}}``, or
``model="baseten/abcd1234[/deployment_id]"``.
Each app can answer for one Baseten model id and deployment:

    [apps.NAME.baseten]
    model_id = "abcd1234"
    deployment_id = "q4w8e2"     # default: the app's name
    production = true            # the deployment used when a request names none
                                 # (default: the first app that serves the model)
    function = "predict"         # a python function app's: what async_predict calls

Answers carry a UUID as their id, as Baseten's do. Baseten's async inference API
(``async_predict``, ``/async_request/{id}``) is ``baseten_async.py``, on the same tables.
"""

from __future__ import annotations

from ..config import ConfigError
from ..errors import HTTPError
from ..hookspecs import hookimpl
from . import baseten_async
from .openai import OpenAIAPI, ReplyOptions, invalid

BASETEN_REPLY = ReplyOptions(uuid_ids=True)
BASETEN_FIELDS = frozenset({"baseten"})  # the bridge's own field, beside OpenAI's
MODEL_PREFIX = "baseten/"  # model="baseten/{model_id}[/{deployment_id}]", the other shape Baseten documents


class BasetenBridge:
    def __init__(self, server) -> None:
        self.api = OpenAIAPI.of(server)
        self.deployments: dict[tuple[str, str], str] = {}  # (model_id, deployment_id) -> app
        self.production: dict[str, str] = {}  # model_id -> app
        self.functions: dict[str, str] = {}  # app -> its [apps.NAME.baseten] function, when set
        config = server.config
        first: dict[str, str] = {}  # model_id -> its first app, production unless another says so
        for name, app_config in config.apps.items():
            if "baseten" not in app_config.surfaces:
                continue
            key = f"apps.{name}.baseten"
            table = config.table(key, app_config.surfaces["baseten"])
            model_id = table.get("model_id", str)
            deployment_id = table.get("deployment_id", str, default=name)
            production = table.get("production", bool, default=None)
            function = table.get("function", str, default=None)
            table.finish()
            if function is not None:
                self.functions[name] = function
            if (model_id, deployment_id) in self.deployments:
                raise ConfigError(f"model {model_id!r} deployment {deployment_id!r} is served by two apps",
                                  key=f"{key}.deployment_id", source=config.source)
            self.deployments[(model_id, deployment_id)] = name
            first.setdefault(model_id, name)
            if production:
                if model_id in self.production:
                    raise ConfigError(f"model {model_id!r} has two production deployments",
                                      key=f"{key}.production", source=config.source)
                self.production[model_id] = name
        for model_id, name in first.items():
            self.production.setdefault(model_id, name)

    async def chat(self, request):
        app = self.app_for(await request.json())
        return await self.api.chat(request, app, BASETEN_REPLY, BASETEN_FIELDS)

    async def completions(self, request):
        app = self.app_for(await request.json())
        return await self.api.completions(request, app, BASETEN_REPLY, BASETEN_FIELDS)

    def app_for(self, body):
        """The app a request names: ``"baseten": {"model_id", "deployment_id"?}`` in the body,
        else ``"model": "baseten/{model_id}[/{deployment_id}]"``."""
        target = body.get("baseten") if type(body) is dict else None
        model = body.get("model") if type(body) is dict else None
        param = "baseten"
        if target is None and type(model) is str and model.startswith(MODEL_PREFIX):
            model_id, _, deployment = model[len(MODEL_PREFIX):].partition("/")
            if not model_id or "/" in deployment:
                raise invalid("model", f"Invalid value for 'model': {model!r}; use "
                              "'baseten/{model_id}' or 'baseten/{model_id}/{deployment_id}'.")
            target, param = {"model_id": model_id, "deployment_id": deployment or None}, "model"
        if type(target) is not dict or type(target.get("model_id")) is not str:
            raise invalid("baseten", "The bridge needs 'baseten': {'model_id': ...} in the body "
                          "(extra_body in the openai SDK), or model='baseten/{model_id}[/{deployment_id}]'.",
                          "missing_required_parameter")
        model_id = target["model_id"]
        deployment_id = target.get("deployment_id")
        if deployment_id is None:
            name = self.production.get(model_id)
        elif type(deployment_id) is str:
            name = self.deployments.get((model_id, deployment_id))
        else:
            raise invalid("baseten.deployment_id", "'baseten.deployment_id' must be a string.", "invalid_type")
        if name is None:
            what = f"model {model_id!r}" + (f" deployment {deployment_id!r}" if deployment_id else "")
            raise HTTPError(404, f"No Baseten {what} is served here.", type="invalid_request_error",
                            param=param, code="model_not_found")
        return self.api.app_by_name(name)


@hookimpl
def runnel_register_routes(register, server):
    bridge = BasetenBridge(server)
    register("POST", "/v1/direct/chat/completions", bridge.chat)
    register("POST", "/v1/direct/completions", bridge.completions)
    if bridge.deployments:
        baseten_async.register_routes(register, server, bridge, bridge.functions)
