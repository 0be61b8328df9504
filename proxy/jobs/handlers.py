"""A generic durable job: one upstream call, through the same pipeline as every other.

For work that must reach an upstream eventually but belongs to no checkout (an
operator's re-drive, an integration that queues a call): the job is repeated until
it succeeds. It carries its own Idempotency-Key, so repeating it is safe; a 4xx
answer means retrying cannot help, and the job is dead-lettered for a person to
look at. (The checkout's own commits and compensations are `checkout_action` jobs,
which re-read their journal record: `proxy.checkout.jobs`.)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from multidict import CIMultiDict
from yarl import URL

from proxy.jobs.queue import Job
from proxy.jobs.worker import PermanentFailure
from proxy.upstreams import OutgoingRequest, Upstream, discard_response

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
    context: dict[str, Any] | None = None,
) -> Job:
    """A durable call to an upstream; `job_id` is its dedupe key (use the idempotency key)."""
    payload: dict[str, Any] = {
        "upstream": upstream,
        "method": method,
        "path": path,
        "json": json_body,
        "headers": headers or {},
        "ok_statuses": ok_statuses or [],
        "context": context or {},
    }
    return Job(type=UPSTREAM_CALL, payload=payload, id=job_id, trace=trace)


class UpstreamCallHandler:
    """Runs `upstream_call` jobs; `upstreams` resolves a name in the config in force."""

    def __init__(
        self,
        upstreams: Callable[[str], Upstream | None],
        on_success: Callable[[Job, int, Any], Any] | None = None,
    ) -> None:
        self._upstreams = upstreams
        self._on_success = on_success

    async def __call__(self, job: Job) -> None:
        payload = job.payload
        upstream = self._upstreams(payload["upstream"])
        if upstream is None:
            raise PermanentFailure(f"no upstream named {payload['upstream']!r} in the config")
        headers: CIMultiDict[str] = CIMultiDict(payload.get("headers") or {})
        body = None
        if payload.get("json") is not None:
            body = json.dumps(payload["json"]).encode()
            headers.setdefault("Content-Type", "application/json")
        url = URL(upstream.base_url + payload["path"], encoded=True)
        request = OutgoingRequest(payload["method"], url, headers, body)
        retryable = "Idempotency-Key" in headers or payload["method"] in ("GET", "PUT", "DELETE")
        result = await upstream.call(request, upstream.deadline(), retryable=retryable)
        try:
            upstream.finished(result, None)
            outcome = result.outcome
            if not outcome.is_response:
                raise RuntimeError(f"{payload['upstream']}: {outcome.reason} {outcome.detail}")
            status = outcome.status
            data = await _json_of(outcome.response)
            if 200 <= status < 300 or status in payload.get("ok_statuses", ()):
                if self._on_success is not None:
                    await _maybe_await(self._on_success(job, status, data))
                return
            if 400 <= status < 500 and status not in (408, 425, 429):
                raise PermanentFailure(f"{payload['upstream']} answered {status}: {data}")
            raise RuntimeError(f"{payload['upstream']} answered {status}")
        finally:
            await discard_response(result.outcome)
            result.release()


async def _json_of(response: Any) -> Any:
    try:
        raw = await response.read()
        return json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        return None
    except Exception:
        return None


async def _maybe_await(value: Any) -> None:
    if hasattr(value, "__await__"):
        await value
