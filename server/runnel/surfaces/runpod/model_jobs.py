"""RunPod jobs on model apps: worker-vllm's job inputs, answered with its outputs.

Matched against runpod-workers/worker-vllm's engine-based worker (``src/handler.py``,
``src/engine.py``, ``src/utils.py``, ``src/constants.py`` as they were before commit
1e396e1, which made the worker a proxy to ``vllm serve``). Its handler is an async
generator run with ``return_aggregate_stream``: a job's ``output`` is the list of what it
yielded, and ``/stream`` hands those values out as they come. Two input shapes
(``job["input"]``):

``{"openai_route": "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings", "openai_input": {...}}``
    The OpenAI body, as POSTed to that route of the endpoint (``/v2/{id}/openai/v1/...``:
    the same ``[apps.NAME.runpod]`` served name, role and ``raw_openai_output``; a
    ``model`` must be the served name). Not streamed: ``output`` is ``[response]``.
    Streamed: ``output`` is a list of batches of chunks, the first of 1 chunk, each next
    3 times larger, up to 50 (worker-vllm's ``MIN_BATCH_SIZE``, ``BATCH_SIZE_GROWTH_FACTOR``,
    ``DEFAULT_BATCH_SIZE``); with ``raw_openai_output`` (the default) a batch is one string
    of SSE events (``"data: {...}\\n\\n"``, the last ending ``"data: [DONE]\\n\\n"``),
    without it a list of chunk objects.

``{"prompt" | "messages", "sampling_params"?, "stream"?, "max_batch_size"?, "min_batch_size"?,
"batch_size_growth_factor"?, "apply_chat_template"?}``
    The legacy shape. ``messages``, or a ``prompt`` with ``apply_chat_template``, is a chat;
    a bare ``prompt`` a completion; ``sampling_params`` are the body's sampling fields
    (``max_tokens`` 100 unless given, as worker-vllm). ``output`` is
    ``[{"choices": [{"tokens": [text]}, ...], "usage": {"input", "output"}}]`` (a choice per
    ``n``); streamed, batches of that shape, each choice's ``tokens`` the pieces generated
    since the last batch, of ``max_batch_size`` (50) tokens, growing from ``min_batch_size``
    (1) by ``batch_size_growth_factor`` (3); a full batch goes out when the next piece
    comes (or at the end). ``usage.output`` counts the tokens so far; ``usage.input`` is the
    prompt's tokens in the last batch, null before it (runnel's stream says it only at
    its end).

Deliberately not as worker-vllm: input that cannot run (neither shape, an unknown route, a
body the route refuses) is refused at ``/run`` with a 400 ``{"error"}``, where worker-vllm
completes the job with an error object as its output; a generation that fails while
running fails the job (``FAILED`` with its ``error``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from ...errors import HTTPError
from ...runs import Run
from ..openai import OpenAIAPI, ReplyOptions, offline
from ..openai.api import DEFAULT_REPLY
from ..openai.runs import OpenAIRuns, execute
from .openai import check_model

__all__ = ["MODEL_SURFACE", "ModelJob", "RunPodModelJobs", "model_job"]

MODEL_SURFACE = "runpod-openai"  # Run.surface of a model app's jobs
CHAT_ROUTE, COMPLETION_ROUTE = "/v1/chat/completions", "/v1/completions"
# worker-vllm's constants.py and JobInput defaults.
DEFAULT_BATCH_SIZE, MIN_BATCH_SIZE, BATCH_SIZE_GROWTH_FACTOR = 50, 1, 3
LEGACY_MAX_TOKENS = 100
DONE_EVENT = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class BatchSizes:
    """worker-vllm's ``BatchSize``: batches start at ``smallest`` and grow by ``growth`` up to
    ``largest`` when that makes sense, else are all ``largest``."""

    largest: int
    smallest: int
    growth: float

    @property
    def dynamic(self) -> bool:
        return self.growth > 1 and self.smallest >= 1 and self.largest > self.smallest

    @property
    def first(self) -> float:
        return self.smallest if self.dynamic else self.largest

    def after(self, size: float) -> float:
        """The size after a batch of ``size``: not rounded, as worker-vllm's (a batch holds
        as many chunks as reach it: 1.5 is 2)."""
        return min(size * self.growth, self.largest) if self.dynamic else self.largest


OPENAI_BATCHES = BatchSizes(DEFAULT_BATCH_SIZE, MIN_BATCH_SIZE, BATCH_SIZE_GROWTH_FACTOR)


@dataclass(frozen=True, slots=True)
class ModelJob:
    """A job's input as the OpenAI request it makes."""

    route: str
    body: Any
    legacy: bool
    batches: BatchSizes


