"""Built-in plugin: the operations endpoints.

``GET /health`` (public): ready when every app has loaded (503 with each app's state
until then), as it always was. ``GET /livez`` (public): the process answers; never
depends on the models (a liveness probe that restarts a server still loading its model
would never let it finish). ``GET /readyz`` (public): ``/health``, and 503 from the
moment the server begins to stop (SIGTERM), while it still serves for
``[server] shutdown_drain_delay`` seconds, so a load balancer stops sending first.
``GET /metrics``: Prometheus' text format (runnel.metrics); authenticated unless
``[server] metrics_public``. ``GET /stats`` (authenticated): a human view, in JSON, of
each app's state and its batching counters (the same counters ``/metrics`` reads).
"""

import os

from ..hookspecs import hookimpl
from ..http import Response, json_response
from ..metrics import CONTENT_TYPE


@hookimpl
def runnel_register_routes(register, server):
    # One of several workers on the port: each answers for itself, and says which it is.
    worker = {"index": server.worker.index, "pid": os.getpid()} if server.worker is not None else None

    def readiness():
        states = server.apps.states()
        if all(state == "ready" for state in states.values()):
            return None
        body = {"status": "failed" if "failed" in states.values() else "loading", "apps": states}
        if worker is not None:
            body["worker"] = worker
        return body

    async def health(request):
        problem = readiness()
        if problem is not None:
            return json_response(problem, status=503)
        return json_response({"status": "ok"} if worker is None else {"status": "ok", "worker": worker})

    async def livez(request):
        return json_response({"status": "ok"})

    async def readyz(request):
        if server.draining:
            return json_response({"status": "draining"}, status=503)
        return await health(request)

    async def metrics(request):
        return Response(200, server.metrics.render(), media_type=CONTENT_TYPE)

    async def stats(request):
        """Each app's state, plus whatever counters it keeps (batching, queue) via ``stats()``."""
        apps = {}
        for name, app in server.apps.items():
            report = getattr(app, "stats", None)
            apps[name] = {"state": server.apps.state(name), **(report() if callable(report) else {})}
        return json_response({"apps": apps})

    register("GET", "/health", health, public=True)
    register("GET", "/livez", livez, public=True)
    register("GET", "/readyz", readyz, public=True)
    register("GET", "/metrics", metrics, public=server.config.server.metrics_public)
    register("GET", "/stats", stats)
