"""Runs queued jobs: take, call the handler for the job's type, then ack, retry or bury.

The worker owns the retry decision (the queue only stores what it is told), so the
backoff is a pure function of the policy and the attempt count, testable without a
queue. Telemetry goes through `WorkerHooks`; this module never imports a metrics
library.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from proxy.jobs.queue import Job, JobQueue, TakesMany, WakesWorkers, WallClock
from proxy.resilience.backoff import BackoffOptions, Jitter, backoff_ceiling, backoff_delay

log = logging.getLogger(__name__)

Handler = Callable[[Job], Awaitable[None]]
JobResult = Literal["ok", "retry", "dead"]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a job type is retried.

    After the n-th failed attempt the job waits about `base * multiplier**(n-1)`
    seconds, capped at `max`, jittered so that jobs that failed together do not all
    come back together: the same backoff as an upstream call's retries
    (`proxy.resilience.backoff`), with "equal" jitter by default (between half and
    all of the wait), because a job's wait should not collapse to nothing. After
    `max_attempts` failed attempts the job is dead-lettered.
    """

    max_attempts: int = 10
    base: float = 1.0
    multiplier: float = 2.0
    max: float = 300.0
    jitter: Jitter = "equal"

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.base < 0 or self.max < 0:
            raise ValueError("base and max must not be negative")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be at least 1, got {self.multiplier}")

    @property
    def backoff(self) -> BackoffOptions:
        return BackoffOptions(self.base, self.multiplier, self.max, self.jitter)


class PermanentFailure(Exception):
    """Raised by a handler when retrying cannot help (the upstream refused with a 4xx).

    The job is dead-lettered at once with this message: still listed, still
    re-drivable by an operator, never silently dropped.
    """


def queue_backend(queue: object) -> str:
    """The backend label of a queue: `sqlite`, `postgres`, `redis`, `amqp`."""
    return type(queue).__name__.removesuffix("Queue").lower()


class WorkerHooks:
    """Telemetry events of a worker; every method is a no-op here."""

    def on_result(self, job_type: str, result: JobResult) -> None:
        """A job run ended: `ok` (acked), `retry` (scheduled again) or `dead`."""

    def on_redelivery(self, backend: str, job: Job) -> None:
        """A job was taken that had been delivered before (`job.redelivered`)."""

    async def around_job(self, job: Job, run: Callable[[], Awaitable[None]]) -> None:
        """Run one job's handler; tracing makes it a span linked to its cause."""
        await run()


