"""Async runs: durable background calls of app functions, owned by the ``Server``.

    store.py     what a run is, its states and claims, and ``RunStore``: the interface
                 every store implements (local, or shared by several servers)
    sqlite.py    ``SQLiteRunStore``: the default store, one file per server
                 (``[server] runs_path``, ``RUNNEL_RUNS_PATH``, else ``default_runs_path``),
                 opened only when an app can take runs
    redis.py     ``RedisRunStore``: runs shared by several servers (``[server] runs``,
                 ``RUNNEL_RUNS_URL``: a Redis URL); imported only when configured
    idempotency.py  ``Idempotency-Key``: a retried request finds the run its first try made
    runner.py    ``Runner``: queues, claims and executes runs, recovers dead runners'
                 claims, purges; ``RunView``: how a surface's runs are called and shown
    webhooks.py  a finished run POSTed to its caller's URL, signed, with retries

The surfaces that take runs (``runnel.surfaces.functions``: ``/v4 ...?async=true``;
``runnel.surfaces.runpod``: the job API) reach the runner as ``server.runs`` and
register a ``RunView`` on it; they never make or start one.
"""

from __future__ import annotations

from .idempotency import Idempotency, idempotency_of
from .runner import Runner, RunView, ValueStream, default_runs_path, store_for
from .sqlite import SQLiteRunStore
from .store import (
    ANYONE,
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    TIMED_OUT,
    QueueFull,
    Recovered,
    Run,
    RunStore,
    SharedRunStore,
    StoreDown,
    StoreUnavailable,
)
from .webhooks import Webhooks, check_target

__all__ = [
    "ANYONE", "CANCELLED", "FAILED", "QUEUED", "RUNNING", "SUCCEEDED", "TERMINAL", "TIMED_OUT",
    "Idempotency", "QueueFull", "Recovered", "Run", "RunStore", "RunView", "Runner", "SQLiteRunStore",
    "SharedRunStore", "StoreDown", "StoreUnavailable", "ValueStream", "Webhooks", "check_target",
    "default_runs_path", "idempotency_of", "store_for",
]
