"""The store opener: every store kind reads URLs alike, never shows a password, and opens
every Redis form (`redis://`, `rediss://`, `unix://`) the same way."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.checkout.journal import CheckoutRecord
from proxy.jobs import Job, QueueUnavailable, Worker
from proxy.storage.errors import StoreUnavailable
from proxy.storage.open import (
    BACKENDS,
    POSTGRES_SCHEMES,
    REDIS_SCHEMES,
    open_idempotency_store,
    open_journal,
    open_queue,
)
from proxy.storage.url import StoreKind, StoreUrl, redact_url

PASSWORD = "hunter2-Zq"

Opener = Callable[[str], Awaitable[object]]


async def _open_idempotency(url: str) -> object:
    return open_idempotency_store(url)


async def _open_journal(url: str) -> object:
    return await open_journal(url)


async def _open_queue(url: str) -> object:
    return await open_queue(url)


OPENERS: dict[StoreKind, Opener] = {
    "idempotency store": _open_idempotency,
    "checkout journal": _open_journal,
    "job queue": _open_queue,
}


def _every_text(exc: BaseException) -> str:
    """What any log line or error body could show of `exc`: message, repr, traceback and
    every chained cause."""
    texts = ["".join(traceback.format_exception(exc))]
    seen: BaseException | None = exc
    while seen is not None:
        texts += [str(seen), repr(seen)]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(texts)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- URLs that cannot be opened -----------------------------------------------------------

MALFORMED = [
    pytest.param(f"mysql://app:{PASSWORD}@db.internal/shop", "unknown scheme", id="scheme"),
    pytest.param(f"redis://app:{PASSWORD}@127.0.0.1:notaport/0", "port", id="port"),
    pytest.param(f"redis://:{PASSWORD}@127.0.0.1/0?ttl=forever", "ttl", id="ttl"),
    pytest.param(
        f"redis://:{PASSWORD}@127.0.0.1/0?socket_timeout=soon", "socket_timeout", id="redis-py"
    ),
    pytest.param(f"app:{PASSWORD}@redis.internal:6379", "not a URL", id="no-scheme"),
    pytest.param(f"postgresql://app:{PASSWORD}@127.0.0.1/shop?bogus=1", "bogus", id="libpq"),
    pytest.param(f"postgres://app:{PASSWORD}@127.0.0.1/shop?schema=A-B", "schema", id="schema"),
]


@pytest.mark.parametrize("kind", OPENERS)
@pytest.mark.parametrize(("url", "problem"), MALFORMED)
async def test_a_url_that_cannot_be_opened_is_refused_naming_the_store_without_the_password(
    kind: StoreKind, url: str, problem: str
) -> None:
    if problem == "ttl" and kind != "checkout journal":
        pytest.skip("only the journal reads ttl")
    with pytest.raises(ValueError) as caught:
        await OPENERS[kind](url)
    message = str(caught.value)
    assert message.startswith(f"{kind} URL ")
    assert problem in message
    assert PASSWORD not in _every_text(caught.value)


async def test_an_unknown_scheme_lists_the_forms_each_store_accepts() -> None:
    with pytest.raises(ValueError) as caught:
        await open_queue("mysql://db/jobs")
    assert "sqlite:///path/to.db" in str(caught.value)
    assert "unix:///path/to/redis.sock?db=0" in str(caught.value)
    assert "memory://" not in str(caught.value)  # jobs must outlive the process


def test_every_store_kind_has_every_redis_and_postgresql_form() -> None:
    for kind, backends in BACKENDS.items():
        assert set(REDIS_SCHEMES) <= set(backends), kind
        assert set(POSTGRES_SCHEMES) <= set(backends), kind


# -- Redis that cannot be reached ---------------------------------------------------------


def _unreachable_urls() -> list[str]:
    timeouts = "socket_timeout=0.3&socket_connect_timeout=0.3"
    port = _closed_port()
    return [
        f"postgresql://app:{PASSWORD}@127.0.0.1:{port}/shop?connect_timeout=1&schema=s",
        f"redis://app:{PASSWORD}@127.0.0.1:{port}/0?prefix=p:&{timeouts}",
        f"redis://127.0.0.1:{port}/0?password={PASSWORD}&{timeouts}",
        f"unix://:{PASSWORD}@/nonexistent/redis-{uuid.uuid4().hex}.sock?db=0&{timeouts}",
    ]


async def _first_failure(kind: StoreKind, url: str) -> tuple[StoreUnavailable, str | None]:
    """Open `url` as `kind` and use it: the StoreUnavailable that must come of it, and the
    store's `name` if it opened."""
    store = None
    try:
        store = await OPENERS[kind](url)  # only the queue connects at open
        if kind == "idempotency store":
            await store.claim("k", "fp", 60)  # type: ignore[attr-defined]
        elif kind == "checkout journal":
            await store.get("co-1")  # type: ignore[attr-defined]
        else:
            await store.depth()  # type: ignore[attr-defined]
    except StoreUnavailable as exc:
        return exc, getattr(store, "name", None)
    finally:
        if store is not None:
            await store.close()  # type: ignore[attr-defined]
    raise AssertionError(f"{kind} at an unreachable Redis did not fail")


