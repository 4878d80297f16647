"""runnel-echo: a backend that streams deterministic tokens at a configurable pace."""

from __future__ import annotations

import asyncio
import random

from runnel import HTTPError, hookimpl, json_response

LOREM = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua ut enim ad minim veniam quis nostrud"
).split()

MAX_TOKENS_LIMIT = 1_000_000


class EchoApp:
    """Tokens are the prompt's words, repeated to fill ``max_tokens``; a seeded
    lorem ipsum when the prompt has none. Same input, same tokens, every time."""

    def __init__(self, name: str, *, pace: float, load_seconds: float, seed: int, served_model_name: str) -> None:
        self.name = name
        self.pace = pace
        self.load_seconds = load_seconds
        self.seed = seed
        self.served_model_name = served_model_name

    async def start(self) -> None:
        if self.load_seconds:
            await asyncio.sleep(self.load_seconds)

    async def close(self) -> None:
        pass

    def tokens(self, prompt: str, max_tokens: int) -> list[str]:
        words = prompt.split() or random.Random(self.seed).choices(LOREM, k=min(max_tokens, 64))
        tokens = [words[i % len(words)] for i in range(max_tokens)]
        return [token if i == 0 else " " + token for i, token in enumerate(tokens)]


def make_echo_app(app_config, table, server) -> EchoApp:
    pace_ms = table.get("pace_ms", float, default=0.0)
    load_seconds = table.get("load_seconds", float, default=0.0)
    if pace_ms < 0:
        raise table.error("pace_ms", "must be >= 0")
    if load_seconds < 0:
        raise table.error("load_seconds", "must be >= 0")
    app = EchoApp(
        app_config.name,
        pace=pace_ms / 1000,
        load_seconds=load_seconds,
        seed=table.get("seed", int, default=0),
        served_model_name=table.get("served_model_name", str, default=app_config.name),
    )
    table.finish()
    return app


def _field(body: dict, name: str, kind: type, default):
    value = body.get(name, default)
    if type(value) is not kind and not (kind is float and type(value) is int):
        raise HTTPError(400, f"'{name}' must be of type {kind.__name__}", param=name, code="invalid_type")
    return value


def _app(server, name: str) -> EchoApp:
    state = server.apps.state(name)
    app = server.apps.get(name)
    if state is None or (app is not None and not isinstance(app, EchoApp)):
        raise HTTPError(404, f"No echo app named {name!r}", code="app_not_found")
    if app is None:
        raise HTTPError(503, f"App {name!r} is {state}", code="app_not_ready")
    return app


@hookimpl
def runnel_register_backends(register):
    register("echo", make_echo_app)


@hookimpl
def runnel_register_routes(register, server):
    async def echo(request):
        app = _app(server, request.path_params["app"])
        body = await request.json()
        if not isinstance(body, dict):
            raise HTTPError(400, "Request body must be a JSON object")
        prompt = _field(body, "prompt", str, "")
        max_tokens = _field(body, "max_tokens", int, 16)
        if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
            raise HTTPError(400, f"'max_tokens' must be between 1 and {MAX_TOKENS_LIMIT}", param="max_tokens")
        tokens = app.tokens(prompt, max_tokens)
        if not _field(body, "stream", bool, False):
            if app.pace:
                await asyncio.sleep(app.pace * len(tokens))
            return json_response({"app": app.name, "text": "".join(tokens), "tokens": len(tokens)})
        stream = request.stream()
        pace = app.pace
        for index, token in enumerate(tokens):
            if pace:
                await asyncio.sleep(pace)
            stream.send({"index": index, "token": token})
            if stream.paused:
                await stream.drain()
        stream.send({"done": True, "tokens": len(tokens)})

    register("POST", "/echo/{app}", echo)
