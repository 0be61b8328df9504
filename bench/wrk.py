"""Run wrk and turn its output into numbers.

wrk prints human units (`5.12ms`, `9.81k`), so every run also loads a Lua
`done()` that prints one `WRK_JSON {...}` line with exact microseconds, request
and error counts. `parse_wrk_output` prefers that line and falls back to the
`--latency` text, so output captured from a plain wrk run parses too.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

JSON_MARK = "WRK_JSON "

REPORT_LUA = r"""
local limit = %(limit)d
local count = 0
if limit > 0 then
  response = function(status, headers, body)
    count = count + 1
    if count >= limit then wrk.thread:stop() end
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%%.0f,"duration_us":%%.0f,"bytes":%%.0f,'
    .. '"connect":%%.0f,"read":%%.0f,"write":%%.0f,"status":%%.0f,"timeout":%%.0f,'
    .. '"p50_us":%%.1f,"p90_us":%%.1f,"p99_us":%%.1f,"max_us":%%.1f,"mean_us":%%.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


@dataclass
class WrkResult:
    """One wrk run. Latencies in ms; `errors` = socket errors + non-2xx/3xx responses."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    socket_errors: int
    non_2xx: int

    @property
    def errors(self) -> int:
        return self.socket_errors + self.non_2xx

    def as_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "errors": self.errors}


_TIME_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_TIME = r"([\d.]+)(us|ms|s|m|h)"


def _ms(value: str, unit: str) -> float:
    return float(value) * _TIME_UNITS[unit]


def parse_wrk_output(text: str) -> WrkResult:
    """Numbers from wrk's stdout: the WRK_JSON line if present, else the `--latency` text."""
    for line in text.splitlines():
        if line.startswith(JSON_MARK):
            return _from_json(json.loads(line[len(JSON_MARK) :]))
    return _from_text(text)


def _from_json(data: dict[str, float]) -> WrkResult:
    seconds = data["duration_us"] / 1e6
    return WrkResult(
        requests=int(data["requests"]),
        seconds=seconds,
        rps=data["requests"] / seconds if seconds else 0.0,
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        socket_errors=int(data["connect"] + data["read"] + data["write"] + data["timeout"]),
        non_2xx=int(data["status"]),
    )


def _from_text(text: str) -> WrkResult:
    percentiles = {
        int(p): _ms(v, u) for p, v, u in re.findall(rf"^\s+(\d+)%\s+{_TIME}\s*$", text, re.M)
    }
    done = re.search(r"(\d+) requests in " + _TIME, text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if done is None or rps is None or not {50, 90, 99} <= percentiles.keys():
        raise ValueError("not wrk --latency output:\n" + text[-500:])
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(
        requests=int(done.group(1)),
        seconds=_ms(done.group(2), done.group(3)) / 1000,
        rps=float(rps.group(1)),
        p50_ms=percentiles[50],
        p90_ms=percentiles[90],
        p99_ms=percentiles[99],
        socket_errors=sum(int(n) for n in sockets.groups()) if sockets else 0,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit("wrk is not installed: apt-get install wrk (or make bench)")
    return path


def command(
    url: str,
    *,
    connections: int,
    seconds: float,
    script: Path,
    threads: int = 1,
    headers: dict[str, str] | None = None,
) -> list[str]:
    sent = [arg for name, value in (headers or {}).items() for arg in ("-H", f"{name}: {value}")]
    return [
        wrk_path(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "--latency",
        *sent,
        "-s",
        str(script),
        url,
    ]


def write_script(directory: Path, limit: int = 0) -> Path:
    """The Lua report script; with `limit` each wrk thread stops after that many responses."""
    path = directory / (f"report-{limit}.lua" if limit else "report.lua")
    path.write_text(REPORT_LUA % {"limit": limit})
    return path


def run(
    url: str,
    *,
    connections: int,
    seconds: float,
    script: Path,
    threads: int = 1,
    headers: dict[str, str] | None = None,
) -> tuple[WrkResult, list[str]]:
    """One bounded wrk run (its own -d, plus a hard subprocess timeout); result and argv.

    `headers` are sent on every request (`-H`): the tracing bench sends a traceparent.
    """
    argv = command(
        url, connections=connections, seconds=seconds, script=script, threads=threads,
        headers=headers,
    )  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk_output(done.stdout), argv
