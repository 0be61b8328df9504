"""`python -m bench.run --only pipeline`: what the resilience pipeline costs, and what it buys.

Two questions from the same run, each against sidecars started as users run them
(`checkout-sidecar run --config ...`, one process each, beside their upstream):

- **Cost.** Sidecar `policies` keeps every policy at its default (breaker, a
  bulkhead of 100, the retry budget); sidecar `bare` has `breaker: {enabled:
  false}` and a bulkhead of 100,000 that never refuses. That is the closest the
  config gets to "no breaker, no bulkhead": neither the bulkhead's counter nor the
  retry budget can be switched off, so `bare` still pays for those two counters.
  Both proxy the fast `bench.upstream`; wrk -c50 drives them in ABBA rounds so a
  drifting neighbour weighs on both alike. The figure that matters is the
  sidecar's own CPU time per request (utime+stime from /proc) and the ratio
  policies / bare. The breaker's and the bulkhead's per-call work is also timed
  in-process, because it is far below the noise of a load test.
- **Hard failure.** An upstream that never answers (`--hang` below), with
  `timeout: {per_try: 1s, total: 1s}` and `retry: {attempts: 1}`. Sidecar
  `breaker` (min_calls 10, failure_rate 0.5, open_for 30s) is driven until
  /admin/breakers says open, then measured at once (well inside the 30 s); so is
  `breaker+fallback`, the same with a static fallback; `no-breaker` has
  `breaker: {enabled: false}`. wrk -c10 with a 5 s timeout: with the breaker the
  sidecar refuses (503 circuit_open) or falls back within milliseconds, without
  it every call waits out the full 1 s timeout (504).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bench import procs, wrk
from bench.durable import round_order, save_section

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 30.0
COST_CONNECTIONS = 50
FAILURE_CONNECTIONS = 10
FAST_FAILURE_P99_TARGET_MS = 5.0
HARD_TIMEOUT_S = 1.0
HANG_LIMIT_S = 60.0  # the hanging upstream gives up on a caller that never hangs up
FAILING_UPSTREAM = "down"
OPENING_BATCH = 12  # concurrent calls per step while driving a breaker open (min_calls 10)


@dataclass(frozen=True)
class PipelinePlan:
    """Seconds per cost round, ABBA rounds, and how long each hard-failure run lasts."""

    seconds: float
    warmup: float
    rounds: int
    failure_seconds: float
    open_within: float  # give up when a breaker is not open after this long


FULL = PipelinePlan(seconds=4, warmup=2, rounds=2, failure_seconds=6, open_within=20)
QUICK = PipelinePlan(seconds=2, warmup=1, rounds=2, failure_seconds=3, open_within=15)


# -- configs -----------------------------------------------------------------------------

COST_VARIANTS: dict[str, str] = {
    "policies": "",
    "bare": "    breaker: {enabled: false}\n    bulkhead: {max_concurrent: 100000}\n",
}
COST_LABELS = {
    "policies": "(a) every policy on: breaker, bulkhead 100, retry budget (defaults)",
    "bare": "(b) `breaker: {enabled: false}`, bulkhead 100,000 (never refuses)",
}

FAILURE_YAML = """\
listen: 127.0.0.1:{port}
admin:
  listen: 127.0.0.1:{admin_port}
upstreams:
  {name}:
    url: {upstream}
    timeout: {{connect: 250ms, per_try: 1s, total: 1s}}
    retry: {{attempts: 1}}
{policy}"""

_BREAKER = "    breaker: {min_calls: 10, failure_rate: 0.5, open_for: 30s}\n"
FAILURE_VARIANTS: dict[str, str] = {
    "breaker": _BREAKER,
    "breaker+fallback": _BREAKER + "    fallback: {status: 200, json: {fallback: true}}\n",
    "no-breaker": "    breaker: {enabled: false}\n",
}
BREAKER_VARIANTS = ("breaker", "breaker+fallback")
FAILURE_LABELS = {
    "breaker": "(c) breaker, open: 503 circuit_open",
    "breaker+fallback": "(c') breaker, open, static fallback: 200",
    "no-breaker": "(d) `breaker: {enabled: false}`: 504 after the timeout",
}


def cost_yaml(port: int, admin_port: int, upstream: str, variant: str) -> str:
    """The bench config of `bench.run` (so `policies` is exactly what `make bench` runs),
    plus the variant's lines under its upstream."""
    from bench.run import SIDECAR_YAML  # bench.run imports this module

    base = SIDECAR_YAML.format(port=port, admin_port=admin_port, upstream=upstream)
    return base + COST_VARIANTS[variant]


