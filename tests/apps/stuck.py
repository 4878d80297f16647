"""Functions that never return, for the shutdown test (tests/e2e/test_cli.py)."""

import time


def hang():
    time.sleep(10**9)


def hang_stream():
    yield "first"
    time.sleep(10**9)
    yield "never"
