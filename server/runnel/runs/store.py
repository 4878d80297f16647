"""What a run is, and the store interface every run store implements.

A run is one call of an app's function, recorded before its caller is answered
and executed in the background by a ``runnel.runs.Runner``. The store is the
truth about runs; a runner keeps only what cannot be shared (the task running a
run, a generator's values so far). Stores: ``runnel.runs.sqlite`` (one host, the
default); a store shared by several servers (Redis) implements the same methods.

States, and who may move a run out of each::

    queued  --claim(owner)-->            running      (any runner: claim is atomic, one wins)
    queued  --finish(owner=None)-->      cancelled | failed    (any runner: cancel, app gone)
    running --finish(owner)-->           succeeded | failed | cancelled | timed_out
                                                      (only the claim's owner, still holding it)
    running --recover(), claim expired--> queued (idempotent apps) | failed "interrupted"
    failed | timed_out --requeue()-->    queued       (a caller's retry: RunPod /retry)
    queued  --expire(), deadline passed--> timed_out "deadline_exceeded"  (never claimed before)

``succeeded``, ``failed``, ``cancelled`` and ``timed_out`` are final: nothing moves
a run out of them but its caller's retry (``requeue``); ``purge`` deletes them once they are older than the retention,
``delete`` when their caller asks. A run may also be inserted final (a call that ran
in the foreground, kept to be read later: a stored OpenAI response).

A run may carry a ``deadline`` (unix seconds): if it has not been claimed by then, it is
never run. A runner checks it before it claims, and ``expire`` sweeps the queue for runs
past theirs, so a long queue does not hold them; both end such a run ``timed_out`` with
code ``deadline_exceeded``. A run claimed in time and queued again after its runner died
(``recover``, an idempotent app) had started: its deadline no longer applies.

A claim is ``(owner, lease_until)``: the owner (a runner's id, unique per process
start) holds the run until ``lease_until`` (unix seconds) and extends it with
``renew`` while the run executes. A claim whose lease has passed belongs to a dead
(or hopelessly stuck) runner: ``recover`` takes it back, and from then on a finish
by the old owner is refused, so a run has at most one recorded outcome. A store
that can prove an owner dead sooner may expire its claims sooner (the SQLite store
does at open: its file lock means no other process can be using the file).

Every method is a coroutine that does its I/O off the event loop, and every state
change applies only if the run is still in the state (and claim) the caller
expects, so several runners, in one process or many, may share one store.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import HTTPError

__all__ = [
    "CANCELLED", "FAILED", "QUEUED", "RUNNING", "SUCCEEDED", "TERMINAL", "TIMED_OUT",
    "ANYONE", "QueueFull", "Recovered", "Run", "RunStore", "SharedRunStore", "StoreDown", "StoreUnavailable",
    "error_record",
]

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, TIMED_OUT = (
    "queued", "running", "succeeded", "failed", "cancelled", "timed_out")
TERMINAL = frozenset((SUCCEEDED, FAILED, CANCELLED, TIMED_OUT))
ANYONE = "anonymous"  # the principal of runs no one authenticated for (runnel.auth.ANONYMOUS's identity)


@dataclass(slots=True)
class Run:
    id: str
    surface: str  # the surface that submitted it, whose view calls and renders it: "cortex", "runpod"
    app: str
    function: str
    input: Any  # JSON: keyword arguments (cortex) or the job's input (runpod)
    state: str = QUEUED
    webhook: str | None = None
    timeout_ms: int | None = None  # execution time allowed, None: no limit
    output: Any = None  # JSON result; a generator's values as a list
    error: dict | None = None  # {"status", "message", "type", "param", "code"}
    streamed: bool = False  # output is the list of a generator's values
    attempts: int = 0  # times it was claimed (> 1: run again after its runner died)
    webhook_pending: bool = False
    created_at: float = 0.0  # unix seconds
    started_at: float | None = None
    finished_at: float | None = None
    run_time_ms: int | None = None
    owner: str | None = None  # the runner holding the claim while running
    lease_until: float | None = None  # unix seconds; past it the claim may be recovered
    # Who submitted it (runnel.auth.Principal.identity): no one else may see or cancel it.
    principal: str = ANYONE
    # A client's Idempotency-Key, scoped (a digest of principal, route and key): unique in the
    # store, so a retry finds this run instead of making another. request_hash: a digest of
    # what was asked, so the same key with a different request can be refused.
    idempotency_key: str | None = None
    request_hash: str | None = None
    # Unix seconds: a run not claimed by then is never run (timed_out, "deadline_exceeded").
    # From X-Request-Deadline or RunPod's policy.ttl; None: it waits as long as it takes.
    deadline: float | None = None

    @property
    def done(self) -> bool:
        return self.state in TERMINAL


@dataclass(slots=True)
class Recovered:
    """What ``recover`` did: runs queued again, and runs it failed (ids, oldest first)."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def error_record(error: HTTPError) -> dict:
    """An HTTPError as a run keeps it (``Run.error``)."""
    return {"status": error.status, **error.to_dict()["error"]}


