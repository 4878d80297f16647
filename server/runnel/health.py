"""Built-in plugin: ``GET /health``, public even when authentication is on."""

from .hookspecs import hookimpl
from .http import json_response


@hookimpl
def runnel_register_routes(register, server):
    async def health(request):
        states = server.apps.states()
        if all(state == "ready" for state in states.values()):
            return json_response({"status": "ok"})
        status = "failed" if "failed" in states.values() else "loading"
        return json_response({"status": status, "apps": states}, status=503)

    register("GET", "/health", health, public=True)
