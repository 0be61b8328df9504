"""Routes every upstream serves besides its API: control (`/_*`) and test helpers.

`/_ledger`, `/_stats`, `/_faults` and `/_reset` let a test, the demo or a
benchmark in another process see and steer the simulator. `/echo` and
`/bytes/{n}` give proxy tests a generic target for headers, statuses and large
streamed bodies.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from .config import UPSTREAMS, SimulatorConfigError, parse_faults
from .middleware import SLOW_BODY_KEY
from .state import SimulatorState

MAX_CHUNK = 1 << 20
_BUFFER = memoryview(b"x" * MAX_CHUNK)  # one buffer for every /bytes response, sliced, never copied
DEFAULT_CHUNK = 64 * 1024


def routes(name: str, state: SimulatorState) -> list[web.RouteDef]:
    """Control and helper routes for the upstream `name`."""

    async def ledger(_: web.Request) -> web.StreamResponse:
        return web.json_response(state.ledger.snapshot())

    async def stats(request: web.Request) -> web.StreamResponse:
        if request.query.get("all"):
            return web.json_response({n: state.stats(n) for n in UPSTREAMS})
        return web.json_response(state.stats(name))

    async def get_faults(_: web.Request) -> web.StreamResponse:
        return web.json_response({"upstream": name, **state.plans[name].describe()})

    async def set_faults(request: web.Request) -> web.StreamResponse:
        try:
            faults = parse_faults(await request.json())
        except ValueError as exc:  # bad JSON, or SimulatorConfigError
            detail = str(exc) if isinstance(exc, SimulatorConfigError) else "body is not JSON"
            return web.json_response({"error": "invalid_faults", "detail": detail}, status=400)
        state.set_faults(name, faults)
        return await get_faults(request)

    async def notify(request: web.Request) -> web.StreamResponse:
        """Stands in for the app's own endpoints (fraud flags, emails) in demos and tests."""
        try:
            body = await request.json()
        except ValueError:
            body = None
        state.ledger.notifications.append(
            {
                "topic": request.match_info["topic"],
                "key": request.headers.get("Idempotency-Key"),
                "body": body,
            }
        )
        return web.json_response({"received": True}, status=202)

    async def reset(_: web.Request) -> web.StreamResponse:
        state.reset()
        return web.json_response({"reset": True})

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        delay_ms = float(request.query.get("delay_ms", 0))
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)
        return web.json_response(
            {
                "upstream": name,
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "headers": dict(request.headers),
                "body": body.decode("utf-8", "replace"),
                "body_length": len(body),
            },
            status=int(request.query.get("status", 200)),
        )

    async def stream_bytes(request: web.Request) -> web.StreamResponse:
        size = int(request.match_info["n"])
        chunk = max(1, min(int(request.query.get("chunk", DEFAULT_CHUNK)), MAX_CHUNK))
        bytes_per_s = request.get(SLOW_BODY_KEY)
        if bytes_per_s:
            chunk = max(1, min(chunk, bytes_per_s // 10))
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        left = size
        while left > 0:
            piece = _BUFFER[: min(chunk, left)]
            await response.write(piece)
            left -= len(piece)
            if bytes_per_s:
                await asyncio.sleep(len(piece) / bytes_per_s)
        await response.write_eof()
        return response

    return [
        web.get("/_ledger", ledger),
        web.get("/_stats", stats),
        web.get("/_faults", get_faults),
        web.post("/_faults", set_faults),
        web.post("/_reset", reset),
        web.post("/_notify/{topic}", notify),
        web.get("/echo", echo),
        web.post("/echo", echo),
        web.get(r"/bytes/{n:\d+}", stream_bytes),
    ]
