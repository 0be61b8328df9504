"""The shared job queue: Redis Streams with a consumer group, for several replicas.

A stream entry is only a pointer (`id`) to a job; the job body lives in a hash so
retries can rewrite it. Keys, all under the URL's `prefix`:

- `<prefix>jobs`    hash, id -> body: every job not yet acked (pending, running or
                    dead). `HSETNX` on it is the dedupe by id.
- `<prefix>stream`  stream + consumer group `workers`: due jobs. XREADGROUP takes a
                    new one, XAUTOCLAIM takes one whose consumer went silent for
                    longer than the visibility timeout, XACK + XDEL finish it.
- `<prefix>delayed` sorted set, id -> run_at: jobs not due yet (delayed enqueues and
                    retries), moved into the stream by `take` once due.
- `<prefix>live`    sorted set, id -> created_at: jobs neither acked nor dead, for
                    `depth` and `oldest_age`.
- `<prefix>dead`    sorted set, id -> dead_at: the dead-letter list.

Each step that touches several keys is one Lua script, so a crash between two
commands cannot lose a job or leave it in two places. `ack`, `retry` and `bury`
first check that the stream entry is still pending for the caller's consumer, so a
worker whose job was reclaimed by another cannot finish it twice.

An idle worker is not polled (`wait_for_work`): it blocks on XREAD after the group's
last-delivered id, so any replica's enqueue wakes it, and looks at the earliest delayed
job about once a second, sleeping until it is due. Before, it polled every 200 ms with
three commands a take (15 a second per worker, most of an idle queue's traffic).

Any Redis or socket error is raised as `QueueUnavailable`, naming the redacted URL.

Durability of `enqueue` is that of the Redis server: run it with `appendonly yes`
and `appendfsync always` (or accept the loss window of `everysec`). For Redis
Cluster, put a hash tag in the prefix (`prefix={jobs}:`) so all keys share a slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError, ResponseError

from proxy.jobs.queue import Job, QueueUnavailable, WallClock
from proxy.storage.redis import unavailable_on_error

StreamReply = list[tuple[str, list[tuple[str, dict[str, str]]]]]
"""XREADGROUP's reply with decode_responses: [(stream, [(entry id, fields)])]."""

GROUP = "workers"
DEFAULT_PREFIX = "jobs:"
_PROMOTE_BATCH = 100
_CLAIM_SCAN_ROUNDS = 100
_BLOCK_SHARE = 0.5
"""An idle wait blocks in XREADs of at most this share of the socket timeout, which
would otherwise cut a longer block short as a failure."""

_ENQUEUE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
if tonumber(ARGV[4]) > tonumber(ARGV[5]) then
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
else
  redis.call('XADD', KEYS[4], '*', 'id', ARGV[1])
end
return 1
"""

# Moves due delayed jobs into the stream; answers the earliest run_at still delayed
# ('' when none) and the group's last-delivered id, from which an idle worker waits
# for new entries (every entry up to it went to some consumer already).
_PROMOTE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('XADD', KEYS[2], '*', 'id', id)
end
local next = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local delivered = ''
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[2])) do
  local fields = {}
  for i = 1, #group, 2 do fields[group[i]] = group[i + 1] end
  if fields['name'] == ARGV[3] then delivered = fields['last-delivered-id'] end
end
return {#ids, next[2] or '', delivered}
"""

# KEYS: jobs, live, delayed, stream, dead
# ARGV: group, entry id, consumer, job id, action, body, score
_FINISH = """
local p = redis.call('XPENDING', KEYS[4], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 or p[1][2] ~= ARGV[3] then return 0 end
redis.call('XACK', KEYS[4], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[4], ARGV[2])
if ARGV[5] == 'ack' then
  redis.call('HDEL', KEYS[1], ARGV[4])
  redis.call('ZREM', KEYS[2], ARGV[4])
elseif ARGV[5] == 'retry' then
  redis.call('HSET', KEYS[1], ARGV[4], ARGV[6])
  redis.call('ZADD', KEYS[3], ARGV[7], ARGV[4])
else
  redis.call('HSET', KEYS[1], ARGV[4], ARGV[6])
  redis.call('ZREM', KEYS[2], ARGV[4])
  redis.call('ZADD', KEYS[5], ARGV[7], ARGV[4])
end
return 1
"""

