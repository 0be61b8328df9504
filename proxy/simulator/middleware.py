"""Carrying out fault decisions on live requests, and counting what reached each upstream.

Only API routes are touched: `/_ledger`, `/_faults` and the other `/_*` routes
must keep answering while an upstream is "down", or a test could not turn the
faults off again.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.typedefs import Middleware

from .faults import Action
from .handlers import KEYS_IGNORED, Handler
from .state import SimulatorState

CONTROL_PREFIX = "/_"
SLOW_BODY_KEY = web.RequestKey("slow_body_bytes_per_s", int)  # /bytes throttles itself by it


def fault_middleware(name: str, state: SimulatorState) -> Middleware:
    """Count the request, then delay, fail, hang, reset or slow it as `state.plans[name]` says."""

    @web.middleware
    async def inject_faults(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(CONTROL_PREFIX):
            return await handler(request)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "(unmatched)"
        state.count_hit(name, f"{request.method} {route}")
        if resource is None:
            return await handler(request)

        plan = state.plans[name]
        if not plan.faults.replay_keys:
            request[KEYS_IGNORED] = True
        decision = plan.decide()
        if decision.action is not Action.PASS:
            state.injected[name][decision.action.value] += 1
        if decision.delay_s > 0:
            await asyncio.sleep(decision.delay_s)

        if decision.action is Action.HANG:
            await state.stopping.wait()  # or cancelled when the client goes away
            return _drop(request)
        if decision.action is Action.RESET:
            return _drop(request)
        if decision.action is Action.STATUS:
            headers = {}
            if decision.retry_after is not None:
                headers["Retry-After"] = str(decision.retry_after)
            body = {"error": "injected_fault", "upstream": name, "status": decision.status}
            return web.json_response(body, status=decision.status, headers=headers)
        if decision.action is Action.RESET_AFTER:
            await handler(request)
            return _drop(request)
        if decision.action is Action.HANG_AFTER:
            await handler(request)
            await state.stopping.wait()  # acted; the client times out and goes away
            return _drop(request)

        if decision.slow_body_bytes_per_s is None:
            return await handler(request)
        request[SLOW_BODY_KEY] = decision.slow_body_bytes_per_s
        response = await handler(request)
        if isinstance(response, web.Response) and not response.prepared:
            return await write_slowly(request, response, decision.slow_body_bytes_per_s)
        return response  # a streaming handler throttled itself

    return inject_faults


def _drop(request: web.Request) -> web.StreamResponse:
    """Abort the TCP connection: the client sees a reset / server disconnect, no status line."""
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=500)  # never written: the transport is gone


async def write_slowly(
    request: web.Request, response: web.Response, bytes_per_s: int
) -> web.StreamResponse:
    """Send `response` with its headers at once and its body at `bytes_per_s`."""
    body = response.body if isinstance(response.body, bytes) else b""
    slow = web.StreamResponse(status=response.status, reason=response.reason)
    for header, value in response.headers.items():
        if header.lower() not in ("content-length", "transfer-encoding"):
            slow.headers.add(header, value)
    slow.content_length = len(body)
    await slow.prepare(request)
    step = max(1, bytes_per_s // 10)
    for start in range(0, len(body), step):
        piece = body[start : start + step]
        await slow.write(piece)
        await asyncio.sleep(len(piece) / bytes_per_s)
    await slow.write_eof()
    return slow
