"""Store URLs, read the same way by every store (idempotency records, journal, job queue).

`sqlite:///var/lib/sidecar.db` is the absolute path /var/lib/sidecar.db (as in a
file:/// URL; `sqlite:////abs.db` is accepted too), `sqlite://var/sidecar.db` is
relative to the working directory. `redis://`, `rediss://` and `unix:///path.sock?db=N`
are redis-py's own forms; `postgresql://` and `postgres://` are libpq's; `amqp://` and
`amqps://` (RabbitMQ, the job queue only) are aio-pika's.
`redis+sentinel://[user:password@]host:26379,host:26380/service/db` names a Redis
master through its Sentinels (`proxy.storage.sentinel` reads it): the userinfo is the
master's, `?sentinel_password=` (and `?sentinel_username=`) the Sentinels'.

Parameters of ours (`prefix`, `ttl`, `timeout`, `maxsize`, `schema`, `prefetch`,
`wait_replicas`, `replica_timeout`) are taken
out of the query before redis-py or libpq sees the rest (`socket_timeout=`, `sslmode=` ...); a store
ignores those of ours it does not use, so one URL can serve all three stores. A URL may
carry a password, so it is redacted before it reaches a log line, a metric or an error:
`StoreUrl.name` is the only form of it that any message shows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from proxy.durations import parse_duration  # durations are spelled as in the config

StoreKind = Literal["idempotency store", "checkout journal", "job queue", "rate limit store"]
"""What a URL is opened as; every error about a URL names it."""

SCHEMES = (
    "memory", "sqlite", "redis", "rediss", "unix", "redis+sentinel", "postgresql", "postgres",
    "amqp", "amqps",
)  # fmt: skip
"""Every scheme some store opens; `proxy.storage.open` says which store takes which."""

OWN_PARAMETERS = frozenset(
    {"prefix", "ttl", "timeout", "maxsize", "schema", "prefetch"}
    | {"wait_replicas", "replica_timeout"}  # Redis: `proxy.storage.replicas`
)
"""Query parameters read by the stores themselves, never passed to a client library."""


SECRET_KEYS = frozenset(
    {"token", "password", "sentinel_password", "secret", "api_key", "authorization"}
)
"""Names whose values are secrets: config keys, and query parameters (redis-py reads
`?password=`, a Sentinel URL `?sentinel_password=`)."""

MULTI_HOST_SCHEMES = frozenset({"redis+sentinel"})
"""Schemes whose authority lists several `host:port`s, which urllib cannot read as one."""


def redact_secrets(url: str) -> str:
    """The URL as written, its password and secret query parameters replaced by ***.

    For showing a config (`/admin/config`): everything that is not a secret stays, so
    an operator can still compare hosts, prefixes and TTLs. A userinfo without a
    password may itself be a token, so it is hidden whole.
    """
    scheme, _, rest = url.partition("://")
    ends = [i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0]
    cut = min(ends, default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    if "@" in authority:
        # the last @ ends the userinfo (as urllib and redis-py read it): a raw @ in a
        # password must not leave its end in view
        userinfo, _, host = authority.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        authority = f"{user}:***@{host}" if has_password else f"***@{host}"
    path, question, query = tail.partition("?")
    if question:
        query, hash_, fragment = query.partition("#")
        query = "&".join(_redact_parameter(p) for p in query.split("&")) + hash_ + fragment
    return f"{scheme}://{authority}{path}{question}{query}"


def _redact_parameter(parameter: str) -> str:
    name, equals, value = parameter.partition("=")
    if equals and value and unquote(name.replace("+", " ")).lower() in SECRET_KEYS:
        return f"{name}=***"
    return parameter


def redact_url(url: str) -> str:
    """A store's name: the URL without password, query string and fragment.

    Text that does not parse as a URL is not shown at all: what in it is secret is unknown.
    """
    scheme, separator, _ = url.partition("://")
    if not separator or not scheme.isascii() or not scheme.replace("+", "").isalnum():
        return "***"
    return redact_secrets(url).split("?", 1)[0].split("#", 1)[0]


def sqlite_path(url: str) -> str:
    """The file a `sqlite://` URL names."""
    rest = url.split("://", 1)[1].split("?", 1)[0].split("#", 1)[0]
    if rest.startswith("//"):
        rest = rest[1:]
    if not rest:
        raise ValueError(f"sqlite URL {redact_url(url)!r} names no file (use sqlite:///path/to.db)")
    return rest


@dataclass(frozen=True, slots=True)
class StoreUrl:
    """A store URL taken apart once, for whichever backend opens it.

    Only `name` is fit for messages; `url` and `client_url` may hold a password and are
    left out of `repr`.
    """

    kind: StoreKind
    scheme: str
    """Lower case: `memory`, `sqlite`, `redis`, `rediss`, `unix` ..."""
    name: str
    """The URL with secrets removed, for error bodies and logs."""
    params: Mapping[str, str]
    """Our own query parameters (`OWN_PARAMETERS`); the first of a repeated one counts."""
    url: str = field(repr=False)
    """As written, secrets included."""
    client_url: str = field(repr=False)
    """The URL without our own parameters, for a client library (redis-py)."""
    secrets: frozenset[str] = field(repr=False, default=frozenset())
    """Passwords in the URL, so `scrub` can take them out of a library's message."""

    @classmethod
    def parse(cls, url: str, kind: StoreKind) -> StoreUrl:
        name = redact_url(url)
        scheme, separator, _ = url.partition("://")
        if not separator or name == "***":
            raise ValueError(f"{kind} URL {name!r} is not a URL (use scheme://...)")
        try:
            parts = urlsplit(url)
            query = parse_qsl(parts.query, keep_blank_values=True)
            if parts.netloc and scheme.lower() not in MULTI_HOST_SCHEMES:
                parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError as exc:
            raise ValueError(f"{kind} URL {name!r} is malformed: {exc}") from None
        params: dict[str, str] = {}
        rest: list[tuple[str, str]] = []
        secrets: set[str] = set()
        for key, value in query:
            if key in OWN_PARAMETERS:
                params.setdefault(key, value)
            else:
                rest.append((key, value))
                if key in SECRET_KEYS and value:
                    secrets.update({value, unquote(value)})
        password = parts.netloc.rpartition("@")[0].partition(":")[2]
        if password:
            secrets.update({password, unquote(password)})
        base = url.split("#", 1)[0].split("?", 1)[0]
        return cls(
            kind=kind,
            scheme=scheme.lower(),
            name=name,
            params=params,
            url=url,
            client_url=f"{base}?{urlencode(rest)}" if rest else base,
            secrets=frozenset(secrets),
        )

    def error(self, problem: str) -> ValueError:
        """A ValueError about this URL that names the store kind and the redacted URL."""
        return ValueError(f"{self.kind} URL {self.name!r}: {self.scrub(problem)}")

    def scrub(self, text: str) -> str:
        """`text` (a library's error message, say) with the URL's passwords replaced."""
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text

    @property
    def sqlite_path(self) -> str:
        try:
            return sqlite_path(self.url)
        except ValueError:
            raise self.error("names no file (use sqlite:///path/to.db)") from None

    def prefix(self, default: str) -> str:
        """`?prefix=`: what every key of the store starts with."""
        return self.params.get("prefix", default)

    def seconds(self, key: str, default: float) -> float:
        """A positive number of seconds (`604800`) or a duration (`168h`)."""
        text = self.params.get(key)
        if text is None:
            return default
        try:
            value = float(text)
        except ValueError:
            try:
                value = parse_duration(text)
            except ValueError:
                problem = f"{key}={text!r} is not seconds or a duration (use 2s, 168h)"
                raise self.error(problem) from None
        if not value > 0:
            raise self.error(f"{key} must be positive, got {text!r}")
        return value

    def count(self, key: str, default: int, minimum: int = 1) -> int:
        """A whole number of at least `minimum`, such as `?maxsize=`."""
        text = self.params.get(key)
        if text is None:
            return default
        try:
            value = int(text)
        except ValueError:
            raise self.error(f"{key}={text!r} is not a whole number") from None
        if value < minimum:
            at_least = "positive" if minimum == 1 else f"at least {minimum}"
            raise self.error(f"{key} must be {at_least}, got {text!r}")
        return value
