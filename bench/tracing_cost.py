"""`python -m bench.run --only tracing`: what tracing costs per proxied request.

The claim to show: with no `OTEL_EXPORTER_OTLP_ENDPOINT`, or with a sampler that
records nothing, tracing costs nothing measurable (at most 5% CPU per request).
Sidecars (the bench config of `bench.run`, one upstream) run side by side,
differing only in their `OTEL_*` variables and, for one, an incoming traceparent:

- `off`: no OTEL variables, as most users run it: no wrapper, no spans; each
  call site is one attribute check (`TRACING.enabled`);
- `off-parent`: the same, sent the `unsampled-parent` variant's traceparent: the
  control for that variant, since a request with one more header costs more to
  read and forward whatever tracing does (about 2% of a proxied request's
  instructions, measured under callgrind); run just before it in each round, and
  the table also gives the median of the per-round ratios;
- `always-off`, `ratio-0`: an endpoint, but `OTEL_TRACES_SAMPLER=always_off`, or
  `traceidratio` with the argument 0: no span can ever be recorded, so tracing is
  propagation only (no wrapper on the proxied route, no SDK provider);
- `parentbased-off`: `parentbased_always_off` and no incoming traceparent: spans
  would be recorded only under a sampled parent, so each request is sorted at the
  door by its traceparent and, without one, makes no span;
- `unsampled-parent`: the SDK's default sampler (`parentbased_always_on`) and a
  request whose traceparent says "not sampled" (flags 00): sorted at the door too;
  compared with `off` and with its control `off-parent`;
- `on`: an endpoint (a local OTLP/HTTP sink that only counts bytes) and
  `always_on`: every request exports a SERVER and a CLIENT span.

Each is measured two ways. The issue's check uses the first:

- **instructions per request**: each variant's sidecar under callgrind, counted over
  the same requests on one connection (`instructions`). The count repeats within
  about 1% run to run, whatever else the machine does, so a 5% difference shows;
- **CPU time per request** (utime+stime from /proc) under wrk, in interleaved
  rounds so a noisy neighbour hits all of them alike, each round's order rotated by
  one place (no variant always first), with the `off` rounds' spread as the noise
  floor. On this shared 2-core machine one variant's CPU per request spread from
  193 to 363 us within one run, so these columns are context, not the verdict.

The `off` cost is also taken apart: the attribute checks a proxied request makes
when tracing is off are timed in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import timeit
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from bench import callgrind, procs, wrk
from bench.durable import save_section

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 30.0
CONNECTIONS = 50
# attribute checks on a proxied request's path with tracing off: `TRACING.active` in
# Telemetry.wrap_attempt (which attempt function) and `TRACING.enabled` in
# Metrics.request_finished (exemplar or not); both are timed as `TRACING.enabled`
OFF_CHECKS_PER_REQUEST = 2

VARIANTS: dict[str, dict[str, str]] = {
    "off": {},
    "always-off": {"OTEL_TRACES_SAMPLER": "always_off"},
    "ratio-0": {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"},
    "parentbased-off": {"OTEL_TRACES_SAMPLER": "parentbased_always_off"},
    # next to each other, so each round measures the pair a few seconds apart
    "off-parent": {},
    "unsampled-parent": {"OTEL_TRACES_SAMPLER": "parentbased_always_on"},
    "on": {"OTEL_TRACES_SAMPLER": "always_on", "OTEL_BSP_SCHEDULE_DELAY": "200"},
}
# a caller's trace that it chose not to sample (flags 00), as a mesh or gateway sends it
UNSAMPLED_TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
HEADERS: dict[str, dict[str, str]] = {
    "off-parent": {"traceparent": UNSAMPLED_TRACEPARENT},
    "unsampled-parent": {"traceparent": UNSAMPLED_TRACEPARENT},
}
# the tracing-off variant sent the same requests, for a variant with headers of its own
CONTROLS: dict[str, str] = {"unsampled-parent": "off-parent"}


@dataclass(frozen=True)
class TracingPlan:
    seconds: float
    warmup: float
    rounds: int
    counted_requests: int  # per variant under callgrind; 0: no instruction counts


FULL = TracingPlan(seconds=2, warmup=1, rounds=3, counted_requests=500)
QUICK = TracingPlan(seconds=2, warmup=1, rounds=2, counted_requests=0)


# -- the OTLP sink: accepts exports, counts them, decodes nothing ---------------------


def sink_app() -> web.Application:
    stats = {"exports": 0, "bytes": 0}

    async def export(request: web.Request) -> web.Response:
        stats["exports"] += 1
        stats["bytes"] += len(await request.read())
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def read_stats(request: web.Request) -> web.Response:
        return web.json_response(stats)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", export)
    app.router.add_get("/stats", read_stats)
    return app


def sink_stats(url: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{url}/stats", timeout=5) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


# -- processes ----------------------------------------------------------------------


def start_servers(stack: ExitStack, tmp: Path) -> tuple[dict[str, procs.Server], str, str]:
    """The upstream, the sink, and one sidecar per variant; all stopped by `stack`."""
    from bench.run import SIDECAR_YAML, sidecar_argv  # bench.run imports this module

    def launch(server: procs.Server) -> procs.Server:
        stack.callback(server.stop)
        return server

    py = [sys.executable, "-m"]
    upstream = launch(
        procs.start("upstream", [*py, "bench.upstream", "--port", "0"], tmp, cwd=ROOT)
    )
    sink = launch(procs.start("sink", [*py, "bench.tracing_cost", "--sink"], tmp, cwd=ROOT))
    upstream_url = upstream.wait_ready(READY_TIMEOUT)
    sink_url = sink.wait_ready(READY_TIMEOUT)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    sidecars: dict[str, procs.Server] = {}
    for name, otel in VARIANTS.items():
        home = tmp / name
        home.mkdir()
        config = home / "sidecar.yaml"
        config.write_text(
            SIDECAR_YAML.format(
                port=procs.free_port(), admin_port=procs.free_port(), upstream=upstream_url
            )
        )
        env = {**base_env, **otel}
        if otel:
            env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": sink_url, "OTEL_SERVICE_NAME": f"bench-{name}"}
        sidecars[name] = launch(procs.start(name, sidecar_argv(config), tmp, cwd=home, env=env))
    for server in sidecars.values():
        server.wait_ready(READY_TIMEOUT)
    return sidecars, sink_url, upstream_url


# -- measuring -------------------------------------------------------------------------


def one_run(
    server: procs.Server, seconds: float, script: Path, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    cpu_before = server.cpu_seconds()
    result, _ = wrk.run(
        f"{server.url}/bench/json", connections=CONNECTIONS, seconds=seconds, script=script,
        headers=headers,
    )  # fmt: skip
    cpu = server.cpu_seconds() - cpu_before
    return {
        **result.as_dict(),
        "cpu_us_per_request": cpu / result.requests * 1e6 if result.requests else None,
    }


def off_check_ns() -> float:
    """Nanoseconds of one `TRACING.enabled` check with tracing off, as the call sites do it."""
    from proxy.observability import tracing as _tracing

    assert not _tracing.TRACING.enabled
    number = 2_000_000
    best = min(
        timeit.repeat("_tracing.TRACING.enabled", globals={"_tracing": _tracing}, number=number)
    )
    empty = min(timeit.repeat("pass", number=number))
    return max(best - empty, 0.0) / number * 1e9


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    cpu = [r["cpu_us_per_request"] for r in runs if r["cpu_us_per_request"] is not None]
    return {
        "cpu_us_per_request": statistics.median(cpu),
        "cpu_us_min": min(cpu),
        "cpu_us_max": max(cpu),
        "rps": statistics.median(r["rps"] for r in runs),
        "p50_ms": statistics.median(r["p50_ms"] for r in runs),
        "p99_ms": statistics.median(r["p99_ms"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "runs": runs,
    }


def _round_order(names: list[str], number: int) -> list[str]:
    """Round `number`'s order: the list rotated by one more place each round, so no
    variant always runs first after a pause or last in a busy stretch. A control and
    its variant (`CONTROLS`) stay next to each other, the control first."""
    pairs = {variant: control for variant, control in CONTROLS.items()}
    units: list[list[str]] = []
    for name in names:
        if name in pairs.values():
            continue  # placed with its variant
        control = pairs.get(name)
        units.append([control, name] if control in names else [name])
    shift = number % len(units)
    return [name for unit in units[shift:] + units[:shift] for name in unit]


def paired_cost(rows: list[dict[str, Any]], base: list[dict[str, Any]]) -> float | None:
    """The median over rounds of each round's CPU per request against `base`'s in the
    same round: the two shared that round's load, which medians taken apart do not."""
    ratios = [
        row["cpu_us_per_request"] / other["cpu_us_per_request"] - 1
        for row, other in zip(rows, base, strict=True)
        if row["cpu_us_per_request"] and other["cpu_us_per_request"]
    ]
    return statistics.median(ratios) if ratios else None


