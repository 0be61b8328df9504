"""The jobs a checkout queues render from the record its process decided, not a re-read.

An async step (fraud screening) and a notification (the email) may only use the request
and the sync steps' results, which the decision fixed; the process that decided the
checkout holds that record (`DecidedRecords`), so its jobs need no journal read. A job
whose record is not held reads the journal, as one in another replica does.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from proxy.checkout.decided import DecidedRecords
from proxy.checkout.journal import CheckoutRecord
from tests.checkout.conftest import Rig, eventually
from tests.checkout.test_checkout_flow import topics


def _decided(checkout_id: str) -> CheckoutRecord:
    return CheckoutRecord(id=checkout_id, key=checkout_id, state="decided", decision="confirmed")


def test_it_keeps_the_latest_records_up_to_its_limit() -> None:
    decided = DecidedRecords(limit=2)
    for name in ("a", "b", "c"):
        decided.keep(_decided(name))

    assert decided.get("a") is None
    assert decided.get("b") is not None
    assert decided.get("c") is not None
    assert len(decided) == 2


def test_keeping_a_record_again_makes_it_the_newest() -> None:
    decided = DecidedRecords(limit=2)
    decided.keep(_decided("a"))
    decided.keep(_decided("b"))
    decided.keep(_decided("a"))
    decided.keep(_decided("c"))

    assert decided.get("a") is not None
    assert decided.get("b") is None


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        DecidedRecords(limit=0)


def _count_reads(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    journal = rig.sidecar.runtime.flow.journal  # type: ignore[union-attr]
    reads: Counter[str] = Counter()
    get = journal.get

    async def counted(checkout_id: str) -> Any:
        reads[checkout_id] += 1
        return await get(checkout_id)

    monkeypatch.setattr(journal, "get", counted)
    return reads


async def _confirmed_and_its_jobs_run(rig: Rig, order: dict[str, Any]) -> str:
    """A confirmed checkout's id, once its email went out and its queue drained."""
    reply = await rig.checkout(order)
    assert reply.status == 200, reply.raw

    async def emailed() -> bool:
        return bool(topics(rig, "email"))

    await eventually(emailed)
    await rig.drained()
    return str(reply.json()["checkout_id"])


async def test_the_fraud_screening_and_email_jobs_do_not_read_the_journal(
    rig: Rig, order: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = _count_reads(rig, monkeypatch)

    checkout_id = await _confirmed_and_its_jobs_run(rig, order)

    assert rig.hits("fraud") == 1
    assert reads[checkout_id] == 0
    # the screening's verdict is journalled all the same
    fraud = (await rig.poll(checkout_id))["steps"]["fraud"]
    assert fraud["status"] == "ok"


async def test_a_job_whose_record_this_process_does_not_hold_reads_the_journal(
    rig: Rig, order: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    flow = rig.sidecar.runtime.flow
    assert flow is not None
    monkeypatch.setattr(flow.decided, "keep", lambda record: None)  # as in another replica
    reads = _count_reads(rig, monkeypatch)

    checkout_id = await _confirmed_and_its_jobs_run(rig, order)

    [email] = topics(rig, "email")
    assert email["body"] == {"checkout_id": checkout_id, "customer": order["customer"]}
    assert reads[checkout_id] == 2  # the screening and the email, one read each


async def test_a_screening_whose_record_the_journal_lost_is_dead_lettered_at_once(
    rig: Rig, order: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its call rendered from the record this process holds, the screening finds no
    record to write its verdict to: that will not change, so it is not retried for
    the queue's 20 attempts."""
    journal = rig.sidecar.runtime.flow.journal  # type: ignore[union-attr]
    set_step = journal.set_step

    async def lost(checkout_id: str, step: str, result: dict[str, Any]) -> None:
        if step == "fraud":
            raise KeyError(checkout_id)  # as every journal does for a record it has not
        await set_step(checkout_id, step, result)

    monkeypatch.setattr(journal, "set_step", lost)
    reply = await rig.checkout(order)
    assert reply.status == 200, reply.raw

    async def buried() -> bool:
        return bool(await rig.dead_letters())

    await eventually(buried)
    [job] = await rig.dead_letters()
    assert job.id.endswith(":fraud:async") and job.attempts == 1
    assert "is not in the journal" in str(job.last_error)
