"""Durable background runs: the runner that executes runs recorded in the run store (``runnel.runstore``).

Surfaces (``/v4 ...?async=true`` in ``runnel.surfaces.cortex``, the RunPod job API in
``runnel.surfaces.runpod_jobs``) submit runs; one ``Runner`` per server, shared
through ``runner_for(server)``, records each run before the caller is answered, then
runs it in the background. Each surface starts and stops the runner from its
``runnel_startup`` / ``runnel_shutdown`` hooks (``start`` and ``close`` are idempotent).

States: ``queued -> running -> succeeded | failed | cancelled | timed_out``; a
queued run may also go straight to ``cancelled``. Every change is a committed
SQLite write (WAL, ``synchronous=FULL``), made on the store's one thread.

Recovery, when a server starts on a store a previous process left (e.g. after
SIGKILL): runs still ``running`` become ``failed`` with code ``interrupted``, or
``queued`` again when their app is idempotent (``[apps.NAME.functions]
idempotent = true``); then every queued run is run, in submission order, and
webhooks not yet delivered are sent. Finished runs are kept ``runs_retention``
seconds, then purged (at start, then periodically); an expired run reads as unknown.

At most ``runs_workers`` runs execute at once per server. A sync function runs in
its app's own thread pool (``FunctionApp.invoke``), so it cannot be interrupted:
cancelling or timing it out abandons the call and discards its result.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from .apps import LOADING
from .config import ConfigError
from .errors import HTTPError
from .functions import FunctionStream
from .runstore import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TIMED_OUT,
    Run,
    RunStore,
    StoreBusy,
)
from .webhooks import Webhooks, check_target

logger = logging.getLogger("runnel.runs")

__all__ = ["Run", "RunStore", "Runner", "StoreBusy", "Surface", "runner_for"]

CANCEL_GRACE = 5.0  # seconds a cancelled call gets to unwind (its finally blocks)


class Surface:
    """How one surface's runs are called and shown. Subclass and ``Runner.add_surface``."""

    name = "default"

    def arguments(self, app, run: Run) -> dict:
        """The keyword arguments to call ``run.function`` with (HTTPError fails the run)."""
        return dict(run.input) if type(run.input) is dict else {}

    def check(self, run: Run, result: Any) -> Any:
        """The result to keep; raise HTTPError to fail the run instead."""
        return result

    def render(self, run: Run) -> dict:
        """The run as this surface's clients (and webhooks) see it."""
        return {"id": run.id, "state": run.state, "output": run.output, "error": run.error}


@dataclass(slots=True)
class _Active:
    """A run a worker has taken from the queue."""

    cancelled: bool = False
    task: asyncio.Task | None = None


@dataclass(slots=True)
class _Outcome:
    state: str
    output: bytes | None = None
    error: HTTPError | None = None
    streamed: bool = False
    run_time_ms: int | None = None


def runner_for(server) -> Runner:
    """The server's one runner (made on first use, kept in ``server.state``)."""
    runner = server.state.get("runner")
    if runner is None:
        runner = server.state["runner"] = Runner(server.config, server.apps)
    return runner


