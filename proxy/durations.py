"""Durations as people write them in config and URLs: `250ms`, `2s`, `1m`, `24h`.

A leaf module (it imports nothing of the sidecar's), so both the config models and
the storage layers (a journal URL's `?ttl=168h`) can read a duration without the
storage layers depending on the config package.
"""

from __future__ import annotations

import re
from typing import Any

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
