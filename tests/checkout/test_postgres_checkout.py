"""`POST /checkout` with every store on PostgreSQL: the shipped config and the simulator,
as in test_checkout_flow.py, with `store: postgresql://...` in a schema of its own.

Besides the saga's answers, this checks what only a shared database can do: the key's
claim and the checkout's first journal record commit in one transaction, so a failure
between them (here, a trigger that refuses the journal insert) leaves neither row and
nothing called upstream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

from proxy.idempotency.store import ClaimResult, JointClaims
from proxy.simulator import start_simulator
from proxy.storage.joint import JointInsert
from tests.checkout.conftest import Rig, new_key, sidecar_config, simulator_config
from tests.postgres import PG_URL, fresh_schema, row_count, schema_url


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    async with fresh_schema() as name:
        yield name


@pytest.fixture
async def pg_rig(start_sidecar: Any, schema: str, tmp_path: Path) -> AsyncIterator[Rig]:
    async with await start_simulator(simulator_config()) as sim:
        sidecar, url = await start_sidecar(sidecar_config(sim, schema_url(schema)))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
            yield Rig(sim, sidecar, url, http)


def _spy_on_joint_claims(rig: Rig) -> list[ClaimResult]:
    """Record what every joint claim of the sidecar's idempotency store answered."""
    store = rig.sidecar.durable.store
    assert isinstance(store, JointClaims)
    results: list[ClaimResult] = []
    claim_joint = store.claim_joint

    async def spy(key: str, fingerprint: str, ttl: float, insert: JointInsert) -> ClaimResult:
        result = await claim_joint(key, fingerprint, ttl, insert)
        results.append(result)
        return result

    store.claim_joint = spy  # type: ignore[method-assign]
    return results


async def test_a_confirmed_checkout_claims_and_journals_in_one_transaction_and_replays(
    pg_rig: Rig, order: dict[str, Any], schema: str
) -> None:
    joint = _spy_on_joint_claims(pg_rig)
    key = new_key()

    first = await pg_rig.checkout(order, key=key)
    again = await pg_rig.checkout(order, key=key)

    assert first.status == 200, first.raw
    assert first.json()["status"] == "confirmed"
    assert [result.joint for result in joint] == [True, False]  # the repeat found it done
    assert again.raw == first.raw and again.headers["Idempotent-Replayed"] == "true"
    ledger = pg_rig.ledger()
    assert len(ledger["authorizations"]) == 1 and len(ledger["captures"]) == 1
    await pg_rig.drained()
    assert await row_count(schema, "checkout_journal") == 1


async def test_a_declined_card_is_rejected_and_undone_through_the_postgresql_queue(
    pg_rig: Rig, order: dict[str, Any]
) -> None:
    order["card"] = "declined"

    reply = await pg_rig.checkout(order)

    assert reply.status == 409, reply.raw
    assert reply.json()["failed_steps"] == ["payment"]
    await pg_rig.drained()
    ledger = pg_rig.ledger()
    assert all(r["status"] == "released" for r in ledger["reservations"].values())
    assert ledger["authorizations"] == {} and ledger["captures"] == []


async def test_same_key_with_another_body_is_422_and_a_bad_request_gives_its_key_back(
    pg_rig: Rig, order: dict[str, Any]
) -> None:
    key = new_key()
    bad = {k: v for k, v in order.items() if k != "card"}
    refused = await pg_rig.checkout(bad, key=key)
    assert refused.status == 400, refused.raw  # validated before the claim: nothing kept

    assert (await pg_rig.checkout(order, key=key)).status == 200
    reused = await pg_rig.checkout({**order, "amount": order["amount"] + 1}, key=key)
    assert reused.status == 422
    assert reused.json()["reason"] == "idempotency_key_reused"


async def test_a_journal_insert_that_fails_after_the_claim_leaves_neither_row(
    pg_rig: Rig, order: dict[str, Any], schema: str
) -> None:
    joint = _spy_on_joint_claims(pg_rig)
    async with await psycopg.AsyncConnection.connect(PG_URL, autocommit=True) as conn:
        await conn.execute(
            f'CREATE FUNCTION "{schema}".refuse() RETURNS trigger LANGUAGE plpgsql AS'
            " $$ BEGIN RAISE EXCEPTION 'journal insert refused by the test'; END $$"
        )
        await conn.execute(
            f'CREATE TRIGGER refuse BEFORE INSERT ON "{schema}".checkout_journal'
            f' FOR EACH ROW EXECUTE FUNCTION "{schema}".refuse()'
        )
    key = new_key()

    refused = await pg_rig.checkout(order, key=key)

    assert refused.status == 503, refused.raw
    assert refused.json()["reason"] == "store_unavailable"
    assert joint == []  # the claim itself failed: its insert was rolled back with the record
    assert await row_count(schema, "idempotency_records") == 0
    assert await row_count(schema, "checkout_journal") == 0
    assert sum(pg_rig.hits(name) for name in ("payment", "inventory")) == 0

    async with await psycopg.AsyncConnection.connect(PG_URL, autocommit=True) as conn:
        await conn.execute(f'DROP TRIGGER refuse ON "{schema}".checkout_journal')
    again = await pg_rig.checkout(order, key=key)
    assert again.status == 200, again.raw
    assert [result.joint for result in joint] == [True]
