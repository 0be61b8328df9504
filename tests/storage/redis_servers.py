"""Throwaway redis-server processes of a test's own: a plain server, or a master, a
replica and a Sentinel watching them, on free loopback ports in a temporary directory.

The shared Redis at 127.0.0.1:6379 is never touched. Every server is started with
`--save '' --appendonly no` unless the test asks for persistence, and stopped (and
its directory removed) when the `with` block ends, whatever happened inside it.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

SERVICE = "mymaster"
MASTER_PASSWORD = "m4ster-Pw"
SENTINEL_PASSWORD = "s3ntinel-Pw"
NO_PERSISTENCE = ("--save", "", "--appendonly", "no")
QUICK = ("--repl-diskless-sync-delay", "0", "--shutdown-timeout", "0")
"""A replica syncs at once (not after the default 5 s wait for more replicas), and a
master stops at once (not after waiting up to 10 s for its replicas to catch up)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_redis_server() -> str:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    return server


@dataclass
class RedisProcess:
    """One redis-server (or sentinel) on a loopback port; `stop` is safe to repeat."""

    port: int
    args: Sequence[str]
    password: str | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, timeout: float = 10.0) -> None:
        self.process = subprocess.Popen(
            [require_redis_server(), *self.args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.client() as client:
                    if client.ping():
                        return
            except redis.RedisError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server {' '.join(self.args)} did not start")
            time.sleep(0.02)

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            socket_timeout=2,
            socket_connect_timeout=0.5,
            decode_responses=True,
            **kwargs,  # type: ignore[arg-type]
        )

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def redis_server(
    *extra: str, persistence: bool = False, password: str | None = None
) -> Iterator[RedisProcess]:
    """A plain redis-server; `extra` arguments are appended (`--rename-command` ...)."""
    directory = Path(tempfile.mkdtemp(prefix="sidecar-redis-"))
    port = free_port()
    durable = ("--appendonly", "yes", "--appendfsync", "everysec") if persistence else ()
    server = RedisProcess(
        port,
        [
            *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)),
            *(durable or NO_PERSISTENCE),
            *QUICK,
            *(("--requirepass", password) if password else ()),
            *extra,
        ],
        password,
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class SentinelSet:
    """A master, its replicas and one Sentinel (quorum 1) watching `SERVICE`."""

    master: RedisProcess
    replicas: Sequence[RedisProcess]
    sentinel: RedisProcess

    @property
    def replica(self) -> RedisProcess:
        """The first replica: the one a set of one replica has."""
        return self.replicas[0]

    def url(self, **query: str) -> str:
        """The `redis+sentinel://` URL of the set: the master's password in the userinfo,
        the Sentinel's as `sentinel_password=`."""
        query = {"sentinel_password": SENTINEL_PASSWORD, **query}
        params = "&".join(f"{key}={value}" for key, value in query.items())
        return (
            f"redis+sentinel://:{MASTER_PASSWORD}@127.0.0.1:{self.sentinel.port}"
            f"/{SERVICE}/0?{params}"
        )

    def replica_in_sync(self) -> bool:
        """Every replica's link to its master is up."""
        for replica in self.replicas:
            with replica.client() as client:
                if client.info("replication")["master_link_status"] != "up":
                    return False
        return True

    def replicas_confirm_writes(self) -> bool:
        """Every replica confirms a write at once. A replica that has just loaded its
        first copy is online for a second before it acknowledges anything, and a
        store's first write would otherwise wait for it (`wait_replicas`)."""
        with self.master.client() as client:
            client.set("sidecar-test:replicas-confirm", "1")
            return int(client.execute_command("WAIT", len(self.replicas), 100)) == len(
                self.replicas
            )

    def sentinel_knows_replica(self) -> bool:
        """The Sentinel is connected to a replica whose link to the master is up: the
        state in which `SENTINEL FAILOVER` finds a replica to promote."""
        with self.sentinel.client() as client:
            replicas = client.sentinel_slaves(SERVICE)  # parsed: is_disconnected ...
        return any(
            not replica["is_disconnected"]
            and not replica["is_sdown"]
            and replica.get("master-link-status") == "ok"
            for replica in replicas
        )

    def master_port(self) -> int:
        """Where the Sentinel says the master is now."""
        with self.sentinel.client() as client:
            _, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return int(port)

    def server(self, port: int) -> RedisProcess:
        return next(server for server in (self.master, *self.replicas) if server.port == port)

    def failover(self) -> int:
        """`SENTINEL FAILOVER`; returns the port of the master it replaces."""
        _wait("a replica the Sentinel can promote", self.sentinel_knows_replica)
        old = self.master_port()
        with self.sentinel.client() as client:
            client.execute_command("SENTINEL", "FAILOVER", SERVICE)
        return old

    def wait_for_new_master(self, old: int, timeout: float = 30.0) -> tuple[int, float]:
        """Block until the Sentinel names another master that says it is one; returns
        its port and the seconds waited. The old master still takes writes until the
        Sentinel turns it into a replica, some seconds later (`wait_for_demotion`)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            with contextlib.suppress(redis.RedisError):
                new = self.master_port()
                if new != old and self.role(new) == "master":
                    return new, time.monotonic() - started
            time.sleep(0.05)
        raise AssertionError(f"no new master within {timeout:.0f}s (still {old})")

    def failing_over(self) -> bool:
        """The Sentinel's entry for the master says a failover is in progress: from
        `SENTINEL FAILOVER` until the other replicas follow the new master. Sentinel
        already names the promoted one before that; the stores refuse writes until it
        ends (`proxy.storage.replicas`)."""
        with self.sentinel.client() as client:
            state = client.execute_command("SENTINEL", "MASTER", SERVICE)
        return "failover_in_progress" in str(state.get("flags"))

    def wait_for_failover_end(self, timeout: float = 30.0) -> float:
        """Block until the Sentinel's failover has ended; returns the seconds waited."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            with contextlib.suppress(redis.RedisError):
                if not self.failing_over():
                    return time.monotonic() - started
            time.sleep(0.05)
        raise AssertionError(f"the failover did not end within {timeout:.0f}s")

    def wait_for_demotion(self, old: int, timeout: float = 30.0) -> float:
        """Block until the old master replicates from the new one; returns the seconds."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            with contextlib.suppress(redis.RedisError):
                if self.role(old) == "slave":
                    return time.monotonic() - started
            time.sleep(0.05)
        raise AssertionError(f"the old master {old} was not demoted within {timeout:.0f}s")

    def role(self, port: int) -> str:
        with self.server(port).client() as client:
            return str(client.execute_command("ROLE")[0])


def _wait(condition: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError):
            if check():
                return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {condition}")


@contextlib.contextmanager
def sentinel_set(
    *,
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 3000,
    master_args: Sequence[str] = (),
    replicas: int = 1,
) -> Iterator[SentinelSet]:
    """Start a master, `replicas` replicas (`--replicaof`) and a Sentinel, wait until the
    Sentinel knows a replica (so a failover has somewhere to go), and stop them all at
    the end.

    Both data servers take `MASTER_PASSWORD` (requirepass and masterauth), since
    either may be the master after a failover; the Sentinel takes `SENTINEL_PASSWORD`.
    """
    directory = Path(tempfile.mkdtemp(prefix="sidecar-sentinel-"))
    master_port, sentinel_port = free_port(), free_port()
    auth = ("--requirepass", MASTER_PASSWORD, "--masterauth", MASTER_PASSWORD)

    def data_server(port: int, *extra: str) -> RedisProcess:
        (directory / str(port)).mkdir()
        args = ("--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory / str(port)))
        return RedisProcess(port, [*args, *NO_PERSISTENCE, *QUICK, *auth, *extra], MASTER_PASSWORD)

    master = data_server(master_port, *master_args)
    followers = [
        data_server(free_port(), "--replicaof", "127.0.0.1", str(master_port))
        for _ in range(replicas)
    ]
    conf = directory / "sentinel.conf"
    conf.write_text(
        "\n".join(
            [
                f"port {sentinel_port}",
                "bind 127.0.0.1",
                f"dir {directory}",
                f"requirepass {SENTINEL_PASSWORD}",
                f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 1",
                f"sentinel auth-pass {SERVICE} {MASTER_PASSWORD}",
                f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}",
                f"sentinel failover-timeout {SERVICE} {failover_timeout_ms}",
                f"sentinel parallel-syncs {SERVICE} 1",
                "",
            ]
        )
    )
    sentinel = RedisProcess(sentinel_port, [str(conf), "--sentinel"], SENTINEL_PASSWORD)
    servers = SentinelSet(master, followers, sentinel)
    try:
        master.start()
        for replica in followers:
            replica.start()
        _wait("the replicas to sync", servers.replica_in_sync)
        _wait("the replicas to confirm writes", servers.replicas_confirm_writes)
        sentinel.start()
        _wait("the Sentinel to know the replica", servers.sentinel_knows_replica)
        yield servers
    finally:
        for server in (sentinel, *followers, master):
            server.stop()
        shutil.rmtree(directory, ignore_errors=True)