@pytest.mark.parametrize("kind", OPENERS)
async def test_an_unreachable_redis_is_reported_without_the_password(kind: StoreKind) -> None:
    for url in _unreachable_urls():
        started = time.monotonic()
        failure, name = await _first_failure(kind, url)
        assert time.monotonic() - started < 5
        assert failure.store == redact_url(url)
        assert str(failure).startswith(f"{kind} {failure.store} is unavailable")
        assert PASSWORD not in failure.store
        assert PASSWORD not in _every_text(failure)
        assert name is None or name == failure.store


def test_a_store_url_never_shows_its_password_in_repr() -> None:
    url = StoreUrl.parse(f"redis://app:{PASSWORD}@h:6379/0?password={PASSWORD}", "job queue")
    assert PASSWORD not in repr(url)
    assert url.name == "redis://app:***@h:6379/0"
    assert url.scrub(f"AUTH app {PASSWORD} failed") == "AUTH app *** failed"


def test_our_own_parameters_are_kept_from_redis_py() -> None:
    url = StoreUrl.parse(
        "unix:///run/redis.sock?db=2&prefix=a:&ttl=168h&socket_timeout=1&prefix=b:",
        "checkout journal",
    )
    assert url.client_url == "unix:///run/redis.sock?db=2&socket_timeout=1"
    assert url.prefix("default:") == "a:"  # the first of a repeated parameter counts
    assert url.seconds("ttl", 1.0) == 168 * 3600
    assert url.name == "unix:///run/redis.sock"


# -- a real Redis on a unix socket --------------------------------------------------------


@dataclass(frozen=True)
class UnixRedis:
    socket: Path
    password: str

    def url(self, **query: str) -> str:
        params = "&".join(f"{key}={value}" for key, value in {"db": "0", **query}.items())
        return f"unix://:{self.password}@{self.socket}?{params}"


