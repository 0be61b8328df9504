"""The proxied route: `/<upstream>/<rest>` to that upstream's URL + `/<rest>`.

The app keeps speaking plain HTTP to its upstreams and gets their answers
unchanged, only bounded by a deadline and retried where that is safe; when the
sidecar itself has to answer, the answer is JSON (`proxy.errors`).
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from yarl import URL

from proxy.errors import json_error, outcome_error
from proxy.forward import (
    IncompleteBody,
    PayloadTooLarge,
    read_request_body,
    send_upstream_response,
    upstream_request_headers,
)
from proxy.resilience.deadline import HEADER as TIMEOUT_HEADER
from proxy.resilience.deadline import InvalidTimeoutHeader, parse_timeout_header
from proxy.resilience.fallback import FALLBACK_HEADER, FallbackAnswer
from proxy.resilience.retry import may_retry_request
from proxy.upstreams import OutgoingRequest, UpstreamRegistry, discard_response

IDEMPOTENCY_HEADER = "Idempotency-Key"


def upstream_url(base: str, raw_path: str, name: str) -> URL:
    """The upstream URL for a raw request path `/<name>/<rest>?<query>`, encoding kept."""
    rest = raw_path[len(name) + 1 :]
    if rest and not rest.startswith(("/", "?")):
        rest = "/" + rest
    return URL(base + rest, encoded=True)


def fallback_response(answer: FallbackAnswer, attempts: int) -> web.Response:
    """The fallback's answer, marked so the app (and an SRE) can tell it was not live."""
    response = web.Response(status=answer.status, body=answer.body)
    for name, value in answer.headers:
        response.headers.add(name, value)
    response.headers[FALLBACK_HEADER] = answer.reason
    response.headers["X-Sidecar-Attempts"] = str(attempts)
    if answer.source == "stale":
        response.headers["Age"] = str(int(answer.age))
    return response


class ProxyRoute:
    """The handler for every proxied request."""

    def __init__(self, registry: UpstreamRegistry) -> None:
        self.registry = registry

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["upstream"]
        upstream = self.registry.get(name)
        if upstream is None:
            return json_error(
                404,
                f"no upstream named {name!r}",
                "unknown_upstream",
                upstream=name,
                known=self.registry.names(),
            )
        try:
            requested = parse_timeout_header(request.headers.get(TIMEOUT_HEADER))
        except InvalidTimeoutHeader as exc:
            return json_error(400, str(exc), "bad_request", upstream=name)

        config = upstream.config
        deadline = upstream.deadline(requested)
        try:
            async with asyncio.timeout(deadline.remaining()):
                body = await read_request_body(
                    request, config.retry.buffer_limit, config.max_request_body
                )
        except PayloadTooLarge as exc:
            return json_error(413, str(exc), "payload_too_large", upstream=name)
        except IncompleteBody as exc:
            return json_error(400, str(exc), "incomplete_body", upstream=name)
        except TimeoutError:
            return json_error(
                408,
                "the request body did not arrive within the deadline",
                "body_timeout",
                upstream=name,
            )

        headers = upstream_request_headers(request)
        if body.length is not None and not body.replayable:
            headers["Content-Length"] = str(body.length)
        key = request.raw_path[len(name) + 1 :]
        outgoing = OutgoingRequest(
            request.method,
            upstream_url(upstream.base_url, request.raw_path, name),
            headers,
            body.data,
        )
        retryable = may_retry_request(
            request.method, IDEMPOTENCY_HEADER in request.headers, body.replayable
        )
        result = await upstream.call(outgoing, deadline, retryable=retryable)
        try:
            if body.too_large is not None:
                return json_error(413, str(body.too_large), "payload_too_large", upstream=name)
            outcome = result.outcome
            fallback = upstream.fallback_for(result, request.method, key)
            upstream.finished(result, fallback)
            if fallback is not None:
                await discard_response(outcome)
                return fallback_response(fallback, result.attempts)
            if outcome.is_response:
                upstream.remember_good(request.method, key, outcome.response)
                return await send_upstream_response(
                    request,
                    outcome.response,
                    {"X-Sidecar-Attempts": str(result.attempts)},
                    deadline.remaining(),
                )
            return outcome_error(name, outcome, result.attempts)
        finally:
            result.release()
