"""`python -m bench.run`: the sidecar's throughput, added latency, memory over time and
memory while streaming, each against a target from the foundation issue;
the composite checkout against naive clients (`bench.checkout`); and what
idempotency and the job queue cost per backend (`bench.durable`).

Every server is its own process (so it gets its own core time and its RSS can
be read from /proc): a fast upstream (`bench.upstream`), the sidecar as users
run it (`checkout-sidecar run --config ...`), and the baseline, a minimal aiohttp
proxy (`bench.minimal_proxy`), once on asyncio and once on uvloop so the ratio is
honest whichever loop one considers fair. wrk drives the load; every wrk run is
bounded by its own duration and a subprocess timeout, and every process started
here is stopped in a `finally`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench import checkout, durable, nginx, procs, report, wrk

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
MIB = 1024 * 1024
READY_TIMEOUT = 30.0


@dataclass(frozen=True)
class Plan:
    """How long and how much; `--quick` shrinks everything for a smoke run."""

    seconds: float
    warmup: float
    soak_requests: int
    soak_max_seconds: float
    download_bytes: int


FULL = Plan(
    seconds=6, warmup=2, soak_requests=100_000, soak_max_seconds=60, download_bytes=300 * MIB
)
QUICK = Plan(seconds=2, warmup=1, soak_requests=5_000, soak_max_seconds=15, download_bytes=20 * MIB)


SIDECAR_YAML = """\
listen: 127.0.0.1:{port}
admin:
  listen: 127.0.0.1:{admin_port}
upstreams:
  bench:
    url: {upstream}
    timeout: {{connect: 1s, per_try: 30s, total: 120s}}
    pool: {{max_connections: 200}}
"""
BYTES_UPSTREAM = """\
  bytes:
    url: {url}
    timeout: {{connect: 1s, per_try: 30s, total: 120s}}
"""
"""The download's upstream, put first so the other benches' lines still go under `bench`."""


def bench_yaml(upstream: str, bytes_upstream: str) -> str:
    """The sidecar's config for `bench.run`: `bench` (small JSON) and `bytes` (download)."""
    base = SIDECAR_YAML.format(
        port=procs.free_port(), admin_port=procs.free_port(), upstream=upstream
    )
    head, marker, rest = base.partition("upstreams:\n")
    return head + marker + BYTES_UPSTREAM.format(url=bytes_upstream) + rest


def sidecar_argv(config: Path) -> list[str]:
    """The installed console script beside this interpreter (the venv's), as users run it."""
    exe = Path(sys.executable).parent / "checkout-sidecar"
    found = str(exe) if exe.exists() else shutil.which("checkout-sidecar")
    if found is None:
        raise SystemExit("checkout-sidecar is not installed: pip install -e . (or make bench)")
    return [found, "run", "--config", str(config)]


def start_servers(stack: ExitStack, tmp: Path, want_minimal: bool) -> dict[str, procs.Server]:
    """Upstreams first (the others point at them), then the proxies; all stopped by `stack`.

    `direct` answers the small JSON: nginx when installed (it costs the proxies'
    shared 2 cores least), else the aiohttp upstream. `bytes` is the aiohttp
    upstream, for the streamed download. The sidecar runs as users run it (uvloop),
    and, with the minimal proxies, once more on the plain asyncio loop, so each loop
    is compared with its own kind.
    """
    servers: dict[str, procs.Server] = {}

    def launch(name: str, argv: list[str], cwd: Path = ROOT) -> procs.Server:
        server = procs.start(name, argv, tmp, cwd=cwd)
        stack.callback(server.stop)
        servers[name] = server
        return server

    py = [sys.executable, "-m"]
    byte_source = launch("bytes", [*py, "bench.upstream", "--port", "0"])
    bytes_url = byte_source.wait_ready(READY_TIMEOUT)
    if nginx.nginx_path() is not None:
        upstream_url = launch("direct", [*py, "bench.nginx", "--port", "0"]).wait_ready(
            READY_TIMEOUT
        )
    else:
        print("nginx is not installed: the aiohttp upstream answers the proxy phase", flush=True)
        servers["direct"] = byte_source
        upstream_url = bytes_url
    config = tmp / "sidecar.yaml"
    config.write_text(bench_yaml(upstream_url, bytes_url))
    # in the temp dir, so its default stores (sqlite://var/...) are created there, not in
    # the checkout: the sidecar runs with the default config a user gets
    launch("sidecar", sidecar_argv(config), cwd=tmp)
    if want_minimal:
        other = tmp / "sidecar-asyncio.yaml"
        other.write_text(bench_yaml(upstream_url, bytes_url))
        launch("sidecar-asyncio", [*sidecar_argv(other), "--loop", "asyncio"], cwd=tmp)
        for loop in ("asyncio", "uvloop"):
            launch(
                f"minimal-{loop}",
                [*py, "bench.minimal_proxy", "--upstream", upstream_url, "--loop", loop],
            )
    for server in servers.values():
        server.wait_ready(READY_TIMEOUT)
    return servers


