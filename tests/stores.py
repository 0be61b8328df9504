"""Store servers a test owns: started on a free loopback port, stopped (or killed) by it.

An outage test must stop its store without touching the shared ones (Redis at 6379,
PostgreSQL at 5432) that other tests and other sessions use, so it starts its own:
a `redis-server`, or a PostgreSQL cluster made with `initdb` and run by `pg_ctl` as
the `postgres` user (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A throwaway redis-server process on a fixed loopback port (restartable on it)."""

    def __init__(self, port: int | None = None, *, persistent: bool = False) -> None:
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        # persistent: an append-only file fsynced per write, so a restart keeps everything
        self.dir = tempfile.mkdtemp(prefix="sidecar-redis-") if persistent else None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        durability = ["--save", "", "--appendonly", "no"]
        if self.dir is not None:
            durability = ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
            durability += ["--dir", self.dir]
        self.process = subprocess.Popen(
            ["redis-server", *durability, "--port", str(self.port), "--bind", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}")
                time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def remove(self) -> None:
        self.kill()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def postgres_bin() -> Path | None:
    """The directory of Debian's PostgreSQL server programs, if installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


class PostgresCluster:
    """A PostgreSQL cluster of the test's own: `initdb` once, `pg_ctl` start and stop."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        bindir = postgres_bin()
        if bindir is None:
            raise RuntimeError("PostgreSQL's server programs are not installed")
        self.bin = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="sidecar-pg-"))
        self.data = self.dir / "data"
        os.chmod(self.dir, 0o777)  # the postgres user writes its socket and data here
        self._as_postgres(
            str(self.bin / "initdb"), "-D", str(self.data), "--auth=trust", "-U", "postgres",
            "--no-sync",
        )  # fmt: skip

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *argv: str) -> None:
        command = list(argv)
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} "
            "-c fsync=off -c full_page_writes=off"
        )
        self._as_postgres(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-w", "-t", "60",
            "-l", str(self.dir / "log"), "start",
        )  # fmt: skip

    def stop(self) -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