def model_job(job_input: Any) -> ModelJob:
    """The request a job's input makes; HTTPError 400 (naming the field) when it has neither shape."""
    if type(job_input) is not dict:
        raise _bad("input", 'A model endpoint\'s "input" must be an object: {"openai_route", "openai_input"} '
                   'or {"prompt" | "messages", "sampling_params", "stream"}')
    if "openai_route" in job_input or "openai_input" in job_input:
        route = job_input.get("openai_route", CHAT_ROUTE)  # worker-vllm's default route
        if type(route) is not str:
            raise _bad("input.openai_route", '"openai_route" must be a string')
        if "openai_input" not in job_input:
            raise _bad("input.openai_input", f'"openai_input" is missing: the body to send to {route[:100]}')
        return ModelJob(route, job_input["openai_input"], False, OPENAI_BATCHES)
    messages, prompt = job_input.get("messages"), job_input.get("prompt")
    if messages is None and prompt is None:
        raise _bad("input", 'The job\'s input must hold "openai_input" (and "openai_route"), or "prompt" or '
                   '"messages" (with "sampling_params")')
    sampling = job_input.get("sampling_params", {})
    if type(sampling) is not dict:
        raise _bad("input.sampling_params", '"sampling_params" must be an object')
    stream = job_input.get("stream", False)
    if type(stream) is not bool:
        raise _bad("input.stream", '"stream" must be true or false')
    body = {"max_tokens": LEGACY_MAX_TOKENS, **sampling, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}  # the prompt's tokens, for usage.input
    if messages is not None:
        body["messages"] = messages
        route = CHAT_ROUTE
    elif job_input.get("apply_chat_template") is True:
        body["messages"] = [{"role": "user", "content": prompt}]
        route = CHAT_ROUTE
    else:
        body["prompt"] = prompt
        route = COMPLETION_ROUTE
    largest = _positive(job_input, "max_batch_size", DEFAULT_BATCH_SIZE)
    smallest = _positive(job_input, "min_batch_size", MIN_BATCH_SIZE)
    growth = job_input.get("batch_size_growth_factor") or BATCH_SIZE_GROWTH_FACTOR
    if type(growth) not in (int, float) or not 1 <= growth <= 1000:
        raise _bad("input.batch_size_growth_factor", '"batch_size_growth_factor" must be a number from 1 to 1000')
    return ModelJob(route, body, True, BatchSizes(largest, smallest, growth))


def _positive(job_input: dict, name: str, default: int) -> int:
    value = job_input.get(name) or default
    if type(value) is not int or not 1 <= value <= 100_000:
        raise _bad(f"input.{name}", f'"{name}" must be an integer from 1 to 100000')
    return value


def _bad(param: str, message: str) -> HTTPError:
    return HTTPError(400, message, param=param, code="invalid_input")


def check_job(api: OpenAIAPI, job: ModelJob) -> None:
    """What can be refused before the job is queued: its route, and its body's fields and values."""
    offline.check(api, job.route, job.body, param="input.openai_route")


