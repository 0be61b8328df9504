"""JSON log lines, one per event, with the trace they belong to.

An SRE greps and ships these; a line is an object with `ts`, `level`, `logger`,
`msg`, an `event` name where the code gave one, the structured fields passed as
`extra=`, and `trace_id`/`span_id` of the span that was current, so a log line
leads to its trace. Nothing is logged per proxied request unless the access log
is switched on.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from opentelemetry import trace as _otel_trace

_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)


def current_trace_ids() -> dict[str, str]:
    context = _otel_trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        trace_ids = getattr(record, "trace_ids", None) or current_trace_ids()
        line.update(trace_ids)
        line.pop("trace_ids", None)
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup_logging(level: str = "info") -> None:
    """JSON lines on stdout; `LOG_LEVEL` in the environment wins over the config."""
    chosen = os.environ.get("LOG_LEVEL", level).upper()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(getattr(logging, chosen, logging.INFO))
    # aiohttp's own access log is replaced by ours (off by default)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
