"""The proxied route: `/<upstream>/<rest>` to that upstream's URL + `/<rest>`.

The app keeps speaking plain HTTP to its upstreams and gets their answers
unchanged, only bounded by a deadline and retried where that is safe; when the
sidecar itself has to answer, the answer is JSON (`proxy.errors`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
from aiohttp import web
from yarl import URL

from proxy.errors import json_error, outcome_error
from proxy.forward import (
    IncompleteBody,
    PayloadTooLarge,
    RequestBody,
    client_response_headers,
    read_request_body,
    send_upstream_response,
    upstream_request_headers,
)
from proxy.idempotency import IdempotencyGuard, NotRun, StoredResponse
from proxy.resilience.deadline import HEADER as TIMEOUT_HEADER
from proxy.resilience.deadline import Deadline, InvalidTimeoutHeader, parse_timeout_header
from proxy.resilience.fallback import FALLBACK_HEADER, FallbackAnswer
from proxy.resilience.outcome import Kind, Outcome
from proxy.resilience.retry import may_retry_request
from proxy.upstreams import (
    OutgoingRequest,
    Upstream,
    UpstreamRegistry,
    classify_error,
    discard_response,
)

IDEMPOTENCY_HEADER = "Idempotency-Key"
UNSAFE_METHODS = frozenset({"POST", "PATCH"})
NEVER_SENT = frozenset({Kind.CIRCUIT_OPEN, Kind.BULKHEAD_FULL, Kind.CONNECT_FAILURE})


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

    def __init__(
        self,
        registry: UpstreamRegistry,
        *,
        guard: Callable[[], IdempotencyGuard | None] = lambda: None,
        key_header: str = IDEMPOTENCY_HEADER,
        required_for: frozenset[str] = frozenset(),
    ) -> None:
        self.registry = registry
        self.guard = guard
        self.key_header = key_header
        self.required_for = required_for

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["upstream"]
        upstream = self.registry.get(name)
        if upstream is None:
            return json_error(
                404,
                f"no upstream named {name!r}",
                "unknown_upstream",
                upstream=name,
                attempts=0,
                known=self.registry.names(),
            )
        try:
            requested = parse_timeout_header(request.headers.get(TIMEOUT_HEADER))
        except InvalidTimeoutHeader as exc:
            return json_error(400, str(exc), "bad_request", upstream=name, attempts=0)

        config = upstream.config
        deadline = upstream.deadline(requested)
        try:
            if not request.body_exists:
                body = RequestBody(None, True, None)  # nothing to wait for: no timer
            else:
                async with asyncio.timeout(deadline.remaining()):
                    body = await read_request_body(
                        request, config.retry.buffer_limit, config.max_request_body
                    )
        except PayloadTooLarge as exc:
            return json_error(413, str(exc), "payload_too_large", upstream=name, attempts=0)
        except IncompleteBody as exc:
            return json_error(400, str(exc), "incomplete_body", upstream=name, attempts=0)
        except TimeoutError:
            return json_error(
                408,
                "the request body did not arrive within the deadline",
                "body_timeout",
                upstream=name,
                attempts=0,
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
        has_key = self.key_header in request.headers
        retryable = may_retry_request(request.method, has_key, body.replayable)
        if request.method in UNSAFE_METHODS:
            if not has_key and name in self.required_for:
                return json_error(
                    400,
                    f"POST and PATCH to {name!r} require an {self.key_header} header",
                    "idempotency_key_missing",
                    upstream=name,
                    attempts=0,
                    header=self.key_header,
                )
            guard = self.guard()
            if has_key and upstream.config.idempotency and guard is not None:
                if not body.replayable:
                    return json_error(
                        413,
                        "a request with an idempotency key must fit in retry.buffer_limit "
                        f"({config.retry.buffer_limit} bytes) so its fingerprint can be kept",
                        "payload_too_large",
                        upstream=name,
                        attempts=0,
                    )

                async def run_once() -> StoredResponse:
                    return await self._buffered(upstream, outgoing, deadline, retryable, key)

                try:
                    return await guard.handle(
                        request,
                        body.data or b"",
                        name,
                        run_once,
                        error_fields={"upstream": name, "attempts": 0},
                    )
                except NotRun as refused:
                    return refused.response
        return await self._streamed(request, upstream, outgoing, deadline, retryable, key, body)

    async def _streamed(
        self,
        request: web.Request,
        upstream: Upstream,
        outgoing: OutgoingRequest,
        deadline: Deadline,
        retryable: bool,
        key: str,
        body: RequestBody,
    ) -> web.StreamResponse:
        """The usual path: the upstream's answer streamed to the client as it comes."""
        name = upstream.name
        result = await upstream.call(outgoing, deadline, retryable=retryable)
        try:
            outcome = result.outcome
            if body.too_large is not None:
                upstream.finished(result, None)
                await discard_response(outcome)
                return json_error(
                    413,
                    str(body.too_large),
                    "payload_too_large",
                    upstream=name,
                    attempts=result.attempts,
                )
            fallback = upstream.fallback_for(result, request.method, key)
            upstream.finished(result, fallback)
            if fallback is not None:
                await discard_response(outcome)
                return fallback_response(fallback, result.attempts)
            if outcome.is_response:
                upstream.remember_good(
                    request.method,
                    key,
                    outcome.response,
                    personal="Authorization" in request.headers or "Cookie" in request.headers,
                )
                return await send_upstream_response(
                    request,
                    outcome.response,
                    {"X-Sidecar-Attempts": str(result.attempts)},
                    deadline.remaining(),
                )
            return outcome_error(name, outcome, result.attempts)
        finally:
            result.release()

    async def _buffered(
        self,
        upstream: Upstream,
        outgoing: OutgoingRequest,
        deadline: Deadline,
        retryable: bool,
        key: str,
    ) -> StoredResponse:
        """The idempotent path: the whole answer read, so it can be stored and replayed.

        A call that never reached the upstream (open breaker, full bulkhead, no
        connection) raises NotRun, so the key is given back and a repeat may run.
        """
        name = upstream.name
        result = await upstream.call(outgoing, deadline, retryable=retryable)
        try:
            outcome = result.outcome
            fallback = upstream.fallback_for(result, outgoing.method, key)
            upstream.finished(result, fallback)
            if fallback is not None:
                await discard_response(outcome)
                raise NotRun(fallback_response(fallback, result.attempts))
            if outcome.is_response:
                response = outcome.response
                try:
                    async with asyncio.timeout(deadline.remaining() or 0.001):
                        data = await response.read()
                except (TimeoutError, aiohttp.ClientError) as exc:
                    # the answer broke off: it happened upstream, so it is kept as such
                    broken = (
                        Outcome(Kind.TIMEOUT)
                        if isinstance(exc, TimeoutError)
                        else classify_error(exc)
                    )
                    error = outcome_error(name, broken, result.attempts)
                    assert isinstance(error.body, bytes)
                    return StoredResponse(error.status, list(error.headers.items()), error.body)
                headers = list(client_response_headers(response).items())
                headers.append(("X-Sidecar-Attempts", str(result.attempts)))
                return StoredResponse(response.status, headers, data)
            error = outcome_error(name, outcome, result.attempts)
            if outcome.kind in NEVER_SENT or result.attempts == 0:
                raise NotRun(error)
            assert isinstance(error.body, bytes)
            return StoredResponse(error.status, list(error.headers.items()), error.body)
        finally:
            result.release()
