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

import http.client
import os
import subprocess
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from bench import procs, wrk


def valgrind_argv(out: Path, argv: Sequence[str]) -> list[str]:
    return [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", "--trace-children=yes",
        f"--callgrind-out-file={out}", *argv,
    ]  # fmt: skip


def send(url: str, requests: int, connections: int, headers: dict[str, str] | None) -> int:
    """Exactly `requests` GETs of `url` over `connections` keep-alive connections; how many
    answered 2xx. A blocking client, a thread per connection: its speed does not matter
    (valgrind's server is far slower), and it returns as soon as the last answer is read,
    so the count that follows holds no idle time. wrk cannot do that: after a request
    limit it sleeps out its whole duration while the server's timers keep counting."""
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    shares = [requests // connections + (i < requests % connections) for i in range(connections)]

    def one_connection(share: int) -> int:
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=120)
        ok = 0
        try:
            for _ in range(share):
                conn.request("GET", target, headers=headers or {})
                response = conn.getresponse()
                response.read()
                ok += 200 <= response.status < 300
        finally:
            conn.close()
        return ok

    with ThreadPoolExecutor(max_workers=connections) as pool:
        return sum(pool.map(one_connection, shares))


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
        wrk.run(url, connections=connections, seconds=2, script=wrk.write_script(home),
                headers=headers)  # fmt: skip
        _control("--instr=on", server.pid)
        ok = send(url, requests, connections, headers)
        _control("--dump", server.pid)
    finally:
        server.stop(timeout=30)
    if ok != requests:
        raise RuntimeError(f"{name}: {requests - ok} of {requests} counted requests failed")
    total = 0
    for dump in home.glob("callgrind.out*"):
        for line in dump.read_text().splitlines():
            if line.startswith(("totals:", "summary:")):
                total = max(total, int(line.split()[1]))
    return total / requests


def _control(command: str, pid: int) -> None:
    subprocess.run(["callgrind_control", command, str(pid)], check=True, capture_output=True)
