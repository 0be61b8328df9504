"""The sidecar's configuration: one YAML file, validated before anything starts.

The models are plain data (pydantic v2) so the same definitions give validation
with field paths, defaults, and the JSON Schema for editors. `load_config` turns
every pydantic error into `file:line path: message` using the line map kept by
`proxy.yamlsource`, and reports errors in `defaults:` once, at their own line,
rather than once per upstream that inherited them.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path as FsPath
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from yarl import URL

from proxy import yamlsource
from proxy.yamlsource import Path, SourceError, dotted

DEFAULT_CONFIG_PATH = "config/sidecar.yaml"

# ---------------------------------------------------------------------------
# scalar types

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    """`250ms`, `2s`, `1m`, `24h` -> seconds. Bare numbers are refused: `5` is ambiguous."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2)]
    if isinstance(value, float | int) and not isinstance(value, bool) and value == 0:
        return 0.0
    raise ValueError(f"{value!r} is not a duration (use 250ms, 2s, 1m)")


def format_duration(seconds: float) -> str:
    """Seconds back to the shortest exact config spelling: 0.25 -> '250ms'."""
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return f"{seconds * 1000:g}ms"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": r"^\d+(\.\d+)?(ms|s|m|h)$"}),
]


def parse_listen(value: Any) -> tuple[str, int]:
    """`127.0.0.1:8080`, `[::1]:8080`, `:8080` -> (host, port)."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"{value!r} is not a listen address (use 127.0.0.1:8080)")
    host, _, port_text = value.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{value!r} has no valid port (use 127.0.0.1:8080)") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    return host, port


class Listen(BaseModel):
    model_config = ConfigDict(frozen=True)
    host: str
    port: int

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _listen(value: Any) -> Any:
    if isinstance(value, Listen | dict):
        return value
    host, port = parse_listen(value)
    return {"host": host, "port": port}


ListenAddress = Annotated[
    Listen,
    BeforeValidator(_listen),
    PlainSerializer(str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": r"^(\[[0-9a-fA-F:]+\]|[^:]*):\d+$"}),
]


def _upstream_url(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a URL")
    try:
        url = URL(value)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a URL: {exc}") from None
    if url.scheme not in ("http", "https"):
        raise ValueError(f"{value!r} must start with http:// or https://")
    if not url.host:
        raise ValueError(f"{value!r} has no host")
    if url.query_string or url.fragment:
        raise ValueError(f"{value!r} must not carry a query string or fragment")
    return value.rstrip("/")


UpstreamUrl = Annotated[
    str, BeforeValidator(_upstream_url), WithJsonSchema({"type": "string", "format": "uri"})
]


# ---------------------------------------------------------------------------
# policy sections


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Section):
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


class Backoff(_Section):
    base: Duration = Field("100ms", validate_default=True)
    multiplier: float = Field(2.0, ge=1.0, le=10.0)
    max: Duration = Field("2s", validate_default=True)
    jitter: Literal["none", "full", "equal"] = "full"

    @model_validator(mode="after")
    def _ordered(self) -> Backoff:
        if self.max < self.base:
            raise ValueError(f"max ({self.max:g}s) is smaller than base ({self.base:g}s)")
        return self


RETRY_CONDITIONS = ("connect-failure", "timeout", "reset")


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


class RetryBudget(_Section):
    """Retries allowed over a rolling window: ratio x requests + min_per_second x window."""

    ratio: float = Field(0.2, ge=0.0, le=10.0)
    min_per_second: float = Field(10.0, ge=0.0)
    window: Duration = Field("10s", validate_default=True)


class Retry(_Section):
    """When to try again. POST and PATCH are retried only with an Idempotency-Key."""

    attempts: int = Field(3, ge=1, le=10, description="attempts in all, the first included")
    backoff: Backoff = Backoff()
    on: list[RetryCondition] = Field(
        default_factory=lambda: ["connect-failure", "timeout", "reset", 502, 503, 504]
    )
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


class Pool(_Section):
    """The upstream's keep-alive connection pool."""

    max_connections: int = Field(100, ge=1, le=10000)
    keepalive: Duration = Field("30s", validate_default=True)


