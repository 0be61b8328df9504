"""The sidecar's durable state: idempotency store, job queue, and the in-process worker.

Opened when the sidecar starts and closed when it stops, apart from the config
objects, because a store connection (a Redis pool, a SQLite file) outlives any one
request and may be shared with a separate `checkout-sidecar worker` process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from proxy.config.model import Config
from proxy.config.options import job_retry_policy
from proxy.idempotency import IdempotencyGuard, IdempotencyStore
from proxy.jobs import Handler, JobQueue, Worker, WorkerHooks
from proxy.jobs.handlers import UPSTREAM_CALL, UpstreamCallHandler
from proxy.storage.open import Durability, open_idempotency_store, open_queue, probe_durability
from proxy.storage.url import redact_url, sqlite_path
from proxy.upstreams import Upstream

log = logging.getLogger(__name__)

StoreLabel = Literal["idempotency", "journal", "queue"]

LOST_ON_RESTART: dict[StoreLabel, str] = {
    "journal": (
        "unfinished checkouts: recovery can no longer void or capture their authorizations "
        "nor release their reservations, which stay held until they expire upstream"
    ),
    "idempotency": "idempotency records: a client's retry after it runs the request again",
    "queue": "queued jobs: compensations and follow-ups not yet run are never run",
}
"""What a restart of a store's server takes with it when the server keeps nothing."""


def _ensure_sqlite_dir(url: str) -> None:
    if url.startswith("sqlite://"):
        parent = Path(sqlite_path(url)).parent
        parent.mkdir(parents=True, exist_ok=True)


class DurableState:
    """Stores and workers of one sidecar process."""

    def __init__(
        self,
        config: Config,
        upstreams: Callable[[str], Upstream | None],
        *,
        worker_hooks: WorkerHooks | None = None,
        idempotency_result: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self._upstreams = upstreams
        self._worker_hooks = worker_hooks
        self._idempotency_result = idempotency_result
        self.handlers: dict[str, Handler] = {UPSTREAM_CALL: UpstreamCallHandler(upstreams)}
        self.store: IdempotencyStore | None = None
        self.queue: JobQueue | None = None
        self.guard: IdempotencyGuard | None = None
        self.worker: Worker | None = None
        self._stop = asyncio.Event()
        self._worker_task: asyncio.Task[None] | None = None

    async def open(self, *, run_workers: bool | None = None) -> None:
        config = self.config
        _ensure_sqlite_dir(config.idempotency_store)
        _ensure_sqlite_dir(config.queue_store)
        self.store = open_idempotency_store(config.idempotency_store)
        section = config.idempotency
        self.guard = IdempotencyGuard(
            self.store,
            header=section.header,
            ttl=section.ttl,
            in_progress_timeout=section.in_progress_timeout,
            scope_header=section.scope_header,
            on_result=self._idempotency_result,
        )
        self.queue = await open_queue(config.queue_store)
        queue = config.queue
        self.worker = Worker(
            self.queue,
            self.handlers,
            policies={name: job_retry_policy(p) for name, p in queue.types.items()},
            default_policy=job_retry_policy(queue.retry),
            consumer=f"{socket.gethostname()}-{os.getpid()}",
            visibility_timeout=queue.visibility_timeout,
            poll_interval=queue.poll_interval,
            safety_poll_interval=queue.safety_poll_interval,
            concurrency=queue.concurrency,
            hooks=self._worker_hooks,
        )
        if run_workers if run_workers is not None else queue.workers:
            self.start_workers(True)

    def start_workers(self, run_workers: bool | None = None) -> None:
        """Start the in-process worker unless told not to (or the config says not to)."""
        wanted = run_workers if run_workers is not None else self.config.queue.workers
        if wanted and self._worker_task is None and self.worker is not None:
            self._worker_task = asyncio.create_task(self.worker.run(self._stop), name="job-worker")

    def register(self, job_type: str, handler: Handler) -> None:
        """Add a job handler (the checkout registers its own); visible to the running worker."""
        self.handlers[job_type] = handler
        if self.worker is not None:
            self.worker.handlers[job_type] = handler

    async def stop_workers(self) -> None:
        """Let running jobs finish; jobs not taken stay queued for the next worker."""
        self._stop.set()
        if self._worker_task is not None:
            await self._worker_task
            self._worker_task = None

    async def report_durability(
        self,
        report: Callable[[StoreLabel, bool | None], None],
        *,
        journal: str | None,
    ) -> None:
        """Tell `report` (the `sidecar_store_durable` gauge) whether each store keeps its
        data over a restart of its server, and log a warning for each one that does not,
        or whose Sentinel-managed master would lose acknowledged writes in a failover:
        the consistency promise (nothing left hanging) holds only while the journal does.
        `journal` is the journal's URL, None when no checkout is configured.
        """
        stores: dict[StoreLabel, str] = {
            "idempotency": self.config.idempotency_store,
            "queue": self.config.queue_store,
        }
        if journal is not None:
            stores["journal"] = journal
        found: dict[str, Durability] = {}
        for label, url in stores.items():
            if url not in found:  # one question per server, however many stores share it
                found[url] = await probe_durability(url)
            durability = found[url]
            report(label, durability.durable)
            extra = {"event": "store_durability", "store": label, "url": redact_url(url)}
            if durability.durable is False:
                log.warning(
                    "the %s store %s keeps nothing over a restart (%s); a restart loses %s",
                    label,
                    redact_url(url),
                    durability.detail,
                    LOST_ON_RESTART[label],
                    extra=extra,
                )
            if durability.caveat:
                log.warning(
                    "the %s store %s: %s",
                    label,
                    redact_url(url),
                    durability.caveat,
                    extra={**extra, "event": "store_failover_risk"},
                )
            if durability.durable is None:
                log.info(
                    "the %s store %s: whether it survives a restart is unknown (%s)",
                    label,
                    redact_url(url),
                    durability.detail,
                    extra=extra,
                )

    async def close(self) -> None:
        await self.stop_workers()
        if self.queue is not None:
            with contextlib.suppress(Exception):
                await self.queue.close()
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.store.close()
