"""The run store's claims (runnel.runs.store), on the SQLite store with real files and on
the Redis store with a real redis-server (the tests taking ``with_any_store`` run on both).

What a store shared by several runners must guarantee: of two claimants one wins;
a claim is the owner's alone until it expires; an expired claim is taken back
(queued again, or failed as interrupted) and can then be taken over, after which
the old owner's result is refused; renewing keeps a claim alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time

import pytest

from runnel.cli import run as run_on_uvloop
from runnel.errors import HTTPError
from runnel.runs import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    QueueFull,
    Run,
    RunStore,
    SharedRunStore,
    SQLiteRunStore,
    StoreUnavailable,
)
from runnel.runs.redis import RedisRunStore

INTERRUPTED = HTTPError(500, "The run was interrupted", code="interrupted")
LONG, EXPIRED = 60.0, 0.0  # leases, in seconds


def new_run(run_id: str, app: str = "lab") -> Run:
    return Run(id=run_id, surface="cortex", app=app, function="f", input={"x": 1}, created_at=time.time())


def with_store(path, body, *, create: bool = True):
    """Run ``body(store)`` on a fresh event loop with the store open; closes it after."""
    async def main():
        store = SQLiteRunStore(str(path))
        try:
            assert await store.open(create=create)
            return await body(store)
        finally:
            await store.close()

    return run_on_uvloop(main())


@pytest.fixture(params=["sqlite", "redis"])
def with_any_store(request, tmp_path):
    """``with_any_store(body)``: ``body(store)`` on an open store of each kind, a fresh one."""
    if request.param == "sqlite":
        return lambda body: with_store(tmp_path / "runs.sqlite3", body)
    url = request.getfixturevalue("redis_url")

    def run(body):
        async def main():
            store = RedisRunStore(url, retention=60)
            try:
                assert await store.open(create=True)
                return await body(store)
            finally:
                await store.close()

        return run_on_uvloop(main())

    return run


def test_the_sqlite_store_implements_the_interface():
    interface = {name for name in vars(RunStore) if not name.startswith("_")}
    assert interface <= set(dir(SQLiteRunStore)), interface - set(dir(SQLiteRunStore))
    assert SQLiteRunStore.shared is False


def test_the_redis_store_implements_the_shared_interface():
    interface = {name for name in (*vars(RunStore), *vars(SharedRunStore)) if not name.startswith("_")}
    assert interface <= set(dir(RedisRunStore)), interface - set(dir(RedisRunStore))
    assert RedisRunStore.shared is True


def test_of_two_claimants_one_wins(with_any_store):
    async def body(store):
        await store.insert(new_run("r1"))
        claims = await asyncio.gather(*(store.claim("r1", owner, LONG) for owner in ("a", "b", "c")))
        winners = [claim for claim in claims if claim is not None]
        assert len(winners) == 1
        won = winners[0]
        assert (won.state, won.attempts) == (RUNNING, 1) and won.owner in ("a", "b", "c")
        assert won.lease_until > time.time() + LONG - 5
        assert await store.claim("r1", "d", LONG) is None  # not queued any more
        return won.owner

    with_any_store(body)


def test_only_the_owner_finishes_a_running_run(with_any_store):
    async def body(store):
        await store.insert(new_run("r1"))
        await store.claim("r1", "a", LONG)
        assert not await store.finish("r1", SUCCEEDED, owner="b", output=b'"theirs"')
        assert not await store.finish("r1", CANCELLED)  # owner None: queued runs only
        assert (await store.get("r1")).state == RUNNING
        assert await store.finish("r1", SUCCEEDED, owner="a", output=b'"ours"')
        run = await store.get("r1")
        assert (run.state, run.output, run.lease_until) == (SUCCEEDED, "ours", None)
        assert not await store.finish("r1", FAILED, owner="a")  # final states are final

    with_any_store(body)


def test_a_queued_run_is_finished_without_an_owner(with_any_store):
    async def body(store):
        await store.insert(new_run("r1"))
        assert not await store.finish("r1", CANCELLED, owner="a")  # nobody owns a queued run
        assert await store.finish("r1", CANCELLED)
        assert await store.claim("r1", "a", LONG) is None

    with_any_store(body)


@pytest.mark.parametrize("idempotent", [False, True])
def test_an_expired_claim_is_taken_back_and_the_old_owner_refused(with_any_store, idempotent):
    async def body(store):
        for run_id in ("dead", "alive", "waiting"):
            await store.insert(new_run(run_id))
        await store.claim("dead", "a", EXPIRED)
        await store.claim("alive", "b", LONG)
        recovered = await store.recover({"lab"} if idempotent else set(), INTERRUPTED)
        if idempotent:
            assert (recovered.requeued, recovered.failed) == (["dead"], [])
            assert (await store.get("dead")).state == QUEUED
            assert await store.queued() == ["dead", "waiting"]
            taken = await store.claim("dead", "b", LONG)  # taken over
            assert (taken.owner, taken.attempts) == ("b", 2)
            assert not await store.finish("dead", SUCCEEDED, owner="a", output=b'"late"')
            assert await store.finish("dead", SUCCEEDED, owner="b", output=b'"again"')
            assert (await store.get("dead")).output == "again"
        else:
            assert (recovered.requeued, recovered.failed) == ([], ["dead"])
            run = await store.get("dead")
            assert (run.state, run.error["code"], run.error["status"]) == (FAILED, "interrupted", 500)
            assert not await store.finish("dead", SUCCEEDED, owner="a", output=b'"late"')
            assert (await store.get("dead")).state == FAILED
        alive = await store.get("alive")  # a live claim is left alone
        assert (alive.state, alive.owner) == (RUNNING, "b")

    with_any_store(body)


def test_renewing_keeps_a_claim_alive(with_any_store):
    async def body(store):
        await store.insert(new_run("r1"))
        await store.insert(new_run("r2"))
        await store.claim("r1", "a", 0.2)
        await store.claim("r2", "b", 0.2)
        assert await store.renew("a", LONG) == 1  # only a's claim
        await asyncio.sleep(0.3)  # b's lease runs out
        recovered = await store.recover(set(), INTERRUPTED)
        assert recovered.failed == ["r2"]
        assert (await store.get("r1")).state == RUNNING

    with_any_store(body)


def test_opening_a_file_expires_the_claims_of_the_process_that_left_it(tmp_path):
    path = tmp_path / "runs.sqlite3"

    async def left(store):
        await store.insert(new_run("r1"))
        await store.claim("r1", "gone", LONG)  # a long lease: only the file lock says it is dead

    async def reopened(store):
        assert (await store.recover(set(), INTERRUPTED)).failed == ["r1"]

    with_store(path, left)
    with_store(path, reopened, create=False)


def test_a_second_store_on_the_same_file_is_refused(tmp_path):
    path = tmp_path / "runs.sqlite3"

    async def body(store):
        other = SQLiteRunStore(str(path))
        with pytest.raises(StoreUnavailable) as caught:
            await other.open(create=True)
        await other.close()
        assert caught.value.key == "server.runs_path" and "in use" in str(caught.value)

    with_store(path, body)


def test_a_file_from_before_claims_is_upgraded(tmp_path):
    path = tmp_path / "runs.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as conn:  # the first release's table
        conn.execute("""CREATE TABLE runs (
            id TEXT PRIMARY KEY, surface TEXT NOT NULL, app TEXT NOT NULL, function TEXT NOT NULL,
            input BLOB NOT NULL, state TEXT NOT NULL, webhook TEXT, timeout_ms INTEGER,
            output BLOB, error BLOB, streamed INTEGER NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0, webhook_pending INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL, started_at REAL, finished_at REAL, run_time_ms INTEGER)""")
        conn.execute("INSERT INTO runs (id, surface, app, function, input, state, created_at, attempts) "
                     "VALUES ('old', 'cortex', 'lab', 'f', '{}', 'running', 0, 1)")
        conn.commit()

    async def body(store):
        assert (await store.recover(set(), INTERRUPTED)).failed == ["old"]
        await store.insert(new_run("new"))
        assert (await store.claim("new", "a", LONG)).owner == "a"
        old = await store.get("old")  # bound to no one before: the anonymous caller's now
        assert (old.principal, old.idempotency_key, old.request_hash) == ("anonymous", None, None)

    with_store(path, body, create=False)


def keyed_run(run_id: str, key: str, principal: str = "key:01") -> Run:
    run = new_run(run_id)
    run.principal, run.idempotency_key, run.request_hash = principal, key, "h"
    return run


async def insert_one_of_twenty_keyed(store):
    recorded = await asyncio.gather(*(store.insert(keyed_run(f"r{i}", "k")) for i in range(20)))
    assert {run.id for run in recorded} == {"r0"}
    assert await store.queued() == ["r0"]
    assert (await store.get("r0")).principal == "key:01"


def test_an_idempotency_key_is_recorded_once_in_redis(redis_url):
    async def main():
        stores = [RedisRunStore(redis_url, retention=60) for _ in range(2)]  # two servers' stores
        try:
            for store in stores:
                await store.open(create=True)
            recorded = await asyncio.gather(*(stores[i % 2].insert(keyed_run(f"r{i}", "k")) for i in range(20)))
            winners = {run.id for run in recorded}  # whichever reached Redis first
            assert len(winners) == 1
            assert await stores[1].queued() == list(winners)
        finally:
            for store in stores:
                await store.close()

    run_on_uvloop(main())


def test_an_idempotency_key_is_recorded_once(tmp_path):
    path = tmp_path / "runs.sqlite3"
    with_store(path, insert_one_of_twenty_keyed)
    with contextlib.closing(sqlite3.connect(path)) as conn, pytest.raises(sqlite3.IntegrityError):
        # The unique index, not only the lookup, keeps a key to one run (other writers, races).
        conn.execute("INSERT INTO runs (id, surface, app, function, input, state, created_at, idempotency_key) "
                     "VALUES ('other', 'cortex', 'lab', 'f', '{}', 'queued', 0, 'k')")


def test_insert_refuses_past_max_queued_counting_queued_runs_only(with_any_store):
    async def body(store):
        await store.insert(new_run("r1"), max_queued=2)
        await store.insert(new_run("r2"), max_queued=2)
        with pytest.raises(QueueFull) as caught:
            await store.insert(new_run("r3"), max_queued=2)
        assert caught.value.limit == 2
        assert (await store.insert(keyed_run("r4", "k"), max_queued=None)).id == "r4"  # unbounded: recorded
        await store.claim("r1", "a", LONG)
        await store.claim("r2", "a", LONG)  # running runs do not count
        await store.insert(new_run("r5"), max_queued=2)
        # A retry of a recorded run is answered even while the queue is full.
        assert (await store.insert(keyed_run("r6", "k"), max_queued=1)).id == "r4"
        assert await store.queued() == ["r4", "r5"]

    with_any_store(body)


def test_final_runs_are_recorded_purged_deleted_and_their_webhooks_tracked(with_any_store):
    async def body(store):
        done = new_run("done")  # a call that ran in the foreground, kept (Runner.record)
        done.state, done.output, done.finished_at = SUCCEEDED, {"a": 1}, time.time() - 10
        await store.insert(done)
        assert (await store.get("done")).output == {"a": 1}
        hooked = new_run("hooked")
        hooked.webhook, hooked.webhook_pending = "http://127.0.0.1:1/hook", True
        await store.insert(hooked)
        await store.insert(new_run("kept"))
        assert await store.queued() == ["hooked", "kept"]
        await store.claim("hooked", "a", LONG)
        assert await store.pending_webhooks() == []  # not finished yet
        assert await store.finish("hooked", SUCCEEDED, owner="a", output=b"1")
        assert [run.id for run in await store.pending_webhooks()] == ["hooked"]
        await store.webhook_done("hooked")
        assert await store.pending_webhooks() == []
        counts = await store.counts("lab", "cortex", time.time() - 60)
        assert {k: v for k, v in counts.items() if v} == {QUEUED: 1, SUCCEEDED: 2}
        assert await store.purge(time.time() - 5) == 1  # "done" only: finished 10 s ago
        assert await store.get("done") is None and (await store.get("hooked")).state == SUCCEEDED
        assert await store.delete("kept") and not await store.delete("kept")
        assert await store.get("kept") is None and await store.queued() == []

    with_any_store(body)


def test_runs_a_dead_server_was_delivered_are_claimed_back_by_a_live_one(redis_url):
    """The Redis queue: a run goes to one runner; one delivered to a runner that died before
    claiming it goes to a live runner once idle past the lease (XAUTOCLAIM); one it was
    running is left to recover(); a finished one is acknowledged, never handed out."""
    lease = 0.3

    async def main():
        dead, live = RedisRunStore(redis_url, retention=60), RedisRunStore(redis_url, retention=60)
        try:
            for store in (dead, live):
                await store.open(create=True)
            for run_id in ("taken", "running", "finished"):
                await dead.insert(new_run(run_id))
            assert await dead.take("dead", lease, 3) == ["taken", "running", "finished"]
            assert await live.take("live", lease, 3) == []  # delivered to one runner only
            await dead.claim("running", "dead", LONG)
            await dead.claim("finished", "dead", LONG)
            await dead.finish("finished", SUCCEEDED, owner="dead", output=b"1")
            await asyncio.sleep(lease + 0.1)
            assert await live.take("live", lease, 3) == ["taken"]
            assert (await live.claim("taken", "live", LONG)).attempts == 1
            assert await live.take("live", lease, 3) == []
        finally:
            for store in (dead, live):
                await store.close()

    run_on_uvloop(main())
