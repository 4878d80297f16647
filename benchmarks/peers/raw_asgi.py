"""A raw ASGI app, no framework: the least an ASGI server can be asked to do.

    python benchmarks/peers/raw_asgi.py --port P [--server uvicorn|granian] [--http h11|httptools]
"""

import json

from common import MODELS, echo_events, serve_asgi

MODELS_BODY = json.dumps(MODELS, separators=(",", ":")).encode()


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["method"] == "GET" and scope["path"] == "/v1/models":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", b"%d" % len(MODELS_BODY))]})
        await send({"type": "http.response.body", "body": MODELS_BODY})
    elif scope["method"] == "POST" and scope["path"].startswith("/echo/"):
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        for event in echo_events(json.loads(body)):
            chunk = b"data: %b\n\n" % json.dumps(event, separators=(",", ":")).encode()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    else:
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})


if __name__ == "__main__":
    serve_asgi("raw_asgi:app", __doc__)
