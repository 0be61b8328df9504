"""The policy sections of one upstream: timeouts, retry, pool, breaker, bulkhead, fallback, TLS.

`defaults:` and every entry of `upstreams:` share the `Policy` shape; the loader
deep-merges the defaults into each upstream before these models see it.
`proxy.config.options` turns these sections into the resilience layer's options.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from proxy.config.values import (
    Duration,
    Rate,
    Section,
    StatusSet,
    UpstreamUrl,
    parse_duration,
)
from proxy.resilience.rules import (
    DEFAULT_FALLBACK_ON,
    DEFAULT_RETRY_CONDITIONS,
    RETRY_CONDITIONS,
    FallbackReason,
)
from proxy.tls import (
    MinVersion,
    check_certificate_file,
    check_key_file,
    check_key_matches,
)


class Timeouts(Section):
    """How long to wait. `total` bounds the whole call, retries and backoff included."""

    connect: Duration = Field(
        "250ms", validate_default=True, description="TCP (and TLS) connect timeout per attempt"
    )
    per_try: Duration = Field(
        "1s", validate_default=True, description="one attempt, until its response headers"
    )
    total: Duration = Field(
        "3s", validate_default=True, description="the whole call: every attempt and backoff"
    )

    @model_validator(mode="after")
    def _ordered(self) -> Timeouts:
        if self.total <= 0 or self.per_try <= 0 or self.connect <= 0:
            raise ValueError("timeouts must be greater than 0")
        if self.per_try > self.total:
            raise ValueError(f"per_try ({self.per_try:g}s) is longer than total ({self.total:g}s)")
        return self


class Backoff(Section):
    base: Duration = Field("100ms", validate_default=True)
    multiplier: float = Field(2.0, ge=1.0, le=10.0)
    max: Duration = Field("2s", validate_default=True)
    jitter: Literal["none", "full", "equal"] = "full"

    @model_validator(mode="after")
    def _ordered(self) -> Backoff:
        if self.max < self.base:
            raise ValueError(f"max ({self.max:g}s) is smaller than base ({self.base:g}s)")
        return self


def _retry_condition(value: Any) -> str | int:
    if isinstance(value, int) and not isinstance(value, bool):
        if 400 <= value <= 599:
            return value
        raise ValueError(f"{value} is not a retryable status (use a 4xx or 5xx code)")
    if isinstance(value, str):
        if value.isdigit():
            return _retry_condition(int(value))
        if value in RETRY_CONDITIONS:
            return value
    raise ValueError(
        f"{value!r} is not a retry condition (use {', '.join(RETRY_CONDITIONS)} or a status code)"
    )


RetryCondition = Annotated[
    str | int,
    BeforeValidator(_retry_condition),
    WithJsonSchema(
        {
            "anyOf": [
                {"enum": list(RETRY_CONDITIONS)},
                {"type": "integer", "minimum": 400, "maximum": 599},
            ]
        }
    ),
]


def _default_retry_on() -> list[str | int]:
    return [*DEFAULT_RETRY_CONDITIONS, 502, 503, 504]


class RetryBudget(Section):
    """Retries allowed over a rolling window: ratio x requests + min_per_second x window."""

    ratio: float = Field(0.2, ge=0.0, le=10.0)
    min_per_second: float = Field(10.0, ge=0.0)
    window: Duration = Field("10s", validate_default=True)


class Retry(Section):
    """When to try again. POST and PATCH are retried only with an Idempotency-Key."""

    attempts: int = Field(3, ge=1, le=10, description="attempts in all, the first included")
    backoff: Backoff = Backoff()
    on: list[RetryCondition] = Field(default_factory=_default_retry_on)
    buffer_limit: ByteSize = Field(
        ByteSize(64 * 1024), description="larger request bodies are streamed and not retried"
    )
    budget: RetryBudget = RetryBudget()

    @property
    def statuses(self) -> frozenset[int]:
        return frozenset(c for c in self.on if isinstance(c, int))

    @property
    def conditions(self) -> frozenset[str]:
        return frozenset(c for c in self.on if isinstance(c, str))


class Pool(Section):
    """The upstream's keep-alive connection pool."""

    max_connections: int = Field(100, ge=1, le=10000)
    keepalive: Duration = Field("30s", validate_default=True)


class SlowCall(Section):
    duration: Duration | None = Field(None, description="a call slower than this is slow")
    rate: float = Field(1.0, gt=0.0, le=1.0, description="slow share that opens the breaker")