def json_url(name: str, server: procs.Server) -> str:
    """The small-JSON URL as each server exposes it (the sidecar routes by upstream name)."""
    return server.url + ("/bench/json" if name.startswith("sidecar") else "/json")


def measure(
    name: str, server: procs.Server, connections: int, seconds: float, script: Path
) -> dict[str, Any]:
    cpu_before = server.cpu_seconds()
    result, argv = wrk.run(
        json_url(name, server), connections=connections, seconds=seconds, script=script
    )
    cpu = server.cpu_seconds() - cpu_before
    row = {"target": name, "connections": connections, **result.as_dict(), "argv": argv}
    row["cpu_us_per_request"] = cpu / result.requests * 1e6 if result.requests else None
    print(
        f"  {name:<16} c={connections:<3} rps={result.rps:>9,.0f} p50={result.p50_ms:.3f}ms "
        f"p99={result.p99_ms:.3f}ms errors={result.errors}",
        flush=True,
    )
    return row


PROXY_ROUNDS = 3
"""The proxy phase's runs per target and connection count, `plan.seconds` split over them."""
PROXY_UNITS = (("direct",), ("minimal-asyncio", "sidecar-asyncio"), ("minimal-uvloop", "sidecar"))
"""Run back to back in each round: each proxy right after its baseline on the same loop."""


