"""The runner: executes the runs recorded in a run store, in the background.

One ``Runner`` per ``Server``, made next to its apps in ``Server.build()``, started
in ``Server.start()`` and closed in ``Server.stop()``. Surfaces submit runs to it
(``/v4 ...?async=true`` in ``runnel.surfaces.functions``, the RunPod job API in
``runnel.surfaces.runpod``) and register a ``RunView`` saying how their runs are
called, checked and rendered. A run is recorded before its caller is answered, then
queued here; a worker waits for the run's app to be ready, claims the run in the
store (which makes it ours: see ``runnel.runs.store`` for states and claims), runs
it and records the outcome. While it runs, the claim is renewed every
``lease / 3`` seconds; a claim left to expire (its runner died) is taken back by
``recover``: the run fails with code ``interrupted``, or is queued again when its
app is idempotent (``[apps.NAME.functions] idempotent = true``).

At start the runner recovers (the SQLite store has already expired every claim a
dead process left), queues every queued run, in submission order, and sends the
webhooks not yet delivered. Finished runs are kept ``runs_retention`` seconds, then
purged (at start, then periodically); an expired run reads as unknown.

A run may have a deadline (``Run.deadline``: ``X-Request-Deadline`` on an async submit,
RunPod's ``policy.ttl``): one not claimed by then is never run but ends ``timed_out`` with
code ``deadline_exceeded``. A worker checks before it claims, and every
``EXPIRE_INTERVAL`` seconds the store is swept for queued runs past theirs (``expire``),
so that a long queue does not hold them until a worker comes to them.

At most ``runs_workers`` runs execute at once per server. A sync function runs in
its app's own thread pool, so it cannot be interrupted: cancelling or timing it
out abandons the call and discards its result.

The queue is bounded in the store: past ``runs_max_queued`` queued runs (of every app,
counted by the store, so the bound holds across restarts and processes) a new run is
refused with 429 and ``Retry-After``; a run once recorded is never refused or dropped
(recovered runs are queued again whatever the count). Each run belongs to the principal
that submitted it (``find`` shows it to no one else), and may carry an idempotency key
(``runnel.runs.idempotency``): a retry with the same key gets the same run.

What lives only here, in this process: the queue of run ids to take (a run is in it
at most once per submit or recovery; a stale id is skipped because the claim fails),
the task running each run this runner holds, and a running generator's values so far.

A store several servers share (``store.shared``: ``runnel.runs.redis``) keeps those in
the store instead: runs are not queued here but taken from the store's queue, one at a
time as workers come free (so an idle server takes what a busy one would only hold);
a generator's values are appended to the store as they come; a cancel of a run that
another server executes is sent to it, and every server hears when a run finishes (for
``wait``). While such a store cannot be reached, run calls raise ``StoreDown`` (503);
the background work retries until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import orjson

from ..backends.python import is_function_app
from ..config import ConfigError
from ..errors import HTTPError
from ..generation import deadline_exceeded
from ..metrics import NoRunMetrics
from .idempotency import Idempotency
from .sqlite import SQLiteRunStore
from .store import (
    ANYONE,
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TIMED_OUT,
    QueueFull,
    Run,
    RunStore,
    SharedRunStore,
    StoreDown,
    StoreUnavailable,
)
from .webhooks import Webhooks, check_target

logger = logging.getLogger("runnel.runs")

__all__ = ["RunView", "Runner", "ValueStream"]

CANCEL_GRACE = 5.0  # seconds a cancelled call gets to unwind (its finally blocks)
# Seconds a follower (``follow``) waits for a wake-up before it looks at the store again: the
# wake-ups are in-process, so this is how soon it sees a run another server executes move on
# (and a safety net for a wake-up lost here).
FOLLOW_POLL_SHARED = 0.1
FOLLOW_POLL = 2.0
QUEUE_FULL_RETRY_AFTER = b"5"  # seconds: a full queue of runs drains no faster than its runs run
EXPIRE_INTERVAL = 1.0  # seconds between sweeps for queued runs past their deadline


@runtime_checkable
class ValueStream(Protocol):
    """What a function returns when it yields values (``runnel.backends.python.FunctionStream``
    is one): async-iterable, and ``aclose()`` stops the function when the caller stops early."""

    def __aiter__(self) -> AsyncIterator[Any]: ...

    async def aclose(self) -> None: ...


class RunView:
    """How one surface's runs are called, checked and shown.

    A surface subclasses it, names it after itself (``name``, what ``Run.surface``
    holds) and registers it with ``Runner.add_view``."""

    name = "default"
    # Whether the store may wait to be opened (and what a previous process left in it
    # recovered) until a run of this view is first submitted or read. A server whose
    # only apps take such runs makes no store file until then; a file that exists is
    # opened at start unless another server holds it.
    opens_lazily = False

    def takes(self, app) -> bool:
        """Whether runs of this view can go to ``app`` (the store is opened only if some app can)."""
        return is_function_app(app)

    async def call(self, app, run: Run) -> Any:
        """Execute the run: its result (a value, or a ``ValueStream``); HTTPError fails it."""
        # Not bounded by the app: runs_workers bounds how many runs call at once.
        return await app.invoke(run.function, self.arguments(app, run), run.id, bounded=False)

    def arguments(self, app, run: Run) -> dict:
        """The keyword arguments to call ``run.function`` with (HTTPError fails the run)."""
        return dict(run.input) if type(run.input) is dict else {}

    def check(self, run: Run, result: Any) -> Any:
        """The result to keep; raise HTTPError to fail the run instead."""
        return result

    def render(self, run: Run) -> dict:
        """The run as this surface's clients (and webhooks) see it."""
        return {"id": run.id, "state": run.state, "output": run.output, "error": run.error}

    def webhook_headers(self, run: Run, body: bytes, secret: str) -> list[tuple[str, str]]:
        """Headers of this surface's own that each webhook attempt carries besides runnel's
        (e.g. a platform's signature of ``body`` with ``[server] webhook_secret``)."""
        return []


