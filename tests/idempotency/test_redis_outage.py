"""Redis going away and coming back, with a redis-server of the test's own.

Fail closed while it is down (503 naming the store, nothing run), and recover
without rebuilding the store when it returns.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator

import pytest
import redis

from proxy.storage.open import open_idempotency_store

from .conftest import Harness


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A throwaway redis-server process on a fixed loopback port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--save",
                "",
                "--appendonly",
                "no",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
            ],
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


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    server = RedisServer(_free_port())
    try:
        server.start()
        yield server
    finally:
        server.kill()


async def test_redis_outage_fails_closed_and_recovers_by_itself(
    own_redis: RedisServer, make_harness: Callable[..., Awaitable[Harness]]
) -> None:
    store = open_idempotency_store(
        f"redis://127.0.0.1:{own_redis.port}/0?prefix=outage-{uuid.uuid4().hex}:"
    )
    try:
        harness = await make_harness(store)
        assert (await harness.post("before"))[0] == 201

        own_redis.kill()
        status, headers, body = await harness.post("during")
        assert status == 503
        error = json.loads(body)
        assert error["reason"] == "store_unavailable"
        assert error["store"] == f"redis://127.0.0.1:{own_redis.port}/0"
        assert "Retry-After" in headers
        assert harness.upstream.calls == 1  # the request was not run unprotected

        own_redis.start()
        status, headers, _ = await harness.post("after")
        assert status == 201
        assert "Idempotent-Replayed" not in headers
        assert harness.upstream.calls == 2
        assert (await harness.post("after"))[1]["Idempotent-Replayed"] == "true"
        assert harness.results == ["first", "store_unavailable", "first", "replayed"]
    finally:
        await store.close()
