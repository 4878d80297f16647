"""hello: a function app for runnel's ``python`` backend (see conf/examples/functions.toml).

Every public function here (no leading underscore, defined in this file) can be called
with ``POST /v4/{project_id}/hello/{function}``; the JSON body's keys are its keyword
arguments:

    curl -s localhost:8000/v4/p-local/hello/greet -d '{"name": "Ada"}'
    {"run_id":"...","run_time_ms":0,"result":"Hello, Ada!"}

    curl -sN localhost:8000/v4/p-local/hello/count -H 'Accept: text/event-stream' -d '{"to": 3}'

and ``run`` speaks OpenAI chat completions, so the openai SDK works against it:

    OpenAI(base_url="http://localhost:8000/v4/p-local/hello/run", api_key="-")
"""

from __future__ import annotations

import asyncio
import time
import uuid

SETUP_CALLS = 0  # how many times setup() ran: once per server start
_GREETING: str | None = None  # "loaded" by setup()


def setup() -> None:
    """Runs once when the app starts, before any call (not a function of the app).

    Load models, open clients and the like here: the server answers /health with 503
    until it returns.
    """
    global SETUP_CALLS, _GREETING
    SETUP_CALLS += 1
    _GREETING = "Hello"


def _helper(name: str) -> str:
    """Private (leading underscore): not callable over HTTP."""
    return name.strip() or "world"


def greet(name: str, punctuation: str = "!") -> str:
    """A sync function: runs in the app's thread pool."""
    return f"{_GREETING}, {_helper(name)}{punctuation}"


async def add(a: float, b: float) -> dict:
    """An async function: awaited on the event loop."""
    await asyncio.sleep(0)
    return {"sum": a + b}


def count(to: int = 3):
    """A sync generator: each value is one event with ``Accept: text/event-stream``."""
    for n in range(1, to + 1):
        yield {"n": n}


async def spell(word: str, delay: float = 0.0):
    """An async generator: strings are sent as they are."""
    for letter in word:
        await asyncio.sleep(delay)
        yield letter


def whoami(run_id: str, note: str | None = None) -> dict:
    """Declaring ``run_id`` makes the server pass the id of this run."""
    return {"run_id": run_id, "note": note}


def create(item: str) -> dict:
    """A dict with an int ``status_code`` sets the response status; the rest is the result."""
    return {"status_code": 201, "created": item}


def fail(message: str = "something went wrong") -> None:
    """Raises: the caller gets a 500 carrying this message and the run id."""
    raise ValueError(message)


def run(messages: list, model: str | None = None, stream: bool = False, **kwargs):
    """OpenAI chat completions: answers "Hello! You said: <last user message>".

    With ``stream`` it returns a generator of ``chat.completion.chunk`` dicts (the
    role first, then the content piece by piece, the finish reason last); otherwise a
    ``chat.completion`` dict. ``**kwargs`` takes the request's other fields
    (temperature, stream_options, ...).
    """
    said = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "") or ""
    text = f"{_GREETING}! You said: {said}"
    completion_id = "chatcmpl-" + uuid.uuid4().hex
    created = int(time.time())
    model = model or "hello"
    prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in messages)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(text.split()),
             "total_tokens": prompt_tokens + len(text.split())}
    if stream:
        include_usage = bool((kwargs.get("stream_options") or {}).get("include_usage"))
        return _chunks(text, completion_id, created, model, usage if include_usage else None)
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": usage,
    }


def _chunks(text: str, completion_id: str, created: int, model: str, usage: dict | None):
    def chunk(delta: dict, finish_reason: str | None = None) -> dict:
        return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    yield chunk({"role": "assistant", "content": ""})
    for index, word in enumerate(text.split(" ")):
        yield chunk({"content": word if index == 0 else " " + word})
    yield chunk({}, "stop")
    if usage is not None:
        yield {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [], "usage": usage}
