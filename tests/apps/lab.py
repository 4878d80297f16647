"""Streams that misbehave on purpose: endless, failing, unsendable, flooding (tests/e2e/test_functions.py).

STATE is read by the tests through the loaded module (each app loads its own copy).
"""

import asyncio
import time

STATE = {"async_closed": False, "sync_closed": False, "sync_pulled": 0, "flood": 0, "flood_closed": False,
         "slow_pulling": False, "slow_closed": False}


async def forever():
    try:
        yield "first"
        while True:
            await asyncio.sleep(3600)
    finally:
        STATE["async_closed"] = True


def sync_forever():
    try:
        while True:
            STATE["sync_pulled"] += 1
            yield STATE["sync_pulled"]
            time.sleep(0.005)
    finally:
        STATE["sync_closed"] = True


def sync_slow_pull(hold: float = 0.5):
    """Its second next() takes ``hold`` seconds: a client can leave while it runs."""
    try:
        yield "first"
        STATE["slow_pulling"] = True
        time.sleep(hold)
        STATE["slow_pulling"] = False
        yield "second"
    finally:
        STATE["slow_closed"] = True


async def flood(size: int = 65536):
    try:
        while True:
            STATE["flood"] += 1
            yield "x" * size
    finally:
        STATE["flood_closed"] = True


def broken():
    yield 1
    raise RuntimeError("broke mid-stream")


async def unsendable():
    yield {1, 2}


def things():
    return {"a", "b"}


def bad_status():
    return {"status_code": 42}


async def chunky(messages, **kwargs):
    for delta in ({"role": "assistant", "content": ""}, {"content": "a"}, {"content": "b"}, {}):
        yield {"id": "c-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
               "choices": [{"index": 0, "delta": delta, "finish_reason": None if delta else "length"}]}


def embed(input, model=None, **kwargs):
    texts = [input] if isinstance(input, str) else input
    return {"object": "list", "model": model or "lab",
            "data": [{"object": "embedding", "index": i, "embedding": [float(len(t)), 1.0]}
                     for i, t in enumerate(texts)],
            "usage": {"prompt_tokens": len(texts), "total_tokens": len(texts)}}


def complete(prompt, model=None, **kwargs):
    return {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": model or "lab",
            "choices": [{"index": 0, "text": prompt + "!", "logprobs": None, "finish_reason": "stop"}]}