class Worker:
    """Takes jobs from one queue and runs them, at most `concurrency` at a time; a
    queue that can lease several in one round trip (`TakesMany`) is asked for as many
    as there are free slots.

    A handler that raises is retried with its type's `RetryPolicy` (or
    `default_policy`) until `max_attempts`, then buried; a job of an unknown type
    is buried at once. A handler must finish within `visibility_timeout`, or
    another worker may take the same job (delivery is at least once, so handlers
    must be idempotent anyway).

    An idle worker looks for work every `poll_interval`, unless its queue wakes it
    (`WakesWorkers`: an enqueue anywhere, or a known job falling due); then it looks
    anyway only every `safety_poll_interval`, for a wake-up that got lost (a
    dropped connection, clocks that disagree), because each look is a query the queue's
    server runs for nothing: at 200 ms they were most of a PostgreSQL queue's takes.
    """

    def __init__(
        self,
        queue: JobQueue,
        handlers: Mapping[str, Handler],
        *,
        policies: Mapping[str, RetryPolicy] | None = None,
        default_policy: RetryPolicy = RetryPolicy(),  # frozen: safe to share
        consumer: str,
        visibility_timeout: float = 30.0,
        poll_interval: float = 0.2,
        safety_poll_interval: float = 5.0,
        concurrency: int = 4,
        hooks: WorkerHooks | None = None,
        wall: WallClock = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if visibility_timeout <= 0:
            raise ValueError(f"visibility_timeout must be positive, got {visibility_timeout}")
        self.queue = queue
        # asked once: isinstance() against a runtime-checkable Protocol walks its
        # members every time (3.5 us in Python 3.11), and the loop asks per job
        self._waker: WakesWorkers | None = queue if isinstance(queue, WakesWorkers) else None
        self._takes_many: TakesMany | None = queue if isinstance(queue, TakesMany) else None
        self.handlers = dict(handlers)
        self.policies = dict(policies or {})
        self.default_policy = default_policy
        self.consumer = consumer
        self.visibility_timeout = visibility_timeout
        self.poll_interval = poll_interval
        self.safety_poll_interval = safety_poll_interval
        self.concurrency = concurrency
        self.hooks = hooks or WorkerHooks()
        self._wall = wall
        self._rng = rng or random.Random()

    def policy_for(self, job_type: str) -> RetryPolicy:
        return self.policies.get(job_type, self.default_policy)

    async def run_once(self) -> int:
        """Take up to `concurrency` due jobs, run them to the end, return how many.

        One batch, not "until empty": a job retried with a tiny backoff could
        otherwise keep one call busy forever. Tests call it instead of `run`.
        """
        jobs: list[Job] = []
        while len(jobs) < self.concurrency:
            taken = await self._take(self.concurrency - len(jobs))
            if not taken:
                break
            jobs += taken
        await asyncio.gather(*(self._process(job) for job in jobs))
        return len(jobs)

    async def _take(self, slots: int) -> list[Job]:
        """Up to `slots` due jobs: in one take where the queue can (`TakesMany`)."""
        if self._takes_many is not None:
            return await self._takes_many.take_many(self.consumer, self.visibility_timeout, slots)
        job = await self.queue.take(self.consumer, self.visibility_timeout)
        return [] if job is None else [job]

    async def run(self, stop: asyncio.Event) -> None:
        """Run jobs until `stop` is set, then wait for those in flight.

        Jobs not yet taken stay pending in the queue for the next worker.
        """
        in_flight: set[asyncio.Task[None]] = set()
        failed_takes = 0
        try:
            while not stop.is_set():
                if len(in_flight) >= self.concurrency:
                    await _wait_for_slot(in_flight, stop)
                    continue
                try:
                    jobs = await self._take(self.concurrency - len(in_flight))
                except Exception:
                    # Backed off apart from the idle wait: a queue that refuses at once
                    # (a store in a failover, a database refusing connections) would
                    # otherwise be asked again at once, in a loop, by every worker.
                    failed_takes += 1
                    delay = backoff_ceiling(TAKE_RETRY, failed_takes)
                    log.exception("job queue take failed; retrying in %.2fs", delay)
                    await _wait(stop, seconds=delay)
                    continue
                failed_takes = 0
                if not jobs:
                    await self._idle(stop)
                    continue
                for job in jobs:
                    task = asyncio.create_task(self._process(job), name=f"job:{job.type}:{job.id}")
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                if self._waker is not None and len(in_flight) < self.concurrency:
                    # it says whether its take left another job due (then at once);
                    # taking until a take comes back empty doubled the takes when idle
                    await self._idle(stop)
        finally:
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)

    async def _idle(self, stop: asyncio.Event) -> None:
        """Wait for work: until the queue announces a job or one falls due when it can
        (`WakesWorkers`, at most `safety_poll_interval`), else `poll_interval`; never
        past `stop`."""
        if self._waker is not None:
            await _wait_for_work(self._waker, stop, seconds=self.safety_poll_interval)
        else:
            await _wait(stop, seconds=self.poll_interval)

    async def _process(self, job: Job) -> None:
        """Run one job and record its result; queue errors are logged, not raised,
        because the lease then expires and the job is simply delivered again."""
        if job.redelivered:
            self.hooks.on_redelivery(queue_backend(self.queue), job)
        try:
            result = await self._run_handler(job)
        except Exception:
            log.exception("job %s (%s): could not record the result", job.id, job.type)
            return
        self.hooks.on_result(job.type, result)

    async def _run_handler(self, job: Job) -> JobResult:
        handler = self.handlers.get(job.type)
        if handler is None:
            known = ", ".join(sorted(self.handlers)) or "none"
            error = f"no handler for job type {job.type!r} (known types: {known})"
            log.error("job %s: %s; dead-lettered", job.id, error)
            await self.queue.bury(job, error)
            return "dead"
        try:
            await self.hooks.around_job(job, lambda: handler(job))
        except PermanentFailure as exc:
            log.error(
                "job %s (%s) cannot succeed, dead-lettered: %s",
                job.id,
                job.type,
                exc,
                extra={"event": "job_dead", "job_id": job.id, "job_type": job.type},
            )
            await self.queue.bury(job, f"permanent: {exc}")
            return "dead"
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            return await self._failed(job, error)
        await self.queue.ack(job)
        return "ok"

    async def _failed(self, job: Job, error: str) -> JobResult:
        policy = self.policy_for(job.type)
        attempts = job.attempts + 1
        if attempts >= policy.max_attempts:
            log.error(
                "job %s (%s) failed attempt %d of %d, dead-lettered: %s",
                job.id,
                job.type,
                attempts,
                policy.max_attempts,
                error,
                extra={"event": "job_dead", "job_id": job.id, "job_type": job.type},
            )
            await self.queue.bury(job, error)
            return "dead"
        delay = backoff_delay(policy.backoff, attempts, self._rng)
        log.warning(
            "job %s (%s) failed attempt %d of %d, retry in %.1fs: %s",
            job.id,
            job.type,
            attempts,
            policy.max_attempts,
            delay,
            error,
            extra={"event": "job_retry", "job_id": job.id, "job_type": job.type},
        )
        await self.queue.retry(job, error, self._wall() + delay)
        return "retry"


TAKE_RETRY = BackoffOptions(base=0.05, multiplier=2.0, max=2.0, jitter="none")
"""The wait before a take is tried again after failures in a row: doubling from 50 ms
up to 2 s, so a queue back from an outage is used again within two seconds and one
that fails at once is asked a few times a second at most."""


async def _wait(stop: asyncio.Event, *, seconds: float) -> None:
    """Sleep up to `seconds`, waking early when `stop` is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


async def _wait_for_work(queue: WakesWorkers, stop: asyncio.Event, *, seconds: float) -> None:
    """Wait until `queue` announces a job, `seconds` pass, or `stop` is set."""
    announced = asyncio.ensure_future(queue.wait_for_work(seconds))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({announced, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in (announced, stopped):
            waiter.cancel()
        await asyncio.gather(announced, stopped, return_exceptions=True)


async def _wait_for_slot(in_flight: set[asyncio.Task[None]], stop: asyncio.Event) -> None:
    """Wait until a running job finishes or `stop` is set, whichever comes first."""
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({*in_flight, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
