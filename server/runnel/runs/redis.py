"""The Redis run store: runs shared by several servers (``[server] runs = "redis://host:port/db"``).

Every server pointed at one Redis database shares its runs: any of them accepts a run,
any of them executes it (exactly one does: claims are atomic), and every one of them
answers for its status, result, RunPod ``/stream`` values and cancel.

Keys (all under ``runnel:``; one Redis, not Redis Cluster: the scripts touch keys they
build themselves)::

    run:ID           hash: the Run's fields, each as JSON, and ``_entry``: its stream entry
    idem:KEY         string: the run an Idempotency-Key made (expires with the run)
    stream           the queue: a Redis Stream, consumer group ``runners``; an entry per
                     queued run, delivered to one runner (its owner id is the consumer),
                     XACKed and deleted when the run finishes
    queued           zset of queued runs (by creation): ``queued()`` and ``max_queued``
    leases           zset of running runs by ``lease_until``: what ``recover`` looks at
    owner:OWNER      set of the runs a runner holds: what ``renew`` extends
    finished         zset of final runs by ``finished_at``: what ``purge`` deletes
    deadlines        zset of runs queued with a deadline, by it: what ``expire`` looks at
                     (an entry stays until its deadline passes, whatever became of the run)
    webhooks         zset of final runs whose webhook is not yet delivered
    app:SURFACE:APP  zset of an app's runs (RunPod ``/health`` counts)
    values:ID        list: a running generator's values so far, for ``/stream`` anywhere

Channels ``runnel:DB:cancel`` and ``runnel:DB:done`` carry run ids: a cancel asked on one
server reaches the server executing the run, and a run finished anywhere wakes the
``/runsync`` waiting for it on any server.

Every change of state is one Lua script, so it applies atomically and only if the run
is still in the state (and claim) the caller expects, as ``runnel.runs.store`` requires.
Finished runs' keys expire by themselves ``retention`` seconds after they finish (a
Redis no server purges still forgets them); ``purge`` also cleans the indexes.

A claim's lease (``lease_until``) is in the servers' clocks: servers sharing a store
must keep their clocks in sync (NTP), to well within the lease.

Durability is Redis's: a run is written before its caller is answered, and survives a
Redis crash as far as Redis's persistence goes: with AOF and ``appendfsync everysec``
(the usual setting) the last second of writes may be lost, with ``appendfsync always``
none. Every call has a deadline (``CONNECT_TIMEOUT``, ``CALL_TIMEOUT``); a Redis that
cannot be reached makes the call raise ``StoreDown`` (503 with Retry-After).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import fields
from typing import Any
from urllib.parse import urlsplit

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import HTTPError
from .store import QUEUED, TERMINAL, QueueFull, Recovered, Run, StoreDown, error_record

logger = logging.getLogger("runnel.runs")

__all__ = ["RedisRunStore", "is_redis_url"]

PREFIX = "runnel:"
GROUP = "runners"
CONNECT_TIMEOUT = 2.0  # seconds to connect to Redis
CALL_TIMEOUT = 5.0  # seconds for any one reply (a blocking read waits TAKE_WAIT less than this)
TAKE_WAIT = 1.0  # seconds a runner's read of the queue blocks before it looks again
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)
_RUN_FIELDS = tuple(f.name for f in fields(Run))
_SCHEMES = ("redis", "rediss", "unix")


def is_redis_url(url: str) -> bool:
    return urlsplit(url).scheme in _SCHEMES


# Scripts: ARGV[1] is the key prefix, ARGV[2] the run id (where there is one). Field values are JSON,
# as Python writes them: a state is '"queued"', null is 'null'.

# A queued run's stream entry; the stream and its group are made with the first.
_ENQUEUE = """
local function enqueue(p, id)
  local stream = p .. 'stream'
  if redis.call('EXISTS', stream) == 0 then redis.call('XGROUP', 'CREATE', stream, '$GROUP', '0', 'MKSTREAM') end
  return redis.call('XADD', stream, '*', 'run', id)