@dataclass(slots=True)
class _Active:
    """A run a worker has taken from the queue."""

    cancelled: bool = False
    task: asyncio.Task | None = None
    at_once: bool = False  # submitted at_once: executing outside the workers


@dataclass(slots=True)
class _Outcome:
    state: str
    output: bytes | None = None
    error: HTTPError | None = None
    streamed: bool = False
    run_time_ms: int | None = None


def default_runs_path(config, environ: Mapping[str, str] = os.environ) -> str:
    """Where a server keeps its runs when ``runs_path`` is not set: in the per-user data
    directory (``$XDG_DATA_HOME/runnel``, else ``~/.local/share/runnel``), one file per
    (config file, port). A server restarted with the same config on the same port finds
    its runs again, as the clients that submitted them (to that address) expect; two
    servers started from different configs, or on different ports, never share a file."""
    data_home = environ.get("XDG_DATA_HOME", "")
    if not os.path.isabs(data_home):  # the XDG spec: a relative value is to be ignored
        data_home = os.path.join(os.path.expanduser("~"), ".local", "share")
    source = os.path.abspath(config.source) if config.source else ""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.splitext(os.path.basename(source))[0]) or "default"
    port = config.server.port
    digest = hashlib.sha256(f"{source}\0{port}".encode()).hexdigest()[:10]
    return os.path.join(data_home, "runnel", f"runs-{stem}-{port}-{digest}.sqlite3")


def store_for(config, *, under_supervisor: bool = False) -> RunStore:
    """The store ``[server] runs`` names (a Redis URL: ``runnel.runs.redis``), else the one
    ``[server] runs_path`` names: that SQLite file ("" is memory; relative is to the working
    directory), else the per-user default (``default_runs_path``). ``under_supervisor``: for a
    worker, whose supervisor holds the SQLite file's lock (``SQLiteRunStore``)."""
    if config.server.runs is not None:
        from .redis import RedisRunStore  # only servers that use Redis import its client

        return RedisRunStore(config.server.runs, retention=config.server.runs_retention,
                             key=config.origin("server.runs")[0])
    path = config.server.runs_path
    key, _ = config.origin("server.runs_path")
    if path is None:
        return SQLiteRunStore(default_runs_path(config), key=key, make_directory=True,
                              under_supervisor=under_supervisor)
    return SQLiteRunStore(os.path.abspath(os.path.expanduser(path)) if path else "", key=key,
                          under_supervisor=under_supervisor)