class Breaker(Section):
    """Closed / open / half-open over a sliding time window of attempts."""

    enabled: bool = True
    window: Duration = Field("10s", validate_default=True)
    min_calls: int = Field(20, ge=1)
    failure_rate: float = Field(0.5, gt=0.0, le=1.0)
    slow_call: SlowCall = SlowCall()
    open_for: Duration = Field("5s", validate_default=True)
    half_open_probes: int = Field(3, ge=1, le=1000)
    failure_on: StatusSet = Field(
        default_factory=lambda: frozenset(range(500, 600)),
        description="statuses that count as failures (4xx never should)",
    )


class Bulkhead(Section):
    max_concurrent: int = Field(100, ge=1, le=100_000)
    max_queue: int = Field(0, ge=0, le=100_000)


class Stale(Section):
    max_age: Duration = Field("5m", validate_default=True)
    max_entries: int = Field(1000, ge=1, le=1_000_000)


def _stale(value: Any) -> Any:
    if value is True:
        return {}
    if value is False or value is None:
        return None
    return value


class Fallback(Section):
    """What answers when the call failed for good: the last good GET, then a static response."""

    on: list[FallbackReason] = Field(default_factory=lambda: list(DEFAULT_FALLBACK_ON))
    stale: Annotated[Stale | None, BeforeValidator(_stale)] = None
    status: int | None = Field(None, ge=100, le=599)
    headers: dict[str, str] = Field(default_factory=dict)
    json_body: Any = Field(None, alias="json")
    body: str | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _something_to_serve(self) -> Fallback:
        if self.json_body is not None and self.body is not None:
            raise ValueError("set either json or body, not both")
        if self.stale is None and not self.has_static:
            raise ValueError("a fallback needs a static response (status, json or body) or stale")
        return self

    @property
    def has_static(self) -> bool:
        return self.status is not None or self.json_body is not None or self.body is not None


class Tls(Section):
    """How to call an `https://` upstream: whom to trust, which certificate to show.

    The files are read here, at load (and at every reload), so a missing or
    unreadable file, a key that does not belong to its certificate, or an expired
    certificate is a config error at the line that names it, not a failure on the
    first call. While the sidecar runs, `proxy.tls.ClientTls` re-reads them when
    they change on disk. Ignored for `http://` upstreams.
    """

    ca_file: str | None = Field(
        None, description="PEM CA bundle to verify the upstream with (a private CA)"
    )
    system_ca: bool | None = Field(
        None,
        description="also trust the system store; default: only when ca_file is not set",
    )
    cert_file: str | None = Field(None, description="PEM client certificate (chain), for mTLS")
    key_file: str | None = Field(None, description="PEM private key of cert_file, unencrypted")
    server_name: str | None = Field(
        None, description="SNI and the name verified, when the URL's host differs"
    )
    min_version: MinVersion = Field("1.2", description="oldest TLS version offered: 1.2 or 1.3")
    insecure_skip_verify: bool = Field(
        False, description="do not verify the upstream at all (logged at every load)"
    )

    @field_validator("min_version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        # YAML reads an unquoted 1.2 as a float
        return str(value) if isinstance(value, float) else value

    @field_validator("ca_file")
    @classmethod
    def _ca_usable(cls, value: str | None) -> str | None:
        if value is not None:
            check_certificate_file(value, "CA file")
        return value

    @field_validator("cert_file")
    @classmethod
    def _cert_usable(cls, value: str | None) -> str | None:
        if value is not None:
            check_certificate_file(value, "certificate file")
        return value

    @field_validator("key_file")
    @classmethod
    def _key_usable(cls, value: str | None) -> str | None:
        if value is not None:
            check_key_file(value)
        return value

    @field_validator("server_name")
    @classmethod
    def _server_name(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c in value for c in "/: ")):
            raise ValueError(f"{value!r} is not a host name")
        return value

    @model_validator(mode="after")
    def _pair(self) -> Tls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("set cert_file and key_file together (a client certificate)")
        if self.cert_file is not None and self.key_file is not None:
            check_key_matches(self.cert_file, self.key_file)
        if self.system_ca is False and self.ca_file is None and not self.insecure_skip_verify:
            raise ValueError("system_ca: false needs a ca_file, or nothing would be trusted")
        return self

    @property
    def trusts_system(self) -> bool:
        return self.system_ca if self.system_ca is not None else self.ca_file is None


