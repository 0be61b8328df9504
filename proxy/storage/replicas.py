"""Writes a Redis replica holds before they count: `WAIT` after each write, when asked.

Redis replicates asynchronously. A Sentinel failover promotes a replica, and a write
the old master acknowledged a moment before may not have reached it: the old master's
copy is discarded when it is demoted. For the checkout that is a journal record of an
authorization, or the job that captures it, gone after the money moved; nothing would
ever capture or void it. `min-replicas-to-write` narrows that window to the master's
notice of a lost replica, not to nothing.

So a store whose URL asks for it sends every write together with `WAIT n timeout` on
the same connection, one round trip, and a write fewer than n replicas confirmed within
`?replica_timeout=` (default 500ms) fails as `NotReplicated`, a RedisError: the store
reports it as its outage (a 503, a retried job). Its callers already treat an outage
as an outcome they do not know, which is what it is: the write may be on the master
and be kept, or be lost in the failover that is under way.

How many: `?wait_replicas=N`, or `all`, the default for the durable stores on a
`redis+sentinel://` URL (`ALL_IN_SYNC`): every replica in sync with the master (online,
its last acknowledgement at most `IN_SYNC_LAG` seconds old, as the master's `INFO
replication` says, asked every half second). Any of them may be the one promoted
(Sentinel's choice rests on replication offsets it polls, not on the last write), so
one confirmation of two is not enough. And while the Sentinels report a failover of
the master in progress, writes are refused outright: the replica being promoted has
left the master, so the master's count no longer has it, and the one confirmation
left would come from a replica about to be pointed at the new master, which discards
what it got from the old one. The count is read before the Sentinels are asked, so a
count without the promoted replica always comes with the failover's flag. An `INFO`
that fails keeps the last count (it does not become "wait for none"), and while no
count is known, after a start or a switch of master, writes are refused. A replica
that stops acknowledging leaves the count within seconds, so it costs a few refused
writes, not an outage; a master with no replica in sync takes writes without a WAIT
(there is no one to wait for: `min-replicas-to-write`, which the sidecar's start warns
about, is what keeps a master left alone from taking them).

Not followed by WAIT: commands that only read, and the job queue's deliveries
(`XREADGROUP`, `XAUTOCLAIM`, `XGROUP`), whose loss only delivers a job again or
creates its group again. Pipelines bypass `execute_command` and are not waited for
either; the stores use one only to drop a dangling stream entry, which a loss brings
back to be dropped again.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

DEFAULT_REPLICA_TIMEOUT = 0.5
"""Seconds a write waits for its replicas: far above a healthy replica's lag (well under
a millisecond on one network), below the stores' socket timeout (2 s) so that a missing
replica is reported as such rather than as a timed-out socket."""

NOT_WAITED = frozenset(
    {
        # reads
        "GET", "MGET", "HGET", "HMGET", "HGETALL", "HLEN", "HEXISTS", "EXISTS", "TTL",
        "PTTL", "TYPE", "ZRANGE", "ZRANGEBYSCORE", "ZREVRANGE", "ZCARD", "ZCOUNT", "ZSCORE",
        "XREAD", "XRANGE", "XREVRANGE", "XLEN", "XPENDING", "XINFO", "SCAN", "HSCAN",
        "ZSCAN", "SMEMBERS", "SCARD", "LRANGE", "LLEN", "DBSIZE", "EVALSHA_RO", "EVAL_RO",
        # the connection and the server
        "PING", "ECHO", "INFO", "CONFIG", "ROLE", "TIME", "SCRIPT", "CLIENT", "WAIT",
        "SELECT", "AUTH", "HELLO",
        # deliveries: lost, a job is delivered again (or its group created again)
        "XREADGROUP", "XAUTOCLAIM", "XGROUP",
    }
)  # fmt: skip
"""First words of the commands sent without a WAIT; every other command is a write."""

ALL_IN_SYNC = -1
"""`wait_for_replicas` value: every replica the client knows to be in sync."""

IN_SYNC_LAG = 2
"""Seconds since a replica's last acknowledgement (it sends one every second) within
which it counts as in sync, as `min-replicas-max-lag` counts a good replica."""


def replicas_in_sync(info: str, max_lag: int = IN_SYNC_LAG) -> int:
    """How many replicas a master's `INFO replication` text shows online and in sync.

    A replica is listed as `slave0:ip=...,port=...,state=online,offset=...,lag=0`; one
    still loading its first copy is not `online`, and is not counted (it could not
    confirm a write yet). A server that is itself a replica lists none.
    """
    count = 0
    for line in info.splitlines():
        name, _, value = line.strip().partition(":")
        if not (name.startswith("slave") and name[5:].isdigit()):
            continue
        fields = dict(part.partition("=")[::2] for part in value.split(","))
        lag = fields.get("lag", "")
        if fields.get("state") == "online" and lag.isdigit() and int(lag) <= max_lag:
            count += 1
    return count


class NotReplicated(RedisError):
    """A write fewer replicas than asked confirmed in time: it may be lost in a failover."""


class ReplicatedRedis(Redis):
    """A client that, once `wait_for_replicas` asked it to, sends every write with a WAIT.

    Set after construction because redis-py builds the client itself (`from_url`,
    Sentinel's `master_for`) and passes constructor arguments to the connections.
    """

    _replicas = 0
    _replica_timeout_ms = 0

    def wait_for_replicas(self, replicas: int, timeout: float = DEFAULT_REPLICA_TIMEOUT) -> None:
        """From now on a write counts only once `replicas` replicas have it: 0 for at once,
        `ALL_IN_SYNC` for every replica `replicas_in_sync` counts."""
        if replicas < ALL_IN_SYNC or not timeout > 0:
            raise ValueError(f"replicas must be >= 0 and timeout positive: {replicas}, {timeout}")
        self._replicas = replicas
        self._replica_timeout_ms = max(1, round(timeout * 1000))

    @property
    def replicas(self) -> int:
        """What `wait_for_replicas` set: a count, or `ALL_IN_SYNC`."""
        return self._replicas

    def replicas_in_sync(self) -> int | None:
        """How many replicas are in sync with the master, as far as this client knows;
        None: it does not know (a plain client; the Sentinel-managed one asks them)."""
        return None

    async def write_refusal(self) -> str | None:
        """Why no write can count now, or None (the Sentinel-managed client refuses
        writes while a failover of its master is in progress)."""
        return None

    def replicas_to_wait_for(self) -> int:
        """How many replicas must confirm the next write; 0: none, no WAIT is sent."""
        if self._replicas == ALL_IN_SYNC:
            return self.replicas_in_sync() or 0
        return self._replicas

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        command = str(args[0]).split(" ", 1)[0].upper() if args else ""
        if self._replicas == 0 or command in NOT_WAITED:
            return await super().execute_command(*args, **options)
        refusal = await self.write_refusal()
        if refusal is not None:
            raise NotReplicated(f"{command} not sent: {refusal}")
        wanted = self.replicas_to_wait_for()
        if wanted == 0:
            return await super().execute_command(*args, **options)
        # one connection for both, as WAIT counts the replicas that have this
        # connection's writes; one round trip, as a pipeline sends them together
        async with self.pipeline(transaction=False) as pipe:
            pipe.execute_command(*args, **options)
            pipe.execute_command("WAIT", wanted, self._replica_timeout_ms)
            result, confirmed = await pipe.execute()
        if int(confirmed) < wanted:
            raise NotReplicated(
                f"{command} was confirmed by {confirmed} of {wanted} replica(s) "
                f"within {self._replica_timeout_ms} ms: it may be lost in a failover"
            )
        return result