def failure_yaml(port: int, admin_port: int, upstream: str, variant: str) -> str:
    return FAILURE_YAML.format(
        port=port,
        admin_port=admin_port,
        name=FAILING_UPSTREAM,
        upstream=upstream,
        policy=FAILURE_VARIANTS[variant],
    )


# -- the upstream that never answers -----------------------------------------------------


async def hang(request: web.Request) -> web.Response:
    """Answers nothing while the caller waits; returns once it hung up (or after
    `HANG_LIMIT_S`), so abandoned handlers do not pile up."""
    for _ in range(int(HANG_LIMIT_S / 0.05)):
        transport = request.transport
        if transport is None or transport.is_closing():
            break
        await asyncio.sleep(0.05)
    return web.Response(status=504, text="gave up waiting\n")


def hang_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hang)
    return app


# -- processes ---------------------------------------------------------------------------


@dataclass
class Sidecar:
    name: str
    server: procs.Server
    admin_url: str

    @property
    def url(self) -> str:
        return self.server.url


MakeYaml = Callable[[int, int, str, str], str]
"""`(port, admin_port, upstream_url, variant) -> config text`: `cost_yaml`, `failure_yaml`."""


def start_sidecars(
    stack: ExitStack, tmp: Path, upstream_url: str, variants: list[str], make_yaml: MakeYaml
) -> dict[str, Sidecar]:
    """One sidecar per variant, each in its own directory (its default SQLite stores go
    there); all stopped by `stack`."""
    from bench.run import sidecar_argv  # bench.run imports this module

    sidecars: dict[str, Sidecar] = {}
    for name in variants:
        home = tmp / name.replace("+", "-")
        home.mkdir()
        admin_port = procs.free_port()
        config = home / "sidecar.yaml"
        config.write_text(make_yaml(procs.free_port(), admin_port, upstream_url, name))
        server = procs.start(name, sidecar_argv(config), tmp, cwd=home)
        stack.callback(server.stop)
        sidecars[name] = Sidecar(name, server, f"http://127.0.0.1:{admin_port}")
    for sidecar in sidecars.values():
        sidecar.server.wait_ready(READY_TIMEOUT)
    return sidecars


def start_upstream(stack: ExitStack, tmp: Path, name: str, argv: list[str]) -> str:
    server = procs.start(name, [sys.executable, "-m", *argv], tmp, cwd=ROOT)
    stack.callback(server.stop)
    return server.wait_ready(READY_TIMEOUT)


# -- cost --------------------------------------------------------------------------------


def one_round(server: procs.Server, url: str, seconds: float, script: Path) -> dict[str, Any]:
    cpu_before = server.cpu_seconds()
    result, argv = wrk.run(url, connections=COST_CONNECTIONS, seconds=seconds, script=script)
    cpu = server.cpu_seconds() - cpu_before
    return {
        **result.as_dict(),
        "cpu_seconds": cpu,
        "cpu_us_per_request": cpu / result.requests * 1e6 if result.requests else None,
        "argv": argv,
    }


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per variant: counts and CPU summed (ABBA cancels a linear drift in sums),
    percentiles the mean of the rounds' (wrk gives no histogram to merge)."""
    requests = sum(r["requests"] for r in rounds)
    seconds = sum(r["seconds"] for r in rounds)
    cpu = sum(r["cpu_seconds"] for r in rounds)
    per_round = [r["cpu_us_per_request"] for r in rounds if r["cpu_us_per_request"] is not None]
    return {
        "requests": requests,
        "seconds": seconds,
        "rps": requests / seconds if seconds else 0.0,
        "p50_ms": statistics.fmean(r["p50_ms"] for r in rounds),
        "p99_ms": statistics.fmean(r["p99_ms"] for r in rounds),
        "errors": sum(r["errors"] for r in rounds),
        "cpu_us_per_request": cpu / requests * 1e6 if requests else None,
        "cpu_us_min": min(per_round, default=None),
        "cpu_us_max": max(per_round, default=None),
        "rounds": rounds,
    }