class Runner:
    def __init__(self, config, apps, *, store: RunStore | None = None) -> None:
        """No I/O here: ``start()`` opens the store."""
        settings = config.server
        self.store = store if store is not None else store_for(config)
        # Where the store was chosen, for errors.
        self._source = config.origin("server.runs" if settings.runs is not None else "server.runs_path")[1]
        # The same store when several servers share it (its queue, cancels, values), else None.
        self._shared: SharedRunStore | None = self.store if getattr(self.store, "shared", False) else None  # type: ignore[assignment]
        self.apps = apps  # runnel.apps.AppRegistry
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"  # this runner's claims
        self.lease = settings.runs_lease  # renewed every lease / 3
        self.retention = settings.runs_retention
        self.workers = settings.runs_workers
        self.max_queued = settings.runs_max_queued
        self.allowed_hosts = settings.webhook_allowed_hosts
        self.webhooks = Webhooks(settings.webhook_secret, settings.webhook_retry_delay)
        self.idempotent: set[str] = set()  # apps whose interrupted runs are run again
        self.views: dict[str, RunView] = {}
        self._state = "new"
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []  # workers, the claim keeper and the purger
        self._deliveries: set[asyncio.Task] = set()
        self._active: dict[str, _Active] = {}
        self._waiters: dict[str, list[asyncio.Future]] = {}
        self._streams: dict[str, list] = {}  # a running generator's values so far
        # Set when a run executing here yields a value or finishes, for its followers (``follow``);
        # made when the run starts (or is submitted ``at_once``), dropped when it finishes.
        self._changed: dict[str, asyncio.Event] = {}
        self._at_once: set[asyncio.Task] = set()  # runs executing outside the workers (``at_once``)
        self._opening = asyncio.Lock()
        # Shared store: workers free to take a run from the store's queue.
        self._free = asyncio.Semaphore(self.workers)
        self.metrics: Any = NoRunMetrics()  # runnel.metrics.RunMetrics once a Server owns this runner

    def add_view(self, view: RunView) -> None:
        if view.name in self.views:
            raise ValueError(f"run view {view.name!r} is registered twice")
        self.views[view.name] = view

    def view(self, run: Run) -> RunView:
        return self.views.get(run.surface) or RunView()

    # -- lifecycle -------------------------------------------------------------------
    @property
    def in_use(self) -> bool:
        """Whether any app can take runs (of any registered view). Only then is the store
        opened: a server with no such app has no store at all (no file, no lock), so it never
        keeps another server using the same one from starting."""
        return bool(self._taking_views())

    def _taking_views(self) -> list[RunView]:
        views = list(self.views.values()) or [RunView()]
        return [view for view in views if any(view.takes(app) for _, app in self.apps.items())]

    async def start(self) -> None:
        """Open the store, recover what a previous process left, start the workers; none
        of it when no app can take runs (``in_use``). ConfigError when the store cannot
        be used."""
        if self._state != "new":
            return
        views = self._taking_views()
        if not views:
            self._state = "unused"
            return
        self._state = "started"
        try:
            # A shared store opens at once (it makes no file, and other servers' runs are
            # waiting in it); a file is made on the first run.
            if self._shared is not None or not all(view.opens_lazily for view in views):
                await self._open(create=False)
            else:
                # Lazily opened views: a file a previous process left is opened now, so the
                # runs it left queued (a model app's jobs) run without waiting for a request;
                # one another server holds is left to it (this one answers 503 if asked).
                with contextlib.suppress(StoreUnavailable):
                    await self._open(create=False)
        except BaseException as exc:
            self._state = "closed"
            await self.store.close()
            if isinstance(exc, StoreUnavailable):
                raise ConfigError(str(exc), key=exc.key, source=self._source) from None
            raise
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._work()) for _ in range(self.workers)]
        self._tasks.append(loop.create_task(self._keep_claims()))
        self._tasks.append(loop.create_task(self._purge_forever()))
        self._tasks.append(loop.create_task(self._expire_forever()))
        if self._shared is not None:
            self._tasks.append(loop.create_task(self._take_forever(self._shared)))
            self._tasks.append(loop.create_task(self._shared.listen(self._cancel_here, self._wake_waiters)))

    async def _open(self, *, create: bool) -> bool:
        """Open the store if it is not yet (creating it when ``create``), and recover what a
        previous process left in it, once; whether it is open."""
        async with self._opening:
            if not self.store.is_open:
                if not await self.store.open(create=create):
                    return False
                try:
                    await self._recover_at_start()
                except StoreDown as exc:  # the claim keeper recovers once the store is back
                    logger.warning("run store %s: nothing recovered at start: %s", self.store.name, exc.message)
        return True

    async def _recover_at_start(self) -> None:
        recovered = await self.store.recover(self.idempotent, _interrupted())
        self.metrics.runs_recovered(len(recovered.requeued), len(recovered.failed))
        purged = await self.store.purge(time.time() - self.retention)
        queued = await self.store.queued()
        self._enqueue(queued)
        pending = await self.store.pending_webhooks()  # those of runs failed just now included
        for run in pending:
            self._send_webhook(run)
        if queued or purged or pending or recovered.failed:
            logger.info("run store %s: %d queued runs to run (%d run again), %d interrupted, %d purged, "
                        "%d webhooks to send", self.store.name, len(queued), len(recovered.requeued),
                        len(recovered.failed), purged, len(pending))

    async def close(self) -> None:
        """Stop the workers and close the store. Runs still queued or running stay so in
        the store; their claims expire, for the next start (or another server) to recover."""
        if self._state == "closed":
            return
        self._state = "closed"
        tasks = [*self._tasks, *self._deliveries, *self._at_once]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.store.close()

    # -- submitting and reading ---------------------------------------------------------
    async def submit(self, surface: str, app: str, function: str, input: Any, *, principal: str = ANYONE,
                     run_id: str | None = None, webhook: str | None = None, timeout_ms: int | None = None,
                     idempotency: Idempotency | None = None, deadline: float | None = None,
                     at_once: bool = False) -> Run:
        """Record a run durably, then queue it; the run recorded. With ``idempotency``, the
        run an earlier request with the same key made, if it is still kept (HTTPError 422
        when that request differed). HTTPError 429 when ``max_queued`` runs are queued
        already, 503 when the store cannot take it. ``deadline`` (unix seconds): if not
        claimed by then, the run is never run; one already past is refused (504), unrecorded.

        ``at_once``: execute it now, here, outside the ``runs_workers`` (for a run that stands
        for a live request, bounded by its app's own admission, not queued behind background
        work). With a shared store another server may still claim it first (it is in the
        store's queue): it executes there then, and ``follow`` reads its values from the store."""
        now = time.time()
        if deadline is not None and deadline <= now:
            raise deadline_exceeded("The run's deadline had passed before it was queued; it was not recorded.")
        run = Run(id=run_id or uuid.uuid4().hex, surface=surface, app=app, function=function, input=input,
                  webhook=webhook, timeout_ms=timeout_ms, webhook_pending=webhook is not None,
                  created_at=now, principal=principal,
                  idempotency_key=None if idempotency is None else idempotency.key,
                  request_hash=None if idempotency is None else idempotency.request_hash, deadline=deadline)
        recorded = await self._insert(run, self.max_queued)
        if recorded.id != run.id:
            if recorded.request_hash != run.request_hash:
                raise HTTPError(422, "This Idempotency-Key was used for a different request; use a new key "
                                "for a new request", param="Idempotency-Key", code="idempotency_key_reused")
            return recorded
        if at_once:
            self._changed[run.id] = asyncio.Event()  # for a follower that comes before it starts
            task = asyncio.get_running_loop().create_task(self._run_at_once(run.id))
            self._at_once.add(task)
            task.add_done_callback(self._at_once.discard)
        else:
            self._enqueue((run.id,))
        self.metrics.run_accepted(app)
        return run

    def _enqueue(self, run_ids) -> None:
        """Queue runs here, for this runner's workers; a shared store queues them itself."""
        if self._shared is None:
            for run_id in run_ids:
                self._queue.put_nowait(run_id)

    async def _insert(self, run: Run, max_queued: int | None) -> Run:
        """``store.insert``, its failures as the HTTPErrors a client sees (429, 503)."""
        if self._state != "started":  # surfaces submit only for apps that take runs
            raise RuntimeError(f"the runner is {self._state}: no run can be submitted")
        try:
            await self._open(create=True)
            recorded = await self.store.insert(run, max_queued=max_queued)
            if recorded.id != run.id and self._expired(recorded):  # its key went with it: purge, then record
                await self.store.purge(time.time() - self.retention)
                recorded = await self.store.insert(run, max_queued=max_queued)
        except HTTPError:  # the store is unreachable for now (StoreDown): 503 with Retry-After
            raise
        except QueueFull as exc:
            raise _queue_full(exc) from None
        except StoreUnavailable as exc:
            raise HTTPError(503, str(exc), code="run_store_busy") from None
        except Exception as exc:  # the store's own errors (sqlite3.Error, OSError, ...)
            logger.exception("run store %s: cannot record run %s", self.store.name, run.id)
            raise HTTPError(503, f"The run could not be recorded: {exc}", code="run_store_error") from None
        return recorded

    async def record(self, run: Run) -> None:
        """Keep a call that ran in the foreground as a finished run (``run.state`` final, its
        ``output`` set): readable like any run, and purged after the retention like them.
        HTTPError 503 when the store cannot take it."""
        assert run.done and run.finished_at is not None
        await self._insert(run, None)

    async def delete(self, run_id: str) -> bool:
        """Forget a run, cancelling it first if it is not done; False when it was unknown."""
        run = await self.get(run_id)
        if run is None:
            return False
        if not run.done:
            await self.cancel(run_id)
        return await self.store.delete(run_id)

    async def get(self, run_id: str) -> Run | None:
        """The run, or None when unknown or expired. HTTPError 503 when a store opened only
        now (``RunView.opens_lazily``) cannot be used."""
        if not self.store.is_open and self._state == "started":
            try:
                await self._open(create=False)
            except StoreUnavailable as exc:
                raise HTTPError(503, str(exc), code="run_store_busy") from None
        run = await self.store.get(run_id)
        return None if run is None or self._expired(run) else run

    async def find(self, run_id: str, *, surface: str | tuple[str, ...], app: str | None,
                   principal: str) -> Run | None:
        """The run if ``principal`` submitted it through ``surface`` (or one of several) to ``app``
        (None: any app), else None: anyone else's run reads as unknown (or expired) does, so its
        existence does not leak."""
        run = await self.get(run_id)
        surfaces = (surface,) if type(surface) is str else surface
        if (run is None or run.surface not in surfaces or (app is not None and run.app != app)
                or run.principal != principal):
            return None
        return run

    def _expired(self, run: Run) -> bool:
        return run.finished_at is not None and run.finished_at + self.retention < time.time()

    async def wait(self, run_id: str, timeout: float) -> Run | None:
        """The run once it is done, or as it is after ``timeout`` seconds."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(run_id, []).append(waiter)
        try:
            run = await self.get(run_id)
            if run is None or run.done:
                return run
            try:
                await asyncio.wait_for(waiter, timeout)
            except TimeoutError:
                pass
            return await self.get(run_id)
        finally:
            waiters = self._waiters.get(run_id)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[run_id]

    async def purge_queue(self, *, surface: str, app: str, principal: str) -> int:
        """Cancel every run of ``app`` that ``principal`` submitted through ``surface`` and that
        is still queued (running ones go on); how many. The queue is bounded (runs_max_queued),
        and each cancel is the store's atomic queued -> cancelled, so a run claimed meanwhile
        is left to run."""
        removed = 0
        if not self.store.is_open:
            try:
                if not await self._open(create=False):
                    return 0  # no store yet: nothing was ever queued
            except StoreUnavailable as exc:
                raise HTTPError(503, str(exc), code="run_store_busy") from None
        for run_id in await self.store.queued():
            run = await self.store.get(run_id)
            if (run is not None and run.state == QUEUED and run.surface == surface and run.app == app
                    and run.principal == principal and await self.store.finish(run_id, CANCELLED)):
                removed += 1
                self.metrics.run_finished(run.app, CANCELLED, None)
                await self._finished(run)
        return removed

    async def retry(self, run_id: str, states: tuple[str, ...] = (FAILED, TIMED_OUT)) -> bool:
        """Queue a final run in one of ``states`` again, under its id, with its input (RunPod's
        ``/retry``); whether it was (False: unknown, or in no such state, a concurrent retry
        having queued it already included). HTTPError 429 when ``max_queued`` runs are queued."""
        run = await self.get(run_id)
        if run is None or run.state not in states:
            return False
        try:
            requeued = await self.store.requeue(run_id, states, max_queued=self.max_queued)
        except QueueFull as exc:
            raise _queue_full(exc) from None
        if requeued:
            self._enqueue((run_id,))
            self.metrics.run_accepted(run.app)
        return requeued

    async def cancel(self, run_id: str, *, queued_only: bool = False) -> Run | None:
        """Cancel a queued or running run (with ``queued_only``, a queued one only: one that
        has started is left to run); the run as it is then (None when unknown)."""
        for _ in range(50):
            run = await self.get(run_id)
            if run is None or run.done or (queued_only and run.state != QUEUED):
                return run
            if run.state == QUEUED and await self.store.finish(run_id, CANCELLED):
                self.metrics.run_finished(run.app, CANCELLED, None)
                await self._finished(run)
                return await self.get(run_id)
            active = self._active.get(run_id)
            if active is not None:
                active.cancelled = True
                if active.task is not None:
                    active.task.cancel()
                return await self.wait(run_id, CANCEL_GRACE * 2)
            if run.state == RUNNING:  # claimed by another runner: not ours to stop, unless shared
                if self._shared is None:
                    return run
                await self._shared.request_cancel(run_id)
                return await self.wait(run_id, CANCEL_GRACE * 2)
            await asyncio.sleep(0.01)
        return await self.get(run_id)

    async def values_so_far(self, run_id: str) -> list | None:
        """The values a running generator has yielded so far (here: the live list, read,
        don't keep); None when no generator of that run is running (here, or with a
        shared store, anywhere)."""
        values = self._streams.get(run_id)
        if values is None and self._shared is not None:
            return await self._shared.values(run_id)
        return values

    def _cancel_here(self, run_id: str) -> None:
        """A cancel asked on another server: stop the run if it executes here."""
        active = self._active.get(run_id)
        if active is not None:
            active.cancelled = True
            if active.task is not None:
                active.task.cancel()

    def _wake_waiters(self, run_id: str) -> None:
        changed = self._changed.pop(run_id, None)
        if changed is not None:  # a run submitted at_once here that another server finished
            changed.set()
        for waiter in self._waiters.pop(run_id, ()):
            if not waiter.done():
                waiter.set_result(None)

    @property
    def queued(self) -> int:
        """Runs waiting in this runner's queue (a cancelled one until a worker takes it off)."""
        return self._queue.qsize()

    @property
    def busy(self) -> int:
        """Workers busy with a run."""
        return sum(not active.at_once for active in self._active.values())

    async def follow(self, run_id: str, start: int = 0) -> AsyncIterator[list]:
        """The values a run yields from index ``start`` on, as they come, until it is done:
        each item is every value new since the last (one wake-up per burst, not per value),
        read from the live list while the run executes here, from the store's copy while it
        executes on another server (a shared store), and from its output once it is done.
        Ends at once for an unknown run; the caller reads the run's outcome after (``get``).
        A reader that stops taking items holds nothing back: the run goes on."""
        sent = start
        while True:
            values = self._streams.get(run_id)
            if values is None:
                run = await self.get(run_id)
                if run is None:
                    return
                if run.done:
                    values = run.output if run.streamed and type(run.output) is list else []
                    if len(values) > sent:
                        yield values[sent:]
                    return
                if self._shared is not None and run.state == RUNNING and run_id not in self._changed:
                    values = await self._shared.values(run_id, sent)
                    if values:
                        sent += len(values)
                        yield values
                        continue
                if run_id in self._streams:  # it started here while the store was read
                    continue
            elif len(values) > sent:
                burst = values[sent:]
                sent += len(burst)
                yield burst
                continue
            changed = self._changed.get(run_id)
            if changed is None:  # queued, or executing on another server: look again shortly
                await asyncio.sleep(FOLLOW_POLL_SHARED)
                continue
            changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FOLLOW_POLL):
                    await changed.wait()

    async def counts(self, app: str, surface: str) -> dict[str, int]:
        return await self.store.counts(app, surface, time.time() - self.retention)

    # -- running ------------------------------------------------------------------------
    async def _work(self) -> None:
        while True:
            run_id = await self._queue.get()
            if run_id in self._active:  # queued twice (a recovery, a redelivery): one worker runs it
                if self._shared is not None:
                    self._free.release()
                continue
            try:
                await self._hold_and_run(run_id, _Active())
            finally:
                if self._shared is not None:
                    self._free.release()

    async def _take_forever(self, store: SharedRunStore) -> None:
        """Shared store: take runs from its queue whenever workers are free, as many as are."""
        while True:
            await self._free.acquire()
            free = 1
            while not self._free.locked():
                await self._free.acquire()  # at once: not locked
                free += 1
            try:
                run_ids = await store.take(self.owner, self.lease, free)
            except Exception as exc:
                run_ids = []
                if not isinstance(exc, StoreDown):
                    logger.exception("run store %s: taking a run failed", self.store.name)
                await asyncio.sleep(0.5)
            for run_id in run_ids:
                self._queue.put_nowait(run_id)
            for _ in range(free - len(run_ids)):
                self._free.release()

    async def _run_at_once(self, run_id: str) -> None:
        if run_id in self._active:  # a worker took it first from a shared store's queue: it runs it
            return
        try:
            await self._hold_and_run(run_id, _Active(at_once=True))
        finally:
            changed = self._changed.pop(run_id, None)
            if changed is not None:  # not run here after all (claimed elsewhere, cancelled)
                changed.set()

    async def _hold_and_run(self, run_id: str, active: _Active) -> None:
        """``_run``, the run in ``_active`` meanwhile (so a cancel finds it); a failure of the
        runner itself is logged, not raised."""
        self._active[run_id] = active
        try:
            await self._run(run_id, active)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("run %s: the runner failed", run_id)
        finally:
            self._active.pop(run_id, None)

    async def _ready_app(self, name: str):
        """The app once it has loaded; None if it failed or is gone. No deadline: a run
        waits for its app as long as the app takes to load (or until the server stops)."""
        await self.apps.wait_settled(name)
        return self.apps.get(name)

    async def _run(self, run_id: str, active: _Active) -> None:
        run = await self.store.get(run_id)
        if run is None or run.state != QUEUED:
            return
        app = await self._ready_app(run.app)
        if app is None:
            error = HTTPError(503, f"App '{run.app}' is not available: it is {self.apps.state(run.app) or 'gone'}",
                              code="app_not_ready")
            if await self.store.finish(run_id, FAILED, error=error):
                self.metrics.run_finished(run.app, FAILED, None)
                await self._finished(run)
            return
        if await self._expired_in_queue(run):
            return
        run = await self._claim(run_id)
        if run is None:  # cancelled while queued, or claimed by another runner
            return
        if active.cancelled:
            await self._finish(run, _Outcome(CANCELLED))
            return
        task = active.task = asyncio.get_running_loop().create_task(self._call(run, app))
        timeout = run.timeout_ms / 1000 if run.timeout_ms else None
        try:
            done, _ = await asyncio.wait((task,), timeout=timeout)
        except asyncio.CancelledError:  # the server is stopping: left 'running', its claim expires
            task.cancel()
            raise
        if not done:
            task.cancel()
            await asyncio.wait((task,), timeout=CANCEL_GRACE)
            outcome = _Outcome(TIMED_OUT, error=HTTPError(
                504, f"The run exceeded its execution timeout of {run.timeout_ms} ms", code="timed_out"))
        elif task.cancelled() or active.cancelled:
            outcome = _Outcome(CANCELLED)  # a sync function's late result is discarded
        else:
            outcome = task.result()
        await self._finish(run, outcome)

    async def _claim(self, run_id: str) -> Run | None:
        """``store.claim``; with a shared store out of reach, tried until it is back (or the
        server stops). A claim whose answer was lost (Redis died after writing it) is found
        in the store as ours: it is run here, since only this runner renews it."""
        while True:
            try:
                return await self.store.claim(run_id, self.owner, self.lease)
            except StoreDown:
                pass
            while True:
                await asyncio.sleep(0.5)
                try:
                    run = await self.store.get(run_id)
                    break
                except StoreDown:
                    pass
            if run is None or run.state != QUEUED:
                return run if run is not None and run.state == RUNNING and run.owner == self.owner else None

    async def _call(self, run: Run, app) -> _Outcome:
        view = self.view(run)
        started = time.perf_counter()
        streamed = False
        values = None
        try:
            result = await view.call(app, run)
            if isinstance(result, ValueStream):
                streamed = True
                values = self._streams[run.id] = []
                sharing = None if self._shared is None else _ValueSharing(self._shared, run.id, values)
                changed = self._changed.get(run.id)
                if changed is None:
                    changed = self._changed[run.id] = asyncio.Event()
                changed.set()  # the values exist now
                try:
                    async for value in result:
                        values.append(value)
                        changed.set()  # a no-op until a follower has taken what came before
                        if sharing is not None:
                            sharing.poke()
                finally:
                    await result.aclose()
                    if sharing is not None:
                        await sharing.close()
                result = values
            output = orjson.dumps(view.check(run, result), option=orjson.OPT_SERIALIZE_NUMPY)
            return _Outcome(SUCCEEDED, output, streamed=streamed, run_time_ms=_ms_since(started))
        except Exception as exc:
            if isinstance(exc, HTTPError):
                error = exc
            elif isinstance(exc, orjson.JSONEncodeError):
                error = HTTPError(500, f"The result of function '{run.function}' cannot be sent as JSON: {exc}",
                                  code="result_not_serializable")
            else:
                logger.exception("function %r of app %r failed (run %s)", run.function, run.app, run.id)
                error = HTTPError(500, f"Function '{run.function}' failed: {type(exc).__name__}: {exc}",
                                  code="function_error")
            partial = None
            if values:  # what a generator yielded before it failed, for RunPod's /stream
                try:
                    partial = orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY)
                except orjson.JSONEncodeError:
                    partial = None
            return _Outcome(FAILED, partial, error, streamed, _ms_since(started))

    async def _finish(self, run: Run, outcome: _Outcome) -> None:
        # Shielded: a server stopping mid-write still records the outcome (the store
        # closes after it, on the same thread). A shared store out of reach is tried
        # until it is back: the run stays claimed by this runner until then (and is
        # taken back if its lease ran out meanwhile: the outcome is refused then).
        while True:
            try:
                written = await asyncio.shield(self.store.finish(
                    run.id, outcome.state, owner=self.owner, output=outcome.output, error=outcome.error,
                    streamed=outcome.streamed, run_time_ms=outcome.run_time_ms))
                break
            except StoreDown:
                await asyncio.sleep(0.5)
                with contextlib.suppress(StoreDown):  # the finish was written, its answer lost?
                    recorded = await self.store.get(run.id)
                    if recorded is not None and recorded.state == outcome.state and recorded.owner == self.owner:
                        written = True
                        break
        self._streams.pop(run.id, None)
        changed = self._changed.pop(run.id, None)
        if changed is not None:  # its followers read the rest from the store now
            changed.set()
        if written:
            seconds = outcome.run_time_ms / 1000 if outcome.run_time_ms is not None else None
            self.metrics.run_finished(run.app, outcome.state, seconds)
            await self._finished(run)
        else:
            logger.warning("run %s: its claim was taken back (not renewed in time); its %s outcome is discarded",
                           run.id, outcome.state)

    async def _finished(self, run: Run) -> None:
        self._wake_waiters(run.id)
        if run.webhook:
            final = await self.store.get(run.id)
            if final is not None:
                self._send_webhook(final)

    def _send_webhook(self, run: Run) -> None:
        if self._state == "closed":
            return
        view = self.view(run)
        body = orjson.dumps(view.render(run), option=orjson.OPT_SERIALIZE_NUMPY)
        headers = view.webhook_headers(run, body, self.webhooks.secret)
        task = asyncio.get_running_loop().create_task(self._deliver(run, body, headers))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, run: Run, body: bytes, headers: list[tuple[str, str]]) -> None:
        url = run.webhook
        assert url is not None  # only runs with a webhook are sent one
        try:
            check_target(url, self.allowed_hosts)  # again: the config may have changed since
        except ValueError as exc:
            logger.warning("webhook for run %s not sent: %s", run.id, exc)
            self.metrics.webhook_outcome("refused")
        else:
            delivered = False
            try:
                delivered = await self.webhooks.deliver(url, run.id, body, headers)
            except Exception:
                logger.exception("webhook for run %s failed", run.id)
            self.metrics.webhook_outcome("delivered" if delivered else "failed")
        await self.store.webhook_done(run.id)  # delivered or given up; a stop before this resends

    # -- housekeeping -------------------------------------------------------------------
    async def _keep_claims(self) -> None:
        """Renew this runner's claims; take back claims other runners let expire."""
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await self.store.renew(self.owner, self.lease)
                recovered = await self.store.recover(self.idempotent, _interrupted())
            except StoreDown as exc:
                logger.warning("run store %s: claims not renewed: %s", self.store.name, exc.message)
                continue
            except Exception:
                logger.exception("run store %s: renewing claims failed", self.store.name)
                continue
            self.metrics.runs_recovered(len(recovered.requeued), len(recovered.failed))
            self._enqueue(recovered.requeued)
            for run_id in recovered.failed:
                run = await self.store.get(run_id)
                if run is not None:
                    self.metrics.run_finished(run.app, FAILED, None)
                    await self._finished(run)
            if recovered.requeued or recovered.failed:
                logger.warning("run store %s: %d expired claims taken back (%d to run again, %d interrupted)",
                               self.store.name, len(recovered.requeued) + len(recovered.failed),
                               len(recovered.requeued), len(recovered.failed))

    async def _expired_in_queue(self, run: Run) -> bool:
        """Before a claim: whether ``run`` (queued, never claimed) is past its deadline; if so it
        is recorded timed out (unless claimed or cancelled meanwhile) and must not be run."""
        if run.deadline is None or run.attempts or time.time() < run.deadline:
            return False
        if await self.store.finish(run.id, TIMED_OUT, error=_deadline_passed()):
            self.metrics.run_finished(run.app, TIMED_OUT, None)
            await self._finished(run)
        return True

    async def _expire_forever(self) -> None:
        """Sweep the store for queued runs past their deadline (every server does, each run is
        expired once: ``expire`` is atomic), so none waits for a worker only to be dropped."""
        while True:
            await asyncio.sleep(EXPIRE_INTERVAL)
            if not self.store.is_open:
                continue
            try:
                for run_id in await self.store.expire(time.time(), _deadline_passed()):
                    run = await self.store.get(run_id)
                    if run is not None:
                        self.metrics.run_finished(run.app, TIMED_OUT, None)
                        await self._finished(run)
            except StoreDown:
                continue  # the next sweep, or the claim's check, gets the rest
            except Exception:
                logger.exception("run store %s: expiring runs failed", self.store.name)

    async def _purge_forever(self) -> None:
        interval = min(max(self.retention / 2, 0.05), 60.0)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.store.purge(time.time() - self.retention)
            except StoreDown:
                pass  # expired runs wait for the next round
            except Exception:
                logger.exception("run store %s: purge failed", self.store.name)