end
""".replace("$GROUP", GROUP)

_INSERT = _ENQUEUE + """
local p, id, idem, max_queued, created, finished, expire_ms, deadline = ARGV[1], ARGV[2], ARGV[3],
    tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7], ARGV[10]
if idem ~= '' then
  local existing = redis.call('GET', p .. 'idem:' .. idem)
  if existing then return {'existing', existing} end
end
local key = p .. 'run:' .. id
local queued = finished == ''
if queued and max_queued >= 0 and redis.call('ZCARD', p .. 'queued') >= max_queued then return {'full'} end
redis.call('HSET', key, unpack(ARGV, 11))
if idem ~= '' then redis.call('SET', p .. 'idem:' .. idem, id) end
redis.call('ZADD', p .. 'app:' .. ARGV[8] .. ':' .. ARGV[9], created, id)
if queued then
  redis.call('ZADD', p .. 'queued', created, id)
  redis.call('HSET', key, '_entry', enqueue(p, id))
  if deadline ~= '' then redis.call('ZADD', p .. 'deadlines', deadline, id) end
else
  redis.call('ZADD', p .. 'finished', finished, id)
  if redis.call('HGET', key, 'webhook_pending') == 'true' then redis.call('ZADD', p .. 'webhooks', finished, id) end
  redis.call('PEXPIREAT', key, expire_ms)
  if idem ~= '' then redis.call('PEXPIREAT', p .. 'idem:' .. idem, expire_ms) end
end
return {'new'}
"""

_CLAIM = """
local p, id, owner, lease_until, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local key = p .. 'run:' .. id
if redis.call('HGET', key, 'state') ~= '"queued"' then return nil end
redis.call('HSET', key, 'state', '"running"', 'owner', cjson.encode(owner), 'lease_until', lease_until,
           'started_at', now)
redis.call('HINCRBY', key, 'attempts', 1)
redis.call('ZREM', p .. 'queued', id)
redis.call('ZADD', p .. 'leases', lease_until, id)
redis.call('SADD', p .. 'owner:' .. owner, id)
return redis.call('HGETALL', key)
"""

# The owner's entries are claimed again by it (XCLAIM resets their idle time), so that
# XAUTOCLAIM, which takes entries idle longer than a lease, takes only a dead runner's.
_RENEW = """
local p, owner, lease_until, group = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local encoded = cjson.encode(owner)
local n, entries = 0, {}
for _, id in ipairs(redis.call('SMEMBERS', p .. 'owner:' .. owner)) do
  local key = p .. 'run:' .. id
  local f = redis.call('HMGET', key, 'state', 'owner', '_entry')
  if f[1] == '"running"' and f[2] == encoded then
    redis.call('HSET', key, 'lease_until', lease_until)
    redis.call('ZADD', p .. 'leases', lease_until, id)
    n = n + 1
    if f[3] then entries[#entries + 1] = f[3] end
  else
    redis.call('SREM', p .. 'owner:' .. owner, id)
  end
end
if #entries > 0 then redis.call('XCLAIM', p .. 'stream', group, owner, 0, unpack(entries), 'JUSTID') end
return n
"""

# What every way to a final state shares: out of the live indexes, into the finished ones,
# the stream entry done, the keys set to expire, every server told.
_FINAL = """
local function final(p, id, key, finished_at, expire_ms, group, channel)
  local f = redis.call('HMGET', key, 'owner', '_entry', 'webhook_pending', 'idempotency_key')
  redis.call('ZREM', p .. 'queued', id)
  redis.call('ZREM', p .. 'leases', id)
  if f[1] and f[1] ~= 'null' then redis.call('SREM', p .. 'owner:' .. cjson.decode(f[1]), id) end
  if f[2] then
    redis.call('XACK', p .. 'stream', group, f[2])
    redis.call('XDEL', p .. 'stream', f[2])
    redis.call('HDEL', key, '_entry')
  end
  redis.call('ZADD', p .. 'finished', finished_at, id)
  if f[3] == 'true' then redis.call('ZADD', p .. 'webhooks', finished_at, id) end
  redis.call('PEXPIREAT', key, expire_ms)
  if f[4] and f[4] ~= 'null' then redis.call('PEXPIREAT', p .. 'idem:' .. cjson.decode(f[4]), expire_ms) end
  redis.call('DEL', p .. 'values:' .. id)
  redis.call('PUBLISH', channel, id)
end
"""

_FINISH = _FINAL + """
local p, id, owner, finished_at, expire_ms, group, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5],
    ARGV[6], ARGV[7]
