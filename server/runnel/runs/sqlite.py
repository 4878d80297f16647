"""The SQLite run store: runs on one host, durable across crashes (the default store).

One table of runs, in WAL mode with ``synchronous=FULL``, written in autocommit on
the store's one thread so the event loop never waits on the disk. A run is
recorded before its caller is answered; every state change is one committed
``UPDATE ... WHERE`` that applies only if the run is still in the state (and
claim) the writer expects (see ``runnel.runs.store`` for the states and claims).

``<path>.lock`` (flock) keeps a second server off the file, so when this store
opens a file, every claim in it belongs to a process that is gone: ``open``
expires them all at once, and the runner's first ``recover`` takes them back
without waiting for their leases to run out.

Workers of one supervisor (``runnel serve --workers N``) share one file: the
supervisor takes the lock and expires the old claims (``hold_for_workers``) before
any worker starts, and each worker opens the file ``under_supervisor``: no lock, no expiring
(a claim in it may be a sibling's). Claims stay exactly-once: each is one
``UPDATE ... WHERE state = 'queued'``, atomic across processes in WAL mode. A worker
that dies leaves its claims to expire by lease, for a sibling's ``recover``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields

import orjson

from ..errors import HTTPError
from .store import (
    ANYONE,
    FAILED,
    QUEUED,
    RUNNING,
    TERMINAL,
    TIMED_OUT,
    QueueFull,
    Recovered,
    Run,
    StoreUnavailable,
    error_record,
)

logger = logging.getLogger("runnel.runs")

__all__ = ["SQLiteRunStore"]

COLUMNS = tuple(f.name for f in fields(Run))
_JSON_COLUMNS = ("input", "output", "error")
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, surface TEXT NOT NULL, app TEXT NOT NULL, function TEXT NOT NULL,
    input BLOB NOT NULL, state TEXT NOT NULL, webhook TEXT, timeout_ms INTEGER,
    output BLOB, error BLOB, streamed INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0, webhook_pending INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, started_at REAL, finished_at REAL, run_time_ms INTEGER,
    owner TEXT, lease_until REAL, principal TEXT NOT NULL DEFAULT '{ANYONE}',
    idempotency_key TEXT, request_hash TEXT, deadline REAL
);
CREATE INDEX IF NOT EXISTS runs_by_state ON runs (state);
CREATE INDEX IF NOT EXISTS runs_by_app ON runs (app, surface);
CREATE INDEX IF NOT EXISTS runs_by_finish ON runs (finished_at);
"""
# Columns added since the first release, for files an older server made. An older file's
# runs were bound to no one: they become the anonymous caller's (readable where auth is off).
_ADDED_COLUMNS = (("owner", "TEXT"), ("lease_until", "REAL"), ("principal", f"TEXT NOT NULL DEFAULT '{ANYONE}'"),
                  ("idempotency_key", "TEXT"), ("request_hash", "TEXT"), ("deadline", "REAL"))
