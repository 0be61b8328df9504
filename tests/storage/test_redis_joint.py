"""The idempotency store and the checkout journal on one Redis: the key's claim and the
checkout's first record in one script (both or neither), the key's answer in the
journal's final script, and the two-step fallback when their keys may not share a
script (another server or db, or prefixes with different hash tags).

Runs against the real Redis at 127.0.0.1:6379, every test under prefixes of its own.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from proxy.checkout.journal import CheckoutRecord, JointJournal, Journal
from proxy.checkout.states import CheckoutState
from proxy.idempotency.store import (
    ClaimState,
    IdempotencyStore,
    JointClaims,
    JointCompletes,
    StoredResponse,
)
from proxy.storage.errors import StoreUnavailable
from proxy.storage.joint import JointScript
from proxy.storage.open import open_idempotency_store, open_journal
from proxy.storage.redis import (
    hash_tag,
    joint_space,
    sequence_call,
    sequence_source,
    server_of,
)

REDIS = "redis://127.0.0.1:6379"
RESPONSE = StoredResponse(200, [("Content-Type", "application/json")], b'{"ok":true}')


@dataclass
class Pair:
    store: IdempotencyStore
    journal: Journal
    store_prefix: str
    journal_prefix: str


@pytest.fixture
async def redis() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(f"{REDIS}/0", socket_connect_timeout=0.5)
    try:
        await client.ping()
    except OSError:
        pytest.skip("no Redis at 127.0.0.1:6379")
    yield client
    await client.aclose()


@pytest.fixture
async def opened(redis: aioredis.Redis) -> AsyncIterator[list[Pair]]:
    """Opens pairs on request and deletes every key they wrote."""
    pairs: list[Pair] = []
    yield pairs
    for pair in pairs:
        await pair.store.close()
        await pair.journal.close()
        for prefix in (pair.store_prefix, pair.journal_prefix):
            async for name in redis.scan_iter(match=f"{prefix}*"):
                await redis.delete(name)


async def _pair(
    opened: list[Pair],
    store_prefix: str,
    journal_prefix: str,
    *,
    store_db: int = 0,
) -> Pair:
    store = open_idempotency_store(f"{REDIS}/{store_db}?prefix={store_prefix}")
    journal = await open_journal(f"{REDIS}/0?prefix={journal_prefix}")
    pair = Pair(store, journal, store_prefix, journal_prefix)
    opened.append(pair)
    return pair


def _unique() -> str:
    return f"test-joint-{uuid.uuid4().hex}"


async def _joint_pair(opened: list[Pair], tag: str = "") -> Pair:
    run = _unique()
    tagged = f"{{{tag}}}" if tag else ""
    return await _pair(opened, f"{run}{tagged}:idem:", f"{run}{tagged}:journal:")


async def test_one_script_claims_the_key_and_inserts_the_record(opened: list[Pair]) -> None:
    pair = await _joint_pair(opened)
    store, journal = pair.store, pair.journal
    assert isinstance(store, JointClaims) and isinstance(journal, JointJournal)
    insert = journal.joint_create(CheckoutRecord(id="chk-1", key="k"))
    assert store.accepts(insert)

    claimed = await store.claim_joint("k", "fp", 60, insert)

    assert claimed.state is ClaimState.CLAIMED and claimed.joint
    record = await journal.get("chk-1")
    assert record is not None and record.key == "k"
    assert [r.id for r in await journal.unfinished(older_than=-60)] == ["chk-1"]
    busy = await store.claim_joint("k", "fp", 60, insert)
    assert busy.state is ClaimState.IN_PROGRESS and not busy.joint


async def test_a_taken_key_inserts_no_record(opened: list[Pair]) -> None:
    pair = await _joint_pair(opened)
    store, journal = pair.store, pair.journal
    assert isinstance(store, JointClaims) and isinstance(journal, JointJournal)
    assert (await store.claim("k", "fp", 60)).state is ClaimState.CLAIMED

    taken = await store.claim_joint(
        "k", "other", 60, journal.joint_create(CheckoutRecord("c", key="k"))
    )

    assert taken.state is ClaimState.MISMATCH and not taken.joint
    assert await journal.get("c") is None
    assert await journal.unfinished(older_than=-60) == []


async def test_a_record_already_there_is_claimed_but_not_inserted_again(
    opened: list[Pair],
) -> None:
    pair = await _joint_pair(opened)
    store, journal = pair.store, pair.journal
    assert isinstance(store, JointClaims) and isinstance(journal, JointJournal)
    assert await journal.create(CheckoutRecord(id="chk-1", key="first"))

    claimed = await store.claim_joint(
        "k", "fp", 60, journal.joint_create(CheckoutRecord("chk-1", key="k"))
    )

    assert claimed.state is ClaimState.CLAIMED and not claimed.joint  # run(False) resumes it
    record = await journal.get("chk-1")
    assert record is not None and record.key == "first"


async def test_an_insert_that_fails_leaves_neither_the_claim_nor_the_record(
    opened: list[Pair], redis: aioredis.Redis
) -> None:
    pair = await _joint_pair(opened)
    store, journal = pair.store, pair.journal
    assert isinstance(store, JointClaims) and isinstance(journal, JointJournal)
    # the unfinished set's key holds a string: the record's insert fails in Redis
    await redis.set(f"{pair.journal_prefix}unfinished", "not a sorted set")
    insert = journal.joint_create(CheckoutRecord(id="chk-1", key="k"))

    with pytest.raises(StoreUnavailable):
        await store.claim_joint("k", "fp", 60, insert)

    assert await redis.exists(f"{pair.store_prefix}k") == 0
    assert await redis.exists(f"{pair.journal_prefix}checkout:chk-1") == 0
    await redis.delete(f"{pair.journal_prefix}unfinished")
    assert (await store.claim_joint("k", "fp", 60, insert)).joint  # the key was free


async def test_a_script_error_in_the_insert_leaves_the_key_free(
    opened: list[Pair], redis: aioredis.Redis
) -> None:
    pair = await _joint_pair(opened)
    store = pair.store
    assert isinstance(store, JointClaims)
    space = joint_space(redis, pair.store_prefix)
    assert space is not None
    broken = JointScript(space, "return redis.call('NO_SUCH_COMMAND')", (), keys=())

    with pytest.raises(StoreUnavailable):
        await store.claim_joint("k", "fp", 60, broken)

    assert (await store.claim("k", "fp", 60)).state is ClaimState.CLAIMED


async def test_the_final_write_keeps_the_keys_answer_in_the_same_script(
    opened: list[Pair],
) -> None:
    pair = await _joint_pair(opened, tag="shop")
    store, journal = pair.store, pair.journal
    assert isinstance(store, JointClaims) and isinstance(store, JointCompletes)
    assert isinstance(journal, JointJournal)
    await store.claim_joint("k", "fp", 60, journal.joint_create(CheckoutRecord("chk-1", key="k")))

    statements = store.joint_complete("k", "fp", RESPONSE, 3600)
    assert statements and all(journal.accepts(s) for s in statements)
    answer = {"status": 200, "body": {"ok": True}, "headers": {}}
    assert await journal.conclude("chk-1", {}, answer, joint=statements)

    replay = await store.claim("k", "fp", 60)
    assert replay.state is ClaimState.COMPLETED and replay.response == RESPONSE
    record = await journal.get("chk-1")
    assert record is not None and record.state == CheckoutState.FINAL
    assert record.response == answer


@pytest.mark.parametrize(
    ("store_prefix", "journal_prefix", "store_db"),
    [
        ("{a}:idem:", "{b}:journal:", 0),  # two slots in Redis Cluster
        ("{a}:idem:", "journal:", 0),  # one tagged, one not
        ("{a:idem:", "{a:journal:", 0),  # tags left open: they depend on each key
        ("idem:", "journal:", 1),  # another db
    ],
)
async def test_stores_whose_keys_may_not_share_a_script_write_apart(
    opened: list[Pair], store_prefix: str, journal_prefix: str, store_db: int
) -> None:
    run = _unique()
    pair = await _pair(opened, run + store_prefix, run + journal_prefix, store_db=store_db)
    store, journal = pair.store, pair.journal
    assert isinstance(store, JointClaims) and isinstance(store, JointCompletes)
    assert isinstance(journal, JointJournal)

    assert not store.accepts(journal.joint_create(CheckoutRecord("chk-1", key="k")))
    assert not any(journal.accepts(s) for s in store.joint_complete("k", "fp", RESPONSE, 60))
    with pytest.raises(ValueError):
        await store.claim_joint(
            "k", "fp", 60, journal.joint_create(CheckoutRecord("chk-1", key="k"))
        )


async def test_stores_on_another_server_write_apart(opened: list[Pair]) -> None:
    run = _unique()
    store = open_idempotency_store(f"redis://localhost:6379/0?prefix={run}:idem:")
    journal = await open_journal(f"{REDIS}/0?prefix={run}:journal:")
    opened.append(Pair(store, journal, f"{run}:idem:", f"{run}:journal:"))
    assert isinstance(store, JointClaims) and isinstance(journal, JointJournal)
    # localhost and 127.0.0.1 may be one server, but nothing here can tell: apart is safe
    assert not store.accepts(journal.joint_create(CheckoutRecord("chk-1", key="k")))


def test_hash_tags_of_prefixes() -> None:
    assert hash_tag("checkout-sidecar:journal:") == ""
    assert hash_tag("{shop}:journal:") == "shop"
    assert hash_tag("x{shop}y{z}:") == "shop"
    assert hash_tag("{}:journal:") == ""
    assert hash_tag("{shop:journal:") is None


async def test_a_sequence_runs_each_part_on_its_own_keys_and_args(
    redis: aioredis.Redis,
) -> None:
    run = _unique()
    first = "redis.call('SET', KEYS[1], ARGV[1]) return #KEYS + #ARGV"
    second = "redis.call('SET', KEYS[1], ARGV[1] .. ARGV[2]) return 99"
    keys, args = sequence_call([([f"{run}:a"], ["1"]), ([f"{run}:b"], ["x", "y"])])
    try:
        result = await redis.eval(sequence_source([first, second]), len(keys), *keys, *args)
        assert result == 2
        assert await redis.mget(f"{run}:a", f"{run}:b") == [b"1", b"xy"]
    finally:
        await redis.delete(f"{run}:a", f"{run}:b")


async def test_any_text_survives_the_packed_script_arguments(opened: list[Pair]) -> None:
    """Lists travel to the scripts as one JSON array each (cjson in Redis): names and
    values beyond ASCII, quotes, backslashes and control characters come back as sent."""
    pair = await _joint_pair(opened)
    journal = pair.journal
    odd = 'é 😀 "q" \\ \x00 \n ☃'
    steps = {f"pay-{odd}": {odd: [odd, 1.5, None, {}], "empty": []}, "none": {}}
    pending = {f"a-{odd}": {"step": f"pay-{odd}", "action": odd}}
    assert await journal.create(CheckoutRecord("chk-1", key=odd, request={"body": odd}))

    record = await journal.update("chk-1", state="committing", steps=steps, pending=pending)

    stored = await journal.get("chk-1")
    assert stored == record
    assert record.steps == steps and record.pending == pending
    assert record.key == odd and record.request == {"body": odd}
    answer = {"status": 200, "body": {odd: odd}, "headers": {}}
    resolved = {f"a-{odd}": (f"pay-{odd}", {"done": odd})}
    assert await journal.conclude("chk-1", resolved, answer)
    final = await journal.get("chk-1")
    assert final is not None and final.response == answer and final.pending == {}
    assert final.steps[f"pay-{odd}"]["done"] == odd


@pytest.mark.parametrize(
    ("url", "server"),
    [
        ("redis://u:secret@h:6380/1", "redis://h:6380/1"),
        ("rediss://h/0", "redis://h:6379/0"),
        ("unix:///tmp/r.sock?db=3", "unix:///tmp/r.sock?db=3"),
        ("redis+sentinel://s2:26380,s1:26379/main/2", "redis+sentinel://s1:26379,s2:26380/main/2"),
    ],
)
async def test_the_server_a_client_reaches_is_named_without_its_credentials(
    url: str, server: str
) -> None:
    from proxy.storage.open import redis_client
    from proxy.storage.url import StoreUrl

    client = redis_client(StoreUrl.parse(url, "checkout journal"))
    try:
        assert server_of(client) == server
        assert joint_space(client, "{t}:x:") == server + "#{t}"
        assert joint_space(client, "{t:x:") is None
    finally:
        await client.aclose()
