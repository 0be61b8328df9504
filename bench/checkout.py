"""`python -m bench.run --only checkout`: what the composite checkout costs and saves.

The same order is checked out three ways against the simulator with fixed
upstream latencies (inventory 50 ms, payment 100, shipping 150, coupon 200,
fraud 50; capture and commit pay the payment and inventory latency again):

- **sidecar**: `POST /checkout` on the sidecar as users run it (`checkout-sidecar
  run` with config/sidecar.yaml, its upstreams pointed at the simulator, durable
  state in SQLite): fan-out, journal, idempotency, capture + commit, and the
  async fraud screening and email it queues after the answer;
- **sequential**: a naive client calling reserve, authorize, quote, validate,
  capture, commit one after the other, no policies;
- **parallel**: a naive client with `asyncio.gather` over the four calls, then
  capture and commit gathered, no policies (no journal, no retries, no undo).

Simulator and sidecar are separate processes (started like bench/run.py starts
its servers); the load comes from this process at a fixed concurrency, bounded
by a count and a time limit per mode, after a short unmeasured warm-up. The
simulator's ledger is reset before each mode and read after it, so a mode that
"wins" by not charging anyone would show.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench import procs

ROOT = Path(__file__).resolve().parent.parent
SIDECAR_CONFIG = ROOT / "config" / "sidecar.yaml"
READY_TIMEOUT = 30.0
REQUEST_TIMEOUT = 10.0

LATENCY_MS = {"inventory": 50, "payment": 100, "shipping": 150, "coupon": 200, "fraud": 50}
MODES = ("sidecar", "sequential", "parallel")
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
    count: int  # checkouts per mode
    max_seconds: float  # ... or until this much time has passed
    warmup: int  # unmeasured checkouts per mode first


FULL = CheckoutPlan(concurrency=20, count=600, max_seconds=30.0, warmup=40)
QUICK = CheckoutPlan(concurrency=20, count=100, max_seconds=10.0, warmup=20)


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


def start_servers(stack: ExitStack, tmp: Path) -> tuple[dict[str, str], procs.Server]:
    """The simulator (fixed latencies, free ports) and the sidecar pointed at it."""
    ports = {name: procs.free_port() for name in LATENCY_MS}
    config = tmp / "simulator.yaml"
    config.write_text(simulator_yaml(ports))
    simulator = procs.start(
        "simulator", [sys.executable, "-m", "proxy.simulator", "--config", str(config)], tmp
    )
    stack.callback(simulator.stop)
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    asyncio.run(_wait_listening(list(urls.values()), READY_TIMEOUT))

    # config/sidecar.yaml as users get it; only what it reads from the environment changes
    env = {
        "SIDECAR_LISTEN": f"127.0.0.1:{procs.free_port()}",
        "SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{procs.free_port()}",
        "SIDECAR_STORE": f"sqlite:///{tmp / 'sidecar.db'}",
        "ORDERS_CALLBACK": urls["fraud"] + "/_notify",
        **{f"{name.upper()}_UPSTREAM": url for name, url in urls.items()},
    }
    argv = ["env", *(f"{k}={v}" for k, v in env.items())]
    argv += [_console_script(), "run", "--config", str(SIDECAR_CONFIG)]
    sidecar = procs.start("sidecar", argv, tmp, cwd=tmp)
    stack.callback(sidecar.stop)
    sidecar.wait_ready(READY_TIMEOUT)
    return urls, sidecar


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
) -> dict[str, Any]:
    """`count` checkouts (or `max_seconds`) at `plan.concurrency`; latencies of the successes."""
    latencies: list[float] = []
    errors: list[str] = []
    next_index = 0
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=plan.concurrency * 8)
    run_id = f"{mode}-{time.time_ns()}"
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        began = time.perf_counter()
        stop_at = began + max_seconds

        async def worker() -> None:
            nonlocal next_index
            while next_index < count and time.perf_counter() < stop_at:
                index, next_index = next_index, next_index + 1
                start = time.perf_counter()
                try:
                    await one(session, f"bench-{run_id}-{index}")
                except (Failed, aiohttp.ClientError, TimeoutError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    continue
                latencies.append((time.perf_counter() - start) * 1000)

        await asyncio.gather(*(worker() for _ in range(plan.concurrency)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "mode": mode,
        "concurrency": plan.concurrency,
        "started": next_index,
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


def run_checkout(plan: CheckoutPlan, tmp: Path) -> dict[str, Any]:
    """Start the servers, run the three modes, stop everything; the results as JSON."""
    with ExitStack() as stack:
        urls, sidecar = start_servers(stack, tmp)
        admin_url = _admin_url(sidecar)
        clients: dict[str, Callable[[aiohttp.ClientSession, str], Awaitable[None]]] = {
            "sidecar": lambda s, k: via_sidecar(s, sidecar.url, k),
            "sequential": lambda s, k: sequential(s, urls, k),
            "parallel": lambda s, k: parallel(s, urls, k),
        }
        runs = []
        print(
            f"checkout: {plan.count} checkouts per mode (at most {plan.max_seconds:g} s), "
            f"{plan.concurrency} concurrent, after {plan.warmup} warm-up",
            flush=True,
        )
        for mode in MODES:
            asyncio.run(drive(clients[mode], mode, plan, plan.warmup, plan.max_seconds))
            if mode == "sidecar" and admin_url:
                asyncio.run(_wait_sidecar_idle(admin_url))
            asyncio.run(_ledger(urls, reset=True))
            row = asyncio.run(drive(clients[mode], mode, plan, plan.count, plan.max_seconds))
            if mode == "sidecar" and admin_url:
                asyncio.run(_wait_sidecar_idle(admin_url))
            counts = asyncio.run(_ledger(urls))
            row["ledger"] = {
                k: counts.get(k, 0)
                for k in ("authorizations", "captures", "voids", "reservations", "committed")
            }
            runs.append(row)
            print(
                f"  {mode:<10} ok={row['ok']:<5} errors={row['errors']:<3} "
                f"p50={_ms(row['p50_ms'])} p99={_ms(row['p99_ms'])} "
                f"{row['checkouts_per_s']:.1f} checkouts/s  ledger {row['ledger']}",
                flush=True,
            )
    by = {r["mode"]: r for r in runs}
    return {
        "upstream_latency_ms": LATENCY_MS,
        "plan": plan.__dict__,
        "sidecar_config": str(SIDECAR_CONFIG.relative_to(ROOT)),
        "runs": runs,
        "ratios": {
            "sidecar_vs_sequential": _ratios(by["sidecar"], by["sequential"]),
            "sidecar_vs_parallel": _ratios(by["sidecar"], by["parallel"]),
        },
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


def markdown(checkout: dict[str, Any]) -> str:
    lat = ", ".join(f"{k} {v}" for k, v in checkout["upstream_latency_ms"].items())
    plan = checkout["plan"]
    out = [
        "### Composite checkout: sidecar vs naive clients",
        "",
        f"Simulated upstream latency (fixed, ms): {lat}; capture and commit pay payment and "
        f"inventory again. {plan['concurrency']} concurrent clients, {plan['count']} checkouts "
        f"per mode (at most {plan['max_seconds']:g} s) after {plan['warmup']} warm-up.",
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
    out += ["", "| sidecar vs | p50 | p99 | throughput |", "| --- | ---: | ---: | ---: |"]
    for name, label in RATIO_LABELS:
        r = checkout["ratios"][name]
        out.append(f"| {label} | {_x(r['p50'])} | {_x(r['p99'])} | {_x(r['throughput'])} |")
    out += [
        "",
        "Ratios are sidecar / other: below 1x latency and above 1x throughput favour the "
        "sidecar. The naive clients keep no journal, retry nothing and undo nothing.",
        "",
    ]
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
