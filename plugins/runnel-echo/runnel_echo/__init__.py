"""runnel-echo: a backend that streams deterministic tokens at a configurable pace."""

from __future__ import annotations

import asyncio
import math
import random
import re
import zlib

from runnel import HTTPError, hookimpl, json_response
from runnel.generation import StopStrings, TokenLogprob

LOREM = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua ut enim ad minim veniam quis nostrud"
).split()

MAX_TOKENS_LIMIT = 100_000


class EchoApp:
    """Tokens are the prompt's words, repeated to fill ``max_tokens``; a seeded
    lorem ipsum when the prompt has none. Same input, same tokens, every time.

    It also serves the OpenAI surfaces (``runnel.generation.ModelApp``): its
    tokenizer splits text into words with their leading whitespace; generation
    echoes the prompt's tokens once and then ends ("stop"), unless
    ``ignore_eos`` makes it cycle to ``max_tokens``. As a model, its next-token
    distribution puts probability 1 on the next prompt token, so temperature,
    top_p, top_k and seed apply but cannot change the answer, and every log
    probability is 0.
    """

    owned_by = "runnel"
    supported = frozenset(
        {"temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "logprobs", "top_logprobs",
         "ignore_eos", "min_tokens"}
    )

    def __init__(
        self,
        name: str,
        *,
        pace: float,
        load_seconds: float,
        seed: int,
        served_model_name: str,
        context_length: int = 4096,
        default_max_tokens: int = 16,
        embedding_dim: int = 64,
    ) -> None:
        self.name = name
        self.pace = pace
        self.load_seconds = load_seconds
        self.seed = seed
        self.model_id = served_model_name
        self.context_length = context_length
        self.default_max_tokens = default_max_tokens
        self.embedding_dim = embedding_dim
        # Token id <-> piece, grown as text is tokenized: ids are stable for the app's life.
        self._ids: dict[str, int] = {}
        self._pieces: list[str] = []

    @property
    def served_model_name(self) -> str:
        return self.model_id

    async def start(self) -> None:
        if self.load_seconds:
            await asyncio.sleep(self.load_seconds)

    async def close(self) -> None:
        pass

    def tokens(self, prompt: str, max_tokens: int):
        """The tokens one at a time, so a long stream costs no memory up front."""
        words = prompt.split() or random.Random(self.seed).choices(LOREM, k=min(max_tokens, 64))
        spaced = [" " + word for word in words]
        yield words[0]
        for i in range(1, max_tokens):
            yield spaced[i % len(words)]

    # -- runnel.generation.ModelApp --------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        ids = []
        for piece in _PIECES.findall(text):
            token_id = self._ids.get(piece)
            if token_id is None:
                token_id = self._ids[piece] = len(self._pieces)
                self._pieces.append(piece)
            ids.append(token_id)
        return ids

    def chat_prompt(self, messages: list[dict]) -> str:
        """Echo's chat template: the last user message is the whole prompt."""
        for message in reversed(messages):
            if message["role"] == "user":
                return message["content"]
        return ""

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Hashed bag-of-words vectors, unit length: texts sharing words are close."""
        vectors = []
        for text in texts:
            vector = [0.0] * self.embedding_dim
            for word in text.lower().split():
                digest = zlib.crc32(word.encode())
                vector[digest % self.embedding_dim] += 1.0 if digest & 0x80000000 else -1.0
            norm = math.sqrt(sum(x * x for x in vector)) or 1.0
            vectors.append([x / norm for x in vector])
        return vectors, sum(len(self.tokenize(text)) for text in texts)

    def generate(self, prompt_tokens, params, n, sink):
        return asyncio.get_running_loop().create_task(self._generate(list(prompt_tokens), params, n, sink))

    async def _generate(self, prompt_tokens, params, n, sink) -> None:
        try:
            rows = [_EchoRow(self, index, prompt_tokens, params) for index in range(n)]
            active = list(rows)
            step = 0
            while active:
                if self.pace:
                    await asyncio.sleep(self.pace)
                elif step % 32 == 31:
                    await asyncio.sleep(0)  # with no pace, still let other requests run
                step += 1
                for row in list(active):
                    if row.step(sink):
                        active.remove(row)
        except Exception as error:  # the sink reports it in the surface's own shape
            sink.on_error(error)


# Words with the whitespace before them; the whitespace at the very end is its own piece.
_PIECES = re.compile(r"\s*\S+|\s+")


class _EchoRow:
    """One choice of an echo generation."""

    def __init__(self, app: EchoApp, index: int, prompt_tokens: list[int], params) -> None:
        self.app = app
        self.index = index
        self.source = prompt_tokens or app.tokenize("".join(app.tokens("", 16)))
        self.params = params
        self.count = 0
        self.stops = StopStrings(params.stop)

    def step(self, sink) -> bool:
        """Make one token; True when the row is finished."""
        params = self.params
        token_id = self.source[self.count % len(self.source)]
        # min_tokens holds back the end (stop tokens, the end of the echo), as in vLLM;
        # a stop token may be the (min_tokens + 1)-th token at the earliest.
        if self.count >= params.min_tokens and token_id in params.stop_token_ids:
            self.count += 1
            return self._finish(sink, "stop", token_id)
        self.count += 1
        past_min = self.count >= params.min_tokens
        piece = self.app._pieces[token_id]
        text = self.stops.push(piece)
        logprobs = None
        if params.logprobs:
            logprobs = [TokenLogprob(piece, 0.0, [(piece, 0.0)][: params.top_logprobs])]
        if text or logprobs:
            sink.on_tokens(self.index, text, (token_id,), logprobs)
        if self.stops.stopped:
            return self._finish(sink, "stop")
        if self.count >= params.max_tokens:
            return self._finish(sink, "length")
        echoed_once = self.count == len(self.source)
        if echoed_once and past_min and not params.ignore_eos:
            return self._finish(sink, "stop")
        return False

    def _finish(self, sink, reason: str, token_id: int | None = None) -> bool:
        rest = self.stops.flush()
        if rest:
            sink.on_tokens(self.index, rest, (), None)
        sink.on_finish(self.index, reason, self.count)
        return True


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
        context_length=table.get("context_length", int, default=4096),
        default_max_tokens=table.get("default_max_tokens", int, default=16),
        embedding_dim=table.get("embedding_dim", int, default=64),
    )
    if app.embedding_dim < 1:
        raise table.error("embedding_dim", "must be >= 1")
    if app.context_length < 1:
        raise table.error("context_length", "must be >= 1")
    if not 1 <= app.default_max_tokens <= app.context_length:
        raise table.error("default_max_tokens", "must be between 1 and context_length")
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

    register("POST", "/echo/{app}", echo)