class RunPodModelJobs(OpenAIRuns):
    """A model endpoint's jobs: the input's request, its answer as worker-vllm yields it."""

    name = MODEL_SURFACE

    def __init__(self, api: OpenAIAPI, replies: dict[str, ReplyOptions], render: Callable[[Run], dict]) -> None:
        super().__init__(api)
        self.replies = replies  # app name -> how its endpoint answers
        self._render = render  # RunPod's view of a job, the same as for function apps

    def render(self, run: Run) -> dict:
        return self._render(run)

    def reply(self, run) -> ReplyOptions:
        return self.replies.get(run.app, DEFAULT_REPLY)

    async def call(self, app, run) -> AsyncIterator[Any]:
        job = model_job(run.input)
        reply = self.reply(run)
        check_model(job.body, app, reply, param="input.openai_input.model")
        return _outputs(self.api, job, app, reply)


async def _outputs(api: OpenAIAPI, job: ModelJob, app, reply: ReplyOptions) -> AsyncIterator[Any]:
    """What worker-vllm's handler yields for ``job``: one whole answer, or batches of its stream."""
    answer = await execute(api, job.route, job.body, app=app, reply=reply)
    if not isinstance(answer, offline.ChunkStream):
        yield _legacy_whole(answer, job.route) if job.legacy else answer
        return
    try:
        if job.legacy:
            async for batch in _legacy_batches(answer, job):
                yield batch
        else:
            async for batch in _openai_batches(answer, job.batches, raw=reply.sse):
                yield batch
    finally:
        await answer.aclose()  # stops the generation when the job is cancelled


async def _openai_batches(chunks: offline.ChunkStream, sizes: BatchSizes, *, raw: bool) -> AsyncIterator[Any]:
    """The chunks in batches, as worker-vllm's ``_handle_chat_or_completion_request``: with
    ``raw`` one string of SSE events each (``[DONE]`` counted as a chunk), else a list."""
    size, batch = sizes.first, []
    async for chunk in chunks:
        # Raw: the chunk's JSON as encoded once by the sink (a Fragment dumps as it is), framed.
        batch.append(b"data: %b\n\n" % orjson.dumps(chunk) if raw else chunk)
        if len(batch) >= size:
            yield b"".join(batch).decode() if raw else batch
            batch, size = [], sizes.after(size)
    if raw:
        batch.append(DONE_EVENT)
    if batch:
        yield b"".join(batch).decode() if raw else batch


def _legacy_whole(answer: dict, route: str) -> dict:
    choices = sorted(answer["choices"], key=lambda choice: choice["index"])
    texts = [choice["message"]["content"] or "" if route == CHAT_ROUTE else choice["text"] for choice in choices]
    usage = answer.get("usage") or {}
    return {"choices": [{"tokens": [text]} for text in texts],
            "usage": {"input": usage.get("prompt_tokens"), "output": usage.get("completion_tokens")}}


async def _legacy_batches(chunks: offline.ChunkStream, job: ModelJob) -> AsyncIterator[dict]:
    """Each choice's new text pieces in batches of ``job.batches`` tokens, as worker-vllm's
    ``_generate_vllm`` streams them. A full batch goes when the next piece comes, or at the
    end: so the last one goes after the usage chunk, with the prompt's tokens."""
    n = job.body.get("n", 1) if type(job.body.get("n", 1)) is int else 1
    chat = job.route == CHAT_ROUTE
    sizes = job.batches
    size, in_batch, total, prompt_tokens = sizes.first, 0, 0, None
    tokens: list[list[str]] = [[] for _ in range(n)]
    async for chunk in chunks:
        data = orjson.loads(orjson.dumps(chunk))
        if data.get("usage"):
            prompt_tokens = data["usage"].get("prompt_tokens")
        for choice in data.get("choices") or ():
            text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            index = choice.get("index", 0)
            if not text or not 0 <= index < n:
                continue
            if in_batch >= size:
                yield _legacy_batch(tokens, prompt_tokens, total)
                tokens = [[] for _ in range(n)]
                in_batch, size = 0, sizes.after(size)
            tokens[index].append(text)
            in_batch += 1
            total += 1
    if in_batch:
        yield _legacy_batch(tokens, prompt_tokens, total)


def _legacy_batch(tokens: list[list[str]], prompt_tokens: int | None, total: int) -> dict:
    return {"choices": [{"tokens": pieces} for pieces in tokens], "usage": {"input": prompt_tokens, "output": total}}