class RateLimit(Section):
    """Keep under the upstream's quota: `rate` calls (attempts) with up to `burst` at once.

    `local` counts per sidecar process; `shared` keeps one count for every replica in
    the top-level `store` (Redis). A call over the limit waits for a token when the
    wait fits its deadline, else it is refused with 429 `rate_limited`.
    """

    rate: Rate = Field(description="calls per second or minute: 100/s, 600/m")
    burst: int = Field(1, ge=1, le=1_000_000, description="calls allowed at once, above the rate")
    scope: Literal["local", "shared"] = Field(
        "local", description="local: per process; shared: one limit for all replicas"
    )
    on_store_down: Literal["refuse", "allow"] = Field(
        "refuse",
        description="shared only: when the store cannot be asked, refuse (503) or allow calls",
    )


_QUANTILE = re.compile(r"^p(\d{2}(?:\.\d+)?)$")


def _hedge_after(value: Any) -> float | str:
    if isinstance(value, str):
        match = _QUANTILE.match(value.strip())
        if match:
            if not 50.0 <= float(match.group(1)) < 100.0:
                raise ValueError(f"{value!r}: the quantile must be from p50 to below p100")
            return value.strip()
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise ValueError(
            f"{value!r} is neither a duration nor a latency quantile (use 50ms or p95)"
        ) from None
    if seconds <= 0:
        raise ValueError("after must be greater than 0")
    return seconds


HedgeAfter = Annotated[
    float | str,
    BeforeValidator(_hedge_after),
    WithJsonSchema({"type": "string", "pattern": r"^(\d+(\.\d+)?(ms|s|m|h)|p\d{2}(\.\d+)?)$"}),
]


class HedgeBudget(Section):
    """Hedges allowed over a rolling window: ratio x calls + min_per_second x window."""

    ratio: float = Field(0.05, ge=0.0, le=1.0)
    min_per_second: float = Field(1.0, ge=0.0)
    window: Duration = Field("10s", validate_default=True)


class Hedge(Section):
    """Race a slow attempt with a copy: GET and HEAD, or keyed calls to `idempotency: true`.

    A hedge also spends the retry budget, a breaker permit and a rate limit token.
    """

    after: HedgeAfter = Field(
        "p95", validate_default=True, description="fixed (50ms) or a latency quantile (p95)"
    )
    fallback_after: Duration = Field(
        "50ms", validate_default=True, description="used until the quantile has min_samples"
    )
    min_samples: int = Field(50, ge=1, le=1_000_000)
    window: Duration = Field("10s", validate_default=True, description="latency window")
    max_extra: int = Field(1, ge=1, le=5, description="hedges per attempt at most")
    budget: HedgeBudget = HedgeBudget()

    @model_validator(mode="after")
    def _positive(self) -> Hedge:
        if self.fallback_after <= 0 or self.window <= 0:
            raise ValueError("fallback_after and window must be greater than 0")
        return self

    @property
    def quantile(self) -> float | None:
        """The quantile `after` names (0.95 for p95), or None for a fixed delay."""
        if isinstance(self.after, str):
            return float(self.after[1:]) / 100.0
        return None


class Policy(Section):
    """Everything an upstream can override; `defaults:` has the same shape."""

    timeout: Timeouts = Timeouts()
    retry: Retry = Retry()
    pool: Pool = Pool()
    breaker: Breaker = Breaker()
    bulkhead: Bulkhead = Bulkhead()
    fallback: Fallback | None = None
    tls: Tls | None = None
    rate_limit: RateLimit | None = None
    hedge: Hedge | None = None
    max_request_body: ByteSize = Field(
        ByteSize(10 * 1024 * 1024), description="larger requests are refused with 413"
    )


UPSTREAM_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
RESERVED_NAMES = frozenset({"checkout", "healthz", "readyz", "metrics", "admin"})


def _upstream_name(name: str) -> str:
    if not UPSTREAM_NAME.match(name):
        raise ValueError(f"upstream name {name!r} must be lower case letters, digits, '-' or '_'")
    if name in RESERVED_NAMES:
        raise ValueError(f"upstream name {name!r} is reserved by the sidecar")
    return name


UpstreamName = Annotated[str, AfterValidator(_upstream_name)]


class Upstream(Policy):
    url: UpstreamUrl
    idempotency: bool = Field(
        False, description="POST/PATCH with an Idempotency-Key reach this upstream only once"
    )
