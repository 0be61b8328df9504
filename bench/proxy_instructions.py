"""`python -m bench.run --only instructions`: the proxy comparison in instructions.

The proxy phase's CPU per request moves with the machine's load (on a shared 2-core
machine the same sidecar measured 113 and 250 us per request an hour apart). Here
each proxy of that phase (the sidecar and the minimal aiohttp proxy, on asyncio and
on uvloop, nginx upstream) runs under callgrind in turn and is counted over the
same number of small JSON GETs (`bench.callgrind`): the ratio of the counts is the
ratio of the work each does per request, kernel time aside. Not part of `make
bench` (valgrind makes it a few minutes long).
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import callgrind, nginx, procs
from bench.durable import save_section

READY_TIMEOUT = 30.0
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class InstructionsPlan:
    requests: int
    connections: int


FULL = InstructionsPlan(requests=2000, connections=20)
QUICK = InstructionsPlan(requests=300, connections=20)

PAIRS = (("sidecar-asyncio", "minimal-asyncio", "asyncio"), ("sidecar", "minimal-uvloop", "uvloop"))


def run(plan: InstructionsPlan, tmp: Path) -> dict[str, Any]:
    from bench.run import bench_yaml, sidecar_argv  # bench.run imports this module

    py = [sys.executable, "-m"]
    if nginx.nginx_path() is None:
        raise SystemExit("nginx is not installed (Debian: apt-get install nginx-light)")
    upstream = procs.start("nginx", [*py, "bench.nginx", "--port", "0"], tmp)
    try:
        url = upstream.wait_ready(READY_TIMEOUT)
        argvs: dict[str, list[str]] = {}
        for loop in ("asyncio", "uvloop"):
            config = tmp / f"sidecar-{loop}.yaml"
            config.write_text(bench_yaml(url, url))
            name = "sidecar" if loop == "uvloop" else "sidecar-asyncio"
            argvs[name] = [*sidecar_argv(config), "--loop", loop]
            argvs[f"minimal-{loop}"] = [
                *py, "bench.minimal_proxy", "--upstream", url, "--loop", loop,
            ]  # fmt: skip
        counts: dict[str, float] = {}
        for name, argv in argvs.items():
            home = tmp / name
            home.mkdir()
            path = "/bench/json" if name.startswith("sidecar") else "/json"
            counts[name] = callgrind.count(
                name,
                argv,
                path,
                requests=plan.requests,
                connections=plan.connections,
                home=home,
                cwd=home if name.startswith("sidecar") else ROOT,  # `bench` importable
            )
            print(f"  {name:<16} {counts[name] / 1e3:.1f}k instructions/request", flush=True)
    finally:
        upstream.stop()
    ratios = {loop: counts[s] / counts[m] for s, m, loop in PAIRS}
    return {"plan": asdict(plan), "instructions_per_request": counts, "ratios": ratios}


def run_and_save(plan: InstructionsPlan, output: Path, meta: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sidecar-instructions-") as tmp_dir:
        result = run(plan, Path(tmp_dir))
    result.update(meta)
    save_section(output, "instructions", result)
    return result


def markdown(result: dict[str, Any]) -> str:
    counts, plan = result["instructions_per_request"], result["plan"]
    lines = [
        f"### Instructions per proxied request (callgrind, {plan['requests']:,} requests, "
        f"{plan['connections']} connections, nginx upstream)",
        "",
        "| loop | sidecar | minimal aiohttp proxy | sidecar / minimal |",
        "| --- | ---: | ---: | ---: |",
    ]
    for sidecar, minimal, loop in PAIRS:
        lines.append(
            f"| {loop} | {counts[sidecar] / 1e3:.1f}k | {counts[minimal] / 1e3:.1f}k | "
            f"{result['ratios'][loop]:.2f}x |"
        )
    return "\n".join(lines)
