"""On the answer's path, the calls that make the answer wait for nothing beside them.

The sidecar runs on one event loop, and a task runs only when the code before it
yields: whatever is started first delays the others' requests by its own work. So
the read-only steps send their requests before the key's claim and first record are
written, and the commits send theirs before the follow-up jobs are queued. Each
store's write being built (on PostgreSQL a statement quoted and sent) came first
before, and delayed the answer's slowest call by that much. Among calls started
together, the one expected to answer last goes first (`CallOrder`). These tests
record, in order, the upstream calls made and the store work begun.
"""

from __future__ import annotations

from typing import Any

import pytest

from proxy.checkout import flow as flow_module
from tests.checkout.conftest import Rig, new_key


def _record_calls(monkeypatch: pytest.MonkeyPatch, key: str, seen: list[str]) -> None:
    """Append each upstream call's part of the Idempotency-Key (`coupon`,
    `payment:commit`) to `seen` as it is made."""
    real = flow_module.call_json

    async def recorded(
        upstream: Any, call: Any, call_key: str | None, *args: Any, **kw: Any
    ) -> Any:
        if call_key is not None and call_key.startswith(key + ":"):
            seen.append(call_key[len(key) + 1 :])
        return await real(upstream, call, call_key, *args, **kw)

    monkeypatch.setattr(flow_module, "call_json", recorded)


def _record_start(
    monkeypatch: pytest.MonkeyPatch, owner: Any, method: str, seen: list[str], mark: str
) -> None:
    """Append `mark` to `seen` whenever `owner.method` (a coroutine method) is begun."""
    real = getattr(owner, method)

    async def recorded(*args: Any, **kwargs: Any) -> Any:
        seen.append(mark)
        return await real(*args, **kwargs)

    monkeypatch.setattr(owner, method, recorded)


async def _checkout_in_order(
    rig: Rig, order: dict[str, Any], monkeypatch: pytest.MonkeyPatch, seen: list[str]
) -> list[str]:
    """Run one checkout to a 200, its upstream calls appended to `seen` (after any
    marks `_record_start` puts there) in the order they were made; `seen` back."""
    key = new_key()
    _record_calls(monkeypatch, key, seen)
    reply = await rig.checkout(order, key=key)
    assert reply.status == 200, reply.raw
    return seen


async def test_the_read_only_steps_call_before_the_claim_is_begun(
    rig: Rig, order: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    guard = rig.sidecar.runtime.guard
    assert guard is not None
    seen: list[str] = []
    _record_start(monkeypatch, guard, "handle_joint", seen, "claim")

    await _checkout_in_order(rig, order, monkeypatch, seen)

    assert set(seen[:2]) == {"shipping", "coupon"} and seen[2] == "claim", seen
    assert {"payment", "inventory"} <= set(seen[3:]), "the acting steps wait for the claim"


async def test_the_commits_call_before_the_follow_up_jobs_are_queued(
    rig: Rig, order: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    flow = rig.sidecar.runtime.flow
    assert flow is not None
    seen: list[str] = []
    _record_start(monkeypatch, flow, "enqueue_after", seen, "enqueue")

    await _checkout_in_order(rig, order, monkeypatch, seen)

    queued = seen.index("enqueue")
    assert queued > seen.index("payment:commit") and queued > seen.index("inventory:commit"), seen
    await rig.drained(seconds=10)
    assert rig.hits("fraud") >= 1, "the follow-up jobs were queued all the same"


@pytest.mark.parametrize("slow", ["shipping", "coupon"])
async def test_the_step_expected_to_answer_last_calls_first(
    rig: Rig, order: dict[str, Any], monkeypatch: pytest.MonkeyPatch, slow: str
) -> None:
    flow = rig.sidecar.runtime.flow
    assert flow is not None
    fast = {"shipping": "coupon", "coupon": "shipping"}[slow]
    flow.call_order.observe(slow, 1.0)
    flow.call_order.observe(fast, 0.01)

    seen = await _checkout_in_order(rig, order, monkeypatch, [])

    assert seen[:2] == [slow, fast], seen


@pytest.mark.parametrize("slow", ["payment", "inventory"])
async def test_the_commit_expected_to_answer_last_calls_first(
    rig: Rig, order: dict[str, Any], monkeypatch: pytest.MonkeyPatch, slow: str
) -> None:
    flow = rig.sidecar.runtime.flow
    assert flow is not None
    fast = {"payment": "inventory", "inventory": "payment"}[slow]
    flow.call_order.observe(f"{slow}:commit", 1.0)
    flow.call_order.observe(f"{fast}:commit", 0.01)

    seen = await _checkout_in_order(rig, order, monkeypatch, [])

    assert [call for call in seen if call.endswith(":commit")] == [
        f"{slow}:commit",
        f"{fast}:commit",
    ], seen
    assert flow.call_order.expected(f"{fast}:commit") != 0.01, "what it took was learnt"
