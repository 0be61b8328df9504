"""The job model and the one interface every queue backend implements.

Compensations, commits and other follow-up work must outlive the request (and the
process) that created them, so they are written to a durable queue and run by a
`Worker`. Callers see only `Job`, `JobQueue` and `QueueUnavailable`; the backend
(`sqlite:///path` embedded, `redis://...` or `amqp://...` shared by replicas) is
chosen by URL, as the idempotency store is, by `proxy.storage.open.open_queue`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from proxy.storage.errors import StoreUnavailable

WallClock = Callable[[], float]
"""Wall-clock seconds since the epoch (`time.time`). Persisted timestamps must survive
a restart and be comparable across replicas, so the queue never uses a monotonic clock."""


class QueueUnavailable(StoreUnavailable):
    """The queue's backend could not answer (Redis down, SQLite locked or unopenable).

    Every `JobQueue` method raises it for a backend failure, whatever the backend; the
    worker logs a failed `take` and tries again after its poll interval.
    """

    kind = "job queue"


@dataclass(frozen=True)
class Job:
    """One unit of durable work.

    `id` is the dedupe key: enqueueing an id the queue already holds (pending,
    running or dead) is a no-op, so a caller that is unsure whether its enqueue
    landed may simply repeat it. (On RabbitMQ, which keeps no index by id, the
    repeat is stored and runs again: handlers are idempotent by design.)
    `created_at` and `run_at` left as None are stamped by the queue's wall clock at
    enqueue. `attempts` counts failed runs so far.
    `trace` is opaque trace context (e.g. W3C traceparent) carried to the worker.
    `receipt` is the backend's lease handle, set by `take` and needed by `ack`,
    `retry` and `bury`; it is not persisted as part of the body.
    `redelivered` is set by `take` when this delivery is not the job's first one
    (a lease that lapsed, an abandoned stream entry, a broker redelivery); it is
    not persisted either.
    """

    type: str
    payload: dict[str, Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    attempts: int = 0
    created_at: float | None = None
    run_at: float | None = None
    last_error: str | None = None
    trace: dict[str, Any] | None = None
    receipt: str | None = field(default=None, compare=False, repr=False)
    redelivered: bool = field(default=False, compare=False, repr=False)

    def stamped(self, now: float) -> Job:
        """The job with missing timestamps filled in, as it will be stored."""
        created_at = now if self.created_at is None else self.created_at
        run_at = created_at if self.run_at is None else self.run_at
        return replace(self, created_at=created_at, run_at=run_at, receipt=None)

    def failed(self, error: str, run_at: float | None) -> Job:
        """The job as stored after one more failed attempt."""
        return replace(
            self, attempts=self.attempts + 1, last_error=error, run_at=run_at, receipt=None
        )

    def revived(self, now: float) -> Job:
        """The job as re-driven from the dead-letter list: a fresh budget, due now.

        `last_error` is kept so an operator can still see why it died before.
        """
        return replace(self, attempts=0, run_at=now, receipt=None)

    def to_json(self) -> str:
        """The persisted body: every field but the lease receipt."""
        body = asdict(self)
        del body["receipt"]
        del body["redelivered"]
        return json.dumps(body, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(
        cls, text: str | bytes, *, receipt: str | None = None, redelivered: bool = False
    ) -> Job:
        body = json.loads(text)
        return cls(
            type=body["type"],
            payload=body["payload"],
            id=body["id"],
            attempts=int(body.get("attempts", 0)),
            created_at=body.get("created_at"),
            run_at=body.get("run_at"),
            last_error=body.get("last_error"),
            trace=body.get("trace"),
            receipt=receipt,
            redelivered=redelivered,
        )


@runtime_checkable
class JobQueue(Protocol):
    """At-least-once job storage with leases, delayed retries and a dead-letter list.

    A job is pending (possibly delayed until `run_at`), running (leased to one
    consumer until its visibility timeout passes, after which any consumer may take
    it again), or dead. `ack` removes it; nothing else ever drops a job. A method raises
    `QueueUnavailable` when the backend cannot answer.
    """

    name: str
    """The queue URL with secrets removed, for error bodies and logs."""

    async def enqueue(self, job: Job) -> bool:
        """Store the job durably; False (and no change) when its id is already held.

        A backend that cannot look up ids (RabbitMQ) always stores it and returns True.
        """
        ...

    async def take(self, consumer: str, visibility_timeout: float) -> Job | None:
        """Lease one due job to `consumer`, or None when none is due right now."""
        ...

    async def ack(self, job: Job) -> None:
        """The job is done: forget it. A no-op when the lease was lost to another taker."""
        ...

    async def retry(self, job: Job, error: str, run_at: float) -> None:
        """Count a failed attempt and make the job pending again at `run_at`."""
        ...

    async def bury(self, job: Job, error: str) -> None:
        """Count a failed attempt and move the job to the dead-letter list."""
        ...

    async def dead(self, limit: int = 100) -> list[Job]:
        """Dead jobs, oldest burial first, for operators to inspect."""
        ...

    async def redrive(self, job_id: str) -> bool:
        """Move a dead job back to pending, attempts reset, runnable now."""
        ...

    async def depth(self) -> int:
        """Jobs enqueued and neither acked nor dead: waiting, delayed or in flight."""
        ...

    async def oldest_age(self) -> float | None:
        """Seconds since the oldest job counted by `depth` was created; None if empty."""
        ...

    async def close(self) -> None:
        """Release connections and threads; stored jobs stay."""
        ...


@runtime_checkable
class WakesWorkers(Protocol):
    """A queue that can tell an idle worker a job has arrived (PostgreSQL's NOTIFY)
    or is about to fall due (a delayed job or retry it knows of, a lapsing lease).

    Optional: the `Worker` waits on it, with its long `safety_poll_interval`, instead
    of sleeping its short poll interval; a queue without it is polled.
    """

    async def wait_for_work(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a new job, or until a job the queue learned
        of at its last `take` (or its own `retry`) falls due; True when the worker
        should take again before `timeout` was up. The worker calls it after every
        take, so it must return at once when that take left another job due.

        Never raises for a backend failure: it then waits, as polling does.
        """
        ...


@runtime_checkable
class EnqueuesMany(Protocol):
    """A queue that stores several jobs in one durable write (PostgreSQL: one
    statement, one commit, one NOTIFY).

    Optional: a checkout queues its after-answer jobs (fraud screening, the email)
    together; each enqueue is a commit the store must flush, beside the checkout's own
    writes, so one commit instead of two is one fewer on a busy store. Without it
    they are enqueued one by one, at the same time.
    """

    async def enqueue_many(self, jobs: Sequence[Job]) -> int:
        """Store every job durably, all or none; how many were new (an id already
        held is skipped, as `enqueue` skips it)."""
        ...


@runtime_checkable
class TakesMany(Protocol):
    """A queue that leases several due jobs in one round trip (PostgreSQL: one
    statement).

    Optional: a checkout queues its jobs together (the screening and the email), and a
    worker with free slots takes them together, one statement instead of one per job
    (plus the empty take that often followed). Without it the worker takes one by one.
    """

    async def take_many(self, consumer: str, visibility_timeout: float, limit: int) -> list[Job]:
        """Lease up to `limit` due jobs to `consumer`, oldest due first; [] when none
        is due right now. Each is acked, retried or buried on its own."""
        ...


@runtime_checkable
class CountsDeadLetters(Protocol):
    """A queue that can count its dead letters without reading them.

    Optional: the metrics scrape uses it when a backend has it (RabbitMQ, where reading
    the list means getting every message), and `len(dead(...))` otherwise.
    """

    async def dead_count(self) -> int:
        """How many jobs the dead-letter list holds."""
        ...
