"""Instructions per request of a server, counted by callgrind: a cost without the noise.

CPU time on a shared 2-core machine swings by more than the differences the
benchmarks look for; the number of instructions a request runs much less. The
server runs under `valgrind --tool=callgrind` with counting off, is warmed up by
wrk, then counted over `requests` requests (`callgrind_control --instr=on`, then
`--dump`). Kernel time (the socket calls) is not counted: the figure is the
process's own work.

With many connections the count still follows the machine's load a little: how many
requests the event loop finds ready per wake-up decides the loop's share of each.
Compare servers counted one after the other in one run, and prefer one connection
when the difference sought is small.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench import procs, wrk


def valgrind_argv(out: Path, argv: Sequence[str]) -> list[str]:
    return [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", "--trace-children=yes",
        f"--callgrind-out-file={out}", *argv,
    ]  # fmt: skip


def count(
    name: str,
    argv: Sequence[str],
    path: str,
    *,
    requests: int,
    connections: int,
    home: Path,
    env: Mapping[str, str] | None = None,
    headers: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> float:
    """Start `argv` under callgrind (in `cwd`, default `home`, where its logs and counts
    go), send `requests` to `path`; instructions each."""
    out = home / "callgrind.out"
    popen_env = dict(os.environ if env is None else env)
    server = procs.start(name, valgrind_argv(out, argv), home, cwd=cwd or home, env=popen_env)
    try:
        server.wait_ready(300)
        url = server.url + path
        warm, _ = wrk.run(url, connections=connections, seconds=2, script=wrk.write_script(home),
                          headers=headers)  # fmt: skip
        subprocess.run(["callgrind_control", "--instr=on", str(server.pid)], check=True)
        limited = wrk.write_script(home, limit=requests)
        # wrk sleeps out its whole -d after the limit: size it from the warm-up's rate
        # (counting slows valgrind down further, hence the margin), within 10 minutes
        seconds = min(600.0, max(10.0, 3.0 * requests / max(warm.rps, 1.0)))
        result, _ = wrk.run(
            url, connections=connections, seconds=seconds, script=limited, headers=headers
        )
        subprocess.run(["callgrind_control", "--dump", str(server.pid)], check=True)
    finally:
        server.stop(timeout=30)
    total = 0
    for dump in home.glob("callgrind.out*"):
        for line in dump.read_text().splitlines():
            if line.startswith(("totals:", "summary:")):
                total = max(total, int(line.split()[1]))
    return total / result.requests if result.requests else float("nan")
