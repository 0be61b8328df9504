"""The Idempotency-Key protocol over real HTTP, once per store backend."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from proxy.idempotency import ClaimState, IdempotencyStore

from .conftest import Backend, Harness

MakeHarness = Callable[..., Awaitable[Harness]]


async def test_first_request_runs_and_answers_with_its_response(
    store: IdempotencyStore, make_harness: MakeHarness
) -> None:
    harness = await make_harness(store)
    status, headers, body = await harness.post("key-1")
    assert status == 201
    assert json.loads(body)["order"] == 1
    assert "Idempotent-Replayed" not in headers
    assert harness.upstream.calls == 1
    assert harness.results == ["first"]


async def test_fifty_concurrent_first_requests_run_the_handler_once(
    store: IdempotencyStore, make_harness: MakeHarness
) -> None:
    harness = await make_harness(store)
    harness.upstream.delay = 0.05
    answers = await asyncio.gather(*(harness.post("same-key") for _ in range(50)))

    assert harness.upstream.calls == 1
    fresh = [a for a in answers if a[0] == 201 and "Idempotent-Replayed" not in a[1]]
    replayed = [a for a in answers if a[1].get("Idempotent-Replayed") == "true"]
    conflicts = [a for a in answers if a[0] == 409]
    assert len(fresh) == 1
    assert len(fresh) + len(replayed) + len(conflicts) == 50
    assert all(body == fresh[0][2] for _, _, body in replayed)
    assert all(
        json.loads(body)["reason"] == "idempotency_key_in_progress" for *_, body in conflicts
    )


async def test_replay_is_byte_identical_and_marked_replayed(
    store: IdempotencyStore, make_harness: MakeHarness
) -> None:
    harness = await make_harness(store)
    first_status, first_headers, first_body = await harness.post("key-1")
    status, headers, body = await harness.post("key-1")

    assert harness.upstream.calls == 1
    assert (status, body) == (first_status, first_body)
    assert headers["Idempotent-Replayed"] == "true"
    assert headers["Content-Type"] == first_headers["Content-Type"]
    assert headers["Location"] == first_headers["Location"] == "/orders/1"
    assert "X-Not-Kept" not in headers  # only headers that matter are stored
    assert harness.results == ["first", "replayed"]


async def test_repeat_while_first_is_running_gets_409_with_retry_after(
    store: IdempotencyStore, make_harness: MakeHarness
) -> None:
    harness = await make_harness(store, in_progress_timeout=60)
    harness.upstream.hold = asyncio.Event()
    first = asyncio.create_task(harness.post("key-1"))
    await asyncio.wait_for(harness.upstream.started.wait(), 5)

    status, headers, body = await harness.post("key-1")
    assert status == 409
    assert 1 <= int(headers["Retry-After"]) <= 60
    error = json.loads(body)
    assert error["reason"] == "idempotency_key_in_progress"
    assert error["error"]

    harness.upstream.hold.set()
    assert (await first)[0] == 201
    assert (await harness.post("key-1"))[1]["Idempotent-Replayed"] == "true"
    assert harness.upstream.calls == 1
    assert "conflict_in_progress" in harness.results


async def test_same_key_with_different_payload_gets_422(
    store: IdempotencyStore, make_harness: MakeHarness
) -> None:
    harness = await make_harness(store)
    await harness.post("key-1", {"item": "book"})
    status, _, body = await harness.post("key-1", {"item": "lamp"})
    assert status == 422
    assert json.loads(body)["reason"] == "idempotency_key_reused"
    assert harness.upstream.calls == 1
    assert harness.results[-1] == "mismatch"


async def test_reserialised_json_body_counts_as_the_same_payload(
    store: IdempotencyStore, make_harness: MakeHarness
) -> None:
    harness = await make_harness(store)
    await harness.post(
        "key-1", raw=b'{"a": 1, "b": [1, 2]}', headers={"Content-Type": "application/json"}
    )
    status, headers, _ = await harness.post(
        "key-1", raw=b'{"b":[1,2],\n "a":1}', headers={"Content-Type": "application/json"}
    )
    assert status == 201
    assert headers["Idempotent-Replayed"] == "true"


async def test_missing_key_gets_400_when_required(
    store: IdempotencyStore, make_harness: MakeHarness
) -> None:
    harness = await make_harness(store, required=True)
    status, _, body = await harness.post(None)
    assert status == 400
    assert json.loads(body)["reason"] == "idempotency_key_missing"
    assert harness.upstream.calls == 0
    assert harness.results == ["missing"]


async def test_missing_key_runs_every_time_when_optional(
    store: IdempotencyStore, make_harness: MakeHarness
) -> None:
    harness = await make_harness(store)
    assert (await harness.post(None))[0] == 201
    assert (await harness.post(None))[0] == 201
    assert harness.upstream.calls == 2


async def test_overlong_key_gets_400(store: IdempotencyStore, make_harness: MakeHarness) -> None:
    harness = await make_harness(store)
    status, _, body = await harness.post("k" * 256)
    assert status == 400
    assert json.loads(body)["reason"] == "idempotency_key_invalid"
    assert harness.upstream.calls == 0
    assert (await harness.post("k" * 255))[0] == 201


async def test_completed_record_expires_after_ttl(
    backend: Backend, store: IdempotencyStore, make_harness: MakeHarness
) -> None:
    harness = await make_harness(store, ttl=backend.short_ttl)
    await harness.post("key-1")

    async def runs_again() -> bool:
        status, headers, _ = await harness.post("key-1")
        return status == 201 and "Idempotent-Replayed" not in headers

    await backend.pass_time(backend.short_ttl, runs_again)
    assert harness.upstream.calls == 2


async def test_crashed_in_progress_claim_expires(backend: Backend, store: IdempotencyStore) -> None:
    timeout = backend.short_ttl
    assert (await store.claim("orphan", "fp", timeout)).state is ClaimState.CLAIMED
    # ... and the process that claimed it died: nobody calls complete().
    assert (await store.claim("orphan", "fp", timeout)).state is ClaimState.IN_PROGRESS

    async def claimable() -> bool:
        return (await store.claim("orphan", "fp", timeout)).state is ClaimState.CLAIMED

    await backend.pass_time(timeout, claimable)


async def test_crashed_request_stops_blocking_its_key_over_http(
    backend: Backend, store: IdempotencyStore, make_harness: MakeHarness
) -> None:
    harness = await make_harness(store, in_progress_timeout=backend.short_ttl)
    harness.upstream.hold = asyncio.Event()  # never set: the first request "hangs"
    stuck = asyncio.create_task(harness.post("key-1"))
    await asyncio.wait_for(harness.upstream.started.wait(), 5)
    harness.upstream.hold = None

    async def runs_again() -> bool:
        return (await harness.post("key-1"))[0] == 201

    try:
        await backend.pass_time(backend.short_ttl, runs_again)
    finally:
        stuck.cancel()
    assert harness.upstream.calls == 2


async def test_key_is_scoped_by_client_header(
    store: IdempotencyStore, make_harness: MakeHarness
) -> None:
    harness = await make_harness(store, scope_header="X-Customer-Id")
    _, _, body_a = await harness.post("shared", headers={"X-Customer-Id": "alice"})
    status, headers, body_b = await harness.post("shared", headers={"X-Customer-Id": "bob"})

    assert status == 201
    assert "Idempotent-Replayed" not in headers
    assert json.loads(body_b)["order"] == 2
    assert harness.upstream.calls == 2
    _, headers, replay_a = await harness.post("shared", headers={"X-Customer-Id": "alice"})
    assert headers["Idempotent-Replayed"] == "true"
    assert replay_a == body_a


async def test_keyed_request_without_scope_header_is_refused(
    store: IdempotencyStore, make_harness: MakeHarness
) -> None:
    harness = await make_harness(store, scope_header="X-Customer-Id")
    status, _, body = await harness.post("shared")
    assert status == 400
    assert json.loads(body)["reason"] == "idempotency_scope_missing"
    assert harness.upstream.calls == 0


async def test_key_is_scoped_by_route(store: IdempotencyStore, make_harness: MakeHarness) -> None:
    harness = await make_harness(store)
    await harness.post("key-1", path="/orders")
    status, headers, _ = await harness.post("key-1", path="/refunds")
    assert status == 201
    assert "Idempotent-Replayed" not in headers
    assert harness.upstream.calls == 2


async def test_ambiguous_5xx_outcome_is_stored_and_replayed(
    store: IdempotencyStore, make_harness: MakeHarness
) -> None:
    harness = await make_harness(store)
    harness.upstream.status = 504
    first = await harness.post("key-1")
    status, headers, body = await harness.post("key-1")
    assert (status, body) == (504, first[2])
    assert headers["Idempotent-Replayed"] == "true"
    assert harness.upstream.calls == 1


async def test_run_that_raises_gives_the_key_back(
    store: IdempotencyStore, make_harness: MakeHarness
) -> None:
    harness = await make_harness(store)
    harness.upstream.fail_next = True
    assert (await harness.post("key-1"))[0] == 500
    status, headers, _ = await harness.post("key-1")
    assert status == 201
    assert "Idempotent-Replayed" not in headers
    assert harness.upstream.calls == 2