# After the columns exist. Unique: of two inserts with one key, the second cannot write.
INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS runs_by_idempotency_key ON runs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS runs_by_deadline ON runs (deadline) WHERE deadline IS NOT NULL AND state = 'queued';
"""


class SQLiteRunStore:
    """Runs in SQLite: WAL, ``synchronous=FULL``, every statement on the store's one thread.

    ``path`` "" keeps them in memory (gone with the process; for tests). A file is
    created on first use, so a server that never takes a run leaves nothing behind.
    ``key`` is the setting that named the path, for errors. With ``make_directory``
    the file's directory is made when the file is (the per-user default's); else it
    must exist. ``under_supervisor``: the file's lock is held by this process's supervisor, for
    its workers (see the module's doc).
    """

    shared = False  # not a store several servers share (runnel.runs.store.SharedRunStore)

    def __init__(self, path: str, *, key: str = "server.runs_path", make_directory: bool = False,
                 under_supervisor: bool = False) -> None:
        self.path = path
        self.make_directory = make_directory
        self.under_supervisor = under_supervisor
        self.name = path or "(memory)"
        self.key = key
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="runnel-runs")
        self._closed = False

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    def _open_connection(self) -> sqlite3.Connection:
        """The connection, for statements that write: writing to a store not open is a bug."""
        conn = self._conn
        if conn is None:
            raise RuntimeError(f"run store {self.name} is not open")
        return conn

    async def _do(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- opening and closing (on the store's thread) --------------------------------
    async def open(self, *, create: bool) -> bool:
        return await self._do(self._open, create)

    def _open(self, create: bool) -> bool:
        if self._conn is not None:
            return True
        if self.path:
            directory = os.path.dirname(self.path)
            if self.make_directory and not os.path.isdir(directory):
                if not create:
                    return False  # nothing to recover
                os.makedirs(directory, mode=0o700, exist_ok=True)
            if not os.path.isdir(directory):
                raise StoreUnavailable(f"no such directory: {directory}", key=self.key)
            if not create and not os.path.exists(self.path):
                return False
            if not self.under_supervisor:
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
            have = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
            for name, kind in _ADDED_COLUMNS:
                if name not in have:
                    conn.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")
            conn.executescript(INDEXES)
            if self._lock_fd is not None:  # we hold the file alone: whoever claimed these is gone
                conn.execute("UPDATE runs SET lease_until = 0 WHERE state = ?", (RUNNING,))
        except BaseException:
            conn.close()
            self._unlock()
            raise
        self._conn = conn
        return True

    def hold_for_workers(self) -> None:
        """(A supervisor, before its workers start; blocking) take the file's lock for the
        workers that will open it ``under_supervisor``, and expire every claim in it: no worker runs
        yet, so whoever claimed them is gone. Held until ``release``."""
        if not self.path:
            raise StoreUnavailable("runs kept in memory (\"\") cannot be shared by several workers; give "
                                   "them a file", key=self.key)
        if self.make_directory:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        if not self._open(create=False):  # no file yet: nothing to expire, but the lock all the same
            self._lock()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def release(self) -> None:
        """Let go of the lock ``hold_for_workers`` took."""
        self._unlock()

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no guard against a second server, claims expire by lease only
            return
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreUnavailable(
                f"{self.path} is in use by another runnel server; give this one its own run store with "
                "[server] runs_path or the RUNNEL_RUNS_PATH environment variable", key=self.key) from None
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
    async def insert(self, run: Run, *, max_queued: int | None = None) -> Run:
        return await self._do(self._insert, run, max_queued)

    def _insert(self, run: Run, max_queued: int | None) -> Run:
        values = [getattr(run, name) for name in COLUMNS]
        for name in _JSON_COLUMNS:
            index = COLUMNS.index(name)
            if values[index] is not None or name == "input":  # a job's input may be null
                values[index] = orjson.dumps(values[index])
        conn = self._open_connection()
        # One transaction, taken for writing up front, so that the key lookup, the count
        # and the insert see the same runs, even with other processes on the file.
        conn.execute("BEGIN IMMEDIATE")
        try:
            if run.idempotency_key is not None:
                row = conn.execute("SELECT id FROM runs WHERE idempotency_key = ?", (run.idempotency_key,)).fetchone()
                if row is not None:
                    conn.execute("COMMIT")
                    existing = self._get(row[0])
                    assert existing is not None  # only this thread deletes, and not in between
                    return existing
            if max_queued is not None:
                (count,) = conn.execute("SELECT COUNT(*) FROM runs WHERE state = ?", (QUEUED,)).fetchone()
                if count >= max_queued:
                    raise QueueFull(max_queued)
            conn.execute(f"INSERT INTO runs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                         values)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return run

    async def get(self, run_id: str) -> Run | None:
        return await self._do(self._get, run_id)

    def _get(self, run_id: str) -> Run | None:
        if self._conn is None:
            return None
        row = self._conn.execute(f"SELECT {', '.join(COLUMNS)} FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            return None
        values = dict(zip(COLUMNS, row, strict=True))
        for name in _JSON_COLUMNS:
            if values[name] is not None:
                values[name] = orjson.loads(values[name])
        values["streamed"] = bool(values["streamed"])
        values["webhook_pending"] = bool(values["webhook_pending"])
        return Run(**values)

    async def queued(self) -> list[str]:
        return await self._do(self._queued)

    def _queued(self) -> list[str]:
        if self._conn is None:
            return []
        return [row[0] for row in self._conn.execute("SELECT id FROM runs WHERE state = ? ORDER BY rowid", (QUEUED,))]

    async def claim(self, run_id: str, owner: str, lease: float) -> Run | None:
        return await self._do(self._claim, run_id, owner, lease)

    def _claim(self, run_id: str, owner: str, lease: float) -> Run | None:
        now = time.time()
        cursor = self._open_connection().execute(
            "UPDATE runs SET state = ?, owner = ?, lease_until = ?, started_at = ?, attempts = attempts + 1 "
            "WHERE id = ? AND state = ?", (RUNNING, owner, now + lease, now, run_id, QUEUED))
        return self._get(run_id) if cursor.rowcount == 1 else None

    async def renew(self, owner: str, lease: float) -> int:
        return await self._do(self._renew, owner, lease)

    def _renew(self, owner: str, lease: float) -> int:
        if self._conn is None:
            return 0
        return self._conn.execute("UPDATE runs SET lease_until = ? WHERE owner = ? AND state = ?",
                                  (time.time() + lease, owner, RUNNING)).rowcount

    async def finish(self, run_id: str, state: str, *, owner: str | None = None, output: bytes | None = None,
                     error: HTTPError | None = None, streamed: bool = False,
                     run_time_ms: int | None = None) -> bool:
        return await self._do(self._finish, run_id, state, owner, output,
                              None if error is None else orjson.dumps(error_record(error)), streamed, run_time_ms)

    def _finish(self, run_id, state, owner, output, error, streamed, run_time_ms) -> bool:
        values: tuple[str, ...]
        if owner is None:
            expected, values = "state = ?", (QUEUED,)
        else:
            expected, values = "state = ? AND owner = ?", (RUNNING, owner)
        cursor = self._open_connection().execute(
            f"UPDATE runs SET state = ?, output = ?, error = ?, streamed = ?, run_time_ms = ?, finished_at = ?, "
            f"lease_until = NULL WHERE id = ? AND {expected}",
            (state, output, error, int(streamed), run_time_ms, time.time(), run_id, *values))
        return cursor.rowcount == 1

    async def recover(self, idempotent_apps: Collection[str], interrupted: HTTPError) -> Recovered:
        return await self._do(self._recover, frozenset(idempotent_apps), orjson.dumps(error_record(interrupted)))

    def _recover(self, idempotent: frozenset[str], error: bytes) -> Recovered:
        recovered = Recovered()
        conn = self._conn
        if conn is None:
            return recovered
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        try:
            expired = conn.execute("SELECT id, app FROM runs WHERE state = ? AND "
                                   "(lease_until IS NULL OR lease_until <= ?) ORDER BY rowid", (RUNNING, now))
            for run_id, app in expired.fetchall():
                if app in idempotent:
                    conn.execute("UPDATE runs SET state = ?, owner = NULL, lease_until = NULL, started_at = NULL "
                                 "WHERE id = ?", (QUEUED, run_id))
                    recovered.requeued.append(run_id)
                else:
                    conn.execute("UPDATE runs SET state = ?, error = ?, finished_at = ?, lease_until = NULL "
                                 "WHERE id = ?", (FAILED, error, now, run_id))
                    recovered.failed.append(run_id)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return recovered

    async def requeue(self, run_id: str, states: Collection[str], *, max_queued: int | None = None) -> bool:
        return await self._do(self._requeue, run_id, tuple(states), max_queued)

    def _requeue(self, run_id: str, states: tuple[str, ...], max_queued: int | None) -> bool:
        conn = self._open_connection()
        conn.execute("BEGIN IMMEDIATE")  # the count and the update see the same runs
        try:
            if max_queued is not None:
                (count,) = conn.execute("SELECT COUNT(*) FROM runs WHERE state = ?", (QUEUED,)).fetchone()
                if count >= max_queued:
                    raise QueueFull(max_queued)
            cursor = conn.execute(
                "UPDATE runs SET state = ?, output = NULL, error = NULL, streamed = 0, started_at = NULL, "
                "finished_at = NULL, run_time_ms = NULL, owner = NULL, lease_until = NULL, deadline = NULL, "
                f"webhook_pending = webhook IS NOT NULL WHERE id = ? AND state IN ({', '.join('?' * len(states))})",
                (QUEUED, run_id, *states))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return cursor.rowcount == 1

    async def expire(self, now: float, error: HTTPError) -> list[str]:
        return await self._do(self._expire, now, orjson.dumps(error_record(error)))

    def _expire(self, now: float, error: bytes) -> list[str]:
        conn = self._conn
        if conn is None:
            return []
        # A read first (the state as a literal, so that the partial index runs_by_deadline
        # applies): most sweeps find nothing due, and then take no write lock at all.
        due = [run_id for (run_id,) in conn.execute(
            f"SELECT id FROM runs WHERE deadline IS NOT NULL AND state = '{QUEUED}' AND deadline <= ? "
            "AND attempts = 0 ORDER BY rowid", (now,))]
        if not due:
            return []
        expired = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for run_id in due:  # each still queued and never claimed, or left alone (claimed meanwhile)
                if conn.execute("UPDATE runs SET state = ?, error = ?, finished_at = ? WHERE id = ? AND state = ? "
                                "AND attempts = 0", (TIMED_OUT, error, now, run_id, QUEUED)).rowcount == 1:
                    expired.append(run_id)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return expired

    async def delete(self, run_id: str) -> bool:
        return await self._do(self._delete, run_id)

    def _delete(self, run_id: str) -> bool:
        if self._conn is None:
            return False
        return self._conn.execute("DELETE FROM runs WHERE id = ?", (run_id,)).rowcount == 1

    async def purge(self, before: float) -> int:
        return await self._do(self._purge, before)

    def _purge(self, before: float) -> int:
        if self._conn is None:
            return 0
        return self._conn.execute("DELETE FROM runs WHERE finished_at < ?", (before,)).rowcount

    async def webhook_done(self, run_id: str) -> None:
        await self._do(self._webhook_done, run_id)

    def _webhook_done(self, run_id: str) -> None:
        self._open_connection().execute("UPDATE runs SET webhook_pending = 0 WHERE id = ?", (run_id,))

    async def pending_webhooks(self) -> list[Run]:
        return await self._do(self._pending_webhooks)

    def _pending_webhooks(self) -> list[Run]:
        if self._conn is None:
            return []
        placeholders = ", ".join("?" * len(TERMINAL))
        ids = self._conn.execute(f"SELECT id FROM runs WHERE webhook_pending = 1 AND state IN ({placeholders}) "
                                 "ORDER BY rowid", tuple(TERMINAL)).fetchall()
        return [run for (run_id,) in ids if (run := self._get(run_id)) is not None]

    async def counts(self, app: str, surface: str, since: float) -> dict[str, int]:
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
