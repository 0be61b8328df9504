"""Store URLs, read the same way by every store (idempotency, journal, job queue).

`sqlite:///var/lib/sidecar.db` is the absolute path /var/lib/sidecar.db (as in a
file:/// URL; `sqlite:////abs.db` is accepted too), `sqlite://var/sidecar.db` is
relative to the working directory. URLs are redacted before they reach a log line,
a metric or an error body, because a Redis URL may carry a password.
"""

from __future__ import annotations

from urllib.parse import urlsplit


def sqlite_path(url: str) -> str:
    """The file a `sqlite://` URL names."""
    rest = url.split("://", 1)[1].split("?", 1)[0]
    if rest.startswith("//"):
        rest = rest[1:]
    if not rest:
        raise ValueError(f"sqlite URL {url!r} names no file (use sqlite:///path/to.db)")
    return rest


def redact_url(url: str) -> str:
    """The URL without password and query string (which may carry credentials)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hostport}" if has_password else f"{user}@{hostport}"
    return f"{parts.scheme}://{netloc}{parts.path}"
