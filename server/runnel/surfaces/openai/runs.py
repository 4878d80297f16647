"""OpenAI bodies as runs: async work for model apps (``/v4 ...?async=true``, RunPod jobs).

A run of an ``OpenAIRuns`` view keeps the route in ``Run.function`` (one of
``offline.ROUTES``) and the body in ``Run.input``; the runner executes it through
``offline`` (the live handlers, so a body means what it means on the wire). A whole
answer is the run's output; a streamed body (``"stream": true``) is a ``ChunkStream``,
whose chunks the runner keeps as the run's values (RunPod ``/stream`` shows them while
it runs) and whose ``aclose`` stops the generation when the run is cancelled. An error
answer (4xx/5xx), before or during the stream, fails the run with that error.

Each surface registers its own view (``name`` is what ``Run.surface`` holds, and how it
renders its runs); this module owns how such a run is executed.
"""

from __future__ import annotations

from typing import Any

from ...runs import Run, RunView
from . import offline
from .api import DEFAULT_REPLY, OpenAIAPI, ReplyOptions, can_embed, is_model_app

__all__ = ["ModelAppRuns", "OpenAIRuns", "execute"]


async def execute(api: OpenAIAPI, route: str, body: Any, *, app, reply: ReplyOptions = DEFAULT_REPLY) -> Any:
    """``body`` sent to ``route`` for ``app``, as a run's result: the answer's body, or for a
    streamed body its ``ChunkStream`` (chunks as they come). HTTPError for an error answer."""
    if type(body) is dict and body.get("stream") is True:
        return offline.stream(api, route, body, app=app, reply=reply)
    status, answer = await offline.call(api, route, body, app=app, reply=reply)
    if status >= 400:
        raise offline.http_error(status, answer)
    return answer


class ModelAppRuns(RunView):
    """The runs of a surface that generates with model apps (OpenAI bodies, stored or
    background responses, resumable streams): what every such view shares."""

    # Every model app takes them and most servers never keep one: no store is opened (no
    # file locked) until one is submitted or read.
    opens_lazily = True

    def __init__(self, api: OpenAIAPI) -> None:
        self.api = api

    def takes(self, app) -> bool:
        return is_model_app(app)


class OpenAIRuns(ModelAppRuns):
    """Runs whose function is an OpenAI route and whose input is its body."""

    name = "openai"

    def takes(self, app) -> bool:
        return is_model_app(app) or can_embed(app)

    def reply(self, run: Run) -> ReplyOptions:
        """How the surface answers for the run's app (a surface may override it per app)."""
        return DEFAULT_REPLY

    async def call(self, app, run: Run) -> Any:
        return await execute(self.api, run.function, run.input, app=app, reply=self.reply(run))
