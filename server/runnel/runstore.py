"""The SQLite run store behind durable background runs (see ``runnel.jobs``).

One table of runs, in WAL mode with ``synchronous=FULL``, written in autocommit
on the store's one thread so the event loop never waits on the disk. A run is
recorded before its caller is answered; every state change is a committed write
that applies only if the run is still in the state the writer expects.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any

import orjson

from .errors import HTTPError

logger = logging.getLogger("runnel.runs")

__all__ = ["Run", "RunStore", "StoreBusy"]

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, TIMED_OUT = (
    "queued", "running", "succeeded", "failed", "cancelled", "timed_out")
TERMINAL = frozenset((SUCCEEDED, FAILED, CANCELLED, TIMED_OUT))


@dataclass(slots=True)
class Run:
    id: str
    surface: str  # which surface submitted it, and renders it: "cortex", "runpod"
    app: str
    function: str
    input: Any  # JSON: keyword arguments (cortex) or the job's input (runpod)
    state: str = QUEUED
    webhook: str | None = None
    timeout_ms: int | None = None  # execution time allowed, None: no limit
    output: Any = None  # JSON result; a generator's values as a list
    error: dict | None = None  # {"status", "message", "type", "param", "code"}
    streamed: bool = False  # output is the list of a generator's values
    attempts: int = 0  # times it started running (> 1: re-run after a crash)
    webhook_pending: bool = False
    created_at: float = 0.0  # unix seconds
    started_at: float | None = None
    finished_at: float | None = None
    run_time_ms: int | None = None

    @property
    def done(self) -> bool:
        return self.state in TERMINAL


COLUMNS = tuple(f.name for f in fields(Run))
_JSON_COLUMNS = ("input", "output", "error")
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, surface TEXT NOT NULL, app TEXT NOT NULL, function TEXT NOT NULL,
    input BLOB NOT NULL, state TEXT NOT NULL, webhook TEXT, timeout_ms INTEGER,
    output BLOB, error BLOB, streamed INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0, webhook_pending INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, started_at REAL, finished_at REAL, run_time_ms INTEGER
);
CREATE INDEX IF NOT EXISTS runs_by_state ON runs (state);
CREATE INDEX IF NOT EXISTS runs_by_app ON runs (app, surface);
CREATE INDEX IF NOT EXISTS runs_by_finish ON runs (finished_at);
"""


def error_record(error: HTTPError) -> dict:
    return {"status": error.status, **error.to_dict()["error"]}


class StoreBusy(RuntimeError):
    """Another server holds the store's file."""


