"""A generic durable job: one upstream call, through the same pipeline as every other.

For work that must reach an upstream eventually but belongs to no checkout (an
operator's re-drive, an integration that queues a call): the job is repeated until
it succeeds. It carries its own Idempotency-Key, so repeating it is safe; a refusal
(`rules.is_refusal`: a 4xx that is not "come back later") means retrying cannot
help, and the job is dead-lettered for a person to look at. (The checkout's own
commits and compensations are `checkout_action` jobs, which re-read their journal
record: `proxy.checkout.jobs`.)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from multidict import CIMultiDict
from yarl import URL

from proxy.client import BrokenBody, OutgoingRequest
from proxy.jobs.queue import Job
from proxy.jobs.worker import PermanentFailure
from proxy.resilience.rules import is_refusal, may_send_twice
from proxy.upstreams import Upstream

UPSTREAM_CALL = "upstream_call"


def upstream_call_job(
    job_id: str,
    upstream: str,
    method: str,
    path: str,
    *,
    json_body: Any = None,
    headers: dict[str, str] | None = None,
    ok_statuses: list[int] | None = None,
    trace: dict[str, str] | None = None,
) -> Job:
    """A durable call to an upstream; `job_id` is its dedupe key (use the idempotency key).

    `ok_statuses` are answers besides 2xx that mean done (a 404 for a DELETE, say).
    """
    payload: dict[str, Any] = {
        "upstream": upstream,
        "method": method,
        "path": path,
        "json": json_body,
        "headers": headers or {},
        "ok_statuses": ok_statuses or [],
    }
    return Job(type=UPSTREAM_CALL, payload=payload, id=job_id, trace=trace)


class UpstreamCallHandler:
    """Runs `upstream_call` jobs; `upstreams` resolves a name in the config in force."""

    def __init__(self, upstreams: Callable[[str], Upstream | None]) -> None:
        self._upstreams = upstreams

    async def __call__(self, job: Job) -> None:
        payload = job.payload
        name = payload["upstream"]
        upstream = self._upstreams(name)
        if upstream is None:
            raise PermanentFailure(f"no upstream named {name!r} in the config")
        headers: CIMultiDict[str] = CIMultiDict(payload.get("headers") or {})
        body = None
        if payload.get("json") is not None:
            body = json.dumps(payload["json"]).encode()
            headers.setdefault("Content-Type", "application/json")
        url = URL(upstream.base_url + payload["path"], encoded=True)
        method = payload["method"]
        request = OutgoingRequest(method, url, headers, body)
        retryable = may_send_twice(method, "Idempotency-Key" in headers, True)
        async with upstream.call(request, upstream.deadline(), retryable=retryable) as call:
            outcome = call.outcome
            response = call.response
            if response is None:
                raise RuntimeError(f"{name}: {outcome.reason} {outcome.detail}")
            status = outcome.status
            if 200 <= status < 300 or status in payload.get("ok_statuses", ()):
                return
            if is_refusal(status, outcome.retry_after):
                raise PermanentFailure(f"{name} answered {status}: {await _text_of(response)}")
            raise RuntimeError(f"{name} answered {status}")


async def _text_of(response: Any) -> str:
    """The start of a refusal's body, for the dead letter's error."""
    try:
        return (await response.read())[:500].decode(errors="replace")
    except BrokenBody:
        return ""