def ratios(policies: dict[str, Any], bare: dict[str, Any]) -> dict[str, float | None]:
    """policies / bare for each figure; None where bare measured nothing."""

    def ratio(key: str) -> float | None:
        a, b = policies.get(key), bare.get(key)
        return a / b if a is not None and b else None

    return {key: ratio(key) for key in ("rps", "p50_ms", "p99_ms", "cpu_us_per_request")}


def policy_call_ns(number: int = 200_000) -> dict[str, float]:
    """Nanoseconds per call of the work `policies` does and `bare` does not: a breaker
    permit taken and recorded, and a bulkhead slot taken and released (best of 5)."""
    from proxy.config import upstream as cfg
    from proxy.config.options import breaker_options
    from proxy.resilience.breaker import Breaker
    from proxy.resilience.bulkhead import Bulkhead, BulkheadOptions

    breaker = Breaker(breaker_options(cfg.Breaker()), time.monotonic)
    bulkhead = Bulkhead(BulkheadOptions())

    def breaker_call() -> None:
        permit = breaker.try_acquire()
        assert permit is not None
        permit.record(True, 0.0005)

    def bulkhead_call() -> None:
        bulkhead.try_acquire()
        bulkhead.release()

    def best(fn: Callable[[], None]) -> float:
        return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e9

    return {"breaker": best(breaker_call), "bulkhead": best(bulkhead_call)}


def run_cost(plan: PipelinePlan, tmp: Path) -> dict[str, Any]:
    with ExitStack() as stack:
        upstream_url = start_upstream(stack, tmp, "upstream", ["bench.upstream", "--port", "0"])
        sidecars = start_sidecars(stack, tmp, upstream_url, list(COST_VARIANTS), cost_yaml)
        script = wrk.write_script(tmp)
        urls = {name: f"{s.url}/bench/json" for name, s in sidecars.items()}
        print("pipeline cost: warm-up", flush=True)
        for url in urls.values():
            wrk.run(url, connections=COST_CONNECTIONS, seconds=plan.warmup, script=script)
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in sidecars}
        for number, name in round_order(list(sidecars), plan.rounds):
            row = one_round(sidecars[name].server, urls[name], plan.seconds, script)
            rounds[name].append(row)
            print(
                f"  round {number + 1}/{plan.rounds} {name:<9} rps={row['rps']:>8,.0f} "
                f"cpu={row['cpu_us_per_request']:.1f}us/req p50={row['p50_ms']:.2f}ms "
                f"p99={row['p99_ms']:.2f}ms errors={row['errors']}",
                flush=True,
            )
    variants = {name: combine(rows) for name, rows in rounds.items()}
    per_call = policy_call_ns()
    return {
        "connections": COST_CONNECTIONS,
        "order": [name for _, name in round_order(list(COST_VARIANTS), plan.rounds)],
        "config": COST_VARIANTS,
        "variants": variants,
        "ratio": ratios(variants["policies"], variants["bare"]),
        "policy_call_ns": per_call,
    }


# -- hard failure ------------------------------------------------------------------------


async def _breaker_state(session: aiohttp.ClientSession, admin_url: str) -> dict[str, Any]:
    async with session.get(f"{admin_url}/admin/breakers") as response:
        response.raise_for_status()
        states: dict[str, Any] = await response.json()
    return states[FAILING_UPSTREAM]  # type: ignore[no-any-return]


def is_open(snapshot: dict[str, Any]) -> bool:
    """True when the /admin/breakers entry says calls are refused right now."""
    return snapshot.get("state") == "open" and float(snapshot.get("open_remaining") or 0) > 0


async def _open_breaker(sidecar: Sidecar, within: float) -> dict[str, Any]:
    """Send batches of calls (each waits out the 1 s timeout) until the breaker opens."""
    url = f"{sidecar.url}/{FAILING_UPSTREAM}/json"
    timeout = aiohttp.ClientTimeout(total=HARD_TIMEOUT_S + 4)
    began = time.monotonic()
    calls = 0

    async def one(session: aiohttp.ClientSession) -> int:
        async with session.get(url) as response:
            await response.read()
            return response.status

    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            snapshot = await _breaker_state(session, sidecar.admin_url)
            if is_open(snapshot):
                return {"calls": calls, "seconds": time.monotonic() - began, "state": snapshot}
            if time.monotonic() - began > within:
                raise RuntimeError(
                    f"{sidecar.name}: breaker not open after {within:g}s: {snapshot}"
                )
            await asyncio.gather(*(one(session) for _ in range(OPENING_BATCH)))
            calls += OPENING_BATCH