class StoreUnavailable(RuntimeError):
    """The store cannot be used by this server: another one holds it, or it is not there.

    ``key`` names the setting that chose the store, so a server failing to start on
    it can say which (``ConfigError``)."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class StoreDown(HTTPError):
    """A shared store cannot be reached now (its server is down, or the network to it):
    for now, not for good. An HTTPError, so a request that meets it, wherever, is answered
    503 with Retry-After; background work logs it and tries again."""

    RETRY_AFTER = b"2"  # seconds

    def __init__(self, name: str, cause: BaseException) -> None:
        super().__init__(503, f"The run store is unreachable ({type(cause).__name__}: {cause}); try again shortly",
                         code="run_store_unreachable", headers=((b"retry-after", self.RETRY_AFTER),))
        self.name = name


class QueueFull(Exception):
    """``insert`` refused a run: ``limit`` runs are queued already (nothing was written)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"{limit} runs are queued already")
        self.limit = limit


class RunStore(Protocol):
    """The operations a runner needs from a store, local or shared by several processes."""

    name: str  # where the runs are, for logs
    # False: this process's runner is the only one taking the store's runs (it queues them
    # itself); True: a SharedRunStore, whose runs any server's runner may take.
    shared: bool

    @property
    def is_open(self) -> bool: ...

    async def open(self, *, create: bool) -> bool:
        """Open (and create, when ``create``); False when there is nothing to open yet.
        Raises StoreUnavailable when this server may not use it."""

    async def close(self) -> None: ...

    async def insert(self, run: Run, *, max_queued: int | None = None) -> Run:
        """Record a new queued run, durably, before the caller is answered; returns it.

        Atomically, as one step: when a run with the same ``idempotency_key`` exists, that
        run is returned and nothing is written (a retry; of concurrent inserts with one
        key, one writes); else QueueFull when ``max_queued`` runs (of every app) are
        queued already. Runs already recorded are never refused or dropped."""

    async def get(self, run_id: str) -> Run | None: ...

    async def queued(self) -> list[str]:
        """The ids of every queued run, oldest first."""

    async def claim(self, run_id: str, owner: str, lease: float) -> Run | None:
        """queued -> running, held by ``owner`` for ``lease`` seconds; None when the run is
        not queued (another runner claimed it, or it was cancelled). Atomic: of several
        claimants, one wins."""

    async def renew(self, owner: str, lease: float) -> int:
        """Extend every claim ``owner`` still holds to ``lease`` seconds from now; how many."""

    async def finish(self, run_id: str, state: str, *, owner: str | None = None, output: bytes | None = None,
                     error: HTTPError | None = None, streamed: bool = False,
                     run_time_ms: int | None = None) -> bool:
        """Record the final ``state``: of a running run only by the ``owner`` of its claim, of a
        queued run only with ``owner`` None. False (nothing written) otherwise."""

    async def recover(self, idempotent_apps: Collection[str], interrupted: HTTPError) -> Recovered:
        """Take back every expired claim: the run is queued again when its app is in
        ``idempotent_apps``, else failed with ``interrupted``."""

    async def requeue(self, run_id: str, states: Collection[str], *, max_queued: int | None = None) -> bool:
        """A final run in one of ``states`` queued again, same id and input, as if just
        submitted: its outcome (output, error, times, claim) cleared, its webhook due again,
        kept until it finishes anew. False (nothing written) when it is in no such state;
        QueueFull, atomically with the check, when ``max_queued`` runs are queued already.
        A retried run has no deadline: its caller asked for it again."""

    async def expire(self, now: float, error: HTTPError) -> list[str]:
        """queued -> timed_out with ``error``, for every run never claimed whose ``deadline`` is
        at or before ``now`` (unix seconds); their ids. Atomic per run: a run claimed meanwhile
        is left to run."""

    async def delete(self, run_id: str) -> bool:
        """Delete a run whatever its state; False when there was none. (A runner deletes only
        runs that are done: one still running would be finished by no one.)"""

    async def purge(self, before: float) -> int:
        """Delete runs finished before ``before`` (unix seconds); how many."""

    async def pending_webhooks(self) -> list[Run]:
        """Finished runs whose webhook is not yet delivered (or given up), oldest first."""

    async def webhook_done(self, run_id: str) -> None: ...

    async def counts(self, app: str, surface: str, since: float) -> dict[str, int]:
        """Runs of ``app`` from ``surface`` per state (finished ones since ``since``), plus
        ``"retried"``: those claimed more than once."""


class SharedRunStore(RunStore, Protocol):
    """A store several servers share (``shared`` True): its queue, cancels and running
    generators' values are in the store, so that every server sees them. Calls raise
    StoreDown while the store cannot be reached."""

    async def take(self, owner: str, lease: float, count: int) -> list[str]:
        """The ids of the next runs (``count`` at most) for ``owner`` to claim, delivered to it
        alone (or taken back from a runner that died, ``lease`` seconds after); none when none
        came within a second or so."""

    async def request_cancel(self, run_id: str) -> None:
        """Ask whichever runner executes ``run_id`` to cancel it."""

    async def listen(self, on_cancel: Callable[[str], None], on_done: Callable[[str], None]) -> None:
        """Forever: ``on_cancel(run_id)`` for each cancel asked, ``on_done(run_id)`` for each
        run finished, by any server."""

    async def append_values(self, run_id: str, values: list) -> None:
        """Add a running generator's newest values to what ``values`` reads, on any server."""

    async def values(self, run_id: str, start: int = 0) -> list | None:
        """A running generator's values so far, from index ``start`` on; None when it has none
        there (not started, or done)."""
