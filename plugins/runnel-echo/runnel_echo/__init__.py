"""runnel-echo: a backend that streams deterministic tokens at a configurable pace."""

from __future__ import annotations

import asyncio
import math
import random
import zlib

from runnel import HTTPError, hookimpl, json_response
from runnel.simple_model import END, SimpleModel

LOREM = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua ut enim ad minim veniam quis nostrud"
).split()

MAX_TOKENS_LIMIT = 100_000
BUSY_RETRY_AFTER = b"1"
EMBED_ON_LOOP_CHARS = 16_384  # more is embedded on a worker thread


class EchoApp(SimpleModel):
    """Tokens are the prompt's words, repeated to fill ``max_tokens``; a seeded
    lorem ipsum when the prompt has none. Same input, same tokens, every time.

    It also serves the OpenAI surfaces, as a ``runnel.simple_model.SimpleModel``:
    its tokenizer splits text into words with their leading whitespace;
    generation echoes the prompt's tokens once and then ends ("stop"), unless
    ``ignore_eos`` (or ``min_tokens``) makes it cycle on to ``max_tokens``. As a
    model, its next-token distribution puts probability 1 on the next prompt
    token, so temperature, top_p, top_k and seed apply but cannot change the
    answer, and every log probability is 0.
    """

    supported = frozenset(
        {"temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "logprobs", "top_logprobs",
         "ignore_eos", "min_tokens"}
    )

    def __init__(self, name: str, *, pace: float, load_seconds: float, seed: int, embedding_dim: int = 64,
                 max_generations: int = 10_000, slots: int | None = None, **settings) -> None:
        super().__init__(name, **settings)
        self.max_generations = max_generations  # choices admitted at once (generating or waiting); one more is a 429
        self.slots = slots  # of them, generating at once; the rest wait their turn (SimpleModel)
        self.generating = 0
        self.pace = pace
        self.load_seconds = load_seconds
        self.seed = seed
        self.embedding_dim = embedding_dim

    @property
    def served_model_name(self) -> str:
        return self.model_id

    async def start(self) -> None:
        if self.load_seconds:
            await asyncio.sleep(self.load_seconds)

    def tokens(self, prompt: str, max_tokens: int):
        """The tokens one at a time, so a long stream costs no memory up front."""
        words = prompt.split() or random.Random(self.seed).choices(LOREM, k=min(max_tokens, 64))
        spaced = [" " + word for word in words]
        yield words[0]
        for i in range(1, max_tokens):
            yield spaced[i % len(words)]

    def generate(self, prompt_tokens, params, n, sink):
        """As SimpleModel's, bounded: ``max_generations`` choices at once, a 429 past it. A request
        that could never fit is refused by the surface first (``max_choices``), with a 400."""
        if self.generating + n > self.max_generations:
            raise HTTPError(429, f"App '{self.name}' is busy ({self.generating} choices generating); try again "
                            "shortly", code="queue_full", headers=((b"retry-after", BUSY_RETRY_AFTER),))
        generation = super().generate(prompt_tokens, params, n, sink)
        self.generating += n
        for task in generation.tasks:  # a choice's task ends when it finishes, fails or is cancelled
            task.add_done_callback(self._choice_done)
        return generation

    def _choice_done(self, task) -> None:
        self.generating -= 1

    @property
    def max_choices(self) -> int:
        """A request for more choices than this can never fit: a 400 (runnel.generation.ModelApp)."""
        return self.max_generations

    def stats(self) -> dict:
        """``generating``: choices admitted (generating or waiting for a slot); ``started``: choices
        that reached the model so far (one dropped at its deadline while it waited never does)."""
        return {"generating": self.generating, "max_generations": self.max_generations, "started": self.started}

    async def stream(self, prompt: str, params):
        """The prompt's tokens, then the end; on again from the start while the end is held back."""
        # Only what can be echoed: a huge prompt is not tokenized again here, on the loop.
        source = (self.vocabulary.tokenize(prompt, limit=params.max_tokens)
                  or self.tokenize("".join(self.tokens("", 16))))
        pace = self.pace
        while True:
            for token_id in source:
                if pace:
                    await asyncio.sleep(pace)
                yield token_id
            yield END

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Hashed bag-of-words vectors, unit length: texts sharing words are close."""
        if sum(len(text) for text in texts) <= EMBED_ON_LOOP_CHARS:
            return self._embed(texts)
        # Python that yields the GIL every switch interval, so the loop keeps answering.
        return await asyncio.to_thread(self._embed, texts)

    def _embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        vectors = []
        for text in texts:
            vector = [0.0] * self.embedding_dim
            for word in text.lower().split():
                digest = zlib.crc32(word.encode())
                vector[digest % self.embedding_dim] += 1.0 if digest & 0x80000000 else -1.0
            norm = math.sqrt(sum(x * x for x in vector)) or 1.0
            vectors.append([x / norm for x in vector])
        return vectors, sum(len(self.tokenize(text)) for text in texts)


def make_echo_app(app_config, table, server) -> EchoApp:
    pace_ms = table.get("pace_ms", float, default=0.0)
    load_seconds = table.get("load_seconds", float, default=0.0)
    if pace_ms < 0:
        raise table.error("pace_ms", "must be >= 0")
    if load_seconds < 0:
        raise table.error("load_seconds", "must be >= 0")
    seed = table.get("seed", int, default=0)
    settings = SimpleModel.settings(app_config, table)
    embedding_dim = table.get("embedding_dim", int, default=64)
    if embedding_dim < 1:
        raise table.error("embedding_dim", "must be >= 1")
    max_generations = table.get("max_generations", int, default=10_000)
    if not 1 <= max_generations <= 1_000_000:
        raise table.error("max_generations", f"must be between 1 and 1000000, got {max_generations}")
    slots = table.get("slots", int, default=None)
    if slots is not None and not 1 <= slots <= max_generations:
        raise table.error("slots", f"must be between 1 and max_generations ({max_generations}), got {slots}")
    table.finish()
    return EchoApp(app_config.name, pace=pace_ms / 1000, load_seconds=load_seconds, seed=seed,
                   embedding_dim=embedding_dim, max_generations=max_generations, slots=slots, **settings)


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
                await asyncio.sleep(app.pace * max_tokens)
            return json_response({"app": app.name, "text": "".join(tokens), "tokens": max_tokens})
        stream = request.stream()
        pace = app.pace
        for index, token in enumerate(tokens):
            if pace:
                await asyncio.sleep(pace)
            stream.send({"index": index, "token": token})
            if stream.paused:
                await stream.drain()
        stream.send({"done": True, "tokens": max_tokens})
        stream.end()

    register("POST", "/echo/{app}", echo)