def _status_class(value: Any) -> list[int]:
    """`503` -> [503]; `5xx` -> 500..599."""
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
        return [value]
    if isinstance(value, str):
        text = value.strip().lower()
        if text.isdigit():
            return _status_class(int(text))
        if len(text) == 3 and text[0] in "12345" and text[1:] == "xx":
            first = int(text[0]) * 100
            return list(range(first, first + 100))
    raise ValueError(f"{value!r} is not a status code or class (use 503 or 5xx)")


StatusSet = Annotated[
    frozenset[int],
    BeforeValidator(
        lambda v: frozenset(
            c for item in (v if isinstance(v, list) else [v]) for c in _status_class(item)
        )
    ),
    WithJsonSchema(
        {
            "type": "array",
            "items": {
                "anyOf": [
                    {"type": "integer", "minimum": 100, "maximum": 599},
                    {"type": "string", "pattern": "^[1-5]xx$"},
                ]
            },
        }
    ),
]


class SlowCall(_Section):
    duration: Duration | None = Field(None, description="a call slower than this is slow")
    rate: float = Field(1.0, gt=0.0, le=1.0, description="slow share that opens the breaker")


class Breaker(_Section):
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


class Bulkhead(_Section):
    max_concurrent: int = Field(100, ge=1, le=100_000)
    max_queue: int = Field(0, ge=0, le=100_000)


FALLBACK_REASONS = (
    "timeout",
    "circuit_open",
    "bulkhead_full",
    "retries_exhausted",
    "upstream_5xx",
    "connect_failure",
    "reset",
)


class Stale(_Section):
    max_age: Duration = Field("5m", validate_default=True)
    max_entries: int = Field(1000, ge=1, le=1_000_000)


def _stale(value: Any) -> Any:
    if value is True:
        return {}
    if value is False or value is None:
        return None
    return value


