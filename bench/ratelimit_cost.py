"""`python -m bench.ratelimit_cost`: what a rate limit adds to each upstream call.

Three upstreams that differ only in `rate_limit`: none, `scope: local`, and
`scope: shared` in Redis; each with a rate so high that no call ever waits, so the
figure is the limiter's own cost, not the limit doing its job. Calls go through
`Upstream.call` (the pipeline every proxied request and checkout step takes) to the
fast `bench.upstream` app on loopback, in this process. Rounds alternate the three
(none, local, shared, shared, local, none, ...) so a busy neighbour weighs on all
alike, and the median round is reported:

- microseconds per call, one call at a time (the latency a call pays);
- calls per second with `--concurrency` callers (what a busy sidecar keeps up);
- microseconds per `acquire` of the limiter alone (for shared: one Redis round trip
  running the GCRA script);
- microseconds per `Pipeline.call` around an attempt that does no I/O: the sidecar's
  own work per call, where the local limiter's share shows above the noise.

    python -m bench.ratelimit_cost [--calls 2000] [--rounds 6] [--redis redis://127.0.0.1:6379/0]

`make bench` runs it as its `ratelimit` phase (`python -m bench.run --only ratelimit`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from bench.upstream import build_app
from proxy.client import OutgoingRequest
from proxy.config.upstream import Upstream as UpstreamConfig
from proxy.resilience.deadline import Deadline
from proxy.resilience.outcome import Kind, Outcome
from proxy.storage.limits import open_bucket_store
from proxy.upstreams import Upstream

VARIANTS = ("none", "local", "shared")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


@dataclass(frozen=True)
class RateLimitPlan:
    calls: int  # per variant and round
    rounds: int
    concurrency: int


FULL = RateLimitPlan(calls=2000, rounds=4, concurrency=16)
QUICK = RateLimitPlan(calls=200, rounds=2, concurrency=4)
NEVER_WAITS = {"rate": "1000000/s", "burst": 1_000_000}


def upstream_config(url: str, variant: str) -> UpstreamConfig:
    data: dict[str, Any] = {"url": url, "breaker": {"enabled": False}}
    if variant != "none":
        data["rate_limit"] = {**NEVER_WAITS, "scope": variant}
    return UpstreamConfig.model_validate(data)


async def one_call(upstream: Upstream) -> None:
    request = OutgoingRequest("GET", URL(upstream.base_url + "/x"), CIMultiDict(), None)
    async with upstream.call(request, upstream.deadline(), retryable=True) as call:
        response = call.response
        assert response is not None and response.status == 200, call.outcome
        await response.read()


async def sequential_us(upstream: Upstream, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        await one_call(upstream)
    return (time.perf_counter() - started) / calls * 1e6


async def concurrent_per_second(upstream: Upstream, calls: int, concurrency: int) -> float:
    left = calls

    async def caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one_call(upstream)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return calls / (time.perf_counter() - started)


async def acquire_us(upstream: Upstream, calls: int) -> float | None:
    limiter = upstream.policies.limiter
    if limiter is None:
        return None
    started = time.perf_counter()
    for _ in range(calls):
        await limiter.acquire(1.0)
    return (time.perf_counter() - started) / calls * 1e6


async def _no_io(number: int, seconds: float) -> Outcome:
    return Outcome(Kind.RESPONSE, 200)


async def pipeline_us(upstream: Upstream, calls: int) -> float:
    """The pipeline alone around an attempt that does no I/O: the limiter's share of the
    sidecar's own work, free of the loopback's and the neighbours' noise."""
    pipeline = upstream.pipeline
    started = time.perf_counter()
    for _ in range(calls):
        (await pipeline.call(_no_io, Deadline.after(3.0), retryable=True)).release()
    return (time.perf_counter() - started) / calls * 1e6


async def measure(calls: int, rounds: int, concurrency: int, redis_url: str) -> dict[str, Any]:
    runner = web.AppRunner(build_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}"
    buckets = open_bucket_store(f"{redis_url}?prefix=bench-ratelimit-{uuid.uuid4().hex}:")
    upstreams = {
        variant: Upstream(variant, upstream_config(url, variant), buckets=buckets)
        for variant in VARIANTS
    }
    results: dict[str, dict[str, list[float]]] = {
        v: {"us_per_call": [], "calls_per_s": [], "us_per_acquire": [], "us_per_pipeline": []}
        for v in VARIANTS
    }
    try:
        for variant in VARIANTS:  # warm up pools, the script cache, the code paths
            await sequential_us(upstreams[variant], 200)
        for number in range(rounds):
            order = VARIANTS if number % 2 == 0 else tuple(reversed(VARIANTS))
            for variant in order:
                upstream = upstreams[variant]
                results[variant]["us_per_call"].append(await sequential_us(upstream, calls))
                results[variant]["calls_per_s"].append(
                    await concurrent_per_second(upstream, calls, concurrency)
                )
                results[variant]["us_per_pipeline"].append(await pipeline_us(upstream, calls * 5))
                acquired = await acquire_us(upstream, calls)
                if acquired is not None:
                    results[variant]["us_per_acquire"].append(acquired)
    finally:
        for upstream in upstreams.values():
            await upstream.close()
        await buckets.close()
        await runner.cleanup()
    summary: dict[str, Any] = {}
    for variant, figures in results.items():
        summary[variant] = {
            name: round(statistics.median(values), 1) if values else None
            for name, values in figures.items()
        }
    none = summary["none"]["us_per_call"]
    for variant in ("local", "shared"):
        summary[variant]["added_us_per_call"] = round(summary[variant]["us_per_call"] - none, 1)
    return summary


def run_and_save(plan: RateLimitPlan, output: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """`--only ratelimit` (and `make bench`): measure, then update only the "ratelimit" key."""
    from bench.durable import save_section

    summary = asyncio.run(measure(plan.calls, plan.rounds, plan.concurrency, REDIS_URL))
    result = {"variants": summary, "plan": asdict(plan), **meta}
    save_section(output, "ratelimit", result)
    return result


def markdown(result: dict[str, Any]) -> str:
    plan = result["plan"]
    heading = (
        f"### Rate limit cost ({plan['calls']:,} calls x {plan['rounds']} rounds per "
        "variant, median)"
    )
    return heading + "\n\n" + table(result["variants"], plan["concurrency"])


def table(summary: dict[str, Any], concurrency: int) -> str:
    lines = [
        f"| rate_limit | µs per call (1 at a time) | calls/s (c={concurrency}) "
        "| µs added per call | µs per acquire | µs per pipeline call, no I/O |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for variant in VARIANTS:
        row = summary[variant]
        added = row.get("added_us_per_call")
        acquire = row["us_per_acquire"]
        lines.append(
            f"| {variant} | {row['us_per_call']:.0f} | {row['calls_per_s']:.0f} "
            f"| {'' if added is None else format(added, '+.0f')} "
            f"| {'' if acquire is None else format(acquire, '.1f')} "
            f"| {row['us_per_pipeline']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000, help="calls per variant and round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    summary = asyncio.run(measure(args.calls, args.rounds, args.concurrency, args.redis))
    print(json.dumps(summary, indent=2) if args.json else table(summary, args.concurrency))


if __name__ == "__main__":
    main()
