"""`python -m bench.run --only checkout`: what the composite checkout costs and saves.

The same order is checked out three ways against the simulator with fixed
upstream latencies (inventory 50 ms, payment 100, shipping 150, coupon 200,
fraud 50; capture and commit pay the payment and inventory latency again):

- **sidecar**: `POST /checkout` on the sidecar as users run it (`checkout-sidecar
  run` with config/sidecar.yaml, its upstreams pointed at the simulator): fan-out,
  journal, idempotency, capture + commit, and the async fraud screening and email
  it queues after the answer. It runs once per store (`STORES`: memory, SQLite,
  Redis, PostgreSQL; `store:` set to it, so idempotency records, journal and queue
  all live there, except memory's queue, which the config keeps in SQLite), each
  sidecar its own process started for its run and stopped after it; the SQLite run,
  the store of the shipped config, is the "sidecar" row of the modes table. A Redis
  or PostgreSQL that does not answer is skipped with the reason printed; the run's
  Redis keys (`?prefix=`) and PostgreSQL schema (`?schema=`) are removed after it;
- **sequential**: a naive client calling reserve, authorize, quote, validate,
  capture, commit one after the other, no policies;
- **parallel**: a naive client with `asyncio.gather` over the four calls, then
  capture and commit gathered, no policies (no journal, no retries, no undo).

Simulator and sidecars are separate processes (started like bench/run.py starts
its servers); the load comes from this process at a fixed concurrency, bounded
by a count and a time limit per run, after a short unmeasured warm-up.

The clients of a run start spread over one checkout's duration (`ARRIVAL_SPREAD_S`),
so checkouts arrive evenly, as independent users' do, instead of in waves of 20 that
stay in step (the latencies are fixed). In waves, each client queued behind the
others' CPU, which inflated the `gather` baseline (six requests per checkout from
this one process) more than the sidecar (one), and a store's p50 over gather jumped
between about -6 and +3 ms from run to run of one code; spread, the same
measurement repeats within about 0.5 ms.

The simulator's ledger is reset before each run and read after it, so a run that
"wins" by not charging anyone would show. Every store is measured against the
same simulator and compared with plain `asyncio.gather` checkouts run in blocks
alternating with its own (`BLOCK_ORDER`, `interleaved`): p50 over gather is the
latency the sidecar adds, with the machine's drift over the minutes of the run
weighing on both sides alike.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench import durable, procs

ROOT = Path(__file__).resolve().parent.parent
SIDECAR_CONFIG = ROOT / "config" / "sidecar.yaml"
READY_TIMEOUT = 30.0
REQUEST_TIMEOUT = 10.0

LATENCY_MS = {"inventory": 50, "payment": 100, "shipping": 150, "coupon": 200, "fraud": 50}
ARRIVAL_SPREAD_S = 0.3
"""The clients of a run start this far apart in all, evenly: about one checkout (the
slowest call, 200 ms, then capture at payment's 100 ms), so arrivals stay even."""
MODES = ("sidecar", "sequential", "parallel")
STORES = ("memory", "sqlite", "redis", "postgresql")
MODE_STORE = "sqlite"
"""The store of the "sidecar" row in the modes table: the shipped config's default."""
RATIO_LABELS = (("sidecar_vs_sequential", "sequential"), ("sidecar_vs_parallel", "naive parallel"))
ORDER: dict[str, Any] = {
    "items": [{"sku": "sku-bench", "qty": 1}],
    "amount": 2599,
    "currency": "EUR",
    "customer": "cust-bench",
    "card": "tok_visa",
    "address": {"country": "FR", "zip": "75001"},
    "coupon": "SAVE10",
}


@dataclass(frozen=True)
class CheckoutPlan:
    concurrency: int
    count: int  # checkouts per naive mode
    max_seconds: float  # ... or until this much time has passed
    warmup: int  # unmeasured checkouts per run first
    store_count: int  # checkouts through the sidecar, per store
    store_max_seconds: float  # ... or until this much time has passed


FULL = CheckoutPlan(
    concurrency=20, count=400, max_seconds=30.0, warmup=40, store_count=300, store_max_seconds=12.0
)
QUICK = CheckoutPlan(
    concurrency=20, count=100, max_seconds=10.0, warmup=20, store_count=60, store_max_seconds=5.0
)


# -- servers -------------------------------------------------------------------------


def simulator_yaml(ports: dict[str, int]) -> str:
    upstreams: dict[str, Any] = {
        name: {"port": ports[name], "latency": {"dist": "fixed", "ms": ms}}
        for name, ms in LATENCY_MS.items()
    }
    upstreams["inventory"]["default_stock"] = 1_000_000_000
    upstreams["coupon"]["coupons"] = {"SAVE10": {"percent": 10}}
    return yaml.safe_dump({"host": "127.0.0.1", "seed": 1, "upstreams": upstreams})


def _console_script() -> str:
    exe = Path(sys.executable).parent / "checkout-sidecar"
    found = str(exe) if exe.exists() else shutil.which("checkout-sidecar")
    if found is None:
        raise SystemExit("checkout-sidecar is not installed: pip install -e . (or make bench)")
    return found


async def _wait_listening(urls: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        for url in urls:
            while True:
                try:
                    async with session.get(url + "/_stats") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"simulator not listening on {url} after {timeout:g}s")
                await asyncio.sleep(0.05)


def start_simulator(stack: ExitStack, tmp: Path) -> dict[str, str]:
    """The simulator (fixed latencies, free ports); its upstreams' URLs by name."""
    ports = {name: procs.free_port() for name in LATENCY_MS}
    config = tmp / "simulator.yaml"
    config.write_text(simulator_yaml(ports))
    simulator = procs.start(
        "simulator", [sys.executable, "-m", "proxy.simulator", "--config", str(config)], tmp
    )
    stack.callback(simulator.stop)
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    asyncio.run(_wait_listening(list(urls.values()), READY_TIMEOUT))
    return urls


def sidecar_env(urls: dict[str, str], store: str) -> dict[str, str]:
    """What config/sidecar.yaml reads from the environment: free ports, the store, and
    the simulator's URLs as its upstreams."""
    return {
        "SIDECAR_LISTEN": f"127.0.0.1:{procs.free_port()}",
        "SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{procs.free_port()}",
        "SIDECAR_STORE": store,
        "ORDERS_CALLBACK": urls["fraud"] + "/_notify",
        **{f"{name.upper()}_UPSTREAM": url for name, url in urls.items()},
    }


def start_sidecar(
    stack: ExitStack, home: Path, urls: dict[str, str], store: str, name: str = "sidecar"
) -> procs.Server:
    """config/sidecar.yaml as users get it, with `store` as its store, run in `home`."""
    home.mkdir(parents=True, exist_ok=True)
    argv = ["env", *(f"{k}={v}" for k, v in sidecar_env(urls, store).items())]
    argv += [_console_script(), "run", "--config", str(SIDECAR_CONFIG)]
    sidecar = procs.start(name, argv, home, cwd=home)
    stack.callback(sidecar.stop)
    sidecar.wait_ready(READY_TIMEOUT)
    return sidecar


@dataclass(frozen=True)
class StoreTarget:
    """One store the sidecar runs on: its URL, and what to remove after the run."""

    store: str
    url: str
    redis_prefix: str | None = None
    postgres_schema: str | None = None


def store_targets(tmp: Path, redis_url: str | None, postgres_url: str | None) -> list[StoreTarget]:
    """A target per store in `STORES`; Redis and PostgreSQL only when given (reachable),
    each with a namespace (prefix, schema) no other run uses."""
    targets = []
    for store in STORES:
        if store == "memory":
            targets.append(StoreTarget(store, "memory://"))
        elif store == "sqlite":
            targets.append(StoreTarget(store, f"sqlite://{tmp}/sidecar-sqlite/state.db"))
        elif store == "redis" and redis_url is not None:
            prefix = f"bench-checkout-{uuid.uuid4().hex}:"
            url = durable.redis_store_url(redis_url, prefix)
            targets.append(StoreTarget(store, url, redis_prefix=prefix))
        elif store == "postgresql" and postgres_url is not None:
            schema = durable.new_schema("checkout")
            url = durable.postgres_store_url(postgres_url, schema)
            targets.append(StoreTarget(store, url, postgres_schema=schema))
    return targets


def cleanup_store(target: StoreTarget, redis_url: str | None, postgres_url: str | None) -> None:
    """Delete the run's Redis keys or drop its PostgreSQL schema (after the sidecar stopped)."""
    if target.redis_prefix is not None and redis_url is not None:
        try:
            deleted = asyncio.run(durable.delete_prefix(redis_url, target.redis_prefix))
        except Exception as exc:
            print(f"  redis: could not delete {target.redis_prefix}*: {exc}", flush=True)
        else:
            print(f"  redis: deleted {deleted:,} keys under {target.redis_prefix}", flush=True)
    if target.postgres_schema is not None and postgres_url is not None:
        durable.cleanup_postgres(postgres_url, [target.postgres_schema])


# -- the three clients -----------------------------------------------------------------


class Failed(Exception):
    """A checkout that did not end confirmed."""


async def _post(session: aiohttp.ClientSession, url: str, body: Any = None, **kw: Any) -> Any:
    async with session.post(url, json=body, **kw) as response:
        data = await response.json(content_type=None)
        if response.status >= 300:
            raise Failed(f"{url} -> {response.status} {data}")
        return data


def _capture_and_commit(
    session: aiohttp.ClientSession, urls: dict[str, str], auth: Any, reservation: Any, coupon: Any
) -> tuple[Awaitable[Any], Awaitable[Any]]:
    capture = _post(
        session,
        f"{urls['payment']}/payments/{auth['id']}/capture",
        {"amount": coupon["total"]},
    )
    commit = _post(session, f"{urls['inventory']}/reservations/{reservation['id']}/commit")
    return capture, commit


def _requests(urls: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    o = ORDER
    return [
        (urls["inventory"] + "/reservations", {"items": o["items"]}),
        (
            urls["payment"] + "/authorize",
            {k: o[k] for k in ("amount", "currency", "customer", "card")},
        ),
        (urls["shipping"] + "/quote", {"items": o["items"], "address": o["address"]}),
        (urls["coupon"] + "/validate", {"code": o["coupon"], "amount": o["amount"]}),
    ]


async def sequential(session: aiohttp.ClientSession, urls: dict[str, str], key: str) -> None:
    results = [await _post(session, url, body) for url, body in _requests(urls)]
    reservation, auth, _, coupon = results
    capture, commit = _capture_and_commit(session, urls, auth, reservation, coupon)
    await capture
    await commit


async def parallel(session: aiohttp.ClientSession, urls: dict[str, str], key: str) -> None:
    results = await asyncio.gather(*(_post(session, u, b) for u, b in _requests(urls)))
    reservation, auth, _, coupon = results
    await asyncio.gather(*_capture_and_commit(session, urls, auth, reservation, coupon))


async def via_sidecar(session: aiohttp.ClientSession, url: str, key: str) -> None:
    body = await _post(session, url + "/checkout", ORDER, headers={"Idempotency-Key": key})
    if body.get("status") != "confirmed":
        raise Failed(f"checkout {key}: {body.get('status')} degraded={body.get('degraded')}")


# -- load --------------------------------------------------------------------------------


def _percentile(sorted_ms: list[float], q: float) -> float | None:
    """Nearest-rank percentile."""
    if not sorted_ms:
        return None
    rank = max(1, min(len(sorted_ms), round(q * len(sorted_ms) + 0.5)))
    return sorted_ms[rank - 1]


async def drive(
    one: Callable[[aiohttp.ClientSession, str], Awaitable[None]],
    mode: str,
    plan: CheckoutPlan,
    count: int,
    max_seconds: float,
    *,
    keep_latencies: bool = False,
) -> dict[str, Any]:
    """`count` checkouts (or `max_seconds`) at `plan.concurrency`; latencies of the
    successes (each one's, sorted, under `latencies_ms` with `keep_latencies`)."""
    latencies: list[float] = []
    errors: list[str] = []
    next_index = 0
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=plan.concurrency * 8)
    run_id = f"{mode}-{time.time_ns()}"
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        began = time.perf_counter()
        stop_at = began + max_seconds

        async def worker(number: int) -> None:
            nonlocal next_index
            # load shaping, not synchronisation: see ARRIVAL_SPREAD_S
            await asyncio.sleep(number * ARRIVAL_SPREAD_S / plan.concurrency)
            while next_index < count and time.perf_counter() < stop_at:
                index, next_index = next_index, next_index + 1
                start = time.perf_counter()
                try:
                    await one(session, f"bench-{run_id}-{index}")
                except (Failed, aiohttp.ClientError, TimeoutError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    continue
                latencies.append((time.perf_counter() - start) * 1000)

        await asyncio.gather(*(worker(n) for n in range(plan.concurrency)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    return _summary(mode, plan.concurrency, next_index, latencies, errors, elapsed) | (
        {"latencies_ms": latencies} if keep_latencies else {}
    )


def _summary(
    mode: str,
    concurrency: int,
    started: int,
    latencies: list[float],
    errors: list[str],
    elapsed: float,
) -> dict[str, Any]:
    """A run's row from its sorted latencies (ms) and its errors."""
    return {
        "mode": mode,
        "concurrency": concurrency,
        "started": started,
        "ok": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:3],
        "seconds": elapsed,
        "checkouts_per_s": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": _percentile(latencies, 0.50),
        "p90_ms": _percentile(latencies, 0.90),
        "p99_ms": _percentile(latencies, 0.99),
        "max_ms": latencies[-1] if latencies else None,
    }


async def _ledger(urls: dict[str, str], reset: bool = False) -> dict[str, int]:
    async with aiohttp.ClientSession() as session:
        if reset:
            async with session.post(urls["payment"] + "/_reset") as response:
                response.raise_for_status()
            return {}
        async with session.get(urls["payment"] + "/_ledger") as response:
            return dict((await response.json())["counts"])


async def _wait_sidecar_idle(admin_url: str, limit_s: float = 15.0) -> None:
    """Let the sidecar's queued fraud screenings and emails finish between modes."""
    deadline = time.monotonic() + limit_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            async with session.get(admin_url + "/metrics") as response:
                text = await response.text()
            depth = next(
                (float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith("sidecar_queue_depth ")),
                0.0,
            )  # fmt: skip
            if depth == 0:
                return
            await asyncio.sleep(0.2)


Client = Callable[[aiohttp.ClientSession, str], Awaitable[None]]

LEDGER_KEYS = ("authorizations", "captures", "voids", "reservations", "committed")
"""The simulator's counts a row keeps: what its checkouts did to money and stock."""


def measure(
    client: Client,
    mode: str,
    plan: CheckoutPlan,
    count: int,
    max_seconds: float,
    urls: dict[str, str],
    admin_url: str = "",
) -> dict[str, Any]:
    """Warm up (unmeasured), reset the ledger, run `count` checkouts (or `max_seconds`),
    let the sidecar's queued work finish, and read what the simulator's ledger saw."""
    asyncio.run(drive(client, mode, plan, plan.warmup, max_seconds))
    if admin_url:
        asyncio.run(_wait_sidecar_idle(admin_url))
    asyncio.run(_ledger(urls, reset=True))
    row = asyncio.run(drive(client, mode, plan, count, max_seconds))
    if admin_url:
        asyncio.run(_wait_sidecar_idle(admin_url))
    counts = asyncio.run(_ledger(urls))
    row["ledger"] = {k: counts.get(k, 0) for k in LEDGER_KEYS}
    return row


BLOCK_ORDER = ("parallel", "sidecar", "sidecar", "parallel") * 2
"""A store's checkouts and its gather baseline's, in blocks of a quarter each, in this
order (A B B A, twice): drift over the minutes of a store's run (the machine's other
load, its hour) then weighs on both sides alike, where one gather run before and one
after left a whole store's run between them."""


def combined(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from runs of one mode kept with `keep_latencies`: their latencies pooled,
    their errors and seconds added up; each block's own p50 under `block_p50s_ms`."""
    latencies = sorted(ms for block in blocks for ms in block["latencies_ms"])
    row = _summary(
        blocks[0]["mode"],
        blocks[0]["concurrency"],
        sum(block["started"] for block in blocks),
        latencies,
        [sample for block in blocks for sample in block["error_samples"]],
        sum(block["seconds"] for block in blocks),
    )
    row["errors"] = sum(block["errors"] for block in blocks)
    row["block_p50s_ms"] = [block["p50_ms"] for block in blocks]
    return row


def interleaved(
    gather: Client,
    sidecar: Client,
    plan: CheckoutPlan,
    urls: dict[str, str],
    admin_url: str,
    sidecar_block: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A store's sidecar row and its gather baseline, measured in alternating blocks
    (`BLOCK_ORDER`) after a warm-up of each. The sidecar's queued work (fraud, email)
    finishes after each of its blocks, unmeasured, so it does not load the next
    gather block; its ledger counts are those of its own blocks. `sidecar_block`
    wraps each sidecar block with its queued work (`bench.checkout_cpu` reads the
    sidecar's CPU around them)."""
    clients = {"parallel": gather, "sidecar": sidecar}
    for mode in ("parallel", "sidecar"):
        asyncio.run(drive(clients[mode], mode, plan, plan.warmup, plan.store_max_seconds))
    asyncio.run(_wait_sidecar_idle(admin_url))
    per_block = max(1, plan.store_count * 2 // len(BLOCK_ORDER))
    seconds = plan.store_max_seconds * 2 / len(BLOCK_ORDER)
    blocks: dict[str, list[dict[str, Any]]] = {"parallel": [], "sidecar": []}
    ledger: Counter[str] = Counter()
    for mode in BLOCK_ORDER:
        if mode == "parallel":
            run = drive(gather, mode, plan, per_block, seconds, keep_latencies=True)
            blocks[mode].append(asyncio.run(run))
            continue
        asyncio.run(_ledger(urls, reset=True))
        with sidecar_block():
            run = drive(sidecar, mode, plan, per_block, seconds, keep_latencies=True)
            blocks[mode].append(asyncio.run(run))
            asyncio.run(_wait_sidecar_idle(admin_url))
        ledger.update(asyncio.run(_ledger(urls)))
    row, baseline = combined(blocks["sidecar"]), combined(blocks["parallel"])
    row["ledger"] = {k: ledger.get(k, 0) for k in LEDGER_KEYS}
    baseline["ledger"] = {}
    return row, baseline


def _print_row(label: str, row: dict[str, Any]) -> None:
    print(
        f"  {label:<20} ok={row['ok']:<5} errors={row['errors']:<3} "
        f"p50={_ms(row['p50_ms'])} p99={_ms(row['p99_ms'])} "
        f"{row['checkouts_per_s']:.1f} checkouts/s  ledger {row['ledger']}",
        flush=True,
    )


def run_stores(
    plan: CheckoutPlan,
    tmp: Path,
    urls: dict[str, str],
    redis_url: str | None,
    postgres_url: str | None,
    gather: Client | None = None,
) -> list[dict[str, Any]]:
    """The sidecar once per store, one process at a time against the same simulator.

    With `gather` (the plain `asyncio.gather` client), each store's checkouts alternate
    in blocks with gather's (`interleaved`), and its baseline is the p50 of those gather
    blocks pooled: measured within the same minute, block by block, so a shared
    machine's drift weighs on both sides alike.
    """
    rows = []
    for target in store_targets(tmp, redis_url, postgres_url):
        try:
            with ExitStack() as stack:
                home = tmp / f"sidecar-{target.store}"
                sidecar = start_sidecar(stack, home, urls, target.url, f"sidecar-{target.store}")

                def client(
                    s: aiohttp.ClientSession, k: str, url: str = sidecar.url
                ) -> Awaitable[None]:
                    return via_sidecar(s, url, k)

                admin = _admin_url(sidecar)
                baseline = None
                if gather is None:
                    row = measure(
                        client, "sidecar", plan, plan.store_count, plan.store_max_seconds,
                        urls, admin,
                    )  # fmt: skip
                else:
                    row, baseline = interleaved(gather, client, plan, urls, admin)
        finally:
            cleanup_store(target, redis_url, postgres_url)
        row["store"] = target.store
        row["store_url"] = durable.store_label(target.url, tmp)
        if baseline is not None:
            _print_row("  gather (its blocks)", baseline)
            row["gather_p50s_ms"] = baseline["block_p50s_ms"]
            row["gather_p50_ms"] = baseline["p50_ms"]
        _print_row(f"sidecar {target.store}", row)
        rows.append(row)
    return rows


def store_rows(stores: list[dict[str, Any]], gather: dict[str, Any]) -> list[dict[str, Any]]:
    """Each store's run with its p50 and p99 minus the gather baseline's (ms): the store's
    own interleaved gather blocks (`gather_p50_ms`) when it has them, else the run's
    `gather`."""

    def minus(a: float | None, b: float | None) -> float | None:
        return a - b if a is not None and b is not None else None

    return [
        {
            **row,
            "p50_over_gather_ms": minus(row["p50_ms"], row.get("gather_p50_ms", gather["p50_ms"])),
            "p99_over_gather_ms": minus(row["p99_ms"], gather["p99_ms"]),
        }
        for row in stores
    ]


TARGET_OVER_GATHER_MS = 3.0
"""Issue 14: a checkout's p50 at most this much over a plain `asyncio.gather`, per store."""


def issue14_rows(checkout: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per store of a `run_checkout` result, for the issue-14 table of `make bench`:
    `{"store", "p50_over_gather_ms", "target_ms", "pass"}`."""
    rows = []
    for row in checkout.get("stores") or []:
        over = row.get("p50_over_gather_ms")
        rows.append(
            {
                "store": row["store"],
                "p50_over_gather_ms": over,
                "target_ms": TARGET_OVER_GATHER_MS,
                "pass": over is not None and over <= TARGET_OVER_GATHER_MS,
            }
        )
    return rows


def run_checkout(plan: CheckoutPlan, tmp: Path) -> dict[str, Any]:
    """Start the simulator, run the naive modes, then the sidecar once per store, stop
    everything; the results as JSON."""
    redis_down = durable.redis_available(durable.REDIS_URL)
    if redis_down:
        print(f"checkout: Redis unavailable ({redis_down}); skipping it", flush=True)
    postgres_down = durable.postgres_available(durable.POSTGRES_URL)
    if postgres_down:
        print(f"checkout: PostgreSQL unavailable ({postgres_down}); skipping it", flush=True)
    redis_url = None if redis_down else durable.REDIS_URL
    postgres_url = None if postgres_down else durable.POSTGRES_URL
    with ExitStack() as stack:
        urls = start_simulator(stack, tmp)
        clients: dict[str, Client] = {
            "sequential": lambda s, k: sequential(s, urls, k),
            "parallel": lambda s, k: parallel(s, urls, k),
        }
        print(
            f"checkout: {plan.count} checkouts per naive mode (at most {plan.max_seconds:g} s), "
            f"{plan.store_count} through the sidecar per store (at most "
            f"{plan.store_max_seconds:g} s), {plan.concurrency} concurrent, after "
            f"{plan.warmup} warm-up",
            flush=True,
        )
        naive = {}
        for mode in ("sequential", "parallel"):
            naive[mode] = measure(clients[mode], mode, plan, plan.count, plan.max_seconds, urls)
            _print_row(mode, naive[mode])
        stores = store_rows(
            run_stores(plan, tmp, urls, redis_url, postgres_url, clients["parallel"]),
            naive["parallel"],
        )
    by = {**naive}
    mode_store = next((r for r in stores if r["store"] == MODE_STORE), None)
    if mode_store is not None:
        by["sidecar"] = {k: v for k, v in mode_store.items() if not k.startswith("store")}
    runs = [by[mode] for mode in MODES if mode in by]
    return {
        "upstream_latency_ms": LATENCY_MS,
        "plan": plan.__dict__,
        "sidecar_config": str(SIDECAR_CONFIG.relative_to(ROOT)),
        "mode_store": MODE_STORE,
        "runs": runs,
        "stores": stores,
        "issue14": issue14_rows({"stores": stores}),
        "unavailable": {"redis": redis_down, "postgresql": postgres_down},
        "ratios": {
            name: _ratios(by["sidecar"], by[other])
            for name, other in (
                ("sidecar_vs_sequential", "sequential"),
                ("sidecar_vs_parallel", "parallel"),
            )
            if "sidecar" in by
        },
        "loadavg_at_end": Path("/proc/loadavg").read_text().split()[:3],
    }


def _admin_url(sidecar: procs.Server) -> str:
    """The admin URL from the sidecar's JSON `start` line (read before it was ready)."""
    return sidecar.admin


def _ratios(sidecar: dict[str, Any], other: dict[str, Any]) -> dict[str, float | None]:
    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    return {
        "p50": div(sidecar["p50_ms"], other["p50_ms"]),
        "p99": div(sidecar["p99_ms"], other["p99_ms"]),
        "throughput": div(sidecar["checkouts_per_s"], other["checkouts_per_s"]),
    }


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}ms"


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f}"


def markdown(checkout: dict[str, Any]) -> str:
    lat = ", ".join(f"{k} {v}" for k, v in checkout["upstream_latency_ms"].items())
    plan = checkout["plan"]
    mode_store = checkout.get("mode_store", "sqlite")
    out = [
        "### Composite checkout: sidecar vs naive clients",
        "",
        f"Simulated upstream latency (fixed, ms): {lat}; capture and commit pay payment and "
        f"inventory again. {plan['concurrency']} concurrent clients, {plan['count']} checkouts "
        f"per naive mode (at most {plan['max_seconds']:g} s), "
        f"{plan.get('store_count', plan['count'])} through the sidecar per store (at most "
        f"{plan.get('store_max_seconds', plan['max_seconds']):g} s), each after "
        f"{plan['warmup']} warm-up. The sidecar row is its `{mode_store}` run.",
        "",
        "| mode | checkouts ok | errors | p50 ms | p99 ms | checkouts/s | authorizations | "
        "captures |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in checkout["runs"]:
        out.append(
            f"| {r['mode']} | {r['ok']} | {r['errors']} | {_ms(r['p50_ms'])[:-2]} | "
            f"{_ms(r['p99_ms'])[:-2]} | {r['checkouts_per_s']:.1f} | "
            f"{r['ledger']['authorizations']} | {r['ledger']['captures']} |"
        )
    ratios = checkout["ratios"]
    if ratios:
        out += ["", "| sidecar vs | p50 | p99 | throughput |", "| --- | ---: | ---: | ---: |"]
        for name, label in RATIO_LABELS:
            r = ratios[name]
            out.append(f"| {label} | {_x(r['p50'])} | {_x(r['p99'])} | {_x(r['throughput'])} |")
    out += [
        "",
        "Ratios are sidecar / other: below 1x latency and above 1x throughput favour the "
        "sidecar. The naive clients keep no journal, retry nothing and undo nothing.",
        "",
    ]
    stores = checkout.get("stores") or []
    if stores:
        gather = next((r for r in checkout["runs"] if r["mode"] == "parallel"), None)
        out += [
            "### Composite checkout per store",
            "",
            "The sidecar with `store:` set to each store in turn (idempotency records, "
            "journal and queue there; memory's queue stays in SQLite), against the same "
            "simulator; p50 over gather = the store's p50 minus the p50 of plain "
            "`asyncio.gather` checkouts run in blocks alternating with the store's (A B B "
            "A, twice; same size in all, same simulator), or the run's gather p50"
            + (f" ({_ms(gather['p50_ms'])[:-2]} ms)" if gather else "")
            + " when it has none.",
            "",
            "| store | checkouts ok | errors | p50 ms | gather p50 ms (its blocks) | "
            "p50 over gather ms | p99 ms | checkouts/s | authorizations | captures |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in stores:
            adjacent = ", ".join(f"{p:.1f}" for p in r.get("gather_p50s_ms") or [])
            out.append(
                f"| `{r['store_url']}` | {r['ok']} | {r['errors']} | {_ms(r['p50_ms'])[:-2]} | "
                f"{adjacent or 'n/a'} | {_signed(r.get('p50_over_gather_ms'))} | "
                f"{_ms(r['p99_ms'])[:-2]} | {r['checkouts_per_s']:.1f} | "
                f"{r['ledger']['authorizations']} | {r['ledger']['captures']} |"
            )
        out += [
            "",
            f"Issue 14 (p50 over gather at most {TARGET_OVER_GATHER_MS:g} ms per store):",
            "",
            "| store | p50 over gather ms | target ms | result |",
            "| --- | ---: | ---: | --- |",
        ]
        for i in issue14_rows(checkout):
            verdict = "pass" if i["pass"] else "**miss**"
            out.append(
                f"| {i['store']} | {_signed(i['p50_over_gather_ms'])} | "
                f"{i['target_ms']:g} | {verdict} |"
            )
        out.append("")
    for name, why in (checkout.get("unavailable") or {}).items():
        if why:
            out += [f"{name} was unavailable and skipped: {why}", ""]
    return "\n".join(out)


def main() -> int:
    import tempfile

    quick = "--quick" in sys.argv[1:]
    with tempfile.TemporaryDirectory(prefix="sidecar-checkout-bench-") as tmp:
        result = run_checkout(QUICK if quick else FULL, Path(tmp))
    print()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
