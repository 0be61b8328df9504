"""Benchmark subprocesses: start, wait until they listen, read their memory and CPU, stop.

Each server runs in its own process so it gets its own core time and its memory
can be read from /proc (no psutil): VmRSS now, VmHWM the peak since the last
reset, utime+stime for the CPU a run cost.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A loopback port nobody listens on right now (bind port 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_event(line: str) -> dict[str, object] | None:
    """The JSON `start` line a server prints once it listens (`listen`, maybe `admin`).

    `checkout-sidecar run` logs it (its stdout is JSON lines only when not a
    terminal); the benchmark's own servers (`bench/serve.py`) print the same shape.
    """
    if not line.startswith("{"):
        return None
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if isinstance(entry, dict) and entry.get("event") == "start" and "listen" in entry:
        return entry
    return None


@dataclass
class Server:
    """One running server process and what it printed."""

    name: str
    popen: subprocess.Popen[str]
    log_path: Path
    url: str = ""
    admin: str = ""
    lines: list[str] = field(default_factory=list)
    served_by: int | None = None  # the pid that does the work, when the ready line names one
    _ready: threading.Event = field(default_factory=threading.Event)

    @property
    def pid(self) -> int:
        """The process whose CPU and memory count: a wrapper (bench.nginx) names its child."""
        return self.served_by or self.popen.pid

    def _pump(self) -> None:
        # drain stdout for the whole life of the process so it never blocks on a full pipe
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip())
            start = start_event(line)
            if start is not None and not self._ready.is_set():
                self.url = str(start["listen"])
                self.admin = str(start.get("admin", ""))
                served_by = start.get("pid")
                self.served_by = served_by if isinstance(served_by, int) else None
                self._ready.set()

    def wait_ready(self, timeout: float) -> str:
        """The URL it announced; raises with its log when it died or never got ready."""
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                log = self.log_path.read_text(errors="replace")[-2000:]
                state = (
                    f"exited {self.popen.returncode}"
                    if self.popen.poll() is not None
                    else (f"not ready after {timeout:g}s")
                )
                raise RuntimeError(f"{self.name} {state}\nstdout: {self.lines[-20:]}\n{log}")
        return self.url

    def status_kb(self, key: str) -> int:
        """A `kB` line of /proc/PID/status, e.g. VmRSS or VmHWM."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def rss_mb(self) -> float:
        return self.status_kb("VmRSS") / 1024

    def hwm_mb(self) -> float:
        return self.status_kb("VmHWM") / 1024

    def reset_hwm(self) -> bool:
        """Reset VmHWM to the current RSS (Linux >= 4.0, needs the right to write clear_refs)."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def cpu_seconds(self) -> float:
        """User + system CPU time so far, from /proc/PID/stat."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)


def start(
    name: str,
    argv: Sequence[str],
    log_dir: Path,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Server:
    """Start a server; stdout is read for the ready line, stderr goes to `<name>.log`.

    `env`: its whole environment (default: this process's), e.g. its own OTEL_* variables.
    """
    log_path = log_dir / f"{name}.log"
    with log_path.open("w") as log:
        popen = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=cwd,
            env=None if env is None else dict(env),
        )
    server = Server(name, popen, log_path)
    threading.Thread(target=server._pump, name=f"pump-{name}", daemon=True).start()
    return server


class RssSampler:
    """Poll a server's VmRSS every `interval` seconds in a thread; keep the peak."""

    def __init__(self, server: Server, interval: float = 0.05) -> None:
        self.server = server
        self.interval = interval
        self.peak_mb = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_mb = max(self.peak_mb, self.server.rss_mb())
                self.samples += 1
            except (OSError, KeyError):
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