def run_tracing(plan: TracingPlan, tmp: Path) -> dict[str, Any]:
    with ExitStack() as stack:
        sidecars, sink_url, _ = start_servers(stack, tmp)
        script = wrk.write_script(tmp)
        print("tracing: warm-up", flush=True)
        for name, server in sidecars.items():
            wrk.run(
                f"{server.url}/bench/json", connections=CONNECTIONS, seconds=plan.warmup,
                script=script, headers=HEADERS.get(name),
            )  # fmt: skip
        exported_before = sink_stats(sink_url)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sidecars}
        names = list(sidecars)
        for number in range(plan.rounds):
            print(f"tracing: round {number + 1} of {plan.rounds}", flush=True)
            for name in _round_order(names, number):
                server = sidecars[name]
                row = one_run(server, plan.seconds, script, HEADERS.get(name))
                runs[name].append(row)
                print(
                    f"  {name:<16} rps={row['rps']:>8,.0f} cpu={row['cpu_us_per_request']:.1f}"
                    f"us/req p99={row['p99_ms']:.2f}ms errors={row['errors']}",
                    flush=True,
                )
        sidecars["on"].stop()  # its exit flushes the last batch
        exported = sink_stats(sink_url)
    variants = {name: summarize(rows) for name, rows in runs.items()}
    off = variants["off"]["cpu_us_per_request"]
    for name, summary in variants.items():
        summary["cpu_vs_off"] = summary["cpu_us_per_request"] / off - 1
        summary["cpu_vs_off_paired"] = paired_cost(runs[name], runs["off"])
        control = CONTROLS.get(name)
        if control is not None:
            summary["control"] = control
            summary["cpu_vs_control"] = (
                summary["cpu_us_per_request"] / variants[control]["cpu_us_per_request"] - 1
            )
            # each round's ratio to the control measured just before it: the pair
            # shares that moment's load, which the medians of the rounds do not
            summary["cpu_vs_control_paired"] = paired_cost(runs[name], runs[control])
    if plan.counted_requests:
        print(f"tracing: instructions, {plan.counted_requests} requests each", flush=True)
        counts = instructions(list(VARIANTS), plan.counted_requests)
        add_instruction_costs(variants, counts)
    check_ns = off_check_ns()
    return {
        "plan": asdict(plan),
        "connections": CONNECTIONS,
        "variants": variants,
        "env": VARIANTS,
        "headers": HEADERS,
        "controls": CONTROLS,
        "exported_bytes": exported["bytes"] - exported_before["bytes"],
        "exports": exported["exports"] - exported_before["exports"],
        "off_check_ns": check_ns,
        "off_checks_per_request": OFF_CHECKS_PER_REQUEST,
        "off_cost_us_per_request": check_ns * OFF_CHECKS_PER_REQUEST / 1e3,
        "off_noise_us": variants["off"]["cpu_us_max"] - variants["off"]["cpu_us_min"],
    }


