"""Run a small aiohttp app as a benchmark subprocess: bind, announce, wait for SIGTERM.

The upstream and the minimal proxy share this so both print the same ready line
(`{"event": "start", "listen": "http://HOST:PORT", ...}`) the orchestrator waits
for, the JSON `start` log line `checkout-sidecar run` writes, and both shut down
cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal

from aiohttp import web


def use_loop(loop: str) -> str:
    """Install the requested event loop; falls back to asyncio when uvloop is missing."""
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            return "asyncio"
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return loop


async def _serve(app: web.Application, host: str, port: int, name: str) -> None:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    url = f"http://{bound_host}:{bound_port}"
    print(json.dumps({"msg": f"{name} started", "event": "start", "listen": url}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def run(app: web.Application, host: str, port: int, name: str) -> None:
    """Serve `app` until SIGINT/SIGTERM."""
    asyncio.run(_serve(app, host, port, name))
