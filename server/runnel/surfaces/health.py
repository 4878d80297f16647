"""Built-in plugin: ``GET /health`` (public) and ``GET /stats`` (authenticated)."""

from ..hookspecs import hookimpl
from ..http import json_response


@hookimpl
def runnel_register_routes(register, server):
    async def health(request):
        states = server.apps.states()
        if all(state == "ready" for state in states.values()):
            return json_response({"status": "ok"})
        status = "failed" if "failed" in states.values() else "loading"
        return json_response({"status": status, "apps": states}, status=503)

    async def stats(request):
        """Each app's state, plus whatever counters it keeps (batching, queue) via ``stats()``."""
        apps = {}
        for name, app in server.apps.items():
            report = getattr(app, "stats", None)
            apps[name] = {"state": server.apps.state(name), **(report() if callable(report) else {})}
        return json_response({"apps": apps})

    register("GET", "/health", health, public=True)
    register("GET", "/stats", stats)
