"""`python -m bench.run --only durable`: what the durable features cost.

Two numbers per backend, each measured in one run so they can be compared:

- **idempotency overhead**: the sidecar (`checkout-sidecar run`, one process per
  configuration, as bench/run.py starts it) in front of the fast bench upstream,
  its upstream marked `idempotency: true` with the store set to `memory://`,
  `sqlite:///<tmp>/s.db`, `redis://...?prefix=<uuid>:` or
  `postgresql://...?schema=<unique>`, plus the same upstream
  without idempotency as the baseline. wrk POSTs a small JSON body with a new
  Idempotency-Key on every request (run nonce + wrk thread + counter, so nothing
  is ever replayed) at fixed concurrency. Each store's rps is divided by the
  baseline's, and its p50 minus the baseline's is the latency a key adds. The
  sidecar's own counters are read before and after each run to prove every
  request was a first use of its key and reached the upstream with a 2xx.
- **queue throughput**: in this process, N no-op jobs enqueued into `sqlite://`,
  `redis://` (Streams), `postgresql://` (SKIP LOCKED) and `amqp://` (RabbitMQ quorum
  queues, publisher confirms) queues by 1 or 8 concurrent producers, then drained by a
  `Worker` with the same concurrency; enqueue, take+ack and end-to-end jobs/s.

Every phase is bounded (wrk's -d plus a subprocess timeout, a time limit on
enqueue and drain), every process is stopped, every Redis key and RabbitMQ queue under
the run's prefixes deleted and every PostgreSQL schema of the run dropped in a
`finally`. A Redis, PostgreSQL or RabbitMQ that does not answer is skipped, with the
reason printed and saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.request
import uuid
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import procs, wrk
from proxy.jobs import Job, JobQueue, Worker
from proxy.storage.open import open_queue
from proxy.storage.url import redact_url

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 30.0

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
POSTGRES_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
STORES = ("none", "memory", "sqlite", "redis", "postgresql")
QUEUE_BACKENDS = ("sqlite", "redis", "postgresql", "amqp")
JOB_TYPE = "bench.noop"


@dataclass(frozen=True)
class DurablePlan:
    """How long and how much; QUICK shrinks everything for a smoke run."""

    seconds: float  # per store, split into `rounds`
    warmup: float
    connections: int
    rounds: int
    jobs: int
    job_max_seconds: float
    concurrencies: tuple[int, ...]


FULL = DurablePlan(
    seconds=6,
    warmup=2,
    connections=20,
    rounds=2,
    jobs=1_500,  # with four backends x two concurrencies, keeps `make bench` under 10 min
    job_max_seconds=15,
    concurrencies=(1, 8),
)
QUICK = DurablePlan(
    seconds=2,
    warmup=1,
    connections=20,
    rounds=2,
    jobs=500,
    job_max_seconds=10,
    concurrencies=(1, 8),
)


# ---------------------------------------------------------------------------
# idempotency overhead

KEYED_POST_LUA = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local nonce = "%(nonce)s"
local next_thread = 0
local counter = 0

setup = function(thread)
  next_thread = next_thread + 1
  thread:set("thread_id", next_thread)
end

request = function()
  counter = counter + 1
  local key = nonce .. "-" .. thread_id .. "-" .. counter
  local body = '{"order":"' .. key .. '","amount_cents":' .. counter .. ',"currency":"EUR"}'
  return wrk.format(nil, nil, {["Idempotency-Key"] = key}, body)
end
"""
"""Every request a POST with a key no other request of any run uses (the nonce is new
per script), so the sidecar claims, forwards and stores each one, never replays."""


def write_keyed_script(directory: Path, nonce: str) -> Path:
    """wrk's report script (bench.wrk) plus the unique-key POST generator."""
    path = directory / f"keyed-{nonce}.lua"
    path.write_text(wrk.REPORT_LUA % {"limit": 0} + KEYED_POST_LUA % {"nonce": nonce})
    return path


