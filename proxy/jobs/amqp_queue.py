"""The job queue on a RabbitMQ broker the platform already runs (aio-pika, AMQP 0-9-1).

Every queue is a durable quorum queue (replicated by Raft) and every message is
persistent. Names, all under the URL's `prefix` (default `jobs.`):

- `<prefix>work`          due jobs, pushed to this process's consumer (manual ack).
- `<prefix>delay.<N>ms`   one queue per delay level (10 ms x 4^k, up to ~2.9 h), each with
                          a queue-wide `x-message-ttl` of N ms, dead-lettered back to
                          `work` (at-least-once dead-lettering).
- `<prefix>dead`          the dead-letter list, in burial order.

What the `JobQueue` protocol asks, and how a broker gives it:

- **Durable when `enqueue` returns.** Every publish waits for the broker's publisher
  confirm, which a quorum queue sends once a majority of its replicas has the message.
- **No dedupe by id.** RabbitMQ keeps no index by message id, and a marker elsewhere
  would be a second store to keep consistent. `enqueue` therefore always stores the
  job and returns True: a job enqueued twice runs twice. That is safe here because
  every handler is idempotent by design (each upstream call carries an Idempotency-Key
  derived from the job id, and checkout action handlers check the journal first), and
  at-least-once already allows duplicates after a lost ack.
- **Leases.** The first `take` starts a consumer on `work` with a prefetch of
  `?prefetch=` (16) unacked deliveries (a process that only enqueues never holds
  jobs); `take` hands out the next delivery (or one got with `basic.get` beyond the
  prefetch window) and its receipt names that delivery on this process's channel.
  The lease ends three ways: `ack`/`retry`/`bury`; the visibility timeout passing
  here (the message is rejected with requeue, so any consumer may take it again, and
  a late `ack` from the old holder is a no-op); or the connection dropping (a dead
  worker): the broker requeues every unacked delivery at once, taken or only
  prefetched. Keep `visibility_timeout` below the broker's `consumer_timeout` (30 min
  by default), which closes a channel holding a delivery longer than that.
- **Delays.** A job whose `run_at` is ahead goes to the largest delay level not longer
  than what is left; when it expires back into `work`, `take` sees the rest of the
  wait and parks it again on a shorter level (a few hops, each up to 4 times
  shorter). One TTL per queue keeps each delay queue in expiry order, so a 5-minute
  backoff never holds up a 1-second one (per-message TTLs expire only at the head).
  A job may run a little late (by the worker's poll interval per hop), never early.
  The broker measures delays on its own clock; the `wall` clock only stamps jobs and
  decides what is due when a job reaches `take`.
- **Dead letters.** `bury` publishes to `dead`; `dead()` reads the first `limit`
  messages on a channel of its own and closes it, which returns them unacked in
  order (no management plugin needed); `redrive` scans the same way, republishes the
  one it finds to `work`, then acks it. The work queue itself dead-letters to `dead`,
  so a message over a broker-imposed delivery limit (RabbitMQ 4's default of 20) is
  listed there instead of being dropped.
- **Depth and age are approximate.** `depth` is the ready messages of `work` and of
  the delay queues (the queue declare's counts) plus the jobs leased or prefetched by
  this process; those other replicas hold are not counted (AMQP does not report
  unacked counts).
  `oldest_age` peeks at the head of each non-empty queue (and at this process's
  leases): a head is the oldest entry, not always the oldest job (a retried job
  re-enters at the back).

While the broker cannot be reached every method raises `QueueUnavailable` at once, so
whoever enqueued keeps what it owes; the robust connection reconnects by itself and
re-declares the queues. Jobs leased through the lost connection are requeued by the
broker, so a job may run twice but is never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from pamqp.common import FieldTable

from proxy.jobs.queue import Job, QueueUnavailable, WallClock

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "jobs."
DEFAULT_PREFETCH = 16
"""Deliveries the broker may push to this process before it acks some (`?prefetch=`)."""
DEFAULT_TIMEOUT = 5.0
"""Seconds an operation may take before it is reported as `QueueUnavailable`."""
RECONNECT_INTERVAL = 1.0
"""Seconds between the robust connection's attempts to come back."""

