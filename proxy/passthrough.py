"""The proxied route: `/<upstream>/<rest>` to that upstream's URL + `/<rest>`.

The app keeps speaking plain HTTP to its upstreams and gets their answers
unchanged, only bounded by a deadline and retried where that is safe; when the
sidecar itself has to answer, the answer is JSON (`proxy.errors`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web
from multidict import istr
from yarl import URL

from proxy.client import BrokenBody, OutgoingRequest
from proxy.errors import json_error, outcome_error
from proxy.forward import (
    NO_BODY,
    IncompleteBody,
    PayloadTooLarge,
    RequestBody,
    client_response_headers,
    read_request_body,
    send_upstream_response,
    upstream_request_headers,
    whole_upstream_response,
)
from proxy.idempotency import NotRun, StoredResponse
from proxy.resilience.deadline import HEADER as TIMEOUT_HEADER
from proxy.resilience.deadline import Deadline, InvalidTimeoutHeader, parse_timeout_header
from proxy.resilience.fallback import FALLBACK_HEADER, FallbackAnswer
from proxy.resilience.outcome import Kind, Outcome
from proxy.resilience.rules import KEY_REQUIRED_METHODS, may_send_twice, never_sent
from proxy.runtime import RuntimeSource
from proxy.upstreams import Upstream

IDEMPOTENCY_HEADER = "Idempotency-Key"
_TIMEOUT_HEADER = istr(TIMEOUT_HEADER)


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
    """The handler for every proxied request, over the runtime in force."""

    def __init__(self, source: RuntimeSource) -> None:
        self.source = source

    async def handle(self, request: web.BaseRequest, name: str) -> web.StreamResponse:
        """Proxy `request` to the upstream `name` (the first segment of its path).

        The usual request (no idempotency key to guard) runs in this one coroutine,
        from the checks to the answer: one frame to resume for each event of the
        request, and no closure (a closure here would make each variable it reads a
        cell, allocated on every request); the guarded path is `_guarded`.
        """
        runtime = self.source.runtime
        upstream = runtime.upstreams.get(name)
        if upstream is None:
            return json_error(
                404,
                f"no upstream named {name!r}",
                "unknown_upstream",
                upstream=name,
                attempts=0,
                known=runtime.upstreams.names(),
            )
        incoming = request.headers
        timeout_header = incoming.get(_TIMEOUT_HEADER)
        try:
            requested = None if timeout_header is None else parse_timeout_header(timeout_header)
        except InvalidTimeoutHeader as exc:
            return json_error(400, str(exc), "bad_request", upstream=name, attempts=0)

        config = upstream.config
        deadline = upstream.deadline(requested)
        if not request.body_exists:
            body = NO_BODY  # nothing to wait for: no timer
        else:
            try:
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

        method = request.method
        raw_path = request.raw_path
        headers = upstream_request_headers(request)
        if body.length is not None and not body.replayable:
            headers["Content-Length"] = str(body.length)
        key = raw_path[len(name) + 1 :]
        outgoing = OutgoingRequest(
            method, upstream_url(upstream.base_url, raw_path, name), headers, body.data
        )
        has_key = runtime.config.idempotency.header in incoming
        retryable = may_send_twice(method, has_key, body.replayable)
        hedge = upstream.may_hedge(method, has_key, body.replayable)
        if method in KEY_REQUIRED_METHODS:
            guarded = await self._guarded(
                request, upstream, outgoing, deadline, retryable, key, body, hedge, has_key
            )
            if guarded is not None:
                return guarded

        # the usual path: the upstream's answer streamed to the client as it comes
        async with upstream.call(
            outgoing, deadline, retryable=retryable, fallback_key=key, hedge=hedge
        ) as call:
            if body.too_large is not None:
                return json_error(
                    413,
                    str(body.too_large),
                    "payload_too_large",
                    upstream=name,
                    attempts=call.attempts,
                )
            fallback = call.fallback
            if fallback is not None:
                return fallback_response(fallback, call.attempts)
            response = call.response
            if response is None:
                return outcome_error(name, call.outcome, call.attempts)
            call.keep_for_stale(incoming)
            whole = whole_upstream_response(request, response, call.attempts)
            if whole is not None:
                return whole  # read inside the attempt: nothing left to wait for
            return await send_upstream_response(
                request, response, call.attempts, deadline.remaining()
            )

    async def _guarded(
        self,
        request: web.BaseRequest,
        upstream: Upstream,
        outgoing: OutgoingRequest,
        deadline: Deadline,
        retryable: bool,
        key: str,
        body: RequestBody,
        hedge: bool,
        has_key: bool,
    ) -> web.StreamResponse | None:
        """A POST or PATCH: refused without the key an upstream requires, run once per
        key through the idempotency guard when it has one; None lets it go the usual way."""
        name = upstream.name
        runtime = self.source.runtime
        key_header = runtime.config.idempotency.header
        if not has_key and name in runtime.config.idempotency.required_for:
            return json_error(
                400,
                f"POST and PATCH to {name!r} require an {key_header} header",
                "idempotency_key_missing",
                upstream=name,
                attempts=0,
                header=key_header,
            )
        guard = runtime.guard
        if not (has_key and upstream.config.idempotency and guard is not None):
            return None
        if not body.replayable:
            return json_error(
                413,
                "a request with an idempotency key must fit in retry.buffer_limit "
                f"({upstream.config.retry.buffer_limit} bytes) so its fingerprint can be kept",
                "payload_too_large",
                upstream=name,
                attempts=0,
            )

        assert not isinstance(body.data, AsyncIterator)  # replayable: bytes or None

        async def run_once() -> StoredResponse:
            return await self._buffered(upstream, outgoing, deadline, retryable, key, hedge)

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

    async def _buffered(
        self,
        upstream: Upstream,
        outgoing: OutgoingRequest,
        deadline: Deadline,
        retryable: bool,
        key: str,
        hedge: bool,
    ) -> StoredResponse:
        """The idempotent path: the whole answer read, so it can be stored and replayed.

        A call that never reached the upstream (open breaker, full bulkhead, no
        connection) raises NotRun, so the key is given back and a repeat may run.
        """
        name = upstream.name
        async with upstream.call(
            outgoing, deadline, retryable=retryable, fallback_key=key, hedge=hedge
        ) as call:
            outcome = call.outcome
            fallback = call.fallback
            if fallback is not None:
                raise NotRun(fallback_response(fallback, call.attempts))
            response = call.response
            if response is not None:
                try:
                    async with asyncio.timeout(deadline.remaining() or 0.001):
                        data = await response.read()
                except (TimeoutError, BrokenBody) as exc:
                    # the answer broke off: it happened upstream, so it is kept as such
                    broken = (
                        exc.outcome
                        if isinstance(exc, BrokenBody)
                        else Outcome(Kind.TIMEOUT, detail="the body did not arrive in time")
                    )
                    return _kept(outcome_error(name, broken, call.attempts))
                headers = list(client_response_headers(response).items())
                headers.append(("X-Sidecar-Attempts", str(call.attempts)))
                return StoredResponse(response.status, headers, data)
            error = outcome_error(name, outcome, call.attempts)
            if never_sent(outcome) or call.attempts == 0:
                raise NotRun(error)
            return _kept(error)


def _kept(error: web.Response) -> StoredResponse:
    """The sidecar's own error answer as it is stored for replay."""
    assert isinstance(error.body, bytes)
    return StoredResponse(error.status, list(error.headers.items()), error.body)
