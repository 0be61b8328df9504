"""`BadRequestLog`, the logger aiohttp's request handler writes to, in this process."""

from __future__ import annotations

import logging

import pytest
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    LineTooLong,
    TransferEncodingError,
)

from proxy.observability.badrequests import BadRequestLog, bad_request_reason
from proxy.observability.metrics import Metrics


class Counted:
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def bad_request(self, reason: str) -> None:
        self.reasons.append(reason)


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (BadHttpMessage("Invalid character in Content-Length:"), "bad_content_length"),
        (InvalidHeader("Content-Length"), "bad_content_length"),
        (LineTooLong("b'aaaa'", "8190"), "header_too_large"),
        (BadHttpMessage("Invalid character in chunk size:"), "bad_chunk"),
        (TransferEncodingError("Not enough data to satisfy transfer length header."), "bad_chunk"),
        (BadStatusLine("GET / HTTP/9.x"), "bad_request_line"),
        (BadHttpMethod("GE T"), "bad_request_line"),
        (BadHttpMessage("Invalid header token:"), "bad_header"),
        (BadHttpMessage("Something else"), "other"),
    ],
)
def test_the_reason_is_one_of_a_fixed_set(exc: HttpProcessingError, reason: str) -> None:
    assert bad_request_reason(exc) == reason


def test_a_parse_error_is_one_info_line_without_traceback_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    counted = Counted()
    caplog.set_level(logging.DEBUG)

    BadRequestLog(counted).exception(
        "Error handling request from %s", "10.0.0.1", exc_info=LineTooLong("b'aaa'", "8190")
    )

    (record,) = caplog.records
    assert (record.name, record.levelno, record.exc_info) == ("proxy.http", logging.INFO, None)
    assert record.getMessage() == "bad request from 10.0.0.1: header_too_large"
    assert (record.event, record.reason, record.remote) == (  # type: ignore[attr-defined]
        "bad_request",
        "header_too_large",
        "10.0.0.1",
    )
    assert counted.reasons == ["header_too_large"]


def test_non_http_bytes_stay_at_debug_and_are_counted_when_debug_is_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    counted = Counted()
    caplog.set_level(logging.INFO)

    BadRequestLog(counted).debug(
        "Error handling request from %s", "10.0.0.1", exc_info=BadHttpMethod("\\x16\\x03")
    )

    assert caplog.records == []
    assert counted.reasons == ["bad_request_line"]


def test_any_other_record_reaches_aiohttp_server_unchanged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    counted = Counted()
    caplog.set_level(logging.INFO)

    BadRequestLog(counted).exception("Unhandled exception", exc_info=RuntimeError("a bug"))

    (record,) = caplog.records
    assert (record.name, record.levelno) == ("aiohttp.server", logging.ERROR)
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)
    assert counted.reasons == []


def test_the_counter_starts_at_zero_for_every_reason_and_counts() -> None:
    metrics = Metrics()
    metrics.bad_request("bad_chunk")

    value = metrics.registry.get_sample_value
    assert value("sidecar_bad_requests_total", {"reason": "bad_chunk"}) == 1.0
    assert value("sidecar_bad_requests_total", {"reason": "other"}) == 0.0