def sidecar_argv(config: Path) -> list[str]:
    """The installed console script beside this interpreter, as bench.run starts it."""
    exe = Path(sys.executable).parent / "checkout-sidecar"
    found = str(exe) if exe.exists() else shutil.which("checkout-sidecar")
    if found is None:
        raise SystemExit("checkout-sidecar is not installed: pip install -e . (or make bench)")
    return [found, "run", "--config", str(config)]


def redis_store_url(base: str, prefix: str) -> str:
    """`base` with our `prefix` query parameter, which namespaces every key it writes."""
    return f"{base}{'&' if '?' in base else '?'}prefix={prefix}"


def postgres_store_url(base: str, schema: str) -> str:
    """`base` with our `schema` query parameter: the run's tables live in that schema."""
    return f"{base}{'&' if '?' in base else '?'}schema={schema}"


def new_schema(kind: str) -> str:
    """A schema name no other run uses (plain lower case, as the store requires)."""
    return f"bench_{kind}_{uuid.uuid4().hex[:16]}"


def store_label(url: str | None, tmp: Path) -> str:
    """The store URL as the report shows it: no secrets, temp dir, prefix and schema generic."""
    if url is None:
        return "none (baseline)"
    label = redact_url(url).replace(str(tmp), "/<tmp>")
    if "prefix=" in url:
        label += "?prefix=<uuid>:"
    if "schema=" in url:
        label += "?schema=<unique>"
    return label


def sidecar_yaml(port: int, admin_port: int, upstream: str, store: str | None) -> str:
    """One upstream `bench`; idempotent with `store` as its store, or plain when None.

    Workers are off so no queue polling competes with the requests measured; the
    journal and queue keep the default SQLite store in the sidecar's own directory.
    """
    lines = [
        f"listen: 127.0.0.1:{port}",
        "admin:",
        f"  listen: 127.0.0.1:{admin_port}",
        "queue:",
        "  workers: false",
    ]
    if store is not None:
        lines += ["idempotency:", f"  store: {json.dumps(store)}"]
    lines += [
        "upstreams:",
        "  bench:",
        f"    url: {upstream}",
        f"    idempotency: {'true' if store is not None else 'false'}",
        "    timeout: {connect: 1s, per_try: 30s, total: 120s}",
        "    pool: {max_connections: 200}",
    ]
    return "\n".join(lines) + "\n"


