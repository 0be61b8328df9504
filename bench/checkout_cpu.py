"""`python -m bench.checkout_cpu STORE`: one store's checkout, its p50 over a plain
gather and the sidecar's CPU per checkout, thread by thread.

`--only checkout` says how far each store is from the issue's target; this says where
one store's cost goes, in under a minute: its p50 over gather measured as `--only
checkout` does (in alternating blocks, `bench.checkout.interleaved`), and the
sidecar's user and system time per checkout for each of its threads (the event loop,
a SQLite file's thread, the fsync thread), read from /proc around each of its blocks,
with the fraud and email jobs they queue. `--spy` records the sidecar with py-spy
(`pip install py-spy`) while it is measured, to a raw file of folded stacks.

    .venv/bin/python -m bench.checkout_cpu sqlite --concurrency 20 --count 300
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import aiohttp

from bench import checkout, durable

REDIS_URL = durable.REDIS_URL
POSTGRES_URL = durable.POSTGRES_URL
_TICKS = os.sysconf("SC_CLK_TCK")

ThreadTimes = dict[str, tuple[str, int, int]]
"""Thread id -> (name, user ticks, system ticks)."""


def thread_times(pid: int) -> ThreadTimes:
    """Each thread's CPU so far, from /proc/PID/task/*/stat."""
    found: ThreadTimes = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the thread ended meanwhile
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        found[stat.parent.name] = (name, int(fields[11]), int(fields[12]))
    return found


def per_checkout(
    before: ThreadTimes, after: ThreadTimes, checkouts: int
) -> list[tuple[str, float, float]]:
    """(thread, user ms, system ms) per checkout for each thread that ran, busiest first."""
    rows = []
    for tid, (name, user, system) in after.items():
        _, user0, system0 = before.get(tid, (name, 0, 0))
        if user - user0 or system - system0:
            scale = 1000 / _TICKS / max(checkouts, 1)
            rows.append((f"{name} ({tid})", (user - user0) * scale, (system - system0) * scale))
    return sorted(rows, key=lambda row: -(row[1] + row[2]))


class BlockTimes:
    """A process's CPU per thread, added up over the blocks it wraps (`block()`)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.spent: ThreadTimes = {}

    @contextmanager
    def block(self) -> Iterator[None]:
        before = thread_times(self.pid)
        yield
        for tid, (name, user, system) in thread_times(self.pid).items():
            _, user0, system0 = before.get(tid, (name, 0, 0))
            _, user_sum, system_sum = self.spent.get(tid, (name, 0, 0))
            self.spent[tid] = (name, user_sum + user - user0, system_sum + system - system0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.checkout_cpu", description=__doc__)
    parser.add_argument("store", choices=checkout.STORES)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--spy", type=Path, help="py-spy's raw output file")
    args = parser.parse_args(argv)
    plan = checkout.CheckoutPlan(
        concurrency=args.concurrency,
        count=args.count,
        max_seconds=60.0,
        warmup=20,
        store_count=args.count,
        store_max_seconds=60.0,
    )
    with tempfile.TemporaryDirectory(prefix="checkout-cpu-") as tmp_dir, ExitStack() as stack:
        tmp = Path(tmp_dir)
        urls = checkout.start_simulator(stack, tmp)
        targets = checkout.store_targets(tmp, REDIS_URL, POSTGRES_URL)
        target = next(t for t in targets if t.store == args.store)
        stack.callback(checkout.cleanup_store, target, REDIS_URL, POSTGRES_URL)
        sidecar = checkout.start_sidecar(stack, tmp / "sidecar", urls, target.url)

        def gather(session: aiohttp.ClientSession, key: str) -> Awaitable[None]:
            return checkout.parallel(session, urls, key)

        def through_sidecar(session: aiohttp.ClientSession, key: str) -> Awaitable[None]:
            return checkout.via_sidecar(session, sidecar.url, key)

        spy = None
        if args.spy is not None:
            py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            spy = subprocess.Popen(
                [py_spy, "record", "-p", str(sidecar.pid), "-o", str(args.spy), "-f", "raw",
                 "-r", "400", "--nonblocking", "--gil"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        times = BlockTimes(sidecar.pid)
        row, baseline = checkout.interleaved(
            gather, through_sidecar, plan, urls, sidecar.admin, times.block
        )
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait()
    gather_p50 = baseline["p50_ms"]
    print(f"gather p50 {gather_p50:.1f} ms (its blocks: "
          f"{', '.join(f'{p:.1f}' for p in baseline['block_p50s_ms'])})")  # fmt: skip
    print(
        f"{args.store}: p50 {row['p50_ms']:.1f} ms ({row['p50_ms'] - gather_p50:+.1f} over "
        f"gather), p99 {row['p99_ms']:.1f} ms, {row['ok']} ok, {row['errors']} errors"
    )
    rows = per_checkout({}, times.spent, row["ok"])
    total = sum(user + system for _, user, system in rows)
    print(f"sidecar CPU per checkout: {total:.1f} ms")
    for name, user, system in rows:
        print(f"  {name:<28} user {user:5.2f} ms  system {system:5.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
