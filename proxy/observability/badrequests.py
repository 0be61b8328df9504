"""A malformed request is the client's fault: one log line and a counter, no traceback.

aiohttp's request handler logs a request it cannot parse (a negative Content-Length,
a header over 8 KiB, a bad chunk size, a broken request line) with
`logger.exception`: an error with a traceback, as if the sidecar had failed.
`BadRequestLog` is the logger the sidecar hands to aiohttp (`AppRunner(...,
logger=...)`, its documented `logger` parameter): it turns those into one `info`
line (`debug` where aiohttp chose debug: non-HTTP bytes on a fresh connection),
counts them in `sidecar_bad_requests_total{reason}`, and passes every other record
through to `aiohttp.server` untouched.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Literal, Protocol

from aiohttp.http_exceptions import (
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)

BadRequestReason = Literal[
    "bad_content_length",
    "header_too_large",
    "bad_chunk",
    "bad_request_line",
    "bad_header",
    "other",
]
BAD_REQUEST_REASONS: tuple[BadRequestReason, ...] = (
    "bad_content_length",
    "header_too_large",
    "bad_chunk",
    "bad_request_line",
    "bad_header",
    "other",
)
DETAIL_LIMIT = 200

log = logging.getLogger("proxy.http")


class BadRequestCounter(Protocol):
    def bad_request(self, reason: str) -> None: ...


def bad_request_reason(exc: HttpProcessingError) -> BadRequestReason:
    """The fixed label of a parse error (the parser's message names what was wrong)."""
    text = f"{exc.message} {exc.headers or ''}".lower()
    if isinstance(exc, LineTooLong):
        return "header_too_large"  # a header line, or the request line, over the limit
    if isinstance(exc, BadStatusLine | InvalidURLError):
        return "bad_request_line"
    if "content-length" in text:
        return "bad_content_length"
    if isinstance(exc, TransferEncodingError) or "chunk" in text:
        return "bad_chunk"
    if isinstance(exc, InvalidHeader) or "header" in text:
        return "bad_header"
    return "other"


def _exception_of(exc_info: object) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple) and len(exc_info) == 3:
        value = exc_info[1]
        return value if isinstance(value, BaseException) else None
    if exc_info is True:
        return sys.exc_info()[1]
    return None


class BadRequestLog(logging.LoggerAdapter[logging.Logger]):
    """The logger aiohttp's request handler writes to, for one sidecar's listeners."""

    def __init__(self, counter: BadRequestCounter, logger: logging.Logger | None = None) -> None:
        super().__init__(logger or logging.getLogger("aiohttp.server"), {})
        self.counter = counter

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc = _exception_of(kwargs.get("exc_info"))
        if not isinstance(exc, HttpProcessingError) or exc.code != 400:
            super().log(level, msg, *args, **kwargs)
            return
        reason = bad_request_reason(exc)
        self.counter.bad_request(reason)
        level = min(level, logging.INFO)
        if not log.isEnabledFor(level):
            return
        remote = args[0] if args else None
        detail = (exc.message or "").strip().splitlines()
        log.log(
            level,
            "bad request from %s: %s",
            remote,
            reason,
            extra={
                "event": "bad_request",
                "reason": reason,
                "remote": remote,
                "status": 400,
                "detail": detail[0][:DETAIL_LIMIT] if detail else "",
            },
        )

    def process(
        self, msg: object, kwargs: MutableMapping[str, Any]
    ) -> tuple[object, MutableMapping[str, Any]]:
        return msg, kwargs