def round_order(number: int) -> list[str]:
    """Round `number`'s order: `PROXY_UNITS` rotated one place more each round, so no
    pair always runs first after the warm-up or last in a busy stretch."""
    shift = number % len(PROXY_UNITS)
    units = PROXY_UNITS[shift:] + PROXY_UNITS[:shift]
    return [name for unit in units for name in unit]


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One target's rounds as one row: the median of each figure, errors and requests
    summed, and the rounds themselves (`report.proxy_checks` pairs them)."""

    def median(key: str) -> float | None:
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.median(values) if values else None

    first = rows[0]
    return {
        "target": first["target"],
        "connections": first["connections"],
        "requests": sum(r["requests"] for r in rows),
        "seconds": sum(r["seconds"] for r in rows),
        "rps": median("rps"),
        "p50_ms": median("p50_ms"),
        "p90_ms": median("p90_ms"),
        "p99_ms": median("p99_ms"),
        "errors": sum(r["errors"] for r in rows),
        "cpu_us_per_request": median("cpu_us_per_request"),
        "argv": first["argv"],
        "rounds": rows,
    }


def run_proxy(servers: dict[str, procs.Server], plan: Plan, script: Path) -> dict[str, Any]:
    """Warm each target up, then wrk at 50 and at 1 connection against each, in
    `PROXY_ROUNDS` rounds whose order rotates; a target's row is its rounds' medians."""
    order = [name for unit in PROXY_UNITS for name in unit]
    print("proxy: warm-up", flush=True)
    for name in order:
        wrk.run(json_url(name, servers[name]), connections=50, seconds=plan.warmup, script=script)
    runs = []
    seconds = plan.seconds / PROXY_ROUNDS
    for connections in (50, 1):
        print(
            f"proxy: {connections} connection(s), {PROXY_ROUNDS} rounds of {seconds:g} s",
            flush=True,
        )
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in order}
        for number in range(PROXY_ROUNDS):
            for name in round_order(number):
                rounds[name].append(measure(name, servers[name], connections, seconds, script))
        runs += [median_row(rounds[name]) for name in order]
    return {
        "seconds": plan.seconds,
        "rounds": PROXY_ROUNDS,
        "warmup_seconds": plan.warmup,
        "runs": runs,
    }


def run_soak(sidecar: procs.Server, plan: Plan, tmp: Path) -> dict[str, Any]:
    """N requests at 50 conns; errors and RSS growth between warm-up and the end.

    wrk sleeps out its whole -d even after every thread stopped at the request
    limit, so -d is sized from the warm-up's rate (+50%), capped at the time bound.
    """
    url = json_url("sidecar", sidecar)
    warm, _ = wrk.run(
        url, connections=50, seconds=max(plan.warmup, 3), script=wrk.write_script(tmp)
    )
    time.sleep(0.5)
    rss_before = sidecar.rss_mb()
    seconds = min(plan.soak_max_seconds, max(3.0, 1.5 * plan.soak_requests / max(warm.rps, 1)))
    print(f"soak: {plan.soak_requests:,} requests (wrk -d{seconds:.0f}s bound)", flush=True)
    cpu_before = sidecar.cpu_seconds()
    result, argv = wrk.run(
        url,
        connections=50,
        seconds=seconds,
        script=wrk.write_script(tmp, limit=plan.soak_requests),
    )
    cpu = sidecar.cpu_seconds() - cpu_before
    time.sleep(1.0)
    rss_after = sidecar.rss_mb()
    print(
        f"  {result.requests:,} requests, {result.errors} errors, RSS "
        f"{rss_before:.1f} -> {rss_after:.1f} MB",
        flush=True,
    )
    return {
        "target_requests": plan.soak_requests,
        "max_seconds": plan.soak_max_seconds,
        "connections": 50,
        "requests": result.requests,
        "errors": result.errors,
        "socket_errors": result.socket_errors,
        "non_2xx": result.non_2xx,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "warmup_rps": warm.rps,
        "cpu_us_per_request": cpu / result.requests * 1e6 if result.requests else None,
        "rss_before_mb": rss_before,
        "rss_after_mb": rss_after,
        "argv": argv,
    }


async def download(url: str, expected: int, limit_seconds: float) -> tuple[int, float]:
    """GET `url`, read in chunks and throw them away; bytes received and seconds taken."""
    received = 0
    timeout = aiohttp.ClientTimeout(total=limit_seconds)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        began = time.perf_counter()
        async with session.get(url) as response:
            response.raise_for_status()
            async for chunk in response.content.iter_chunked(256 * 1024):
                received += len(chunk)
        elapsed = time.perf_counter() - began
    if received != expected:
        print(f"  download got {received} of {expected} bytes", flush=True)
    return received, elapsed


def run_download(servers: dict[str, procs.Server], plan: Plan) -> dict[str, Any]:
    """Stream the body through the sidecar while polling its RSS; direct once for scale."""
    n = plan.download_bytes
    sidecar = servers["sidecar"]
    print(f"download: {n / MIB:g} MiB", flush=True)
    _, direct_s = asyncio.run(download(f"{servers['bytes'].url}/bytes/{n}", n, 120))
    time.sleep(0.5)
    rss_before = sidecar.rss_mb()
    hwm_reset = sidecar.reset_hwm()
    with procs.RssSampler(sidecar, 0.05) as sampler:
        received, seconds = asyncio.run(download(f"{sidecar.url}/bytes/bytes/{n}", n, 120))
    hwm = sidecar.hwm_mb()
    rate = received / MIB / seconds
    print(f"  {rate:.0f} MiB/s, peak RSS {sampler.peak_mb:.1f} MB, VmHWM {hwm:.1f} MB", flush=True)
    return {
        "bytes": n,
        "mib": n / MIB,
        "received": received,
        "complete": received == n,
        "seconds": seconds,
        "mb_per_s": rate,
        "direct_mb_per_s": n / MIB / direct_s,
        "rss_before_mb": rss_before,
        "peak_rss_mb": sampler.peak_mb,
        "rss_samples": sampler.samples,
        "hwm_mb": hwm,
        "hwm_reset": hwm_reset,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs, for smoke tests")
    parser.add_argument(
        "--only",
        choices=(
            "proxy",
            "soak",
            "download",
            "checkout",
            "durable",
            "tracing",
            "pipeline",
            "ratelimit",
            "instructions",
        ),
        help="one phase only (instructions: callgrind counts, not part of the full run)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON results file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    began = time.monotonic()
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    phases = [args.only] if args.only else ["proxy", "soak", "download", "checkout", "durable"]
    command = shlex.join([sys.executable, "-m", "bench.run", *(argv or sys.argv[1:])])
    results: dict[str, Any] = {
        "command": command,
        "quick": args.quick,
        "plan": plan.__dict__,
        "machine": report.machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    checks: list[report.Check] = []
    if phases == ["checkout"]:
        return _checkout_only(args, results)
    if phases == ["durable"]:
        return _saved_phase(args, results, "durable")
    if phases == ["tracing"]:
        return _saved_phase(args, results, "tracing")
    if phases == ["pipeline"]:
        return _saved_phase(args, results, "pipeline")
    if phases == ["ratelimit"]:
        return _saved_phase(args, results, "ratelimit")
    if phases == ["instructions"]:
        return _saved_phase(args, results, "instructions")
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sidecar-bench-")))
        servers = start_servers(stack, tmp, want_minimal="proxy" in phases)
        results["servers"] = {name: s.url for name, s in servers.items()}
        script = wrk.write_script(tmp)
        if "proxy" in phases:
            results["proxy"] = run_proxy(servers, plan, script)
            checks += report.proxy_checks(results["proxy"]["runs"])
        if "soak" in phases:
            results["soak"] = run_soak(servers["sidecar"], plan, tmp)
            checks += report.soak_checks(results["soak"])
        if "download" in phases:
            results["download"] = run_download(servers, plan)
            checks += report.download_checks(results["download"])
    if "checkout" in phases:
        with tempfile.TemporaryDirectory(prefix="sidecar-checkout-bench-") as tmp_dir:
            results["checkout"] = checkout.run_checkout(_checkout_plan(args), Path(tmp_dir))
    if "durable" in phases:
        with tempfile.TemporaryDirectory(prefix="sidecar-durable-bench-") as tmp_dir:
            results["durable"] = durable.run_durable(_durable_plan(args), Path(tmp_dir))
    results["checks"] = [c.as_dict() for c in checks]
    results["all_pass"] = all(c.passed is not False for c in checks)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(report.markdown(results))
    if "checkout" in results:
        print(checkout.markdown(results["checkout"]))
    if "durable" in results:
        print(durable.markdown(results["durable"]))
    print(f"results: {args.output}")
    if not args.only:  # these phases start their own sidecars and add their own keys
        _saved_phase(args, results, "tracing")
        _saved_phase(args, results, "pipeline")
        _saved_phase(args, results, "ratelimit")
        print_issue14(args.output, time.monotonic() - began)
    return 0


def print_issue14(output: Path, seconds: float) -> None:
    """The performance issue's targets, all measured by this run, in one table (saved too)."""
    saved = json.loads(output.read_text())
    checks = report.proxy_checks(saved.get("proxy", {}).get("runs", []))
    if "tracing" in saved:
        checks += report.tracing_checks(saved["tracing"])
    if "checkout" in saved:
        checks += report.checkout_checks(checkout.issue14_rows(saved["checkout"]))
    saved["issue14"] = {
        "seconds": seconds,
        "checks": [c.as_dict() for c in checks],
    }
    output.write_text(json.dumps(saved, indent=2) + "\n")
    print()
    print(report.issue14_markdown(checks, saved.get("command", "make bench")))
    print(f"make bench took {seconds / 60:.1f} min")