local key = p .. 'run:' .. id
local f = redis.call('HMGET', key, 'state', 'owner')
if owner == '' then
  if f[1] ~= '"queued"' then return 0 end
elseif f[1] ~= '"running"' or f[2] ~= cjson.encode(owner) then
  return 0
end
redis.call('HSET', key, 'finished_at', finished_at, 'lease_until', 'null', unpack(ARGV, 8))
final(p, id, key, finished_at, expire_ms, group, channel)
return 1
"""

_RECOVER = _ENQUEUE + _FINAL + """
local p, now, group, channel, error, expire_ms = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local idempotent = {}
for i = 7, #ARGV do idempotent[ARGV[i]] = true end
local requeued, failed = {}, {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. 'leases', '-inf', now)) do
  local key = p .. 'run:' .. id
  local f = redis.call('HMGET', key, 'state', 'lease_until', 'app', 'owner', '_entry')
  if f[1] ~= '"running"' then
    redis.call('ZREM', p .. 'leases', id)
  elseif tonumber(f[2]) > now then
    redis.call('ZADD', p .. 'leases', f[2], id)
  elseif idempotent[f[3]] then
    redis.call('ZREM', p .. 'leases', id)
    if f[4] ~= 'null' then redis.call('SREM', p .. 'owner:' .. cjson.decode(f[4]), id) end
    if f[5] then
      redis.call('XACK', p .. 'stream', group, f[5])
      redis.call('XDEL', p .. 'stream', f[5])
    end
    redis.call('HSET', key, 'state', '"queued"', 'owner', 'null', 'lease_until', 'null', 'started_at', 'null',
               '_entry', enqueue(p, id))
    redis.call('ZADD', p .. 'queued', redis.call('HGET', key, 'created_at'), id)  -- in its place in line
    requeued[#requeued + 1] = id
  else
    redis.call('HSET', key, 'state', '"failed"', 'error', error, 'finished_at', ARGV[2], 'lease_until', 'null')
    final(p, id, key, ARGV[2], expire_ms, group, channel)
    failed[#failed + 1] = id
  end
end
return {requeued, failed}
"""

# Out of the finished indexes and back in line, its keys kept again until it finishes anew.
_REQUEUE = _ENQUEUE + """
local p, id, max_queued = ARGV[1], ARGV[2], tonumber(ARGV[3])
local key = p .. 'run:' .. id
local state = redis.call('HGET', key, 'state')
local allowed = false
for i = 4, #ARGV do if state == ARGV[i] then allowed = true end end
if not allowed then return 0 end
if max_queued >= 0 and redis.call('ZCARD', p .. 'queued') >= max_queued then return -1 end
local f = redis.call('HMGET', key, 'idempotency_key', 'webhook', 'created_at')
redis.call('PERSIST', key)
if f[1] ~= 'null' then redis.call('PERSIST', p .. 'idem:' .. cjson.decode(f[1])) end
redis.call('ZREM', p .. 'finished', id)
redis.call('ZREM', p .. 'webhooks', id)
redis.call('HSET', key, 'state', '"queued"', 'output', 'null', 'error', 'null', 'streamed', 'false',
           'started_at', 'null', 'finished_at', 'null', 'run_time_ms', 'null', 'owner', 'null',
           'lease_until', 'null', 'deadline', 'null', 'webhook_pending', f[2] ~= 'null' and 'true' or 'false')
redis.call('ZREM', p .. 'deadlines', id)  -- a retry waits as long as it takes: its caller asked again
redis.call('ZADD', p .. 'queued', f[3], id)
redis.call('HSET', key, '_entry', enqueue(p, id))
return 1
"""

# Runs never claimed, still queued at their deadline: timed out (their stream entry goes with
# them, so no runner takes them). Entries of runs claimed, cancelled or gone are just dropped.
_EXPIRE = _FINAL + """
local p, now, group, channel, error, expire_ms = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local expired = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. 'deadlines', '-inf', now, 'LIMIT', 0, 1000)) do
  redis.call('ZREM', p .. 'deadlines', id)
  local key = p .. 'run:' .. id
  local f = redis.call('HMGET', key, 'state', 'attempts')
  if f[1] == '"queued"' and f[2] == '0' then
    redis.call('HSET', key, 'state', '"timed_out"', 'error', error, 'finished_at', now)
    final(p, id, key, now, expire_ms, group, channel)
    expired[#expired + 1] = id
  end
end
return expired
"""

_DELETE = """
local p, id, group = ARGV[1], ARGV[2], ARGV[3]
local key = p .. 'run:' .. id
local f = redis.call('HMGET', key, 'surface', 'app', 'owner', '_entry', 'idempotency_key')
if not f[1] then return 0 end
redis.call('DEL', key, p .. 'values:' .. id)
if f[5] ~= 'null' then redis.call('DEL', p .. 'idem:' .. cjson.decode(f[5])) end
if f[3] ~= 'null' then redis.call('SREM', p .. 'owner:' .. cjson.decode(f[3]), id) end
if f[4] then
  redis.call('XACK', p .. 'stream', group, f[4])
  redis.call('XDEL', p .. 'stream', f[4])
end
for _, index in ipairs({'queued', 'leases', 'finished', 'webhooks', 'deadlines'}) do
  redis.call('ZREM', p .. index, id)
end
redis.call('ZREM', p .. 'app:' .. cjson.decode(f[1]) .. ':' .. cjson.decode(f[2]), id)
return 1
"""

# Runs whose keys expired already are only dropped from the indexes; all are counted.
_PURGE = """
local p, before = ARGV[1], ARGV[2]
local ids = redis.call('ZRANGEBYSCORE', p .. 'finished', '-inf', '(' .. before, 'LIMIT', 0, 1000)
for _, id in ipairs(ids) do
  local key = p .. 'run:' .. id
  local f = redis.call('HMGET', key, 'surface', 'app', 'idempotency_key')
  if f[1] then
    redis.call('ZREM', p .. 'app:' .. cjson.decode(f[1]) .. ':' .. cjson.decode(f[2]), id)
    if f[3] ~= 'null' then redis.call('DEL', p .. 'idem:' .. cjson.decode(f[3])) end
    redis.call('DEL', key)
  end
  redis.call('ZREM', p .. 'finished', id)
  redis.call('ZREM', p .. 'webhooks', id)
end
return #ids
"""

_WEBHOOK_DONE = """
local key = ARGV[1] .. 'run:' .. ARGV[2]
if redis.call('EXISTS', key) == 1 then redis.call('HSET', key, 'webhook_pending', 'false') end
redis.call('ZREM', ARGV[1] .. 'webhooks', ARGV[2])
"""

_COUNTS = """
local index, p, since = ARGV[1], ARGV[2], tonumber(ARGV[3])
local counts, retried = {}, 0
for _, id in ipairs(redis.call('ZRANGE', index, 0, -1)) do
  local f = redis.call('HMGET', p .. 'run:' .. id, 'state', 'finished_at', 'attempts')
  if not f[1] then
    redis.call('ZREM', index, id)
  elseif f[2] == 'null' or tonumber(f[2]) >= since then
    counts[f[1]] = (counts[f[1]] or 0) + 1
    if tonumber(f[3]) > 1 then retried = retried + 1 end
  end
end
local flat = {'"retried"', retried}
for state, n in pairs(counts) do flat[#flat + 1] = state; flat[#flat + 1] = n end
return flat
"""

_APPEND_VALUES = """
redis.call('RPUSH', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
"""


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


def _decode(flat: list | dict) -> Run | None:
    """A run from HGETALL's reply (a dict, or a script's flat list); None when empty."""
    if not flat:
        return None
    items = flat.items() if isinstance(flat, dict) else zip(flat[::2], flat[1::2], strict=True)
    values: dict[str, Any] = {}
    for name, value in items:
        name = name.decode()
        if name in _RUN_FIELDS:
            values[name] = orjson.loads(value)
    return Run(**values)


class RedisRunStore:
    """Runs in one Redis database, shared by every server whose ``[server] runs`` names it.

    ``retention``: seconds a finished run's keys live (``[server] runs_retention``).
    ``key``: the setting that named the URL, for errors."""

    shared = True

    def __init__(self, url: str, *, retention: float, key: str = "server.runs") -> None:
        self.url = url
        parts = urlsplit(url)
        address = parts.path if parts.scheme == "unix" else f"{parts.hostname}:{parts.port or 6379}{parts.path}"
        self.name = f"{parts.scheme}://{address}"  # for logs: no password
        self.key = key
        self.retention = retention
        self._redis: aioredis.Redis | None = None
        db = parse_url(url).get("db", 0)
        self._cancel_channel = f"runnel:{db}:cancel"
        self._done_channel = f"runnel:{db}:done"
        self._reclaimed: deque[str] = deque()  # runs XAUTOCLAIM took back, to hand out first
        self._reclaimed_at = 0.0
        self._scripts: dict[str, Any] = {}

    @property
    def is_open(self) -> bool:
        return self._redis is not None

    def _client(self) -> aioredis.Redis:
        client = self._redis
        if client is None:
            raise RuntimeError(f"run store {self.name} is not open")
        return client

    async def open(self, *, create: bool) -> bool:
        """Makes the client; no I/O: a Redis that is down now is reached when it is back."""
        if self._redis is None:
            # One retry, at once: a connection Redis closed (a restart) fails the first try. A
            # write whose answer was lost is never run twice by it: Redis is down then, and the
            # retry fails too (the runner sorts such claims and finishes out; see _claim).
            self._redis = aioredis.Redis.from_url(
                self.url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=CALL_TIMEOUT,
                retry=Retry(NoBackoff(), 1), health_check_interval=30)
            for name, source in (("insert", _INSERT), ("claim", _CLAIM), ("renew", _RENEW), ("finish", _FINISH),
                                 ("recover", _RECOVER), ("requeue", _REQUEUE), ("expire", _EXPIRE),
                                 ("delete", _DELETE), ("purge", _PURGE),
                                 ("webhook_done", _WEBHOOK_DONE), ("counts", _COUNTS),
                                 ("append_values", _APPEND_VALUES)):
                self._scripts[name] = self._redis.register_script(source)
        return True

    async def close(self) -> None:
        client, self._redis = self._redis, None
        if client is not None:
            await client.aclose()

    async def _call(self, name: str, *args: Any, keys: tuple[str, ...] = ()) -> Any:
        """Run a script; StoreDown when Redis cannot be reached."""
        self._client()
        try:
            return await self._scripts[name](keys=keys, args=args)
        except _UNREACHABLE as exc:
            raise StoreDown(self.name, exc) from None

    async def _do(self, command: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await command(*args, **kwargs)
        except _UNREACHABLE as exc:
            raise StoreDown(self.name, exc) from None

    def _expire_ms(self, finished_at: float) -> int:
        return int((finished_at + self.retention) * 1000) + 1000

    # -- the RunStore interface -------------------------------------------------------------
    async def insert(self, run: Run, *, max_queued: int | None = None) -> Run:
        pairs: list[Any] = []
        for name in _RUN_FIELDS:
            pairs += (name, _dumps(getattr(run, name)))
        finished = "" if run.finished_at is None else repr(run.finished_at)
        expire = "" if run.finished_at is None else self._expire_ms(run.finished_at)
        while True:
            reply = await self._call("insert", PREFIX, run.id, run.idempotency_key or "",
                                     -1 if max_queued is None else max_queued, repr(run.created_at), finished,
                                     expire, run.surface, run.app, "" if run.deadline is None else repr(run.deadline),
                                     *pairs)
            if reply[0] == b"new":
                return run
            if reply[0] == b"full":
                assert max_queued is not None
                raise QueueFull(max_queued)
            existing = await self.get(reply[1].decode())
            if existing is not None:
                return existing
            # The key's run expired (or was deleted) just now: the key is gone with it; try again.

    async def get(self, run_id: str) -> Run | None:
        return _decode(await self._do(self._client().hgetall, f"{PREFIX}run:{run_id}"))

    async def queued(self) -> list[str]:
        return [member.decode() for member in await self._do(self._client().zrange, f"{PREFIX}queued", 0, -1)]

    async def claim(self, run_id: str, owner: str, lease: float) -> Run | None:
        now = time.time()
        return _decode(await self._call("claim", PREFIX, run_id, owner, repr(now + lease), repr(now)))

    async def renew(self, owner: str, lease: float) -> int:
        return int(await self._call("renew", PREFIX, owner, repr(time.time() + lease), GROUP))

    async def finish(self, run_id: str, state: str, *, owner: str | None = None, output: bytes | None = None,
                     error: HTTPError | None = None, streamed: bool = False,
                     run_time_ms: int | None = None) -> bool:
        now = time.time()
        written = await self._call(
            "finish", PREFIX, run_id, owner or "", repr(now), self._expire_ms(now), GROUP, self._done_channel,
            "state", _dumps(state), "output", b"null" if output is None else output,
            "error", b"null" if error is None else _dumps(error_record(error)),
            "streamed", _dumps(streamed), "run_time_ms", _dumps(run_time_ms))
        return written == 1

    async def recover(self, idempotent_apps: Collection[str], interrupted: HTTPError) -> Recovered:
        now = time.time()
        requeued, failed = await self._call(
            "recover", PREFIX, repr(now), GROUP, self._done_channel, _dumps(error_record(interrupted)),
            self._expire_ms(now), *(_dumps(app) for app in idempotent_apps))
        return Recovered([i.decode() for i in requeued], [i.decode() for i in failed])

    async def requeue(self, run_id: str, states: Collection[str], *, max_queued: int | None = None) -> bool:
        written = int(await self._call("requeue", PREFIX, run_id, -1 if max_queued is None else max_queued,
                                       *(_dumps(state) for state in states)))
        if written < 0:
            assert max_queued is not None
            raise QueueFull(max_queued)
        return written == 1

    async def expire(self, now: float, error: HTTPError) -> list[str]:
        expired = await self._call("expire", PREFIX, repr(now), GROUP, self._done_channel,
                                   _dumps(error_record(error)), self._expire_ms(now))
        return [run_id.decode() for run_id in expired]

    async def delete(self, run_id: str) -> bool:
        return await self._call("delete", PREFIX, run_id, GROUP) == 1

    async def purge(self, before: float) -> int:
        purged = int(await self._call("purge", PREFIX, repr(before)))
        await self._forget_gone_runners()
        return purged

    async def _forget_gone_runners(self) -> None:
        """Drop the group's consumers that hold nothing and have not read for a retention: runners
        of servers long gone (each server start is a new one; a live runner reads every second)."""
        client, stream = self._client(), f"{PREFIX}stream"
        try:
            consumers = await client.xinfo_consumers(stream, GROUP)
        except ResponseError:  # no stream or group yet
            return
        except _UNREACHABLE as exc:
            raise StoreDown(self.name, exc) from None
        for consumer in consumers:
            if consumer["pending"] == 0 and consumer["idle"] > self.retention * 1000:
                await self._do(client.xgroup_delconsumer, stream, GROUP, consumer["name"])

    async def pending_webhooks(self) -> list[Run]:
        ids = await self._do(self._client().zrange, f"{PREFIX}webhooks", 0, -1)
        runs = [await self.get(run_id.decode()) for run_id in ids]
        return [run for run in runs if run is not None and run.done]

    async def webhook_done(self, run_id: str) -> None:
        await self._call("webhook_done", PREFIX, run_id)

    async def counts(self, app: str, surface: str, since: float) -> dict[str, int]:
        counts = dict.fromkeys((QUEUED, "running", *TERMINAL, "retried"), 0)
        flat = await self._call("counts", f"{PREFIX}app:{surface}:{app}",
                                PREFIX, repr(since))
        for state, count in zip(flat[::2], flat[1::2], strict=True):
            counts[orjson.loads(state)] = int(count)
        return counts

    # -- what a shared store adds (runnel.runs.store.SharedRunStore) ----------------------------
    async def take(self, owner: str, lease: float, count: int) -> list[str]:
        """The next runs (``count`` at most) for ``owner`` to claim, from the stream (delivered
        to it alone), or ones a dead runner took and never claimed (XAUTOCLAIM, idle past
        ``lease``); none when none came within ``TAKE_WAIT``."""
        client = self._client()
        stream = f"{PREFIX}stream"
        try:
            if not self._reclaimed and time.monotonic() - self._reclaimed_at > lease / 3:
                self._reclaimed_at = time.monotonic()
                await self._reclaim(client, stream, owner, lease)
            if self._reclaimed:
                return [self._reclaimed.popleft() for _ in range(min(count, len(self._reclaimed)))]
            try:
                reply: Any = await client.xreadgroup(GROUP, owner, {stream: ">"}, count=count,
                                                     block=int(TAKE_WAIT * 1000))
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._make_group(client, stream)
                return []
        except _UNREACHABLE as exc:
            raise StoreDown(self.name, exc) from None
        return [entry[b"run"].decode() for _, entries in reply or () for _, entry in entries]

    async def _make_group(self, client: aioredis.Redis, stream: str) -> None:
        try:
            await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _reclaim(self, client: aioredis.Redis, stream: str, owner: str, lease: float) -> None:
        """Take entries a dead runner was delivered: queued runs are handed out again; entries of
        runs that are done (or gone) are acknowledged; running ones are left to ``recover``."""
        try:
            reply = await client.xautoclaim(stream, GROUP, owner, int(lease * 1000), "0-0", count=100)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self._make_group(client, stream)
            return
        for entry_id, entry in reply[1]:
            if not entry:  # deleted from the stream meanwhile
                continue
            run_id = entry[b"run"].decode()
            state = await client.hget(f"{PREFIX}run:{run_id}", "state")
            if state == b'"queued"':
                self._reclaimed.append(run_id)
            elif state is None or orjson.loads(state) in TERMINAL:
                await client.xack(stream, GROUP, entry_id)
                await client.xdel(stream, entry_id)
        if self._reclaimed:
            logger.warning("run store %s: %d queued runs a stopped server had taken are taken back",
                           self.name, len(self._reclaimed))

    async def request_cancel(self, run_id: str) -> None:
        """Ask whichever server executes ``run_id`` to cancel it."""
        await self._do(self._client().publish, self._cancel_channel, run_id)

    async def listen(self, on_cancel: Callable[[str], None], on_done: Callable[[str], None]) -> None:
        """Forever: call ``on_cancel`` with each run id a cancel is asked for, ``on_done`` with
        each run finished, on any server. Reconnects when Redis comes back; what was said
        while it was away is not heard (waits end by their deadlines)."""
        cancel = self._cancel_channel.encode()
        while True:
            pubsub = self._client().pubsub()
            try:
                await pubsub.subscribe(self._cancel_channel, self._done_channel)
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=TAKE_WAIT)
                    if message is not None:
                        (on_cancel if message["channel"] == cancel else on_done)(message["data"].decode())
            except _UNREACHABLE:
                await asyncio.sleep(0.5)
            finally:
                await pubsub.aclose()

    async def append_values(self, run_id: str, values: list) -> None:
        """Add a running generator's new values to what every server's ``values`` reads."""
        await self._call("append_values", int(self.retention) + 1, *(_dumps(v) for v in values),
                         keys=(f"{PREFIX}values:{run_id}",))

    async def values(self, run_id: str, start: int = 0) -> list | None:
        """A running generator's values so far, from index ``start`` on (a follower reads only
        what is new); None when it has none there (not started, or done)."""
        values = await self._do(self._client().lrange, f"{PREFIX}values:{run_id}", start, -1)
        return [orjson.loads(value) for value in values] if values else None
