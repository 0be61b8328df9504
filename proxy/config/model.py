"""The root `Config`: the sidecar's own sections, and the rules that span sections.

The sections of the sidecar itself (listeners, stores, idempotency, the job queue,
shutdown, reload, logs) are here; an upstream's policy sections come from
`proxy.config.upstream`, the composite checkout's from `proxy.checkout.schema`.
`semantic_errors` holds the checks no single section can make, once the shapes
are valid; the checkout's own cross-checks stay with its schema.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from proxy.checkout.schema import CheckoutComposite, composite_errors
from proxy.config.secrets import FileSecrets
from proxy.config.source import Document, SourceError, dotted
from proxy.config.upstream import Policy, Upstream, UpstreamName
from proxy.config.values import Duration, ListenAddress, Section, StoreUrl


class Idempotency(Section):
    """Idempotency-Key handling (IETF draft): run once, replay after, 409/422 on misuse."""

    store: StoreUrl | None = Field(None, description="overrides the top-level store")
    header: str = "Idempotency-Key"
    ttl: Duration = Field("24h", validate_default=True)
    in_progress_timeout: Duration = Field("1m", validate_default=True)
    scope_header: str | None = Field(
        None, description="client identity header (e.g. X-Customer-Id) that scopes keys"
    )
    required_for: list[str] = Field(
        default_factory=list,
        description="upstream names (and 'checkout') whose POST/PATCH must carry a key",
    )


class JobRetry(Section):
    max_attempts: int = Field(10, ge=1, le=1000)
    base: Duration = Field("1s", validate_default=True)
    multiplier: float = Field(2.0, ge=1.0, le=10.0)
    max: Duration = Field("5m", validate_default=True)


class Queue(Section):
    """The durable job queue: at-least-once, retried, dead-lettered, never dropped."""

    store: StoreUrl | None = Field(None, description="overrides the top-level store")
    workers: bool = Field(True, description="run workers inside the sidecar")
    concurrency: int = Field(
        32,
        ge=1,
        le=256,
        description="jobs run at once; they wait on upstreams, so this divided by a job's"
        " latency is the jobs per second a worker keeps up with",
    )
    visibility_timeout: Duration = Field("30s", validate_default=True)
    poll_interval: Duration = Field("200ms", validate_default=True)
    safety_poll_interval: Duration = Field(
        "5s",
        validate_default=True,
        description="an idle worker of a queue that wakes it (PostgreSQL, Redis) looks"
        " anyway this often, for work nothing announced",
    )
    retry: JobRetry = JobRetry()
    types: dict[str, JobRetry] = Field(
        default_factory=dict, description="retry policy per job type"
    )

    @model_validator(mode="after")
    def _memory_is_not_a_queue(self) -> Queue:
        if self.store is not None and self.store.startswith("memory://"):
            raise ValueError(
                "the job queue must be durable: use sqlite:///path, redis://, postgresql:// "
                "or amqp://"
            )
        return self


class Admin(Section):
    listen: ListenAddress = Field("127.0.0.1:9901", validate_default=True)
    token: str | None = Field(None, description="bearer token; required off loopback")

    @field_validator("token", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value


class Composite(Section):
    checkout: CheckoutComposite | None = None


EventType = Literal[
    "checkout.confirmed", "checkout.rejected", "checkout.compensated", "checkout.fraud_flagged"
]
EVENT_TYPES: tuple[EventType, ...] = (
    "checkout.confirmed",
    "checkout.rejected",
    "checkout.compensated",
    "checkout.fraud_flagged",
)
"""What happens to a checkout that other services may want to hear of."""


class Events(Section):
    """Checkout events for other services, as CloudEvents on a broker, through an outbox.

    Absent: no event is written or published, and nothing is connected.
    """

    broker: str = Field(
        ...,
        pattern=r"^amqps?://",
        description="the broker's URL (amqp:// or amqps://, aio-pika)",
    )
    exchange: str = Field("checkout.events", min_length=1, description="a durable topic exchange")
    types: list[EventType] = Field(
        default_factory=lambda: list(EVENT_TYPES), description="the event types to publish"
    )
    source: str = Field(
        "urn:checkout-sidecar", min_length=1, description="the CloudEvents `source` attribute"
    )
    relay_interval: Duration = Field(
        "2s", validate_default=True, description="how often unsent events are published again"
    )
    publish_timeout: Duration = Field(
        "5s", validate_default=True, description="connect and confirm time limit per publish"
    )


class Shutdown(Section):
    """SIGTERM: not ready at once, keep accepting for drain_delay, then finish within grace."""

    drain_delay: Duration = Field(
        "5s", validate_default=True, description="keep accepting so the load balancer notices"
    )
    grace: Duration = Field(
        "20s", validate_default=True, description="in-flight requests and checkouts finish"
    )


class Reload(Section):
    """Live reload: on SIGHUP, and when the file (or a ConfigMap's symlink) changes."""

    watch: bool = True
    poll_interval: Duration = Field("1s", validate_default=True)


class Log(Section):
    level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="overridden by the LOG_LEVEL environment variable"
    )
    access_log: bool = Field(False, description="one JSON line per proxied request")


