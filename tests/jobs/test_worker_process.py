"""`checkout-sidecar worker` as its own process, draining the queue a sidecar filled."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import yaml
from aiohttp import web

from proxy.jobs.handlers import upstream_call_job
from proxy.storage.open import open_queue


async def test_worker_process_runs_queued_upstream_calls_and_stops_on_sigterm(
    tmp_path: Path, start_server
) -> None:
    seen: list[str] = []
    arrived = asyncio.Event()

    async def capture(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Idempotency-Key", ""))
        arrived.set()
        return web.json_response({"captured": True})

    app = web.Application()
    app.router.add_post("/payments/{id}/capture", capture)
    server = await start_server(app)

    store = f"sqlite://{tmp_path}/state.db"
    config = {
        "store": store,
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "queue": {"poll_interval": "20ms"},
        "upstreams": {"payment": {"url": str(server.make_url("")).rstrip("/")}},
    }
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))

    queue = await open_queue(store)
    await queue.enqueue(
        upstream_call_job(
            "k1:payment:commit",
            "payment",
            "POST",
            "/payments/auth_1/capture",
            json_body={"amount": 100},
            headers={"Idempotency-Key": "k1:payment:commit"},
        )
    )
    await queue.close()

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "worker", "--config", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        async with asyncio.timeout(20):
            await arrived.wait()
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            code = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert code == 0
    assert seen == ["k1:payment:commit"]
    queue = await open_queue(store)
    try:
        assert await queue.depth() == 0
    finally:
        await queue.close()