async def _sample(sidecar: Sidecar) -> dict[str, Any]:
    """One call after the run: what the caller gets, how fast, and the breaker's state."""
    timeout = aiohttp.ClientTimeout(total=HARD_TIMEOUT_S + 4)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        began = time.perf_counter()
        async with session.get(f"{sidecar.url}/{FAILING_UPSTREAM}/json") as response:
            await response.read()
            answer = {
                "status": response.status,
                "reason": response.headers.get("X-Sidecar-Error"),
                "fallback": response.headers.get("X-Sidecar-Fallback"),
                "ms": (time.perf_counter() - began) * 1000,
            }
        answer["breaker"] = await _breaker_state(session, sidecar.admin_url)
    return answer


def run_failure(plan: PipelinePlan, tmp: Path) -> dict[str, Any]:
    runs: dict[str, dict[str, Any]] = {}
    with ExitStack() as stack:
        upstream_url = start_upstream(
            stack, tmp, "hang", ["bench.pipeline_cost", "--hang", "--port", "0"]
        )
        sidecars = start_sidecars(stack, tmp, upstream_url, list(FAILURE_VARIANTS), failure_yaml)
        script = wrk.write_script(tmp)
        for name, sidecar in sidecars.items():
            opened = None
            if name in BREAKER_VARIANTS:
                print(f"hard failure: driving {name} open", flush=True)
                opened = asyncio.run(_open_breaker(sidecar, plan.open_within))
            result, argv = wrk.run(
                f"{sidecar.url}/{FAILING_UPSTREAM}/json",
                connections=FAILURE_CONNECTIONS,
                seconds=plan.failure_seconds,
                script=script,
            )
            sample = asyncio.run(_sample(sidecar))
            runs[name] = {**result.as_dict(), "argv": argv, "opened": opened, "sample": sample}
            print(
                f"  {name:<16} requests={result.requests:,} p50={result.p50_ms:.2f}ms "
                f"p99={result.p99_ms:.2f}ms non-2xx={result.non_2xx} "
                f"socket errors={result.socket_errors}; sample {sample['status']} "
                f"{sample['reason'] or sample['fallback'] or ''}, "
                f"breaker {sample['breaker']['state']}",
                flush=True,
            )
    return {
        "connections": FAILURE_CONNECTIONS,
        "seconds": plan.failure_seconds,
        "config": FAILURE_VARIANTS,
        "runs": runs,
        "checks": failure_checks(runs),
    }


