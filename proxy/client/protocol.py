"""What an upstream attempt needs from an HTTP client, and nothing more."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.resilience.outcome import Outcome


@dataclass(slots=True)
class OutgoingRequest:
    """A request ready to be attempted (once, or again when `body` is bytes)."""

    method: str
    url: URL
    headers: CIMultiDict[str]
    body: bytes | AsyncIterator[bytes] | None = None


class BrokenBody(Exception):
    """The response body broke off after the headers: `outcome` says how (reset, timeout)."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.detail or outcome.reason)
        self.outcome = outcome


class UpstreamResponse(Protocol):
    """An upstream's answer whose body may still be on the wire.

    `body` is the whole body when the client already read it (small bodies are read
    inside the attempt, so a retry decision can see them and the connection is back
    in the pool at once), else None and the body is `read()` or `chunks()`-streamed.
    Reading errors raise `BrokenBody`. Whoever holds the response ends it with
    `let_go()`: a fully read one returns its connection to the pool, an unread one
    closes it (reading an unknown rest just to keep a connection could take forever).
    """

    @property
    def status(self) -> int: ...

    @property
    def reason(self) -> str | None: ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def content_length(self) -> int | None: ...

    @property
    def body(self) -> bytes | None: ...

    async def read(self) -> bytes: ...

    def chunks(self, size: int) -> AsyncIterator[bytes]: ...

    def let_go(self) -> None: ...


class HttpClient(Protocol):
    """One upstream's connection pool: sends attempts, classifies what happened."""

    async def send(self, request: OutgoingRequest) -> Outcome:
        """Send `request` once; the outcome's `response` is an `UpstreamResponse`.

        Never raises for a network failure: it is classified (connect failure,
        reset, timeout). The caller bounds the attempt's time by cancelling it.
        """
        ...

    async def close(self) -> None:
        """Close the pool; a `send` after it fails like an unreachable upstream."""
        ...