# KEYS: dead, jobs, live, delayed; ARGV: job id, body, created_at, now
_REDRIVE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
return 1
"""


class RedisQueue:
    """`JobQueue` over Redis Streams; open it with `RedisQueue.open`."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        name: str,
        prefix: str = DEFAULT_PREFIX,
        wall: WallClock = time.time,
    ) -> None:
        self.name = name
        self._redis = client
        self._wall = wall
        self._jobs = f"{prefix}jobs"
        self._stream = f"{prefix}stream"
        self._delayed = f"{prefix}delayed"
        self._live = f"{prefix}live"
        self._dead = f"{prefix}dead"
        self._enqueue = client.register_script(_ENQUEUE)
        self._promote = client.register_script(_PROMOTE)
        self._finish = client.register_script(_FINISH)
        self._redrive = client.register_script(_REDRIVE)
        self._next_due: float | None = None
        """The earliest run_at of a delayed job, as of the last take or the last slice
        of a wait: `wait_for_work` sleeps no longer than until then."""
        self._delivered: str | None = None
        """The group's last-delivered id as of the last empty take: a wait for new
        work is an XREAD BLOCK after it, so an entry added meanwhile is not missed."""
        self._took = False
        socket_timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
        self._block_limit = _BLOCK_SHARE * socket_timeout if socket_timeout else 5.0

    @classmethod
    async def open(
        cls,
        client: redis.Redis,
        *,
        name: str,
        prefix: str = DEFAULT_PREFIX,
        wall: WallClock = time.time,
    ) -> RedisQueue:
        """Connect and create the consumer group (idempotent); `client` must decode
        responses. The client is closed if this fails."""
        queue = cls(client, name=name, prefix=prefix, wall=wall)
        try:
            with queue._unavailable():
                await queue._ensure_group()
        except BaseException:
            await client.aclose()
            raise
        return queue

    def _unavailable(self) -> contextlib.AbstractContextManager[None]:
        return unavailable_on_error(self.name, QueueUnavailable)

    async def _ensure_group(self) -> None:
        try:
            # From id 0, so entries added before the group existed are delivered too.
            await self._redis.xgroup_create(self._stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def enqueue(self, job: Job) -> bool:
        now = self._wall()
        stored = job.stamped(now)
        with self._unavailable():
            added = await self._enqueue(
                keys=[self._jobs, self._live, self._delayed, self._stream],
                args=[
                    stored.id,
                    stored.to_json(),
                    repr(stored.created_at),
                    repr(stored.run_at),
                    repr(now),
                ],
            )
        return int(added) == 1

    async def take(self, consumer: str, visibility_timeout: float) -> Job | None:
        """Lease one due job; `visibility_timeout` is the idle time after which another
        consumer's unacknowledged job is reclaimed, so every worker should use the same."""
        with self._unavailable():
            try:
                return await self._take(consumer, visibility_timeout)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._ensure_group()
                return await self._take(consumer, visibility_timeout)

    async def _take(self, consumer: str, visibility_timeout: float) -> Job | None:
        self._took = False
        _, next_due, delivered = await self._promote(
            keys=[self._delayed, self._stream],
            args=[repr(self._wall()), _PROMOTE_BATCH, GROUP],
        )
        self._next_due = float(next_due) if next_due else None
        self._delivered = delivered or None
        job = await self._claim_abandoned(consumer, visibility_timeout)
        if job is not None:
            self._took = True
            return job
        while True:
            response: StreamReply = await self._redis.xreadgroup(  # type: ignore[assignment]
                GROUP, consumer, {self._stream: ">"}, count=1
            )  # redis-py's stubs give every reply shape at once; a decoded XREADGROUP is this
            if not response:
                return None
            for entry_id, fields in response[0][1]:
                job = await self._load(entry_id, fields, consumer)
                if job is not None:
                    self._took = True
                    return job

    async def _claim_abandoned(self, consumer: str, visibility_timeout: float) -> Job | None:
        """XAUTOCLAIM one entry idle longer than the visibility timeout, if any."""
        min_idle_ms = max(1, int(visibility_timeout * 1000))
        start = "0-0"
        for _ in range(_CLAIM_SCAN_ROUNDS):
            next_start, claimed, *_deleted = await self._redis.xautoclaim(
                self._stream, GROUP, consumer, min_idle_ms, start_id=start, count=1
            )
            for entry_id, fields in claimed:
                job = await self._load(entry_id, fields, consumer, redelivered=True)
                if job is not None:
                    return job
            if next_start == "0-0":
                return None
            start = next_start
        return None

    async def _load(
        self,
        entry_id: str,
        fields: dict[str, Any] | None,
        consumer: str,
        *,
        redelivered: bool = False,
    ) -> Job | None:
        """The job an entry points to; a dangling entry is acknowledged and dropped."""
        job_id = (fields or {}).get("id")
        body = await self._redis.hget(self._jobs, job_id) if job_id else None
        if body is None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xack(self._stream, GROUP, entry_id)
                pipe.xdel(self._stream, entry_id)
                await pipe.execute()
            return None
        return Job.from_json(body, receipt=f"{entry_id}|{consumer}", redelivered=redelivered)

    async def _finish_job(self, job: Job, action: str, body: str = "", score: float = 0.0) -> bool:
        if not job.receipt:
            raise ValueError(f"job {job.id!r} was not taken from this queue (no receipt)")
        entry_id, _, consumer = job.receipt.partition("|")
        with self._unavailable():
            done = await self._finish(
                keys=[self._jobs, self._live, self._delayed, self._stream, self._dead],
                args=[GROUP, entry_id, consumer, job.id, action, body, repr(score)],
            )
        return int(done) == 1

    async def ack(self, job: Job) -> None:
        await self._finish_job(job, "ack")

    async def retry(self, job: Job, error: str, run_at: float) -> None:
        await self._finish_job(job, "retry", job.failed(error, run_at).to_json(), run_at)

    async def bury(self, job: Job, error: str) -> None:
        await self._finish_job(job, "bury", job.failed(error, job.run_at).to_json(), self._wall())

    async def dead(self, limit: int = 100) -> list[Job]:
        with self._unavailable():
            # decoded: str ids, which redis-py's stubs cannot tell from bytes
            ids: list[str] = await self._redis.zrange(self._dead, 0, limit - 1)  # type: ignore[assignment]
            bodies = await self._redis.hmget(self._jobs, ids) if ids else []
        return [Job.from_json(body) for body in bodies if body is not None]

    async def redrive(self, job_id: str) -> bool:
        with self._unavailable():
            body = await self._redis.hget(self._jobs, job_id)
            if body is None:
                return False
            now = self._wall()
            revived = Job.from_json(body).revived(now)
            done = await self._redrive(
                keys=[self._dead, self._jobs, self._live, self._delayed],
                args=[job_id, revived.to_json(), repr(revived.created_at), repr(now)],
            )
        return int(done) == 1

    async def depth(self) -> int:
        with self._unavailable():
            return int(await self._redis.zcard(self._live))

    async def oldest_age(self) -> float | None:
        with self._unavailable():
            oldest = await self._redis.zrange(self._live, 0, 0, withscores=True)
        if not oldest:
            return None
        return max(0.0, self._wall() - float(oldest[0][1]))

    # -- waking idle workers (WakesWorkers) ---------------------------------------------

    async def wait_for_work(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a new stream entry (an enqueue anywhere) or
        for the earliest delayed job to fall due; True when the worker should take
        again before `timeout` was up (at once after a take that took a job).

        An XREAD BLOCK from the group's last-delivered id, in slices shorter than the
        socket timeout (1 s by default), each after a look at the earliest delayed
        job: two commands a second when idle instead of three per 200 ms poll. A
        delayed enqueue or a retry, which add no stream entry, is seen at the next
        slice; a lapsed lease waits for the safety poll.
        Never raises: on a Redis error it sleeps out the wait, as polling does.
        """
        if self._took:
            self._took = False
            return True
        deadline = time.monotonic() + timeout
        first = True
        while (remaining := deadline - time.monotonic()) > 0:
            if not first:  # a delayed enqueue or a retry anywhere adds no stream entry
                with contextlib.suppress(RedisError, OSError):
                    self._next_due = await self._earliest_delayed()
            first = False
            if self._next_due is not None:
                due_in = self._next_due - self._wall()
                if due_in <= remaining:
                    remaining = due_in
                    if remaining <= 0:
                        return True
            block = min(remaining, self._block_limit)
            try:
                if await self._new_entry(block):
                    return True
            except (RedisError, OSError):
                await asyncio.sleep(block)
        return False

    async def _earliest_delayed(self) -> float | None:
        earliest = await self._redis.zrange(self._delayed, 0, 0, withscores=True)
        return float(earliest[0][1]) if earliest else None

    async def _new_entry(self, seconds: float) -> bool:
        """Whether an entry after the last-delivered id appears within `seconds`."""
        if self._delivered is None:  # no take yet: nothing to wait after
            await asyncio.sleep(seconds)
            return False
        reply = await self._redis.xread(
            {self._stream: self._delivered}, count=1, block=max(1, round(seconds * 1000))
        )
        return bool(reply)

    async def close(self) -> None:
        await self._redis.aclose()
