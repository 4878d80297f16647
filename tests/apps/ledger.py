"""Runs that leave a trace (tests/e2e/test_runs_redis.py): each call appends its tag to a
ledger file, one line, so a test can tell that no run was executed twice and none lost,
whichever server (process) executed it."""

import asyncio
import os
import time


def record(ledger: str, tag: str, hold: float = 0.0):
    time.sleep(hold)
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{tag} {os.getpid()}\n".encode())  # one write: lines from processes never mix
    finally:
        os.close(fd)
    return tag


async def linger(ledger: str, tag: str):
    """Runs until cancelled; says which process runs it, then whether it was cancelled."""
    with open(ledger, "a") as f:
        f.write(f"{tag} started {os.getpid()}\n")
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        with open(ledger, "a") as f:
            f.write(f"{tag} cancelled {os.getpid()}\n")
        raise
    return tag


async def count(n: int, pause: float = 0.05):
    for i in range(n):
        yield i
        await asyncio.sleep(pause)