_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of samples of `name` in Prometheus text whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match.group(1) != name:
            continue
        found = dict(_LABEL.findall(match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


@dataclass(frozen=True)
class Counts:
    """The sidecar's own view of a run: keys used first, keys replayed, upstream 2xx."""

    first: float
    replayed: float
    upstream_ok: float

    def minus(self, before: Counts) -> Counts:
        return Counts(
            self.first - before.first,
            self.replayed - before.replayed,
            self.upstream_ok - before.upstream_ok,
        )


def read_counts(admin_url: str) -> Counts:
    with urllib.request.urlopen(f"{admin_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    return Counts(
        first=metric_value(text, "sidecar_idempotency_total", result="first"),
        replayed=metric_value(text, "sidecar_idempotency_total", result="replayed"),
        upstream_ok=metric_value(text, "sidecar_requests_total", upstream="bench", outcome="ok"),
    )


def delivery_ok(store: str, requests: int, errors: int, counts: Counts, connections: int) -> bool:
    """All 2xx, no replay, and every request counted by wrk reached the upstream.

    The sidecar may count up to `connections` more than wrk: requests in flight
    when wrk stopped were served but not reported.
    """
    slack = range(requests, requests + connections + 1)
    keyed_ok = store == "none" or (int(counts.first) in slack and counts.replayed == 0)
    return errors == 0 and requests > 0 and int(counts.upstream_ok) in slack and keyed_ok


def overhead_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run with its rps as a ratio of the baseline's and the p50 it adds (ms)."""
    base = next((r for r in runs if r["store"] == "none"), None)
    rows = []
    for run in runs:
        row = dict(run)
        if base is not None and base["rps"]:
            row["rps_ratio"] = run["rps"] / base["rps"]
            row["added_p50_ms"] = run["p50_ms"] - base["p50_ms"]
            row["added_p99_ms"] = run["p99_ms"] - base["p99_ms"]
        rows.append(row)
    return rows


def redis_available(url: str) -> str | None:
    """None when Redis answers PING at `url`, else why not."""

    async def ping() -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        try:
            await client.ping()
        finally:
            await client.aclose()

    try:
        asyncio.run(ping())
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def postgres_available(url: str) -> str | None:
    """None when PostgreSQL accepts a connection at `url`, else why not."""

    async def connect() -> None:
        import psycopg

        conn = await psycopg.AsyncConnection.connect(url, connect_timeout=2)
        await conn.close()

    try:
        asyncio.run(connect())
    except Exception as exc:
        return redact_url(url) + f": {type(exc).__name__}: {str(exc).strip()}"[:300]
    return None


async def drop_schemas(url: str, schemas: list[str]) -> int:
    """DROP SCHEMA ... CASCADE for each of `schemas`; how many existed."""
    import psycopg

    dropped = 0
    async with await psycopg.AsyncConnection.connect(
        url, connect_timeout=2, autocommit=True
    ) as conn:
        for schema in schemas:
            cursor = await conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
            if await cursor.fetchone() is not None:
                dropped += 1
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    return dropped


def cleanup_postgres(url: str, schemas: list[str]) -> None:
    """Drop the run's schemas, saying so; a failure is printed, never raised (it runs
    in a `finally`, and must not hide the measurement's own error)."""
    if not schemas:
        return
    try:
        dropped = asyncio.run(drop_schemas(url, schemas))
    except Exception as exc:
        print(f"  postgresql: could not drop {schemas}: {type(exc).__name__}: {exc}", flush=True)
        return
    print(f"  postgresql: dropped {dropped} schema(s) ({', '.join(schemas)})", flush=True)


async def delete_prefix(url: str, prefix: str) -> int:
    """Delete every key under `prefix` (SCAN, never KEYS); how many were deleted."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)
    deleted = 0
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += await client.delete(*batch)
                batch = []
        if batch:
            deleted += await client.delete(*batch)
    finally:
        await client.aclose()
    return deleted


def settled_counts(admin_url: str, quiet: float = 0.3, limit: float = 5.0) -> Counts:
    """The counters once two reads `quiet` seconds apart agree (requests still in flight
    when wrk stopped finish after it), or the last read after `limit` seconds."""
    deadline = time.monotonic() + limit
    counts = read_counts(admin_url)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        again = read_counts(admin_url)
        if again == counts:
            break
        counts = again
    return counts


def round_order(stores: list[str], rounds: int) -> list[tuple[int, str]]:
    """(round, store) in ABBA order: forward, backward, forward... so a load that drifts
    during the run weighs on every store about equally."""
    order = []
    for number in range(rounds):
        for store in stores if number % 2 == 0 else reversed(stores):
            order.append((number, store))
    return order


def run_idempotency(
    plan: DurablePlan, tmp: Path, redis_url: str | None, postgres_url: str | None = None
) -> dict[str, Any]:
    """One sidecar per store (all started first); warm each up, then `plan.rounds` rounds of
    `plan.seconds / plan.rounds` per store in ABBA order, combined per store. A store
    whose server URL is None (unreachable) is left out."""
    prefix = f"bench-{uuid.uuid4().hex}:"
    schemas: list[str] = []
    urls: dict[str, str | None] = {
        "none": None,
        "memory": "memory://",
        "sqlite": f"sqlite://{tmp}/s.db",
    }
    if redis_url is not None:
        urls["redis"] = redis_store_url(redis_url, prefix)
    if postgres_url is not None:
        schemas.append(new_schema("idem"))
        urls["postgresql"] = postgres_store_url(postgres_url, schemas[-1])
    seconds = plan.seconds / plan.rounds
    rounds: dict[str, list[dict[str, Any]]] = {store: [] for store in urls}
    try:
        with ExitStack() as stack:
            upstream = procs.start(
                "upstream", [sys.executable, "-m", "bench.upstream", "--port", "0"], tmp, cwd=ROOT
            )
            stack.callback(upstream.stop)
            upstream_url = upstream.wait_ready(READY_TIMEOUT)
            sidecars: dict[str, tuple[procs.Server, str]] = {}
            for store, url in urls.items():
                home = tmp / f"sidecar-{store}"
                home.mkdir()
                admin_port = procs.free_port()
                config = home / "sidecar.yaml"
                config.write_text(sidecar_yaml(procs.free_port(), admin_port, upstream_url, url))
                server = procs.start(f"sidecar-{store}", sidecar_argv(config), home, cwd=home)
                stack.callback(server.stop)
                sidecars[store] = (server, f"http://127.0.0.1:{admin_port}")
            for server, _ in sidecars.values():
                server.wait_ready(READY_TIMEOUT)
            print(
                f"idempotency: {plan.connections} connections, {plan.rounds} rounds of "
                f"{seconds:g} s per store (ABBA order) after a {plan.warmup:g} s warm-up",
                flush=True,
            )
            for server, _ in sidecars.values():
                warm = write_keyed_script(tmp, uuid.uuid4().hex[:12])
                target = f"{server.url}/bench/orders"
                wrk.run(target, connections=plan.connections, seconds=plan.warmup, script=warm)
            for number, store in round_order(list(urls), plan.rounds):
                server, admin_url = sidecars[store]
                row = _measure_round(store, server, admin_url, seconds, plan.connections, tmp)
                rounds[store].append({"round": number, **row})
    finally:
        if redis_url is not None:
            left = asyncio.run(delete_prefix(redis_url, prefix))
            print(f"  redis: deleted {left:,} keys under {prefix}", flush=True)
        if postgres_url is not None:
            cleanup_postgres(postgres_url, schemas)
    runs = [
        combine_rounds(store, store_label(url, tmp), rounds[store]) for store, url in urls.items()
    ]
    return {
        "connections": plan.connections,
        "seconds": plan.seconds,
        "rounds": plan.rounds,
        "warmup_seconds": plan.warmup,
        "runs": overhead_rows(runs),
    }


def _measure_round(
    store: str,
    server: procs.Server,
    admin_url: str,
    seconds: float,
    connections: int,
    tmp: Path,
) -> dict[str, Any]:
    """One bounded wrk run of fresh keys, with the sidecar's counters and CPU around it."""
    target = f"{server.url}/bench/orders"
    script = write_keyed_script(tmp, uuid.uuid4().hex[:12])
    before = settled_counts(admin_url)
    cpu_before = server.cpu_seconds()
    result, argv = wrk.run(target, connections=connections, seconds=seconds, script=script)
    counts = settled_counts(admin_url).minus(before)
    cpu = server.cpu_seconds() - cpu_before
    ok = delivery_ok(store, result.requests, result.errors, counts, connections)
    print(
        f"  {store:<10} rps={result.rps:>8,.0f} p50={result.p50_ms:.3f}ms "
        f"p99={result.p99_ms:.3f}ms errors={result.errors} first={counts.first:,.0f} "
        f"replayed={counts.replayed:,.0f} upstream_ok={counts.upstream_ok:,.0f}"
        + ("" if ok else "  <-- NOT all delivered"),
        flush=True,
    )
    return {
        **result.as_dict(),
        "sidecar_first": counts.first,
        "sidecar_replayed": counts.replayed,
        "upstream_ok": counts.upstream_ok,
        "all_delivered": ok,
        "cpu_seconds": cpu,
        "argv": argv,
    }


def combine_rounds(store: str, label: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per store: counts and CPU summed, rps over the summed time, percentiles
    the mean of the rounds' (wrk gives no histogram to merge)."""
    requests = sum(r["requests"] for r in rounds)
    seconds = sum(r["seconds"] for r in rounds)
    cpu = sum(r["cpu_seconds"] for r in rounds)
    count = len(rounds)
    return {
        "store": store,
        "store_url": label,
        "requests": requests,
        "seconds": seconds,
        "rps": requests / seconds if seconds else 0.0,
        "p50_ms": sum(r["p50_ms"] for r in rounds) / count if count else 0.0,
        "p90_ms": sum(r["p90_ms"] for r in rounds) / count if count else 0.0,
        "p99_ms": sum(r["p99_ms"] for r in rounds) / count if count else 0.0,
        "errors": sum(r["errors"] for r in rounds),
        "sidecar_first": sum(r["sidecar_first"] for r in rounds),
        "sidecar_replayed": sum(r["sidecar_replayed"] for r in rounds),
        "upstream_ok": sum(r["upstream_ok"] for r in rounds),
        "all_delivered": count > 0 and all(r["all_delivered"] for r in rounds),
        "cpu_us_per_request": cpu / requests * 1e6 if requests else None,
        "rounds": rounds,
    }


# ---------------------------------------------------------------------------
# queue throughput


@dataclass
class QueueRun:
    backend: str
    concurrency: int
    target_jobs: int
    enqueued: int
    enqueue_seconds: float
    drained: int
    drain_seconds: float
    depth_after: int

    @property
    def enqueue_per_s(self) -> float:
        return self.enqueued / self.enqueue_seconds if self.enqueue_seconds else 0.0

    @property
    def drain_per_s(self) -> float:
        return self.drained / self.drain_seconds if self.drain_seconds else 0.0

    @property
    def end_to_end_per_s(self) -> float:
        """Jobs enqueued and acked per second of enqueue + drain (the phases run apart)."""
        seconds = self.enqueue_seconds + self.drain_seconds
        return self.drained / seconds if seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "enqueue_per_s": self.enqueue_per_s,
            "drain_per_s": self.drain_per_s,
            "end_to_end_per_s": self.end_to_end_per_s,
            "complete": self.drained == self.enqueued == self.target_jobs and self.depth_after == 0,
        }


async def enqueue_jobs(
    queue: JobQueue, count: int, concurrency: int, max_seconds: float
) -> tuple[int, float]:
    """`concurrency` producers share `count` enqueues, stopping at `max_seconds`."""
    issued = 0
    done = 0
    began = time.perf_counter()
    deadline = began + max_seconds

    async def producer() -> None:
        nonlocal issued, done
        while issued < count and time.perf_counter() < deadline:
            issued += 1
            if await queue.enqueue(Job(JOB_TYPE, {"n": issued})):
                done += 1

    await asyncio.gather(*(producer() for _ in range(concurrency)))
    return done, time.perf_counter() - began


async def drain_jobs(
    queue: JobQueue, expected: int, concurrency: int, max_seconds: float
) -> tuple[int, float]:
    """A Worker with a no-op handler runs until it has handled `expected` jobs (or time)."""
    handled = 0
    stop = asyncio.Event()

    async def noop(job: Job) -> None:
        nonlocal handled
        handled += 1
        if handled >= expected:
            stop.set()

    if expected == 0:
        return 0, 0.0
    worker = Worker(
        queue,
        {JOB_TYPE: noop},
        consumer=f"bench-{uuid.uuid4().hex[:8]}",
        concurrency=concurrency,
        visibility_timeout=max_seconds + 60,
        poll_interval=0.01,
    )
    timer = asyncio.get_running_loop().call_later(max_seconds, stop.set)
    began = time.perf_counter()
    try:
        await worker.run(stop)  # returns once the last job in flight is acked
    finally:
        timer.cancel()
    return handled, time.perf_counter() - began


async def _queue_case(backend: str, url: str, concurrency: int, plan: DurablePlan) -> QueueRun:
    queue = await open_queue(url)
    try:
        enqueued, enqueue_s = await enqueue_jobs(
            queue, plan.jobs, concurrency, plan.job_max_seconds
        )
        drained, drain_s = await drain_jobs(queue, enqueued, concurrency, plan.job_max_seconds)
        depth = await queue.depth()
    finally:
        await queue.close()
    return QueueRun(backend, concurrency, plan.jobs, enqueued, enqueue_s, drained, drain_s, depth)


def amqp_available(url: str) -> str | None:
    """None if a RabbitMQ broker answers at `url`, else why not (short timeout)."""

    async def connect() -> None:
        import aio_pika

        connection = await aio_pika.connect(url, timeout=2)
        await connection.close()

    try:
        asyncio.run(connect())
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


async def delete_amqp_queues(url: str, prefix: str) -> None:
    """Delete every queue of a bench queue prefix (work, delay levels, dead)."""
    import aio_pika

    from proxy.jobs.amqp_queue import queue_names

    connection = await aio_pika.connect(url, timeout=5)
    try:
        channel = await connection.channel()
        for name in queue_names(prefix):
            await channel.queue_delete(name)
    finally:
        await connection.close()


def run_queue(
    plan: DurablePlan,
    tmp: Path,
    redis_url: str | None,
    postgres_url: str | None = None,
    amqp_url: str | None = None,
) -> dict[str, Any]:
    """Each backend x concurrency on a fresh queue (new file, new Redis prefix, new
    PostgreSQL schema, new RabbitMQ queue names); a backend whose server is down (its
    URL None) is left out."""
    runs: list[dict[str, Any]] = []
    servers = {"sqlite": "", "redis": redis_url, "postgresql": postgres_url, "amqp": amqp_url}
    print(f"queue: {plan.jobs:,} no-op jobs per case", flush=True)
    for backend in QUEUE_BACKENDS:
        server = servers[backend]
        if server is None:
            continue
        for concurrency in plan.concurrencies:
            prefix = f"bench-jobs-{uuid.uuid4().hex}:"
            schema = new_schema("jobs")
            if backend == "sqlite":
                url = f"sqlite://{tmp}/q-{concurrency}.db"
            elif backend == "redis":
                url = redis_store_url(server, prefix)
            elif backend == "postgresql":
                url = postgres_store_url(server, schema)
            else:
                prefix = f"bench-jobs-{uuid.uuid4().hex}."
                url = f"{server}{'&' if '?' in server else '?'}prefix={prefix}"
            try:
                run = asyncio.run(_queue_case(backend, url, concurrency, plan))
            finally:
                if backend == "redis":
                    asyncio.run(delete_prefix(server, prefix))
                elif backend == "postgresql":
                    cleanup_postgres(server, [schema])
                elif backend == "amqp":
                    asyncio.run(delete_amqp_queues(server, prefix))
            row = run.as_dict()
            runs.append(row)
            print(
                f"  {backend:<10} c={concurrency} enqueue={run.enqueue_per_s:>7,.0f}/s "
                f"take+ack={run.drain_per_s:>7,.0f}/s e2e={run.end_to_end_per_s:>7,.0f}/s "
                f"({run.drained:,}/{run.enqueued:,} drained, depth after {run.depth_after})",
                flush=True,
            )
    return {"jobs": plan.jobs, "max_seconds_per_phase": plan.job_max_seconds, "runs": runs}


# ---------------------------------------------------------------------------
# checkout events: CloudEvents published with confirms, in the outbox relay's pages


async def publish_events(url: str, count: int, batch: int) -> dict[str, Any]:
    """Publish `count` CloudEvents through `AmqpPublisher` to a new exchange with one
    bound queue, `batch` at a time (every batch waits for its confirms, as the outbox
    relay's pages do); the exchange and queue are deleted after."""
    import aio_pika

    from proxy.events.amqp import AmqpPublisher
    from proxy.events.cloudevents import checkout_event
    from proxy.events.outbox import PAGE_SIZE

    batch = batch or PAGE_SIZE
    name = f"bench-events-{uuid.uuid4().hex}"
    connection = await aio_pika.connect(url, timeout=5)
    publisher = AmqpPublisher(url, name, connection_name="checkout-sidecar bench", timeout=30)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(name, durable=True)
        await queue.bind(exchange, routing_key="#")
        wall = time.time()
        events = [
            checkout_event(
                "checkout.confirmed",
                f"chk_bench_{i:08d}",
                {"status": "confirmed", "amount_cents": i},
                source="/checkout-sidecar/bench",
                wall=wall,
            )
            for i in range(count)
        ]
        confirmed = 0
        began = time.perf_counter()
        for start in range(0, count, batch):
            confirmed += len(await publisher.publish(events[start : start + batch]))
        elapsed = time.perf_counter() - began
        declared = await channel.declare_queue(name, durable=True, passive=True)
        in_queue = declared.declaration_result.message_count or 0
        return {
            "events": count,
            "batch": batch,
            "confirmed": confirmed,
            "in_queue": in_queue,
            "seconds": round(elapsed, 3),
            "events_per_s": round(confirmed / elapsed, 1) if elapsed > 0 else None,
        }
    finally:
        await publisher.close()
        with contextlib.suppress(Exception):
            cleanup = await connection.channel()
            await cleanup.queue_delete(name)
            await cleanup.exchange_delete(name)
        await connection.close()


def run_events(plan: DurablePlan, amqp_url: str | None) -> dict[str, Any]:
    """Events/s published with confirms; skipped (with the reason printed) without a broker."""
    count = plan.jobs * 4
    if amqp_url is None:
        print("events: RabbitMQ unavailable; skipping the events phase", flush=True)
        return {"skipped": "RabbitMQ unavailable"}
    row = asyncio.run(publish_events(amqp_url, count, 0))
    print(
        f"events: {row['confirmed']:,}/{count:,} CloudEvents confirmed in batches of "
        f"{row['batch']} in {row['seconds']:.2f} s = {row['events_per_s']:,.0f} events/s "
        f"({row['in_queue']:,} in the bound queue)",
        flush=True,
    )
    return row


# ---------------------------------------------------------------------------
# orchestration, results file and report


def run_durable(plan: DurablePlan, tmp: Path) -> dict[str, Any]:
    """Both measurements; Redis and PostgreSQL rows are left out (and the reason kept)
    when the server does not answer."""
    redis_down = redis_available(REDIS_URL)
    redis_url = None if redis_down else REDIS_URL
    if redis_down:
        print(f"durable: Redis at {REDIS_URL} unavailable ({redis_down}); skipping it", flush=True)
    postgres_down = postgres_available(POSTGRES_URL)
    postgres_url = None if postgres_down else POSTGRES_URL
    if postgres_down:
        print(f"durable: PostgreSQL unavailable ({postgres_down}); skipping it", flush=True)
    amqp_down = amqp_available(AMQP_URL)
    amqp_url = None if amqp_down else AMQP_URL
    if amqp_down:
        print(
            f"durable: RabbitMQ at {redact_url(AMQP_URL)} unavailable ({amqp_down}); skipping it",
            flush=True,
        )
    result: dict[str, Any] = {
        "plan": asdict(plan),
        "redis": {"url": REDIS_URL, "unavailable": redis_down},
        "postgresql": {"url": redact_url(POSTGRES_URL), "unavailable": postgres_down},
        "amqp": {"url": redact_url(AMQP_URL), "unavailable": amqp_down},
        "idempotency": run_idempotency(plan, tmp, redis_url, postgres_url),
        "queue": run_queue(plan, tmp, redis_url, postgres_url, amqp_url),
        "events": run_events(plan, amqp_url),
    }
    # other processes on the machine skew every number; say how busy it was
    result["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    return result


def save_section(path: Path, key: str, section: dict[str, Any]) -> None:
    """Write `section` under `key` of the JSON results file, keeping its other keys."""
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        results = {}
    results[key] = section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def markdown(durable: dict[str, Any]) -> str:
    idem = durable["idempotency"]
    out: list[str] = []
    machine = durable.get("machine")
    if machine:
        out += [
            f"- machine: {machine['nproc']} cores, {machine['cpu']}, {machine['kernel']}, "
            f"load avg at start {' '.join(machine['loadavg_at_start'])}, at end "
            f"{' '.join(durable.get('loadavg_at_end', ['?']))}; "
            f"Python {machine['python']}, aiohttp {machine['aiohttp']}, {machine['wrk']}",
            "",
        ]
    out += [
        f"### Idempotency overhead: POST with a new Idempotency-Key each, wrk -t1 "
        f"-c{idem['connections']}, {idem['seconds']:g} s per store in {idem['rounds']} "
        f"rounds (ABBA order) after a {idem['warmup_seconds']:g} s warm-up",
        "",
        "| store | rps | rps / no idempotency | p50 ms | added p50 ms | p99 ms | errors | "
        "reached upstream (2xx) | server CPU us/req |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in idem["runs"]:
        delivered = f"{r['upstream_ok']:,.0f}" + ("" if r["all_delivered"] else " (check!)")
        out.append(
            f"| `{r['store_url']}` | {_fmt(r['rps'], 0)} | "
            f"{_fmt(r.get('rps_ratio'), 2)}x | {_fmt(r['p50_ms'], 3)} | "
            f"{_fmt(r.get('added_p50_ms'), 3)} | {_fmt(r['p99_ms'], 3)} | {r['errors']} | "
            f"{delivered} | {_fmt(r.get('cpu_us_per_request'), 0)} |"
        )
    queue = durable["queue"]
    base = next((r for r in idem["runs"] if r["store"] == "none"), None)
    drift = ", ".join(f"{r['rps']:,.0f}" for r in (base or {}).get("rounds", []))
    out += [
        "",
        "rps over both rounds; p50/p99 the mean of the rounds'. reached upstream = the "
        "sidecar's count of upstream calls that ended in a 2xx (it may exceed wrk's count by "
        "the requests in flight when wrk stopped)."
        + (f" Baseline rps by round: {drift} (how much the machine drifted)." if drift else ""),
        "",
        f"### Job queue: {queue['jobs']:,} no-op jobs enqueued, then drained by a Worker "
        f"(at most {queue['max_seconds_per_phase']:g} s per phase)",
        "",
        "| backend | concurrency | jobs | enqueue jobs/s | take+ack jobs/s | end-to-end jobs/s "
        "| left in queue |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in queue["runs"]:
        jobs = f"{r['drained']:,}" + ("" if r["complete"] else f" of {r['target_jobs']:,}")
        out.append(
            f"| {r['backend']} | {r['concurrency']} | {jobs} | {_fmt(r['enqueue_per_s'], 0)} | "
            f"{_fmt(r['drain_per_s'], 0)} | {_fmt(r['end_to_end_per_s'], 0)} | "
            f"{r['depth_after']} |"
        )
    out += [
        "",
        "concurrency = concurrent producers for enqueue and the Worker's concurrency for "
        "take+ack; end-to-end = jobs / (enqueue time + drain time). amqp: every enqueue "
        "waits for the broker's publisher confirm; the worker consumes with a prefetch.",
    ]
    events = durable.get("events") or {}
    if events.get("events_per_s") is not None:
        out += [
            "",
            f"events: {events['confirmed']:,} of {events['events']:,} CloudEvents published "
            f"with confirms in batches of {events['batch']} (the outbox relay's page): "
            f"{_fmt(events['events_per_s'], 0)} events/s.",
        ]
    redis = durable.get("redis", {})
    if redis.get("unavailable"):
        out += ["", f"Redis ({redis['url']}) was unavailable: {redis['unavailable']}."]
    amqp = durable.get("amqp", {})
    if amqp.get("unavailable"):
        out += ["", f"RabbitMQ ({amqp['url']}) was unavailable: {amqp['unavailable']}."]
    postgres = durable.get("postgresql", {})
    if postgres.get("unavailable"):
        out += ["", f"PostgreSQL ({postgres['url']}) was unavailable: {postgres['unavailable']}."]
    return "\n".join(out) + "\n"


def run_and_save(plan: DurablePlan, output: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """`--only durable`: measure in a temp dir, then update only the "durable" key."""
    with tempfile.TemporaryDirectory(prefix="sidecar-durable-bench-") as tmp_dir:
        result = run_durable(plan, Path(tmp_dir))
    result.update(meta)
    save_section(output, "durable", result)
    return result
