"""FastAPI, written as its documentation shows: a dict returned, a pydantic body, and
sse-starlette for SSE.

    python benchmarks/peers/fastapi_app.py --port P [--server uvicorn|granian] [--http h11|httptools]
"""

import json

from fastapi import FastAPI
from pydantic import BaseModel
from sse_starlette.sse import EventSourceResponse

from common import MODELS, echo_events, serve_asgi

app = FastAPI()


class EchoRequest(BaseModel):
    prompt: str = ""
    max_tokens: int = 16
    stream: bool = False


@app.get("/v1/models")
async def models():
    return MODELS


@app.post("/echo/{name}")
async def echo(name: str, request: EchoRequest):
    events = echo_events(request.model_dump())
    if not request.stream:
        return {"app": name, "text": "".join(event.get("token", "") for event in events), "tokens": len(events) - 1}

    async def stream():
        for event in events:
            yield json.dumps(event)

    return EventSourceResponse(stream())


if __name__ == "__main__":
    serve_asgi("fastapi_app:app", __doc__)
