"""Starlette, written as its documentation shows: JSONResponse, and sse-starlette for SSE.

    python benchmarks/peers/starlette_app.py --port P [--server uvicorn|granian] [--http h11|httptools]
"""

import json

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from common import MODELS, echo_events, serve_asgi


async def models(request):
    return JSONResponse(MODELS)


async def echo(request):
    events = echo_events(await request.json())

    async def stream():
        for event in events:
            yield json.dumps(event)

    return EventSourceResponse(stream())


app = Starlette(routes=[Route("/v1/models", models), Route("/echo/{app}", echo, methods=["POST"])])

if __name__ == "__main__":
    serve_asgi("starlette_app:app", __doc__)