class RunStore:
    """Runs in SQLite: WAL, ``synchronous=FULL``, every statement on the store's one thread.

    ``path`` "" keeps them in memory (gone with the process; for tests). A file is
    created on first use, so a server that never takes a run leaves nothing behind;
    ``<path>.lock`` (flock) keeps a second server off the same file.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="runnel-runs")
        self._closed = False

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    async def _do(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- opening and closing (on the store's thread) --------------------------------
    async def open(self, *, create: bool) -> bool:
        """Open (and create, when ``create``) the store; False when there is no file yet."""
        return await self._do(self._open, create)

    def _open(self, create: bool) -> bool:
        if self._conn is not None:
            return True
        if self.path:
            if not create and not os.path.exists(self.path):
                return False
            self._lock()
        try:
            conn = sqlite3.connect(self.path or ":memory:", isolation_level=None)
        except BaseException:
            self._unlock()
            raise
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.executescript(SCHEMA)
        except BaseException:
            conn.close()
            self._unlock()
            raise
        self._conn = conn
        return True

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no guard against a second server
            return
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreBusy(f"{self.path} is in use by another runnel server") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._do(self._close)
        finally:
            self._pool.shutdown(wait=False)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        self._unlock()

    # -- statements ----------------------------------------------------------------------
    async def insert(self, run: Run) -> None:
        await self._do(self._insert, run)

    def _insert(self, run: Run) -> None:
        values = [getattr(run, name) for name in COLUMNS]
        for name in _JSON_COLUMNS:
            index = COLUMNS.index(name)
            if values[index] is not None or name == "input":  # a job's input may be null
                values[index] = orjson.dumps(values[index])
        self._conn.execute(f"INSERT INTO runs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                           values)

    async def get(self, run_id: str) -> Run | None:
        return await self._do(self._get, run_id)

    def _get(self, run_id: str) -> Run | None:
        if self._conn is None:
            return None
        row = self._conn.execute(f"SELECT {', '.join(COLUMNS)} FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            return None
        values = dict(zip(COLUMNS, row))
        for name in _JSON_COLUMNS:
            if values[name] is not None:
                values[name] = orjson.loads(values[name])
        values["streamed"] = bool(values["streamed"])
        values["webhook_pending"] = bool(values["webhook_pending"])
        return Run(**values)

    async def claim(self, run_id: str) -> Run | None:
        """queued -> running; None when the run is no longer queued (cancelled)."""
        return await self._do(self._claim, run_id)

    def _claim(self, run_id: str) -> Run | None:
        cursor = self._conn.execute(
            "UPDATE runs SET state = ?, started_at = ?, attempts = attempts + 1 WHERE id = ? AND state = ?",
            (RUNNING, time.time(), run_id, QUEUED))
        return self._get(run_id) if cursor.rowcount == 1 else None

    async def finish(self, run_id: str, state: str, *, from_states=(RUNNING,), output: bytes | None = None,
                     error: HTTPError | None = None, streamed: bool = False,
                     run_time_ms: int | None = None) -> bool:
        """Move a run in one of ``from_states`` to the final ``state``; False if it was not in one."""
        return await self._do(self._finish, run_id, state, tuple(from_states), output,
                              None if error is None else orjson.dumps(error_record(error)), streamed, run_time_ms)

    def _finish(self, run_id, state, from_states, output, error, streamed, run_time_ms) -> bool:
        cursor = self._conn.execute(
            f"UPDATE runs SET state = ?, output = ?, error = ?, streamed = ?, run_time_ms = ?, finished_at = ? "
            f"WHERE id = ? AND state IN ({', '.join('?' * len(from_states))})",
            (state, output, error, int(streamed), run_time_ms, time.time(), run_id, *from_states))
        return cursor.rowcount == 1

    async def recover(self, idempotent_apps, interrupted: HTTPError) -> list[str]:
        """Runs a dead process left running: re-queued (idempotent apps) or failed.
        Returns the ids of every queued run, oldest first."""
        return await self._do(self._recover, tuple(idempotent_apps), orjson.dumps(error_record(interrupted)))

    def _recover(self, idempotent: tuple, error: bytes) -> list[str]:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            if idempotent:
                conn.execute(f"UPDATE runs SET state = ?, started_at = NULL WHERE state = ? "
                             f"AND app IN ({', '.join('?' * len(idempotent))})", (QUEUED, RUNNING, *idempotent))
            conn.execute("UPDATE runs SET state = ?, error = ?, finished_at = ? WHERE state = ?",
                         (FAILED, error, time.time(), RUNNING))
            queued = [row[0] for row in conn.execute("SELECT id FROM runs WHERE state = ? ORDER BY rowid", (QUEUED,))]
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return queued

    async def purge(self, before: float) -> int:
        """Delete runs finished before ``before`` (unix seconds)."""
        return await self._do(self._purge, before)

    def _purge(self, before: float) -> int:
        if self._conn is None:
            return 0
        return self._conn.execute("DELETE FROM runs WHERE finished_at < ?", (before,)).rowcount

    async def webhook_done(self, run_id: str) -> None:
        await self._do(self._webhook_done, run_id)

    def _webhook_done(self, run_id: str) -> None:
        self._conn.execute("UPDATE runs SET webhook_pending = 0 WHERE id = ?", (run_id,))

    async def pending_webhooks(self) -> list[Run]:
        return await self._do(self._pending_webhooks)

    def _pending_webhooks(self) -> list[Run]:
        placeholders = ", ".join("?" * len(TERMINAL))
        ids = self._conn.execute(f"SELECT id FROM runs WHERE webhook_pending = 1 AND state IN ({placeholders}) "
                                 "ORDER BY rowid", tuple(TERMINAL)).fetchall()
        return [run for (run_id,) in ids if (run := self._get(run_id)) is not None]

    async def counts(self, app: str, surface: str, since: float) -> dict[str, int]:
        """Runs of ``app`` from ``surface`` per state (finished ones since ``since``), plus
        ``"retried"``: those run more than once."""
        return await self._do(self._counts, app, surface, since)

    def _counts(self, app: str, surface: str, since: float) -> dict[str, int]:
        counts = dict.fromkeys((QUEUED, RUNNING, *TERMINAL, "retried"), 0)
        if self._conn is None:
            return counts
        rows = self._conn.execute(
            "SELECT state, COUNT(*), SUM(attempts > 1) FROM runs WHERE app = ? AND surface = ? "
            "AND (finished_at IS NULL OR finished_at >= ?) GROUP BY state", (app, surface, since))
        for state, count, retried in rows:
            counts[state] = count
            counts["retried"] += retried or 0
        return counts