DEFAULT_STORE = "sqlite://var/checkout-sidecar.db"


class Config(Section):
    listen: ListenAddress = Field("127.0.0.1:8080", validate_default=True)
    admin: Admin = Admin()
    store: StoreUrl = Field(
        DEFAULT_STORE, description="default store of idempotency records, journal and queue"
    )
    idempotency: Idempotency = Idempotency()
    queue: Queue = Queue()
    defaults: Policy = Policy()
    upstreams: dict[UpstreamName, Upstream] = Field(default_factory=dict)
    composite: Composite = Composite()
    events: Events | None = None
    shutdown: Shutdown = Shutdown()
    reload: Reload = Reload()
    log: Log = Log()

    # not a field: where values came from is not part of the config's shape or schema
    _file_secrets: FileSecrets = PrivateAttr(default_factory=FileSecrets)

    @property
    def file_secrets(self) -> FileSecrets:
        """The values of this config read from `${file:...}`, and the files read.

        `/admin/config` and the logs hide these values; the reloader watches the files.
        """
        return self._file_secrets

    def attach_file_secrets(self, secrets: FileSecrets) -> None:
        """Record what came from files; the loader does this once, before anyone reads it."""
        self._file_secrets = secrets

    @property
    def idempotency_store(self) -> str:
        return self.idempotency.store or self.store

    @property
    def queue_store(self) -> str:
        store = self.queue.store or self.store
        # a memory:// default store is for throwaway runs; the queue then lives in a
        # private temporary SQLite file so at-least-once still holds within the process
        if store.startswith("memory://"):
            return f"sqlite://{tempfile.gettempdir()}/checkout-sidecar-queue-{os.getpid()}.db"
        return store


SHARED_LIMIT_SCHEMES = (
    "memory", "redis", "rediss", "unix", "redis+sentinel", "postgresql", "postgres"
)  # fmt: skip
"""Stores that can keep a `scope: shared` rate limit (`proxy.storage.limits` opens
them; a test checks the two lists agree). memory:// shares it within one process."""


def rate_limit_errors(config: Config, doc: Document) -> list[SourceError]:
    """A `scope: shared` rate limit needs a store every replica reaches (not SQLite)."""
    scheme = config.store.split("://", 1)[0].lower()
    if scheme in SHARED_LIMIT_SCHEMES:
        return []
    sections: list[tuple[tuple[str | int, ...], Upstream | Policy]] = [
        (("defaults",), config.defaults),
        *((("upstreams", name), upstream) for name, upstream in config.upstreams.items()),
    ]
    out = []
    for where, section in sections:
        limit = section.rate_limit
        if limit is None or limit.scope != "shared":
            continue
        if (*where, "rate_limit") not in doc.lines:
            continue  # inherited from defaults: reported there once
        path = (*where, "rate_limit", "scope")
        out.append(
            SourceError(
                doc.file,
                doc.line_of(path),
                dotted(path),
                f"shared needs a store every replica reaches: store is {scheme}://, "
                "use redis://host:port/db (or scope: local)",
            )
        )
    return out


def semantic_errors(config: Config, doc: Document) -> list[SourceError]:
    """Rules that span sections, checked once the shapes are valid."""
    out: list[SourceError] = []
    if not config.admin.listen.is_loopback and not config.admin.token:
        path: tuple[str | int, ...] = ("admin", "listen")
        out.append(
            SourceError(
                doc.file,
                doc.line_of(path),
                dotted(path),
                f"{config.admin.listen} is not loopback: set admin.token to expose the admin "
                "listener beyond this host",
            )
        )
    out.extend(composite_errors(config.composite.checkout, config.upstreams.keys(), doc))
    out.extend(rate_limit_errors(config, doc))
    known = set(config.upstreams) | {"checkout"}
    for i, name in enumerate(config.idempotency.required_for):
        if name not in known:
            path = ("idempotency", "required_for", i)
            out.append(
                SourceError(
                    doc.file, doc.line_of(path), dotted(path), f"no upstream named {name!r}"
                )
            )
    if config.listen == config.admin.listen and config.listen.port != 0:
        path = ("admin", "listen")
        out.append(
            SourceError(doc.file, doc.line_of(path), dotted(path), "must differ from listen")
        )
    return out
