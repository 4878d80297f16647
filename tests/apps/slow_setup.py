"""An app whose setup() runs until the test creates the file named by $SLOW_SETUP_GATE
(tests/e2e/test_functions.py): the environment, not generated source, carries the path."""

import asyncio
import os

CALLS = []


async def setup():
    CALLS.append("setup")
    gate = os.environ["SLOW_SETUP_GATE"]
    while not os.path.exists(gate):  # slow until the test opens the gate
        await asyncio.sleep(0.01)


def ping():
    return CALLS