@pytest.fixture(scope="module")
def unix_redis() -> Iterator[UnixRedis]:
    """Our own redis-server, listening only on a unix socket, stopped at the end."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    directory = Path(tempfile.mkdtemp(prefix="sidecar-redis-", dir="/tmp"))  # short: 108 bytes
    sock = directory / "redis.sock"
    process = subprocess.Popen(
        [
            server,
            *("--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"),
            *("--save", "", "--appendonly", "no", "--daemonize", "no"),
            *("--requirepass", PASSWORD, "--dir", str(directory)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (exit {process.poll()})")
            time.sleep(0.02)
        yield UnixRedis(sock, PASSWORD)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(directory, ignore_errors=True)


async def test_the_idempotency_store_opens_on_a_unix_socket(unix_redis: UnixRedis) -> None:
    store = open_idempotency_store(unix_redis.url(prefix=f"t-{uuid.uuid4().hex}:"))
    try:
        assert store.name == f"unix://:***@{unix_redis.socket}"
        assert (await store.claim("k", "fp", 60)).state.value == "claimed"
        assert (await store.claim("k", "fp", 60)).state.value == "in_progress"
    finally:
        await store.close()


async def test_the_checkout_journal_opens_on_a_unix_socket(unix_redis: UnixRedis) -> None:
    journal = await open_journal(unix_redis.url(prefix=f"t-{uuid.uuid4().hex}:", ttl="1h"))
    try:
        assert journal.name == f"unix://:***@{unix_redis.socket}"
        assert await journal.create(CheckoutRecord(id="co-1", key="k"))
        found = await journal.get("co-1")
        assert found is not None and found.key == "k"
    finally:
        await journal.close()


async def test_the_job_queue_opens_on_a_unix_socket(unix_redis: UnixRedis) -> None:
    queue = await open_queue(unix_redis.url(prefix=f"t-{uuid.uuid4().hex}:"))
    try:
        assert queue.name == f"unix://:***@{unix_redis.socket}"
        assert await queue.enqueue(Job(type="email", payload={}, id="j1"))
        taken = await queue.take("w1", 30.0)
        assert taken is not None and taken.id == "j1"
        await queue.ack(taken)
        assert await queue.depth() == 0
    finally:
        await queue.close()


# -- the worker, when its queue fails -----------------------------------------------------


class _TakeFailures(logging.Handler):
    """Collects the worker's error lines and says when the first one came."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.seen.set()


async def test_a_worker_logs_a_failed_take_and_takes_again_once_the_queue_answers(
    tmp_path: Path,
) -> None:
    path = tmp_path / "q.db"
    queue = await open_queue(f"sqlite://{path}?timeout=0.05")
    done = asyncio.Event()

    async def handler(job: Job) -> None:
        done.set()

    worker = Worker(queue, {"email": handler}, consumer="w1", poll_interval=0.01)
    await queue.enqueue(Job(type="email", payload={}, id="j1"))
    failures = _TakeFailures()
    logger = logging.getLogger("proxy.jobs.worker")
    logger.addHandler(failures)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        await asyncio.wait_for(failures.seen.wait(), timeout=10)
        assert not done.is_set()
        blocker.execute("ROLLBACK")
        await asyncio.wait_for(done.wait(), timeout=10)
    finally:
        logger.removeHandler(failures)
        blocker.close()
        stop.set()
        await running
        await queue.close()
    first = failures.records[0]
    assert "job queue take failed" in first.getMessage()
    assert first.exc_info is not None and isinstance(first.exc_info[1], QueueUnavailable)
    assert str(first.exc_info[1]).startswith(f"job queue sqlite://{path} is unavailable")


# -- RabbitMQ (the job queue only) --------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        pytest.param(f"amqp://app:{PASSWORD}@127.0.0.1:{_closed_port()}/%2F", id="unreachable"),
        pytest.param(f"amqp://guest:{PASSWORD}@127.0.0.1:5672/%2F?timeout=3s", id="wrong-password"),
    ],
)
async def test_a_broker_that_refuses_the_queue_is_reported_without_the_password(url: str) -> None:
    started = time.monotonic()
    failure, name = await _first_failure("job queue", url)
    assert time.monotonic() - started < 5
    assert failure.store == redact_url(url)
    assert str(failure).startswith(f"job queue {failure.store} is unavailable")
    assert PASSWORD not in _every_text(failure)
    assert name is None


@pytest.mark.parametrize("kind", ["idempotency store", "checkout journal"])
async def test_only_the_job_queue_opens_on_a_broker(kind: StoreKind) -> None:
    with pytest.raises(ValueError) as caught:
        await OPENERS[kind](f"amqp://app:{PASSWORD}@127.0.0.1:5672/%2F")
    assert "unknown scheme 'amqp'" in str(caught.value)
    assert PASSWORD not in _every_text(caught.value)
