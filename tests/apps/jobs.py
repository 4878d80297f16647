"""RunPod-style job handlers, one app per endpoint (tests/e2e/test_runpod_jobs.py).

Runs that must be held wait for a gate file whose path the job's input names.
"""

import asyncio
import os
import time

CALLS = []       # job ids the handler ran
CANCELLED = []   # job ids whose async handler saw its cancellation


def _wait(gate):
    deadline = time.monotonic() + 30
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)


def handler(job):
    """RunPod style: the job dict. {"fail": msg} raises, {"gate": path} waits for the file."""
    CALLS.append(job["id"])
    data = job["input"]
    if isinstance(data, dict):
        if data.get("fail"):
            raise ValueError(data["fail"])
        if data.get("gate"):
            _wait(data["gate"])
    return {"id": job["id"], "input": data}


def greet(name: str, punctuation: str = "!"):
    """Keyword style: the input's keys are the arguments."""
    return f"Hello, {name}{punctuation}"


async def nap(event):
    CALLS.append(event["id"])
    try:
        await asyncio.sleep(event["input"].get("seconds", 30))
    except asyncio.CancelledError:
        CANCELLED.append(event["id"])
        raise
    return "rested"


async def ticks(job):
    """Yields 0 .. n-2, waits for the gate, then yields n-1."""
    n, gate = job["input"]["n"], job["input"]["gate"]
    for i in range(n - 1):
        yield i
    while not os.path.exists(gate):
        await asyncio.sleep(0.01)
    yield n - 1


def soft(job):
    return {"error": "bad input: " + str(job["input"])}