DELAY_LEVELS_MS: tuple[int, ...] = tuple(10 * 4**k for k in range(11))
"""Delay queue TTLs: 10 ms, 40 ms, 160 ms ... 10,485,760 ms (~2.9 h). A longer wait
takes several trips through the longest level."""
_PARK_ROUNDS = 100
"""How many not-yet-due messages one `take` parks before it gives up for this poll."""
_PUSH_WAIT = 0.02
"""Seconds an empty `take` waits for a pushed delivery after `basic.get` found nothing
ready: a job confirmed a moment ago may already be on its way to this consumer. Short,
because `take` must not hold up a worker that has jobs to start."""
_RETURN_WAIT = 1.0
"""Seconds a browse waits for the broker to take back what it returned."""
_PEEK_WAIT = 0.1
"""The same for a peek at the head of a queue (`oldest_age`, at scrape time)."""


def queue_names(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Every queue a prefix owns, for operators (and tests) who delete one."""
    return [f"{prefix}work", f"{prefix}dead", *(f"{prefix}delay.{ms}ms" for ms in DELAY_LEVELS_MS)]


def delay_level(wait: float) -> int | None:
    """The delay queue (its TTL in ms) for a job due in `wait` seconds; None if due.

    The longest level that does not overshoot, so a job is never early; under the
    shortest level, the shortest (late by less than 10 ms).
    """
    wait_ms = wait * 1000
    if wait_ms <= 0:
        return None
    return max((ms for ms in DELAY_LEVELS_MS if ms <= wait_ms), default=DELAY_LEVELS_MS[0])


_BROKER_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    aio_pika.exceptions.AMQPException,
    ConnectionError,
    OSError,
    TimeoutError,
)


@dataclass
class _Lease:
    """A delivery `take` handed out and nobody has finished yet."""

    message: AbstractIncomingMessage
    created_at: float
    expiry: asyncio.TimerHandle | None = field(default=None, repr=False)


class AmqpQueue:
    """`JobQueue` on RabbitMQ quorum queues; open it with `AmqpQueue.open`."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        channel: AbstractRobustChannel,
        *,
        name: str,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        wall: WallClock = time.time,
        scrub: Callable[[str], str] = str,
    ) -> None:
        self.name = name
        self._inbox: deque[AbstractIncomingMessage] = deque()
        self._consuming = False
        self._arrived = asyncio.Event()
        self._connection = connection
        self._channel = channel
        self._timeout = timeout
        self._wall = wall
        self._scrub = scrub
        self.work_queue, self.dead_queue, *delays = queue_names(prefix)
        self.delay_queues = dict(zip(DELAY_LEVELS_MS, delays, strict=True))
        self._declared: dict[str, AbstractQueue] = {}
        self._leases: dict[str, _Lease] = {}
        self._receipts = itertools.count(1)
        self._expiring: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        name: str,
        prefix: str = DEFAULT_PREFIX,
        prefetch: int = DEFAULT_PREFETCH,
        timeout: float = DEFAULT_TIMEOUT,
        wall: WallClock = time.time,
        scrub: Callable[[str], str] = str,
    ) -> AmqpQueue:
        """Connect, open a confirming channel and declare the queues (idempotent).

        `url` is the client URL (our own parameters removed); `name` and `scrub` keep
        its password out of every message. The connection is closed if this fails.
        """
        connection: AbstractRobustConnection | None = None
        try:
            with _unavailable(name, scrub):
                async with asyncio.timeout(timeout):
                    connection = await aio_pika.connect_robust(
                        url, reconnect_interval=RECONNECT_INTERVAL
                    )
                    channel = await connection.channel(publisher_confirms=True)
                    await channel.set_qos(prefetch_count=prefetch)
                    queue = cls(
                        connection,
                        channel,
                        name=name,
                        prefix=prefix,
                        timeout=timeout,
                        wall=wall,
                        scrub=scrub,
                    )
                    await queue._declare_all()
        except BaseException:
            if connection is not None:
                with contextlib.suppress(*_BROKER_ERRORS):
                    await connection.close()
            raise
        # a reopened channel (after a reconnect, or a channel error) voids every lease
        channel.reopen_callbacks.add(queue._forget_leases)
        return queue

    async def _declare_all(self) -> None:
        quorum: FieldTable = {"x-queue-type": "quorum"}
        at_least_once: FieldTable = {
            # dead-lettering that waits for the target's confirm (quorum queues only);
            # RabbitMQ requires reject-publish overflow with it
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            "x-dead-letter-exchange": "",
        }
        self._declared[self.dead_queue] = await self._channel.declare_queue(
            self.dead_queue, durable=True, arguments=quorum
        )
        self._declared[self.work_queue] = await self._channel.declare_queue(
            self.work_queue,
            durable=True,
            arguments={**quorum, **at_least_once, "x-dead-letter-routing-key": self.dead_queue},
        )
        for ttl_ms, queue_name in self.delay_queues.items():
            self._declared[queue_name] = await self._channel.declare_queue(
                queue_name,
                durable=True,
                arguments={
                    **quorum,
                    **at_least_once,
                    "x-dead-letter-routing-key": self.work_queue,
                    "x-message-ttl": ttl_ms,
                },
            )

    @contextlib.contextmanager
    def _unavailable(self) -> Iterator[None]:
        with _unavailable(self.name, self._scrub):
            yield

    # -- publishing ----------------------------------------------------------------

    async def _publish(self, job: Job, queue_name: str) -> None:
        """Publish `job` to `queue_name` and return once the broker confirmed it."""
        message = aio_pika.Message(
            job.to_json().encode(),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            content_type="application/json",
            message_id=job.id,
            type=job.type,
        )
        async with asyncio.timeout(self._timeout):
            await self._channel.default_exchange.publish(message, routing_key=queue_name)

    def _destination(self, run_at: float) -> str:
        """Where a job due at `run_at` waits: `work` when due, else a delay queue."""
        level = delay_level(run_at - self._wall())
        return self.work_queue if level is None else self.delay_queues[level]

    async def enqueue(self, job: Job) -> bool:
        """Store the job once the broker confirms it; always True (see the module
        docstring: no dedupe by id, handlers are idempotent)."""
        stored = job.stamped(self._wall())
        assert stored.run_at is not None  # stamped
        with self._unavailable():
            await self._publish(stored, self._destination(stored.run_at))
        return True

    # -- leases --------------------------------------------------------------------

    async def _consume(self) -> None:
        """Start the consumer at the first `take`, not at open: a process that only
        enqueues (a sidecar with `workers: false`) must not hold `prefetch` jobs that
        it will never run. The robust channel consumes again by itself after a
        reconnect."""
        async with asyncio.timeout(self._timeout):
            await self._declared[self.work_queue].consume(self._delivered)
        self._consuming = True

    async def _delivered(self, message: AbstractIncomingMessage) -> None:
        """The consumer's callback: keep the delivery for the next `take`."""
        self._inbox.append(message)
        self._arrived.set()

    async def _next_delivery(self) -> AbstractIncomingMessage | None:
        """A pushed delivery; else one got with `basic.get` (a job beyond the prefetch
        window); else one pushed within `_PUSH_WAIT`; else None."""
        message = self._pop_delivery()
        if message is not None:
            return message
        async with asyncio.timeout(self._timeout):
            message = await self._declared[self.work_queue].get(no_ack=False, fail=False)
        if message is not None:
            return message
        self._arrived.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_PUSH_WAIT):
                await self._arrived.wait()
        return self._pop_delivery()

    def _pop_delivery(self) -> AbstractIncomingMessage | None:
        while self._inbox:
            message = self._inbox.popleft()
            if not _stale(message):
                return message
        return None

    async def take(self, consumer: str, visibility_timeout: float) -> Job | None:
        """Lease one due job, or None. The broker pushes up to `prefetch` deliveries
        to this process's consumer; `take` hands out the next (see `_next_delivery`).
        `consumer` is not needed: a lease belongs to this process's channel. Jobs
        that reached `work` before their `run_at` (on their way through the delay
        levels) are parked again on the way."""
        with self._unavailable():
            if not self._consuming:
                await self._consume()
            for _ in range(_PARK_ROUNDS):
                message = await self._next_delivery()
                if message is None:
                    return None
                try:
                    job = Job.from_json(message.body)
                except (ValueError, KeyError, TypeError) as exc:
                    await self._bury_unreadable(message, exc)
                    continue
                run_at = job.run_at if job.run_at is not None else self._wall()
                destination = self._destination(run_at)
                if destination != self.work_queue:
                    await self._publish(job, destination)
                    await message.ack()
                    continue
                return self._lease(job, message, visibility_timeout)
        return None

    def _lease(self, job: Job, message: AbstractIncomingMessage, visibility_timeout: float) -> Job:
        receipt = str(next(self._receipts))
        created_at = job.created_at if job.created_at is not None else self._wall()
        lease = _Lease(message, created_at)
        lease.expiry = asyncio.get_running_loop().call_later(
            visibility_timeout, self._expire, receipt
        )
        self._leases[receipt] = lease
        return replace(job, receipt=receipt, redelivered=bool(message.redelivered))

    def _expire(self, receipt: str) -> None:
        """The visibility timeout passed: give the job back to the broker for anyone."""
        lease = self._leases.pop(receipt, None)
        if lease is None:
            return
        task = asyncio.create_task(self._requeue(lease.message))
        self._expiring.add(task)
        task.add_done_callback(self._expiring.discard)

    async def _requeue(self, message: AbstractIncomingMessage) -> None:
        try:
            await message.nack(requeue=True)
        except _BROKER_ERRORS as exc:  # the channel is gone: the broker requeued it
            log.debug("job queue %s: requeue after lease expiry failed: %s", self.name, exc)

    def _forget_leases(self, *_: object) -> None:
        """When the channel is reopened the leases and waiting deliveries of the old
        one are void: the broker has requeued those messages, and their delivery tags
        mean nothing on the new channel. (The consumer may already be delivering on the
        new channel when this runs, so only what came through a closed one goes.)"""
        self._inbox = deque(m for m in self._inbox if not _stale(m))
        for receipt, lease in list(self._leases.items()):
            if _stale(lease.message):
                self._drop_lease(receipt)

    def _drop_lease(self, receipt: str) -> None:
        lease = self._leases.pop(receipt, None)
        if lease is not None and lease.expiry is not None:
            lease.expiry.cancel()

    def _held(self, job: Job) -> _Lease | None:
        """The job's lease if this process still holds it: not expired, and its channel
        not closed (a reopen may not have been reported yet when this runs)."""
        if not job.receipt:
            raise ValueError(f"job {job.id!r} was not taken from this queue (no receipt)")
        lease = self._leases.get(job.receipt)
        if lease is not None and _stale(lease.message):
            self._drop_lease(job.receipt)
            return None
        return lease

    async def _settle(self, job: Job, then: Job | None, queue_name: str) -> None:
        """Publish `then` (if any) to `queue_name`, confirmed, and only then ack the
        delivery: a crash between the two leaves a duplicate, never a loss."""
        lease = self._held(job)
        if lease is None:
            return  # the lease expired or went with the connection: another taker has it
        with self._unavailable():
            if then is not None:
                await self._publish(then, queue_name)
            if self._leases.pop(job.receipt or "", None) is None:
                return  # expired while publishing: the requeued original runs again
            if lease.expiry is not None:
                lease.expiry.cancel()
            await lease.message.ack()

    async def ack(self, job: Job) -> None:
        await self._settle(job, None, self.work_queue)

    async def retry(self, job: Job, error: str, run_at: float) -> None:
        await self._settle(job, job.failed(error, run_at), self._destination(run_at))

    async def bury(self, job: Job, error: str) -> None:
        await self._settle(job, job.failed(error, job.run_at), self.dead_queue)

    async def _bury_unreadable(self, message: AbstractIncomingMessage, exc: Exception) -> None:
        """A body that is not a job is kept in the dead queue as it is, for an operator."""
        log.error("job queue %s: unreadable message dead-lettered: %s", self.name, exc)
        async with asyncio.timeout(self._timeout):
            await self._channel.default_exchange.publish(
                aio_pika.Message(message.body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=self.dead_queue,
            )
        await message.ack()

    # -- dead letters --------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _browse(
        self, queue_name: str, *, settle_within: float = _RETURN_WAIT
    ) -> AsyncIterator[_Browser]:
        """`queue_name` on a channel of its own: whatever is got and not acked through
        it goes back, in order, when the channel closes. The broker takes returned
        messages back asynchronously, so on the way out this waits (briefly) until the
        queue's ready count is back, or a `redrive` right after a `dead` would miss them
        (a peek passes a shorter bound: workers may drain the queue meanwhile, so its
        count need not come back)."""
        before = await self._ready(queue_name)
        channel = await self._connection.channel()
        browser = _Browser(await channel.get_queue(queue_name, ensure=False), before)
        try:
            yield browser
        finally:
            with contextlib.suppress(*_BROKER_ERRORS):
                await channel.close()
        if browser.got > browser.acked:
            with contextlib.suppress(TimeoutError):  # late is fine, only not yet visible
                async with asyncio.timeout(settle_within):
                    while await self._ready(queue_name) < before - browser.acked:  # noqa: ASYNC110 - the broker sends no event for it
                        await asyncio.sleep(0.01)

    async def _ready(self, queue_name: str) -> int:
        """Messages ready in `queue_name` (re-declaring it: same arguments, no change)."""
        return (await self._declared[queue_name].declare()).message_count or 0

    async def dead(self, limit: int = 100) -> list[Job]:
        jobs: list[Job] = []
        with self._unavailable():
            async with asyncio.timeout(self._timeout), self._browse(self.dead_queue) as dead:
                while len(jobs) < limit:
                    message = await dead.get()
                    if message is None:
                        break
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        jobs.append(Job.from_json(message.body))
        return jobs

    async def dead_count(self) -> int:
        """The dead queue's ready count, for the metric (`dead` would read every one)."""
        with self._unavailable():
            async with asyncio.timeout(self._timeout):
                return await self._ready(self.dead_queue)

    async def redrive(self, job_id: str) -> bool:
        with self._unavailable():
            async with asyncio.timeout(self._timeout), self._browse(self.dead_queue) as dead:
                for _ in range(dead.ready_at_start):
                    message = await dead.get()
                    if message is None:
                        return False
                    if message.message_id != job_id:
                        continue
                    revived = Job.from_json(message.body).revived(self._wall())
                    await self._publish(revived, self.work_queue)
                    await dead.ack(message)
                    return True
        return False

    # -- gauges --------------------------------------------------------------------

    async def _ready_counts(self) -> dict[str, int]:
        async with asyncio.timeout(self._timeout):
            return {n: await self._ready(n) for n in (self.work_queue, *self.delay_queues.values())}

    async def depth(self) -> int:
        with self._unavailable():
            ready = await self._ready_counts()
        return sum(ready.values()) + len(self._leases) + len(self._inbox)

    async def oldest_age(self) -> float | None:
        created = [lease.created_at for lease in self._leases.values()]
        for message in list(self._inbox):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                created.append(Job.from_json(message.body).created_at or self._wall())
        with self._unavailable():
            ready = await self._ready_counts()
            async with asyncio.timeout(self._timeout):
                for queue_name, count in ready.items():
                    if count == 0:
                        continue
                    async with self._browse(queue_name, settle_within=_PEEK_WAIT) as browser:
                        head = await browser.get()
                    if head is None:
                        continue
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        created_at = Job.from_json(head.body).created_at
                        if created_at is not None:
                            created.append(created_at)
        if not created:
            return None
        return max(0.0, self._wall() - min(created))

    async def close(self) -> None:
        for receipt in list(self._leases):
            self._drop_lease(receipt)
        self._inbox.clear()
        for task in list(self._expiring):
            task.cancel()
        with contextlib.suppress(*_BROKER_ERRORS):
            await self._connection.close()


def _stale(message: AbstractIncomingMessage) -> bool:
    """True when the delivery came through a channel that has closed since."""
    try:
        message.channel  # noqa: B018 - aio-pika raises for a closed channel
    except aiormq.exceptions.ChannelInvalidStateError:
        return True
    return False


class _Browser:
    """Gets from a queue without taking: nothing is acked unless `ack` says so."""

    def __init__(self, queue: AbstractQueue, ready_at_start: int) -> None:
        self._queue = queue
        self.ready_at_start = ready_at_start
        self.got = 0
        self.acked = 0

    async def get(self) -> AbstractIncomingMessage | None:
        message = await self._queue.get(no_ack=False, fail=False)
        self.got += message is not None
        return message

    async def ack(self, message: AbstractIncomingMessage) -> None:
        await message.ack()
        self.acked += 1


@contextlib.contextmanager
def _unavailable(name: str, scrub: Callable[[str], str]) -> Iterator[None]:
    """Raise `QueueUnavailable` for a broker, socket or timeout error inside the block."""
    try:
        yield
    except _BROKER_ERRORS as exc:
        detail = scrub(f"{type(exc).__name__}: {exc}".rstrip(": "))
        raise QueueUnavailable(name, detail) from exc
