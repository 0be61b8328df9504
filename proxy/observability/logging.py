"""JSON log lines, one per event, with the trace they belong to.

An SRE greps and ships these; a line is an object with `ts`, `level`, `logger`,
`msg`, an `event` name where the code gave one, the structured fields passed as
`extra=`, and `trace_id`/`span_id` of the span that was current, so a log line
leads to its trace. Nothing is logged per proxied request unless the access log
is switched on.

No line shows a value the config read from a secret file (`${file:...}`): the
formatter replaces each with `***` in the message and in every field, the way store
URLs are shown without their passwords. `LOG_SECRETS` holds those values for the
process; it is set when a config is loaded or reloaded, and costs nothing while no
config reads a file.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from opentelemetry import trace as _otel_trace

from proxy.config.secrets import FileSecrets
from proxy.observability import tracing as _tracing
from proxy.observability.tracing import PASSED

_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)


def current_trace_ids() -> dict[str, str]:
    """The current span's ids; for a request that makes no span, its caller's ones.

    Unsampled requests (propagation only) still log the trace they belong to, read
    from the traceparent they came with, so a log line and the caller's spans meet.
    """
    if not _tracing.TRACING.active:
        return {}  # tracing off: no span can be current, and no OTel call per line
    context = _otel_trace.get_current_span().get_span_context()
    if not context.is_valid:
        passed = PASSED.get()
        parts = (passed.get("traceparent") or "").strip().split("-") if passed else []
        if len(parts) >= 4 and len(parts[1]) == 32 and len(parts[2]) == 16:
            return {"trace_id": parts[1], "span_id": parts[2]}
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


class LogSecrets:
    """The secret values no log line may show: those of the config in force and of the
    one it replaced (calls that started under the old config may still log)."""

    def __init__(self) -> None:
        self._current = FileSecrets()
        self._hidden = FileSecrets()

    def use(self, secrets: FileSecrets) -> None:
        """A config reading `secrets` is now in force."""
        self._hidden = self._current | secrets
        self._current = secrets

    def clear(self) -> None:
        self._current = self._hidden = FileSecrets()

    def __bool__(self) -> bool:
        return bool(self._hidden)

    def scrub(self, value: Any) -> Any:
        """`value` (a message, a field, nested lists and dicts) with the secrets replaced.

        What `json.dumps(default=str)` would turn into text is turned into text here
        first, so a secret in an exception or an object's `str` is caught too.
        """
        if isinstance(value, str):
            return self._hidden.redact(value)
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, dict):
            return {self.scrub(str(k)): self.scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.scrub(v) for v in value]
        return self._hidden.redact(str(value))


LOG_SECRETS = LogSecrets()
"""The process's: `proxy.cli` sets it at start, `proxy.reload` at every reload."""


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
        if LOG_SECRETS:
            line = LOG_SECRETS.scrub(line)
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
