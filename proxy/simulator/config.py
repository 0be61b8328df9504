"""What the simulator is told: ports, business data and faults per upstream.

The same `Faults` model validates the YAML file and the JSON posted to
`/_faults` at run time, so a fault that works in one works in the other. Every
model forbids unknown keys: a typo in a fault (`error_rat: 1`) must fail loudly
instead of silently running a healthy upstream.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

UPSTREAMS: tuple[str, ...] = ("payment", "inventory", "shipping", "coupon", "fraud")

Rate = Annotated[float, Field(ge=0.0, le=1.0)]
Port = Annotated[int, Field(ge=0, le=65535)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FixedLatency(_Model):
    """Every request waits exactly `ms`."""

    dist: Literal["fixed"]
    ms: float = Field(ge=0)


class UniformLatency(_Model):
    """Every request waits between `min_ms` and `max_ms`, uniformly."""

    dist: Literal["uniform"]
    min_ms: float = Field(ge=0)
    max_ms: float = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> UniformLatency:
        if self.max_ms < self.min_ms:
            raise ValueError("max_ms must be >= min_ms")
        return self


class LognormalLatency(_Model):
    """A long-tailed latency given by the two numbers people know: median and p99."""

    dist: Literal["lognormal"]
    p50_ms: float = Field(gt=0)
    p99_ms: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> LognormalLatency:
        if self.p99_ms < self.p50_ms:
            raise ValueError("p99_ms must be >= p50_ms")
        return self

    @property
    def mu(self) -> float:
        """ln(median): the median of a lognormal is exp(mu)."""
        return math.log(self.p50_ms)

    @property
    def sigma(self) -> float:
        """From p99 = exp(mu + z99 * sigma)."""
        return math.log(self.p99_ms / self.p50_ms) / Z99


Z99 = 2.3263478740408408  # standard normal quantile at 0.99

Latency = Annotated[FixedLatency | UniformLatency | LognormalLatency, Field(discriminator="dist")]

FailKind = Literal["status", "reset", "hang", "reset_after", "hang_after"]


class FailNext(_Model):
    """Fail exactly the next `count` API requests, then behave.

    `reset_after` lets the request act (authorize, reserve ...) and then drops
    the connection: the answer is lost, which is what idempotency keys are for.
    `hang_after` lets it act and then never answers, so the client times out
    after the upstream acted (the lost answer a checkout's `resolve` looks up).
    """

    count: int = Field(ge=0)
    status: int = Field(default=503, ge=400, le=599)
    kind: FailKind = "status"


class Faults(_Model):
    """The faults of one upstream. All rates are probabilities per API request."""

    latency: Latency | None = None
    error_rate: Rate = 0.0
    error_status: int = Field(default=503, ge=400, le=599)
    retry_after: int | None = Field(default=None, ge=0, description="seconds, sent on errors")
    hang_rate: Rate = 0.0
    reset_rate: Rate = 0.0
    slow_body_rate: Rate = 0.0
    slow_body_bytes_per_s: int = Field(default=1024, gt=0)
    fail_next: FailNext | None = None
    replay_keys: bool = Field(
        default=True,
        description="false: act on every request, ignoring Idempotency-Key (a provider "
        "without key replay, so a re-sent request acts twice); keys are still recorded",
    )
    seed: int | None = Field(default=None, description="reseed this upstream's randomness")


FAULT_KEYS: frozenset[str] = frozenset(Faults.model_fields)


class _Upstream(Faults):
    """Fault keys sit beside `port` in YAML, as in `payment: {port: 9101, latency: ...}`."""

    port: Port = 0

    def faults(self) -> Faults:
        return Faults(**{key: getattr(self, key) for key in FAULT_KEYS})


class PaymentConfig(_Upstream):
    decline_over: int | None = Field(
        default=None, ge=0, description="amounts (cents) above this are declined with 402"
    )


class InventoryConfig(_Upstream):
    stock: dict[str, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    default_stock: int = Field(default=1_000_000, ge=0, description="for skus not in `stock`")


class ShippingConfig(_Upstream):
    standard_cents: int = Field(default=499, ge=0)
    express_cents: int = Field(default=1499, ge=0)
    per_item_cents: int = Field(default=100, ge=0, description="added per item after the first")


class Coupon(_Model):
    """Exactly one of `percent` or `amount_off` (cents)."""

    percent: float | None = Field(default=None, gt=0, le=100)
    amount_off: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _exactly_one(self) -> Coupon:
        if (self.percent is None) == (self.amount_off is None):
            raise ValueError("give exactly one of percent or amount_off")
        return self


class CouponConfig(_Upstream):
    coupons: dict[str, Coupon] = Field(default_factory=dict)


Verdict = Literal["approve", "review", "reject"]


class FraudConfig(_Upstream):
    review_at: float = Field(default=0.7, ge=0, le=1, description="score >= this: review")
    reject_at: float = Field(default=0.9, ge=0, le=1, description="score >= this: reject")
    customers: dict[str, Verdict] = Field(
        default_factory=dict, description="fixed verdicts by `customer`, for demos and tests"
    )


class UpstreamsConfig(_Model):
    payment: PaymentConfig = Field(default_factory=PaymentConfig)
    inventory: InventoryConfig = Field(default_factory=InventoryConfig)
    shipping: ShippingConfig = Field(default_factory=ShippingConfig)
    coupon: CouponConfig = Field(default_factory=CouponConfig)
    fraud: FraudConfig = Field(default_factory=FraudConfig)


class SimulatorConfig(_Model):
    host: str = "127.0.0.1"
    seed: int = 0
    upstreams: UpstreamsConfig = Field(default_factory=UpstreamsConfig)

    def upstream(self, name: str) -> _Upstream:
        return getattr(self.upstreams, name)


class SimulatorConfigError(ValueError):
    """A config that does not validate; the message has one line per problem."""


def parse_config(
    data: Any, *, source: str = "<config>", yaml_text: str | None = None
) -> SimulatorConfig:
    """Validate plain data; errors name the source, the line (when known) and the field."""
    try:
        return SimulatorConfig.model_validate(data or {})
    except ValidationError as exc:
        raise SimulatorConfigError(_describe(exc, source, yaml_text)) from None


def load_config(path: str | Path) -> SimulatorConfig:
    """Read and validate a simulator YAML file."""
    text = Path(path).read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SimulatorConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, source=str(path), yaml_text=text)


def parse_faults(data: Any) -> Faults:
    """Validate a `/_faults` body (or `Simulator.set_faults` dict)."""
    try:
        return Faults.model_validate(data or {})
    except ValidationError as exc:
        raise SimulatorConfigError(_describe(exc, "faults", None)) from None


def _describe(exc: ValidationError, source: str, yaml_text: str | None) -> str:
    lines = []
    for error in exc.errors():
        # Drop the union tags pydantic adds ("lognormal" in upstreams.payment.latency.lognormal).
        loc = _without_union_tags(error["loc"])
        where = source
        line = _yaml_line(yaml_text, loc) if yaml_text else None
        if line is not None:
            where = f"{source}:{line}"
        dotted = ".".join(str(part) for part in loc) or "(top)"
        lines.append(f"{where} {dotted}: {error['msg']}")
    return "\n".join(lines)


def _without_union_tags(loc: tuple[Any, ...]) -> list[Any]:
    kept: list[Any] = []
    for part in loc:
        if kept and kept[-1] == "latency" and part in ("fixed", "uniform", "lognormal"):
            continue
        kept.append(part)
    return kept


def _yaml_line(text: str, loc: list[Any]) -> int | None:
    """The 1-based line of the deepest key of `loc` that exists in the YAML text."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        for key, value in node.value:
            if key.value == str(part):
                line, node = key.start_mark.line + 1, value
                break
        else:
            break
    return line
