"""Runs that write down who ran them (tests/e2e/test_workers.py): one line per call,
"<tag> <pid>", appended to a file shared by every process (O_APPEND: lines stay whole)."""

import os
import time


def append(ledger: str, tag: str, gate: str = ""):
    deadline = time.monotonic() + 30
    while gate and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    with open(ledger, "a") as f:
        f.write(f"{tag} {os.getpid()}\n")
    return tag
