"""``[apps.NAME.runpod]``: the one reader of the table both RunPod halves use.

Each app is a RunPod endpoint; the table holds what a RunPod worker's environment
variables would:

    endpoint_id = "abc123"                     # default: the app's name
    served_model_name_override = "my-model"    # OPENAI_SERVED_MODEL_NAME_OVERRIDE
    response_role = "assistant"                # OPENAI_RESPONSE_ROLE
    raw_openai_output = true                   # RAW_OPENAI_OUTPUT: SSE; false: JSON lines
    handler = "handler"                        # the function the job API's jobs call

The OpenAI paths (``openai.py``) use the first four for model apps, and so do model
apps' jobs (``model_jobs.py``); the job API (``jobs.py``) uses ``endpoint_id`` for every
app and ``handler`` for python function apps.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...config import ConfigError

__all__ = ["RunPodEndpoint", "read_endpoints"]


@dataclass(frozen=True, slots=True)
class RunPodEndpoint:
    app: str
    endpoint_id: str
    handler: str  # the function jobs call
    model_name: str | None  # the model's name in answers; None: the app's own
    role: str
    sse: bool  # False: stream bare JSON lines


def read_endpoints(config) -> dict[str, RunPodEndpoint]:
    """Every app's endpoint, by endpoint id. ConfigError naming the key for a mistake,
    an unknown key, or an endpoint id two apps share."""
    endpoints: dict[str, RunPodEndpoint] = {}
    for name, app_config in config.apps.items():
        table = config.table(f"apps.{name}.runpod", app_config.surfaces.get("runpod", {}))
        endpoint_id = table.get("endpoint_id", str, default=name)
        handler = table.get("handler", str, default="handler")
        if not handler.isidentifier():
            raise table.error("handler", f"must be a function name, got {handler!r}")
        endpoint = RunPodEndpoint(
            app=name,
            endpoint_id=endpoint_id,
            handler=handler,
            model_name=table.get("served_model_name_override", str, default=None),
            role=table.get("response_role", str, default="assistant"),
            sse=table.get("raw_openai_output", bool, default=True),
        )
        table.finish()
        if endpoint_id in endpoints:
            raise ConfigError(f"endpoint id {endpoint_id!r} is used by two apps", key=f"apps.{name}.runpod.endpoint_id",
                              source=config.source)
        endpoints[endpoint_id] = endpoint
    return endpoints