class Runner:
    def __init__(self, config, apps) -> None:
        settings = config.server
        path = settings.runs_path
        self.store = RunStore(os.path.abspath(os.path.expanduser(path)) if path else "")
        self.apps = apps  # runnel.apps.AppRegistry
        self.retention = settings.runs_retention
        self.workers = settings.runs_workers
        self.allowed_hosts = settings.webhook_allowed_hosts
        self.webhooks = Webhooks(settings.webhook_secret, settings.webhook_retry_delay)
        self.idempotent: set[str] = set()  # apps whose interrupted runs are run again
        self.surfaces: dict[str, Surface] = {}
        self._state = "new"
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []  # workers and the purger
        self._deliveries: set[asyncio.Task] = set()
        self._active: dict[str, _Active] = {}
        self._waiters: dict[str, list[asyncio.Future]] = {}
        self._streams: dict[str, list] = {}  # a running generator's values so far
        self._seen: dict[str, tuple[int, float]] = {}  # run id -> (values streamed out, when)

    def add_surface(self, surface: Surface) -> None:
        self.surfaces[surface.name] = surface

    def _surface(self, run: Run) -> Surface:
        return self.surfaces.get(run.surface) or Surface()

    # -- lifecycle -------------------------------------------------------------------
    def start(self):
        """A coroutine that opens the store, recovers and starts the workers; None if already started."""
        if self._state != "new":
            return None
        self._state = "started"
        return self._start()

    async def _start(self) -> None:
        path = self.store.path
        if path and not os.path.isdir(os.path.dirname(path)):
            raise ConfigError(f"no such directory: {os.path.dirname(path)}", key="server.runs_path")
        try:
            opened = await self.store.open(create=not path)
        except StoreBusy as exc:
            await self.store.close()
            raise ConfigError(str(exc), key="server.runs_path") from None
        if opened:
            await self._recover()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._work()) for _ in range(self.workers)]
        self._tasks.append(loop.create_task(self._purge_forever()))

    async def _recover(self) -> None:
        interrupted = HTTPError(500, "The run was interrupted: the server stopped while it was running",
                                code="interrupted")
        queued = await self.store.recover(self.idempotent, interrupted)
        purged = await self.store.purge(time.time() - self.retention)
        for run_id in queued:
            self._queue.put_nowait(run_id)
        pending = await self.store.pending_webhooks()
        for run in pending:
            self._send_webhook(run)
        if queued or purged or pending:
            logger.info("run store %s: %d queued runs to run, %d purged, %d webhooks to send",
                        self.store.path or "(memory)", len(queued), purged, len(pending))

    def close(self):
        """A coroutine that stops the workers and closes the store; None if already closed.
        Runs still queued or running stay so in the store, for the next start."""
        if self._state == "closed":
            return None
        self._state = "closed"
        return self._close()

    async def _close(self) -> None:
        tasks = [*self._tasks, *self._deliveries]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.store.close()

    # -- submitting and reading ---------------------------------------------------------
    async def submit(self, surface: str, app: str, function: str, input: Any, *, run_id: str | None = None,
                     webhook: str | None = None, timeout_ms: int | None = None) -> Run:
        """Record a run durably, then queue it. HTTPError 503 when the store cannot take it."""
        run = Run(id=run_id or uuid.uuid4().hex, surface=surface, app=app, function=function, input=input,
                  webhook=webhook, timeout_ms=timeout_ms, webhook_pending=webhook is not None,
                  created_at=time.time())
        try:
            if not self.store.is_open:
                await self.store.open(create=True)
            await self.store.insert(run)
        except StoreBusy as exc:
            raise HTTPError(503, str(exc), code="run_store_busy") from None
        except (sqlite3.Error, OSError) as exc:
            logger.exception("run store %s: cannot record run %s", self.store.path or "(memory)", run.id)
            raise HTTPError(503, f"The run could not be recorded: {exc}", code="run_store_error") from None
        self._queue.put_nowait(run.id)
        return run

    async def get(self, run_id: str) -> Run | None:
        """The run, or None when unknown or expired."""
        run = await self.store.get(run_id)
        if run is not None and run.finished_at is not None and run.finished_at + self.retention < time.time():
            return None
        return run

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

    async def cancel(self, run_id: str) -> Run | None:
        """Cancel a queued or running run; the run as it is then (None when unknown)."""
        for _ in range(50):
            run = await self.get(run_id)
            if run is None or run.done:
                return run
            if run.state == QUEUED and await self.store.finish(run_id, CANCELLED, from_states=(QUEUED,)):
                await self._finished(run)
                return await self.get(run_id)
            active = self._active.get(run_id)
            if active is not None:
                active.cancelled = True
                if active.task is not None:
                    active.task.cancel()
                return await self.wait(run_id, CANCEL_GRACE * 2)
            if run.state == RUNNING:  # running in another process on the same file: not ours to stop
                return run
            await asyncio.sleep(0.01)
        return await self.get(run_id)

    def take_stream(self, run: Run) -> list:
        """The values of ``run`` not handed out by an earlier call (a generator's so far, or its
        output once done)."""
        values = self._streams.get(run.id)
        if values is None:
            if not run.done:
                return []  # not started, or finishing right now: the next call has them
            if run.streamed and type(run.output) is list:
                values = run.output
            else:
                values = [run.output] if run.state == SUCCEEDED else []
        seen = self._seen.get(run.id, (0, 0.0))[0]
        self._seen[run.id] = (max(seen, len(values)), time.monotonic())
        return values[seen:]

    @property
    def busy(self) -> int:
        """Workers busy with a run."""
        return len(self._active)

    async def counts(self, app: str, surface: str) -> dict[str, int]:
        return await self.store.counts(app, surface, time.time() - self.retention)

    # -- running ------------------------------------------------------------------------
    async def _work(self) -> None:
        while True:
            run_id = await self._queue.get()
            active = self._active[run_id] = _Active()
            try:
                await self._run(run_id, active)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("run %s: the runner failed", run_id)
            finally:
                self._active.pop(run_id, None)

    async def _ready_app(self, name: str):
        """The app once it is ready; None if it failed or is gone."""
        while True:
            app = self.apps.get(name)
            if app is not None or self.apps.state(name) != LOADING:
                return app
            await asyncio.sleep(0.05)

    async def _run(self, run_id: str, active: _Active) -> None:
        run = await self.store.get(run_id)
        if run is None or run.state != QUEUED:
            return
        app = await self._ready_app(run.app)
        if app is None:
            error = HTTPError(503, f"App '{run.app}' is not available: it is {self.apps.state(run.app) or 'gone'}",
                              code="app_not_ready")
            if await self.store.finish(run_id, FAILED, from_states=(QUEUED,), error=error):
                await self._finished(run)
            return
        run = await self.store.claim(run_id)
        if run is None:  # cancelled while queued
            return
        if active.cancelled:
            await self._finish(run, _Outcome(CANCELLED))
            return
        task = active.task = asyncio.get_running_loop().create_task(self._call(run, app))
        timeout = run.timeout_ms / 1000 if run.timeout_ms else None
        try:
            done, _ = await asyncio.wait((task,), timeout=timeout)
        except asyncio.CancelledError:  # the server is stopping: left 'running' for recovery
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

    async def _call(self, run: Run, app) -> _Outcome:
        surface = self._surface(run)
        started = time.perf_counter()
        streamed = False
        values = None
        try:
            result = await app.invoke(run.function, surface.arguments(app, run), run.id)
            if isinstance(result, FunctionStream):
                streamed = True
                values = self._streams[run.id] = []
                try:
                    async for value in result:
                        values.append(value)
                finally:
                    await result.aclose()
                result = values
            output = orjson.dumps(surface.check(run, result), option=orjson.OPT_SERIALIZE_NUMPY)
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
            if values:  # what a generator yielded before it failed, for /stream
                try:
                    partial = orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY)
                except orjson.JSONEncodeError:
                    partial = None
            return _Outcome(FAILED, partial, error, streamed, _ms_since(started))

    async def _finish(self, run: Run, outcome: _Outcome) -> None:
        # Shielded: a server stopping mid-write still records the outcome (the store
        # closes after it, on the same thread).
        written = await asyncio.shield(self.store.finish(
            run.id, outcome.state, output=outcome.output, error=outcome.error, streamed=outcome.streamed,
            run_time_ms=outcome.run_time_ms))
        self._streams.pop(run.id, None)
        if written:
            await self._finished(run)

    async def _finished(self, run: Run) -> None:
        for waiter in self._waiters.pop(run.id, ()):
            if not waiter.done():
                waiter.set_result(None)
        if run.webhook:
            final = await self.store.get(run.id)
            if final is not None:
                self._send_webhook(final)

    def _send_webhook(self, run: Run) -> None:
        if self._state == "closed":
            return
        body = orjson.dumps(self._surface(run).render(run), option=orjson.OPT_SERIALIZE_NUMPY)
        task = asyncio.get_running_loop().create_task(self._deliver(run, body))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, run: Run, body: bytes) -> None:
        try:
            check_target(run.webhook, self.allowed_hosts)  # again: the config may have changed since
        except ValueError as exc:
            logger.warning("webhook for run %s not sent: %s", run.id, exc)
        else:
            try:
                await self.webhooks.deliver(run.webhook, run.id, body)
            except Exception:
                logger.exception("webhook for run %s failed", run.id)
        await self.store.webhook_done(run.id)  # delivered or given up; a stop before this resends

    async def _purge_forever(self) -> None:
        interval = min(max(self.retention / 2, 0.05), 60.0)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.store.purge(time.time() - self.retention)
            except sqlite3.Error:
                logger.exception("run store %s: purge failed", self.store.path or "(memory)")
            stale = time.monotonic() - self.retention
            self._seen = {key: value for key, value in self._seen.items() if value[1] >= stale}


def _ms_since(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)