class _ValueSharing:
    """A running generator's values, appended to a shared store as they come: one append
    at a time, each taking every value yielded since the last, so a fast generator is
    never held up by the store, nor sends it one call per value."""

    def __init__(self, store: SharedRunStore, run_id: str, values: list) -> None:
        self.store = store
        self.run_id = run_id
        self.values = values  # the runner's live list
        self.sent = 0
        self._task: asyncio.Task | None = None

    def poke(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        while self.sent < len(self.values):
            new = self.values[self.sent:]
            try:
                await self.store.append_values(self.run_id, new)
            except StoreDown:
                return  # readers elsewhere see fewer values; the outcome has them all
            self.sent += len(new)

    async def close(self) -> None:
        """Wait for the last append, so the run's finish (which drops the values) comes after it."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self.sent < len(self.values):
            with contextlib.suppress(StoreDown):
                await self._send()


def _queue_full(exc: QueueFull) -> HTTPError:
    return HTTPError(429, f"Too many runs are waiting ({exc.limit} queued); try again later",
                     code="queue_full", headers=((b"retry-after", QUEUE_FULL_RETRY_AFTER),))


def _deadline_passed() -> HTTPError:
    return deadline_exceeded("The run was still queued at its deadline; it was not run.")


def _interrupted() -> HTTPError:
    return HTTPError(500, "The run was interrupted: the server stopped while it was running", code="interrupted")


def _ms_since(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)
