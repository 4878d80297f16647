"""Runs that leave a trace: each call appends "<tag> <pid>" to a ledger file shared by every
process, so a test can tell that no run was executed twice and none lost, and which process
ran it (tests/e2e/test_workers.py, tests/e2e/test_runs_redis.py)."""

import asyncio
import os
import time


def _write(ledger: str, line: str) -> None:
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())  # one write: lines from processes never mix
    finally:
        os.close(fd)


def append(ledger: str, tag: str, gate: str = ""):
    """Waits (at most 30 s) for the file ``gate`` to exist, then writes its line."""
    deadline = time.monotonic() + 30
    while gate and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    _write(ledger, f"{tag} {os.getpid()}\n")
    return tag


def record(ledger: str, tag: str, hold: float = 0.0):
    time.sleep(hold)
    _write(ledger, f"{tag} {os.getpid()}\n")
    return tag


async def linger(ledger: str, tag: str):
    """Runs until cancelled; says which process runs it, then whether it was cancelled."""
    _write(ledger, f"{tag} started {os.getpid()}\n")
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        _write(ledger, f"{tag} cancelled {os.getpid()}\n")
        raise
    return tag


async def count(n: int, pause: float = 0.05):
    for i in range(n):
        yield i
        await asyncio.sleep(pause)