def _checkout_plan(args: argparse.Namespace) -> checkout.CheckoutPlan:
    return checkout.QUICK if args.quick else checkout.FULL


def _checkout_only(args: argparse.Namespace, run: dict[str, Any]) -> int:
    """`--only checkout`: update the "checkout" entry of the results file, keep the rest."""
    with tempfile.TemporaryDirectory(prefix="sidecar-checkout-bench-") as tmp_dir:
        result = checkout.run_checkout(_checkout_plan(args), Path(tmp_dir))
    result.update({k: run[k] for k in ("command", "quick", "machine", "started")})
    try:
        results = json.loads(args.output.read_text())
    except (OSError, ValueError):
        results = {}
    results["checkout"] = result
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(checkout.markdown(result))
    print(f'results: {args.output} ("checkout")')
    return 0


def _durable_plan(args: argparse.Namespace) -> durable.DurablePlan:
    return durable.QUICK if args.quick else durable.FULL


def _saved_phase(args: argparse.Namespace, run: dict[str, Any], name: str) -> int:
    """`--only <name>` for a phase that saves itself: update its key, keep the rest.

    The module is imported here because tracing_cost and pipeline_cost import this
    module's sidecar setup.
    """
    module = importlib.import_module(f"bench.{SAVED_PHASES[name]}")
    plan = module.QUICK if args.quick else module.FULL
    meta = {k: run[k] for k in ("command", "quick", "machine", "started")}
    result = module.run_and_save(plan, args.output, meta)
    print()
    print(module.markdown(result))
    print(f'results: {args.output} ("{name}")')
    return 0


SAVED_PHASES = {
    "durable": "durable",
    "tracing": "tracing_cost",
    "pipeline": "pipeline_cost",
    "ratelimit": "ratelimit_cost",
    "instructions": "proxy_instructions",
}


if __name__ == "__main__":
    sys.exit(main())