class Fallback(_Section):
    """What answers when the call failed for good: the last good GET, then a static response."""

    on: list[Literal[FALLBACK_REASONS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: [r for r in FALLBACK_REASONS if r != "reset"]
    )
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


class Policy(_Section):
    """Everything an upstream can override; `defaults:` has the same shape."""

    timeout: Timeouts = Timeouts()
    retry: Retry = Retry()
    pool: Pool = Pool()
    breaker: Breaker = Breaker()
    bulkhead: Bulkhead = Bulkhead()
    fallback: Fallback | None = None
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


def _store_url(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a store URL")
    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    if scheme not in ("memory", "sqlite", "redis", "rediss"):
        raise ValueError(
            f"{value!r} is not a store URL (use memory://, sqlite:///path or redis://host:port/db)"
        )
    return value


StoreUrl = Annotated[
    str,
    BeforeValidator(_store_url),
    WithJsonSchema({"type": "string", "pattern": "^(memory|sqlite|redis|rediss)://"}),
]


class Idempotency(_Section):
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


class JobRetry(_Section):
    max_attempts: int = Field(10, ge=1, le=1000)
    base: Duration = Field("1s", validate_default=True)
    multiplier: float = Field(2.0, ge=1.0, le=10.0)
    max: Duration = Field("5m", validate_default=True)


class Queue(_Section):
    """The durable job queue: at-least-once, retried, dead-lettered, never dropped."""

    store: StoreUrl | None = Field(None, description="overrides the top-level store")
    workers: bool = Field(True, description="run workers inside the sidecar")
    concurrency: int = Field(4, ge=1, le=256)
    visibility_timeout: Duration = Field("30s", validate_default=True)
    poll_interval: Duration = Field("200ms", validate_default=True)
    retry: JobRetry = JobRetry()
    types: dict[str, JobRetry] = Field(
        default_factory=dict, description="retry policy per job type"
    )

    @model_validator(mode="after")
    def _memory_is_not_a_queue(self) -> Queue:
        if self.store is not None and self.store.startswith("memory://"):
            raise ValueError("the job queue must be durable: use sqlite:///path or redis://")
        return self


class Admin(_Section):
    listen: ListenAddress = Field("127.0.0.1:9901", validate_default=True)
    token: str | None = Field(None, description="bearer token; required off loopback")

    @field_validator("token", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value


# ---------------------------------------------------------------------------
# the composite checkout

HttpMethod = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
Outcome = Literal["confirmed", "rejected"]


def _compiles(value: Any, path: str | None, where: str) -> None:
    from proxy.checkout.templates import compile_path, compile_template

    if path is not None:
        compile_path(path, where)
    if value is not None:
        compile_template(value, where=where)


class Call(_Section):
    """One upstream call of the saga (commit, compensate, follow-up), with placeholders."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str | None = Field(None, description="names a follow-up call's result for later calls")
    upstream: str | None = Field(None, description="defaults to the step's upstream")
    method: HttpMethod = "POST"
    path: str
    json_body: Any = Field(None, alias="json")
    headers: dict[str, str] = Field(default_factory=dict)
    only_if: str | None = Field(
        None, description="a placeholder; the call is skipped unless it renders truthy"
    )

    @model_validator(mode="after")
    def _templates(self) -> Call:
        _compiles(self.json_body, self.path, "call")
        if self.only_if is not None:
            _compiles(self.only_if, None, "only_if")
        for value in self.headers.values():
            _compiles(value, None, "headers")
        return self


class StepRequest(_Section):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    method: HttpMethod = "POST"
    path: str
    json_body: Any = Field(None, alias="json")
    headers: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _templates(self) -> StepRequest:
        _compiles(self.json_body, self.path, "request")
        for value in self.headers.values():
            _compiles(value, None, "headers")
        return self


class StepFallback(_Section):
    """The answer a non-critical step takes when its call failed (placeholders allowed)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    json_body: Any = Field(alias="json")

    @model_validator(mode="after")
    def _templates(self) -> StepFallback:
        _compiles(self.json_body, None, "fallback")
        return self


class Step(_Section):
    """One upstream call of the checkout and its place in the saga."""

    upstream: str
    request: StepRequest
    critical: bool = Field(True, description="a failed critical step rejects the order")
    mode: Literal["sync", "async"] = "sync"
    commit: Call | None = None
    compensate: Call | None = None
    fallback: StepFallback | None = Field(
        None, description="answer when a non-critical step fails (else the upstream's fallback)"
    )
    only_if: str | None = Field(
        None, description="a placeholder; the step is skipped unless it renders truthy"
    )
    skipped: StepFallback | None = Field(None, description="the step's answer when skipped")
    on_fallback: list[Call] = Field(
        default_factory=list, description="calls queued when the fallback was used"
    )
    when: list[Outcome] = Field(
        default_factory=lambda: ["confirmed"], description="async steps: after which decision"
    )
    callback: Call | None = Field(None, description="async steps: told the step's result")
    flag_if: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="async steps: call back only when the result's field has one of the values",
    )

    @model_validator(mode="after")
    def _async_rules(self) -> Step:
        if self.only_if is not None:
            _compiles(self.only_if, None, "only_if")
        if self.mode == "async" and (self.commit or self.compensate):
            raise ValueError(
                "an async step runs after the decision: it has no commit or compensate"
            )
        if self.mode == "sync" and (self.callback or self.flag_if):
            raise ValueError("callback and flag_if are for async steps")
        return self


class Notify(_Section):
    """Calls queued after a decision, e.g. the confirmation email."""

    name: str
    when: list[Outcome] = Field(default_factory=lambda: ["confirmed"])
    calls: list[Call]


class CheckoutComposite(_Section):
    """`POST /checkout`: one consistent decision from five upstreams."""

    route: str = "POST /checkout"
    deadline: Duration = Field("3s", validate_default=True)
    reserve: Duration = Field(
        "500ms",
        validate_default=True,
        description="time kept back from the fan-out for the commit or compensate calls",
    )
    steps: dict[str, Step]
    notify: list[Notify] = Field(default_factory=list)
    recovery_interval: Duration = Field("10s", validate_default=True)

    @field_validator("route")
    @classmethod
    def _route(cls, value: str) -> str:
        method, _, path = value.partition(" ")
        if method != "POST" or not path.startswith("/") or "{" in path:
            raise ValueError(f"{value!r} must be 'POST /path' (a plain path)")
        return value

    @model_validator(mode="after")
    def _reserve_fits(self) -> CheckoutComposite:
        if self.reserve >= self.deadline:
            raise ValueError("reserve must be shorter than deadline")
        return self

    @property
    def path(self) -> str:
        return self.route.partition(" ")[2]


class Composite(_Section):
    checkout: CheckoutComposite | None = None


class Shutdown(_Section):
    """SIGTERM: not ready at once, keep accepting for drain_delay, then finish within grace."""

    drain_delay: Duration = Field(
        "5s", validate_default=True, description="keep accepting so the load balancer notices"
    )
    grace: Duration = Field(
        "20s", validate_default=True, description="in-flight requests and checkouts finish"
    )


class Reload(_Section):
    """Live reload: on SIGHUP, and when the file (or a ConfigMap's symlink) changes."""

    watch: bool = True
    poll_interval: Duration = Field("1s", validate_default=True)


class Log(_Section):
    level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="overridden by the LOG_LEVEL environment variable"
    )
    access_log: bool = Field(False, description="one JSON line per proxied request")


DEFAULT_STORE = "sqlite://var/checkout-sidecar.db"


class Config(_Section):
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
    shutdown: Shutdown = Shutdown()
    reload: Reload = Reload()
    log: Log = Log()

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


# ---------------------------------------------------------------------------
# loading


class ConfigError(Exception):
    """A config that must not be used; `errors` lists every problem with its line."""

    def __init__(self, errors: list[SourceError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


def _merge(defaults: Any, override: Any, src: Path, dst: Path, origin: dict[Path, Path]) -> Any:
    """Deep-merge `override` over `defaults`, remembering which leaves came from defaults."""
    if not isinstance(defaults, dict) or not isinstance(override, dict):
        return copy.deepcopy(override)
    merged: dict[str, Any] = {}
    for key, value in defaults.items():
        if key in override:
            merged[key] = _merge(value, override[key], (*src, key), (*dst, key), origin)
        else:
            merged[key] = copy.deepcopy(value)
            origin[(*dst, key)] = (*src, key)
    for key, value in override.items():
        if key not in defaults:
            merged[key] = value
    return merged


def _origin_of(path: Path, origin: Mapping[Path, Path]) -> Path:
    for i in range(len(path), 0, -1):
        if path[:i] in origin:
            return origin[path[:i]] + path[i:]
    return path


def _message(error: Mapping[str, Any]) -> str:
    msg = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "missing":
        return "is required"
    value = error.get("input")
    if error["type"] not in ("value_error",) and isinstance(value, str | int | float):
        return f"{value!r}: {msg}"
    return msg


def validate_text(
    text: str, file: str = "<config>", env: Mapping[str, str] | None = None
) -> tuple[Config | None, list[SourceError]]:
    """Validate YAML text; return the config or every error, each with file, line and path."""
    doc = yamlsource.parse(text, file, env)
    errors = list(doc.errors)
    if doc.data is None:
        return None, errors
    if not isinstance(doc.data, dict):
        return None, [SourceError(file, 1, "", "the config must be a mapping of sections")]

    data = dict(doc.data)
    origin: dict[Path, Path] = {}
    defaults = data.get("defaults") or {}
    upstreams = data.get("upstreams")
    if isinstance(upstreams, dict) and isinstance(defaults, dict):
        data["upstreams"] = {
            name: _merge(defaults, body, ("defaults",), ("upstreams", name), origin)
            if isinstance(body, dict)
            else body
            for name, body in upstreams.items()
        }

    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        # a value already reported by the YAML layer (an unset ${VAR}) is not also
        # reported as the empty string it left behind
        flagged = {(e.line, e.path) for e in doc.errors}
        seen: set[tuple[str, str]] = set()
        for err in exc.errors():
            loc = _origin_of(tuple(p for p in err["loc"] if p != "[key]"), origin)
            # a model-level check (per_try > total) has no field of its own: drop the
            # class name pydantic appends, keep the section path
            path = dotted(loc)
            msg = _message(err)
            line = doc.line_of(loc)
            if (path, msg) in seen or (line, path) in flagged:
                continue
            seen.add((path, msg))
            errors.append(SourceError(file, line, path, msg))
        errors.extend(_semantic_errors(_listeners_only(data), doc))
        return None, _sorted(errors)

    errors.extend(_semantic_errors(config, doc))
    if errors:
        return None, _sorted(errors)
    return config, []


def _listeners_only(data: dict[str, Any]) -> Config:
    """A config of just the listeners (or their defaults where invalid), for cross-checks
    that must be reported even when other sections have mistakes."""
    partial: dict[str, Any] = {}
    for section in ("listen", "admin"):
        if section in data:
            try:
                Config.model_validate({section: data[section]})
            except ValidationError:
                continue
            partial[section] = data[section]
    return Config.model_validate(partial)


def _semantic_errors(config: Config, doc: yamlsource.Document) -> list[SourceError]:
    """Rules that span sections, checked once the shapes are valid."""
    out: list[SourceError] = []
    if not config.admin.listen.is_loopback and not config.admin.token:
        path = ("admin", "listen")
        out.append(
            SourceError(
                doc.file,
                doc.line_of(path),
                dotted(path),
                f"{config.admin.listen} is not loopback: set admin.token to expose the admin "
                "listener beyond this host",
            )
        )
    out.extend(_composite_errors(config, doc))
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


def _composite_errors(config: Config, doc: yamlsource.Document) -> list[SourceError]:
    """Names the checkout refers to must exist; placeholders may only look backwards."""
    from proxy.checkout.templates import compile_path, compile_template

    checkout = config.composite.checkout
    if checkout is None:
        return []
    out: list[SourceError] = []
    base = ("composite", "checkout", "steps")
    sync_steps = {n for n, s in checkout.steps.items() if s.mode == "sync"}

    def err(path: tuple[str | int, ...], message: str) -> None:
        out.append(SourceError(doc.file, doc.line_of(path), dotted(path), message))

    def refs(path: str | None, body: Any, *extra: Any) -> set[str]:
        found: set[str] = set()
        if path is not None:
            found |= compile_path(path, "x").step_refs()
        for value in (body, *extra):
            if value is not None:
                found |= compile_template(value, where="x").step_refs()
        return found

    def check_call(call: Call, where: tuple[str | int, ...], allowed: set[str], step: str) -> None:
        upstream = call.upstream or checkout.steps[step].upstream
        if upstream not in config.upstreams:
            err((*where, "upstream"), f"no upstream named {upstream!r}")
        for ref in sorted(refs(call.path, call.json_body, call.only_if, *call.headers.values())):
            if ref not in allowed:
                err(where, f"placeholder references unknown step {ref!r}")

    for name, step in checkout.steps.items():
        where = (*base, name)
        if step.upstream not in config.upstreams:
            err((*where, "upstream"), f"no upstream named {step.upstream!r}")
        request_refs = refs(
            step.request.path, step.request.json_body, *step.request.headers.values()
        )
        allowed_for_request = set() if step.mode == "sync" else sync_steps
        for ref in sorted(request_refs):
            if ref not in checkout.steps:
                err((*where, "request"), f"placeholder references unknown step {ref!r}")
            elif ref not in allowed_for_request:
                err(
                    (*where, "request"),
                    f"placeholder references step {ref!r}, which runs at the same time "
                    "(sync steps start together; only commit, compensate and async steps "
                    "can use their results)",
                )
        followups = {c.name for c in step.on_fallback if c.name}
        for label, call in (("commit", step.commit), ("compensate", step.compensate)):
            if call is not None:
                check_call(call, (*where, label), sync_steps, name)
        if step.callback is not None:
            check_call(step.callback, (*where, "callback"), sync_steps | {name}, name)
        for i, call in enumerate(step.on_fallback):
            check_call(call, (*where, "on_fallback", i), sync_steps | followups, name)
        for label, answer in (("fallback", step.fallback), ("skipped", step.skipped)):
            if answer is not None and refs(None, answer.json_body):
                err((*where, label), "may only use request placeholders")
        if step.only_if is not None and refs(None, step.only_if):
            err((*where, "only_if"), "may only use request placeholders")
    for i, notify in enumerate(checkout.notify):
        names = sync_steps | {c.name for c in notify.calls if c.name}
        for j, call in enumerate(notify.calls):
            if call.upstream is None:
                err(("composite", "checkout", "notify", i, "calls", j), "needs an upstream")
            else:
                check_call(call, ("composite", "checkout", "notify", i, "calls", j), names, "")
    if checkout.path.strip("/").split("/")[0] in config.upstreams:
        err(("composite", "checkout", "route"), "collides with an upstream's proxied path")
    return out


def _sorted(errors: list[SourceError]) -> list[SourceError]:
    return sorted(errors, key=lambda e: (e.line or 0, e.path))


def load_config(path: str | FsPath, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file; raise ConfigError with every problem."""
    file = str(path)
    try:
        text = FsPath(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([SourceError(file, None, "", f"cannot read: {exc.strerror}")]) from None
    config, errors = validate_text(text, file, env)
    if config is None:
        raise ConfigError(errors)
    return config


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the config file, for editors and CI linters."""
    schema = Config.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "checkout-sidecar configuration"
    return schema
