"""Durable jobs: work that must happen even if the request or the process that asked
for it is gone (compensations, commits, fraud screening, emails), run at least once,
retried with backoff, dead-lettered after `max_attempts`, never silently dropped."""

from proxy.jobs.queue import (
    EnqueuesMany,
    Job,
    JobQueue,
    QueueUnavailable,
    WakesWorkers,
    WallClock,
)
from proxy.jobs.worker import (
    Handler,
    JobResult,
    PermanentFailure,
    RetryPolicy,
    Worker,
    WorkerHooks,
)

__all__ = [
    "EnqueuesMany",
    "Handler",
    "Job",
    "JobQueue",
    "JobResult",
    "PermanentFailure",
    "QueueUnavailable",
    "RetryPolicy",
    "WakesWorkers",
    "WallClock",
    "Worker",
    "WorkerHooks",
]
