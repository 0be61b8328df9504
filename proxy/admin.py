"""The admin listener: metrics, health, and manual control of the breakers.

It has its own port, loopback by default, so nothing on the data plane can reach
it. When bound beyond loopback the config requires a token, and every admin
request but the probes must carry it (compared in constant time).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client.exposition import choose_encoder

from proxy.api import openapi_json
from proxy.config.model import Config
from proxy.errors import json_error
from proxy.storage.url import SECRET_KEYS, redact_secrets

if TYPE_CHECKING:
    from proxy.app import Sidecar

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(data, indent=2).encode(), content_type="application/json"
    )


def token_middleware(current_token: Callable[[], str | None]) -> Middleware:
    """Every request but the probes must carry the token of the config in force.

    The token is looked up per request, not captured once, so a reload (a rotated
    `${file:...}` secret, say) changes it without restarting the listener.
    """

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        token = current_token()
        if not token or request.path in OPEN_PATHS:
            return await handler(request)
        expected = token.encode()
        scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
        # the scheme is case-insensitive (RFC 9110 11.1); the token is compared in constant time
        valid = hmac.compare_digest(given.strip().encode(), expected)
        if scheme.lower() != "bearer" or not valid:
            return json_error(
                401,
                "admin endpoints need 'Authorization: Bearer <admin.token>'",
                "unauthorized",
                headers={"WWW-Authenticate": 'Bearer realm="checkout-sidecar admin"'},
            )
        return await handler(request)

    return check


class AdminApp:
    """Routes of the admin listener over the sidecar in force."""

    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar

    def build(self) -> web.Application:
        app = web.Application(middlewares=[token_middleware(self._token)])
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/admin/breakers", self.breakers)
        app.router.add_post("/admin/breakers/{upstream}", self.control_breaker)
        app.router.add_get("/admin/config", self.config)
        app.router.add_get("/admin/jobs/dead", self.dead_jobs)
        app.router.add_post("/admin/jobs/dead/{id}/retry", self.redrive_job)
        app.router.add_get("/admin/openapi.json", self.openapi)
        return app

    def _token(self) -> str | None:
        return self.sidecar.config.admin.token

    async def openapi(self, request: web.Request) -> web.Response:
        """This API described: `proxy/api/openapi.yaml` as JSON."""
        return web.Response(body=openapi_json(), content_type="application/json")

    async def config(self, request: web.Request) -> web.Response:
        sidecar = self.sidecar
        return _json(
            {
                "config": redacted_config(sidecar.config),
                "hash": sidecar.loaded.get("hash", ""),
                "loaded_at": sidecar.loaded.get("loaded_at"),
                "source": sidecar.loaded.get("source", ""),
                "restart_required": sidecar.loaded.get("restart_required", []),
            }
        )

    async def dead_jobs(self, request: web.Request) -> web.Response:
        queue = self.sidecar.durable.queue
        if queue is None:
            return json_error(503, "the job queue is not open", "queue_unavailable")
        try:
            limit = min(1000, max(1, int(request.query.get("limit", "100"))))
        except ValueError:
            return json_error(400, "limit must be a whole number", "bad_request")
        jobs = await queue.dead(limit=limit)
        return _json({"dead": [json.loads(job.to_json()) for job in jobs]})

    async def redrive_job(self, request: web.Request) -> web.Response:
        queue = self.sidecar.durable.queue
        if queue is None:
            return json_error(503, "the job queue is not open", "queue_unavailable")
        job_id = request.match_info["id"]
        if not await queue.redrive(job_id):
            return json_error(404, f"no dead job with id {job_id!r}", "unknown_job", id=job_id)
        return _json({"redriven": job_id})

    async def metrics(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        sidecar = self.sidecar
        await sidecar.metrics.jobs.refresh(sidecar.durable.queue)
        await sidecar.metrics.events.refresh(sidecar.events)
        body = encoder(sidecar.metrics.registry)
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "alive"})

    async def readyz(self, request: web.Request) -> web.Response:
        sidecar = self.sidecar
        if sidecar.ready:
            return _json({"status": "ready"})
        return _json({"status": "not ready", "reason": sidecar.not_ready_reason}, status=503)

    async def breakers(self, request: web.Request) -> web.Response:
        out = {}
        for upstream in self.sidecar.runtime.upstreams:
            breaker = upstream.policies.breaker
            out[upstream.name] = (
                {"state": "disabled"} if breaker is None else _rounded(breaker.snapshot())
            )
        return _json(out)

    async def control_breaker(self, request: web.Request) -> web.Response:
        name = request.match_info["upstream"]
        upstream = self.sidecar.runtime.upstreams.get(name)
        if upstream is None:
            return json_error(404, f"no upstream named {name!r}", "unknown_upstream", upstream=name)
        breaker = upstream.policies.breaker
        if breaker is None:
            return json_error(
                409, f"the breaker of {name!r} is disabled", "breaker_disabled", upstream=name
            )
        try:
            action = (await request.json()).get("action")
        except (ValueError, AttributeError):
            action = None
        actions = {
            "open": breaker.force_open,
            "close": breaker.force_closed,
            "reset": breaker.reset,
        }
        if not isinstance(action, str) or action not in actions:  # [] is unhashable: a 500
            return json_error(
                400,
                'body must be {"action": "open" | "close" | "reset"}',
                "bad_request",
                upstream=name,
            )
        actions[action]()
        return _json({name: _rounded(breaker.snapshot())})


def redacted_config(config: Config) -> Any:
    """The config in force as JSON, tokens and passwords in URLs replaced by ***.

    Values read from `${file:...}` are replaced wherever they appear, whole or as a
    part of a longer string (a password inside a store URL, a token inside a header),
    whatever the key they sit under: a secret file is a secret by where it came from.
    """
    from_files = config.file_secrets

    def walk(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, str):
            if key.lower() in SECRET_KEYS and value:
                return "***"
            if from_files:
                value = from_files.redact(value)
            if "://" in value:
                return redact_secrets(value)
        return value

    return walk(config.model_dump(mode="json", by_alias=True))


def _rounded(snapshot: dict[str, object]) -> dict[str, object]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in snapshot.items()}