def add_instruction_costs(variants: dict[str, dict[str, Any]], counts: dict[str, float]) -> None:
    """Each variant's instructions per request, against `off` and against its control."""
    for name, count in counts.items():
        summary = variants.setdefault(name, {})
        summary["instructions_per_request"] = count
        summary["instructions_vs_off"] = count / counts["off"] - 1
        control = CONTROLS.get(name)
        if control is not None and control in counts:
            summary["instructions_vs_control"] = count / counts[control] - 1


def run_and_save(plan: TracingPlan, output: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """`--only tracing`: measure in a temp dir, then update only the "tracing" key."""
    with tempfile.TemporaryDirectory(prefix="sidecar-tracing-bench-") as tmp_dir:
        result = run_tracing(plan, Path(tmp_dir))
    result.update(meta)
    save_section(output, "tracing", result)
    return result


def _signed(value: float | None) -> str:
    return "" if value is None else f"{value:+.1%}"


def markdown(result: dict[str, Any]) -> str:
    labels = {
        "off": "off (no OTEL_* set)",
        "off-parent": "off, traceparent flags 00",
        "always-off": "endpoint set, sampler always_off",
        "ratio-0": "endpoint set, traceidratio 0",
        "parentbased-off": "endpoint set, parentbased_always_off, no traceparent",
        "unsampled-parent": "endpoint set, parentbased_always_on, traceparent flags 00",
        "on": "endpoint set, always_on, exporting",
    }
    counted = result["plan"].get("counted_requests", 0)
    lines = [
        f"### Tracing cost ({result['plan']['rounds']} rounds x {result['plan']['seconds']:g} s, "
        f"wrk c={result['connections']}, median"
        + (f"; instructions: callgrind, {counted} requests over 1 connection)" if counted else ")"),
        "",
        "| sidecar | instructions/request | vs off | vs off, same requests "
        "| CPU us/request | (min-max) | vs off (medians) | vs off, paired by round "
        "| vs off, same requests | rps | p50 ms | p99 ms | errors |",
        "| --- |" + " ---: |" * 12,
    ]
    for name, v in result["variants"].items():
        same = ""
        if "cpu_vs_control" in v:
            same = f"{v['cpu_vs_control']:+.1%}"
            if v.get("cpu_vs_control_paired") is not None:
                same += f" (paired {v['cpu_vs_control_paired']:+.1%})"
        count = v.get("instructions_per_request")
        lines.append(
            f"| {labels.get(name, name)} | {'' if count is None else f'{count / 1e3:,.1f}k'} | "
            f"{_signed(v.get('instructions_vs_off'))} | "
            f"{_signed(v.get('instructions_vs_control'))} | "
            f"{v['cpu_us_per_request']:.1f} | "
            f"{v['cpu_us_min']:.1f}-{v['cpu_us_max']:.1f} | {v['cpu_vs_off']:+.1%} | "
            f"{_signed(v.get('cpu_vs_off_paired'))} | {same} | "
            f"{v['rps']:,.0f} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} | {v['errors']} |"
        )
    lines += [
        "",
        f"Off, taken apart: {result['off_checks_per_request']} `TRACING.enabled` checks per "
        f"proxied request x {result['off_check_ns']:.0f} ns = "
        f"{result['off_cost_us_per_request'] * 1e3:.0f} ns/request, against a noise floor "
        f"of {result['off_noise_us']:.1f} us/request between the `off` rounds.",
        f"Exported while measuring `on`: {result['exports']} OTLP requests, "
        f"{result['exported_bytes'] / 1024:,.0f} KiB.",
    ]
    return "\n".join(lines)


# -- instructions per request under callgrind: the same comparison, without the noise ----


def instructions(
    variants: list[str], requests: int, connections: int = 1, parallel: int = 2
) -> dict[str, float]:
    """Instructions per proxied request of each variant, counted by callgrind.

    CPU time on a shared machine swings more than the 5% being checked; the number of
    instructions a request runs much less. Each variant's sidecar runs under
    `valgrind --tool=callgrind` with counting off, is warmed up, then counted over
    exactly `requests` requests sent its headers (`bench.callgrind.count`). One
    connection by default: with many, how many requests the event loop finds ready
    per wake-up depends on how busy the machine is, and so does the loop's share of
    each request (20 connections counted one sidecar at 659k to 668k on a quiet
    machine and 774k on a busy one; over one connection two sidecars counted 1,110.4k
    and 1,111.3k). For the same reason `parallel` variants are counted at once: over
    one connection the count does not follow the load, and valgrind is slow (about
    15 s per variant at 500 requests, most of it the sidecar's start).
    """
    from bench.run import SIDECAR_YAML, sidecar_argv

    with tempfile.TemporaryDirectory(prefix="sidecar-ir-") as tmp_dir, ExitStack() as stack:
        tmp = Path(tmp_dir)
        py = [sys.executable, "-m"]
        upstream = procs.start("upstream", [*py, "bench.upstream", "--port", "0"], tmp, cwd=ROOT)
        stack.callback(upstream.stop)
        sink = procs.start("sink", [*py, "bench.tracing_cost", "--sink"], tmp, cwd=ROOT)
        stack.callback(sink.stop)
        upstream_url = upstream.wait_ready(READY_TIMEOUT)
        sink_url = sink.wait_ready(READY_TIMEOUT)
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}

        def one(name: str) -> float:
            home = tmp / name
            home.mkdir()
            config = home / "sidecar.yaml"
            config.write_text(
                SIDECAR_YAML.format(
                    port=procs.free_port(), admin_port=procs.free_port(), upstream=upstream_url
                )
            )
            otel = VARIANTS[name]
            env = {**base_env, **otel}
            if otel:
                env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": sink_url}
            found = callgrind.count(
                name,
                sidecar_argv(config),
                "/bench/json",
                requests=requests,
                connections=connections,
                home=home,
                env=env,
                headers=HEADERS.get(name),
            )
            print(f"  {name:<18} {found / 1e3:.1f}k instructions/request", flush=True)
            return found

        with ThreadPoolExecutor(max_workers=parallel) as pool:
            return dict(zip(variants, pool.map(one, variants), strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sink", action="store_true", help="run the OTLP/HTTP sink only")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--instructions",
        nargs="+",
        metavar="VARIANT",
        choices=list(VARIANTS),
        help="count instructions per request of these variants under callgrind",
    )
    parser.add_argument("--requests", type=int, default=FULL.counted_requests)
    parser.add_argument("--connections", type=int, default=1)
    args = parser.parse_args()
    if args.instructions:
        instructions(args.instructions, args.requests, args.connections)
        return
    if not args.sink:
        parser.error(
            "measure with: python -m bench.run --only tracing "
            "(or python -m bench.tracing_cost --instructions VARIANT...)"
        )
    from bench.serve import run

    run(sink_app(), "127.0.0.1", args.port, "otlp-sink")


if __name__ == "__main__":
    main()
