"""`python -m bench.client_cost`: the upstream client's own CPU per request.

The proxy's hot path is mostly its upstream client, so the client is measured
alone: this process sends small GETs (the fast `bench.upstream` answers a 55-byte
JSON body from another process, so its CPU is not counted) through each client and
divides this process's CPU time (`time.process_time`) by the number of requests.
Rounds alternate the clients (ABBA) so a busy neighbour weighs on each alike; the
median round is reported.

- `http11`: `proxy.client.http11.Http11Client` (send, let_go), what upstreams use;
- `aiohttp`: aiohttp's public `ClientSession.request` with the settings the old
  client had (no decompression, no automatic headers, no cookie jar), body read;
- `aiohttp-direct` (with `--old-rev REV`): the former `AiohttpClient` and its
  `_direct_request` (a copy of aiohttp 3.14's private request path), loaded from
  `proxy/client/aiohttp_client.py` at git revision REV; it needs aiohttp 3.14.

Loopback only, bounded by `--requests` per round and `--rounds`.

    python -m bench.client_cost --requests 5000 --rounds 4 --concurrency 1 10 \
        --old-rev 0368750
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from bench.procs import free_port, start
from bench.serve import use_loop
from proxy.client import OutgoingRequest
from proxy.client.http11 import Http11Client

Send = Callable[[], Awaitable[None]]


def _headers() -> CIMultiDict[str]:
    """What a proxied request carries upstream (forward.py's shape), roughly."""
    return CIMultiDict(
        {
            "User-Agent": "wrk",
            "Accept": "*/*",
            "X-Forwarded-For": "127.0.0.1",
            "X-Forwarded-Proto": "http",
            "X-Forwarded-Host": "127.0.0.1:8080",
            "X-Request-Timeout-Ms": "1000",
        }
    )


def _load_old_client(rev: str) -> types.ModuleType:
    source = subprocess.run(
        ["git", "show", f"{rev}:proxy/client/aiohttp_client.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    module = types.ModuleType("bench_old_aiohttp_client")
    exec(compile(source, f"{rev}:proxy/client/aiohttp_client.py", "exec"), module.__dict__)
    return module


async def _http11(url: URL) -> tuple[Send, Callable[[], Awaitable[None]]]:
    client = Http11Client(connect_timeout=2.0, max_connections=100, keepalive=30.0)

    async def send() -> None:
        outcome = await client.send(OutgoingRequest("GET", url, _headers()))
        response = outcome.response
        assert response is not None and response.status == 200, outcome
        response.let_go()

    return send, client.close


async def _aiohttp(url: URL) -> tuple[Send, Callable[[], Awaitable[None]]]:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100, keepalive_timeout=30.0),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),
    )

    async def send() -> None:
        async with session.request("GET", url, headers=_headers()) as response:
            await response.read()
            assert response.status == 200

    return send, session.close


def _old_direct(module: types.ModuleType) -> Callable[[URL], Awaitable[Any]]:
    async def make(url: URL) -> tuple[Send, Callable[[], Awaitable[None]]]:
        client = module.AiohttpClient(connect_timeout=2.0, max_connections=100, keepalive=30.0)

        async def send() -> None:
            outcome = await client.send(OutgoingRequest("GET", url, _headers()))
            response = outcome.response
            assert response is not None and response.status == 200, outcome
            response.let_go()

        return send, client.close

    return make


async def _round(send: Send, requests: int, concurrency: int) -> tuple[float, float]:
    """CPU and wall microseconds per request over `requests`, `concurrency` at a time."""
    per_worker = requests // concurrency

    async def worker() -> None:
        for _ in range(per_worker):
            await send()

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    done = per_worker * concurrency
    return (
        (time.process_time() - cpu) / done * 1e6,
        (time.perf_counter() - wall) / done * 1e6,
    )


async def measure(url: URL, args: argparse.Namespace) -> dict[tuple[str, int], list[float]]:
    makers: dict[str, Callable[[URL], Awaitable[Any]]] = {
        "http11": _http11,
        "aiohttp": _aiohttp,
    }
    if args.old_rev:
        makers["aiohttp-direct"] = _old_direct(_load_old_client(args.old_rev))
    clients = {name: await make(url) for name, make in makers.items()}
    results: dict[tuple[str, int], list[float]] = {}
    try:
        for concurrency in args.concurrency:
            for send, _ in clients.values():  # warm up: connections open, caches filled
                await _round(send, min(1000, args.requests), concurrency)
            order = list(clients)
            for number in range(args.rounds):
                for name in order if number % 2 == 0 else reversed(order):
                    cpu, _ = await _round(clients[name][0], args.requests, concurrency)
                    results.setdefault((name, concurrency), []).append(cpu)
    finally:
        for _, close in clients.values():
            await close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=5000, help="per round and client")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    parser.add_argument("--old-rev", help="git revision holding proxy/client/aiohttp_client.py")
    args = parser.parse_args()
    loop = use_loop(args.loop)
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        upstream = start(
            "upstream",
            [sys.executable, "-m", "bench.upstream", "--port", str(port)],
            Path(tmp),
        )
        try:
            base = upstream.wait_ready(15)
            results = asyncio.run(measure(URL(f"{base}/item"), args))
        finally:
            upstream.stop()
    print(f"client CPU per request, us (median of {args.rounds} rounds; loop {loop})")
    for (name, concurrency), samples in results.items():
        spread = f"{min(samples):.1f}-{max(samples):.1f}"
        print(f"  {name:15} c={concurrency:<3} {statistics.median(samples):6.1f}  ({spread})")


if __name__ == "__main__":
    main()
