"""The config's scalar types: each parses one YAML value and says what it expects.

Every section model (the sidecar's, the upstreams', the checkout's) builds on these,
so they sit at the bottom of the config layers and import nothing of the sidecar's
except the duration parser of `proxy.durations`.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainSerializer,
    WithJsonSchema,
)
from yarl import URL

from proxy.durations import format_duration, parse_duration
from proxy.storage.url import SCHEMES, redact_url

__all__ = [
    "Duration",
    "Listen",
    "ListenAddress",
    "Rate",
    "Section",
    "StatusSet",
    "StoreUrl",
    "UpstreamUrl",
    "format_duration",
    "parse_duration",
    "parse_listen",
]


class Section(BaseModel):
    """A config section: unknown keys are mistakes, and a loaded config never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": r"^\d+(\.\d+)?(ms|s|m|h)$"}),
]


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate(value: Any) -> float:
    """`100/s`, `600/m`, `5000/h` -> calls per second, greater than 0."""
    if isinstance(value, float | int) and not isinstance(value, bool):
        raise ValueError(f"{value!r} has no unit (use 100/s or 600/m)")
    if isinstance(value, str):
        match = _RATE.match(value)
        if match:
            count = float(match.group(1))
            if count <= 0:
                raise ValueError(f"{value!r} must be more than 0 calls (use 100/s or 600/m)")
            return count / _RATE_UNITS[match.group(2)]
    raise ValueError(f"{value!r} is not a rate (use 100/s or 600/m)")


def format_rate(per_second: float) -> str:
    """Calls per second back to the shortest exact spelling: 0.5 -> '30/m'."""
    for unit, size in (("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        count = per_second * size
        if abs(count - round(count)) < 1e-9:
            return f"{round(count)}/{unit}"
    return f"{per_second:g}/s"


Rate = Annotated[
    float,
    BeforeValidator(parse_rate),
    PlainSerializer(format_rate, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": r"^\d+(\.\d+)?/(s|m|h)$"}),
]
"""A rate as config spells it (`100/s`), held as calls per second."""


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


def _store_url(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a store URL")
    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    if scheme not in SCHEMES:
        raise ValueError(
            f"{redact_url(value)!r} is not a store URL "
            "(use memory://, sqlite:///path, redis://host:port/db, unix:///path.sock, "
            "redis+sentinel://host:26379,host:26380/service/db, "
            "postgresql://user:password@host:5432/db or, for the job queue, "
            "amqp://host:5672/vhost)"
        )
    return value


StoreUrl = Annotated[
    str,
    BeforeValidator(_store_url),
    # escaped: `+` in redis+sentinel is a quantifier in a pattern
    WithJsonSchema({"type": "string", "pattern": f"^({'|'.join(map(re.escape, SCHEMES))})://"}),
]