def failure_checks(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """p99 with an open breaker under the target; without one, the full timeout."""
    checks = []
    for name in BREAKER_VARIANTS:
        if name in runs:
            p99 = runs[name]["p99_ms"]
            checks.append(
                {
                    "name": f"{FAILURE_LABELS[name]}: p99",
                    "measured": f"{p99:.2f} ms",
                    "target": f"< {FAST_FAILURE_P99_TARGET_MS:g} ms",
                    "passed": p99 < FAST_FAILURE_P99_TARGET_MS,
                }
            )
    if "no-breaker" in runs:
        p50 = runs["no-breaker"]["p50_ms"]
        checks.append(
            {
                "name": f"{FAILURE_LABELS['no-breaker']}: p50",
                "measured": f"{p50:.0f} ms",
                "target": f"~ the {HARD_TIMEOUT_S * 1000:.0f} ms timeout",
                "passed": p50 >= HARD_TIMEOUT_S * 1000 * 0.95,
            }
        )
    return checks


# -- the whole phase -----------------------------------------------------------------------


def run_pipeline(plan: PipelinePlan, tmp: Path) -> dict[str, Any]:
    cost_dir, failure_dir = tmp / "cost", tmp / "failure"
    cost_dir.mkdir()
    failure_dir.mkdir()
    return {
        "plan": asdict(plan),
        "cost": run_cost(plan, cost_dir),
        "hard_failure": run_failure(plan, failure_dir),
        "loadavg_at_end": Path("/proc/loadavg").read_text().split()[:3],
    }


def run_and_save(plan: PipelinePlan, output: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """`--only pipeline`: measure in a temp dir, then update only the "pipeline" key."""
    with tempfile.TemporaryDirectory(prefix="sidecar-pipeline-bench-") as tmp_dir:
        result = run_pipeline(plan, Path(tmp_dir))
    result.update(meta)
    save_section(output, "pipeline", result)
    return result


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}x"


def markdown(result: dict[str, Any]) -> str:
    plan, cost, failure = result["plan"], result["cost"], result["hard_failure"]
    out: list[str] = []
    machine = result.get("machine")
    if machine:
        out += [
            f"- machine: {machine['nproc']} cores, {machine['cpu']}, {machine['kernel']}, "
            f"load avg at start {' '.join(machine['loadavg_at_start'])}, at end "
            f"{' '.join(result.get('loadavg_at_end', ['?']))}; "
            f"Python {machine['python']}, aiohttp {machine['aiohttp']}, {machine['wrk']}",
            "",
        ]
    out += [
        f"### Pipeline cost: wrk -t1 -c{cost['connections']}, {plan['rounds']} rounds x "
        f"{plan['seconds']:g} s per sidecar (ABBA order) after a {plan['warmup']:g} s warm-up",
        "",
        "| sidecar | rps | p50 ms | p99 ms | server CPU us/req | (min-max per round) | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, v in cost["variants"].items():
        out.append(
            f"| {COST_LABELS.get(name, name)} | {v['rps']:,.0f} | {v['p50_ms']:.3f} | "
            f"{v['p99_ms']:.3f} | {_fmt(v['cpu_us_per_request'], 1)} | "
            f"{_fmt(v['cpu_us_min'], 1)}-{_fmt(v['cpu_us_max'], 1)} | {v['errors']} |"
        )
    r = cost["ratio"]
    ns = cost["policy_call_ns"]
    out += [
        f"| **(a) / (b)** | {_ratio(r['rps'])} | {_ratio(r['p50_ms'])} | {_ratio(r['p99_ms'])} "
        f"| **{_ratio(r['cpu_us_per_request'])}** | | |",
        "",
        "(b) is the closest the config gets to no breaker and no bulkhead: the breaker is "
        "off, but a bulkhead counter (here 100,000 slots, never refusing) and the retry "
        "budget always run. Timed in-process, the work (a) adds per call is "
        f"{ns['breaker']:.0f} ns for a breaker permit taken and recorded plus "
        f"{ns['bulkhead']:.0f} ns for a bulkhead slot (which (b) pays too). "
        "Server CPU = user+system time of the sidecar process / requests.",
        "",
        f"### One upstream fails hard: it never answers; `timeout: {{per_try: 1s, total: 1s}}`, "
        f"`retry: {{attempts: 1}}`; wrk -t1 -c{failure['connections']} --timeout 5s, "
        f"{failure['seconds']:g} s per sidecar",
        "",
        "| sidecar | requests | p50 ms | p90 ms | p99 ms | answer (sampled after) | "
        "breaker after | opened by |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for name, run in failure["runs"].items():
        sample = run["sample"]
        answer = f"{sample['status']} " + (
            sample["reason"] or ("fallback " + sample["fallback"] if sample["fallback"] else "")
        )
        opened = run["opened"]
        opened_text = f"{opened['calls']} calls, {opened['seconds']:.1f} s" if opened else "-"
        out.append(
            f"| {FAILURE_LABELS.get(name, name)} | {run['requests']:,} | {run['p50_ms']:.2f} | "
            f"{run['p90_ms']:.2f} | {run['p99_ms']:.2f} | {answer.strip()} | "
            f"{sample['breaker']['state']} | {opened_text} |"
        )
    out += [
        "",
        "wrk keeps 10 connections busy, so the open breaker is measured at its full refusal "
        "rate (latency includes queueing behind the other 9), while each connection to (d) "
        "waits out the timeout. Breakers were driven open just before their run "
        "(open_for 30s covers it).",
        "",
        "| check | measured | target | result |",
        "| --- | --- | --- | --- |",
    ]
    for c in failure["checks"]:
        verdict = "PASS" if c["passed"] else "MISS"
        out.append(f"| {c['name']} | {c['measured']} | {c['target']} | {verdict} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hang", action="store_true", help="run the upstream that never answers")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if not args.hang:
        parser.error("measure with: python -m bench.run --only pipeline")
    from bench.serve import run

    run(hang_app(), "127.0.0.1", args.port, "hang-upstream")


if __name__ == "__main__":
    main()
