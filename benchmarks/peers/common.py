"""What the HTTP-core peers serve, the same as runnel with an echo app named "echo",
and how the ASGI peers are started (uvicorn with h11 or httptools, or granian)."""

from __future__ import annotations

import argparse

# runnel's GET /v1/models with one echo app, byte for byte.
MODELS = {"object": "list", "data": [{"id": "echo", "object": "model", "created": 0, "owned_by": "runnel"}]}


def echo_events(body: dict) -> list[dict]:
    """The events of runnel's POST /echo/{app} stream: the prompt's words, cycled to max_tokens."""
    words = str(body.get("prompt") or "lorem ipsum").split()
    count = int(body.get("max_tokens", 16))
    events = [{"index": i, "token": words[i % len(words)] if i == 0 else " " + words[i % len(words)]}
              for i in range(count)]
    return events + [{"done": True, "tokens": count}]


def serve_asgi(target: str, description: str) -> None:
    """``python benchmarks/peers/X.py --port P [--server uvicorn|granian] [--http h11|httptools]``.

    ``target`` is "module:attribute" importable from benchmarks/peers/ (the script's own folder).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server", choices=("uvicorn", "granian"), default="uvicorn")
    parser.add_argument("--http", choices=("h11", "httptools"), default="httptools", help="uvicorn's HTTP parser")
    args = parser.parse_args()
    if args.server == "granian":
        from pathlib import Path

        from granian import Granian

        Granian(target, address="127.0.0.1", port=args.port, interface="asgi", workers=1, loop="uvloop",
                websockets=False, log_level="warning", backlog=2048,
                working_dir=Path(__file__).resolve().parent).serve()
    else:
        import uvicorn

        # Idle keep-alive connections stay open as long as runnel's do in the scale scenario.
        uvicorn.run(target, host="127.0.0.1", port=args.port, http=args.http, loop="uvloop", lifespan="on",
                    log_level="warning", access_log=False, backlog=2048, timeout_keep_alive=600)
