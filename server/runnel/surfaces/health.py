"""Built-in plugin: ``GET /health`` (public) and ``GET /stats`` (authenticated)."""

import os

from ..hookspecs import hookimpl
from ..http import json_response


@hookimpl
def runnel_register_routes(register, server):
    # One of several workers on the port: each answers for itself, and says which it is.
    worker = {"index": server.worker.index, "pid": os.getpid()} if server.worker is not None else None

    async def health(request):
        states = server.apps.states()
        if all(state == "ready" for state in states.values()):
            return json_response({"status": "ok"} if worker is None else {"status": "ok", "worker": worker})
        status = "failed" if "failed" in states.values() else "loading"
        body = {"status": status, "apps": states}
        if worker is not None:
            body["worker"] = worker
        return json_response(body, status=503)

    async def stats(request):
        """Each app's state, plus whatever counters it keeps (batching, queue) via ``stats()``."""
        apps = {}
        for name, app in server.apps.items():
            report = getattr(app, "stats", None)
            apps[name] = {"state": server.apps.state(name), **(report() if callable(report) else {})}
        return json_response({"apps": apps})

    register("GET", "/health", health, public=True)
    register("GET", "/stats", stats)
