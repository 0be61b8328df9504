"""`postgresql://user:pass@host:5432/db`: the checkout journal beside the checkout's data.

One row per checkout in `<schema>.checkout_journal`, the record as JSONB, with a
`revision` that a trigger bumps on every update (whoever writes, an older sidecar too).
Every mutation is one transaction that applies the change in Python (the pure
operations of `proxy.checkout.journal`, shared with the other backends) and writes the
record back with the change's outbox events and joint statements.

The usual path is one round trip: the journal remembers (bounded, per object) the last
record text it wrote or read for each unfinished checkout, with its revision, applies
the change to a copy and writes it with a compare-and-set on the revision, events and
joint statements in the same transaction, sent as one query. A mismatch (another
worker, replica or journal object wrote since, or the row expired) makes the CAS
statement raise, which rolls the whole transaction back, events and joint statements
included; the change is then made the slow way, which also serves a checkout not
remembered: read the row `FOR UPDATE` (so two writers queue on the row lock and neither
loses the other's update), apply, write, two round trips.

`expires_at` is NULL while a checkout is unfinished (a crash must stay recoverable)
and set to now + ttl when it becomes final; expired rows are invisible at once and
deleted a batch at a time whenever a record becomes final. `unfinished()` reads the
partial index of non-final records. JSONB cannot hold a NUL character (`\\u0000`) in
a string: such a checkout request is refused by the store.

The first insert can also be handed to the idempotency store as a `JointInsert`
(`joint_create`), so the key's claim and the checkout's record commit together.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from proxy import jsoncodec
from proxy.checkout.journal import (
    DEFAULT_TTL,
    FINAL,
    Change,
    CheckoutRecord,
    Cursor,
    EditingJournal,
    EventsIf,
    OutboxEvent,
    WallClock,
    new_record_data,
)
from proxy.storage.joint import JointInsert
from proxy.storage.postgres import Conflict, PostgresDatabase, Statement
from proxy.storage.sweep import Sweep

T = TypeVar("T")

_LIVE = "(expires_at IS NULL OR expires_at > %(now)s)"

# A row of the same id that has expired is replaced; a live one is left alone.
_CREATE = """
INSERT INTO {schema}.checkout_journal AS j (id, state, created_at, expires_at, record, revision)
VALUES (%s, %s, %s, %s, %s::jsonb, %s)
ON CONFLICT (id) DO UPDATE SET
    state = excluded.state, created_at = excluded.created_at,
    expires_at = excluded.expires_at, record = excluded.record
WHERE j.expires_at IS NOT NULL AND j.expires_at <= %s
"""

_GET = f"SELECT record, revision FROM {{schema}}.checkout_journal WHERE id = %(id)s AND {_LIVE}"
_LOCK = _GET + " FOR UPDATE"
_STORE = """
UPDATE {schema}.checkout_journal SET state = %s, record = %s::jsonb,
    expires_at = CASE WHEN %s THEN expires_at ELSE %s END
WHERE id = %s
"""
# The same write if the row is still at the revision the journal remembers (and live);
# otherwise `expect_rows` raises and the transaction is rolled back.
_STORE_IF = f"""
WITH changed AS (
    UPDATE {{schema}}.checkout_journal SET state = %s, record = %s::jsonb,
        expires_at = CASE WHEN %s THEN expires_at ELSE %s END
    WHERE id = %s AND revision = %s AND {_LIVE.replace("%(now)s", "%s")}
    RETURNING 1
)
SELECT {{schema}}.expect_rows((SELECT count(*) FROM changed))
"""
_UNFINISHED = """
SELECT record FROM {schema}.checkout_journal
WHERE state <> 'final' AND created_at <= %s AND (created_at, id) > (%s, %s)
ORDER BY created_at, id LIMIT %s
"""
_PURGE = """
DELETE FROM {schema}.checkout_journal WHERE id IN (
    SELECT id FROM {schema}.checkout_journal WHERE expires_at <= %s
    LIMIT %s FOR UPDATE SKIP LOCKED
)
"""
_PURGE_BATCH = 100
REMEMBERED = 4096
"""Checkouts whose last record each journal object remembers (final ones too); beyond
that the least recently used is forgotten (its next change takes the locking path)."""

# The outbox: events not yet confirmed by the broker, in write order (`seq`), inserted
# in the transaction of the record change that caused them.
_ADD_EVENT = """
INSERT INTO {schema}.checkout_outbox (id, checkout_id, type, body)
VALUES (%s, %s, %s, %s::jsonb) ON CONFLICT (id) DO NOTHING
"""
_UNSENT = "SELECT id, checkout_id, type, body FROM {schema}.checkout_outbox ORDER BY seq LIMIT %s"
_MARK_SENT = "DELETE FROM {schema}.checkout_outbox WHERE id = ANY(%s)"
_PENDING = "SELECT count(*) FROM {schema}.checkout_outbox"


def _json(data: dict[str, Any]) -> str:
    return jsoncodec.dumps(data)


class PostgresJournal(EditingJournal):
    """Checkout records in PostgreSQL; each operation is one short transaction."""

    def __init__(
        self,
        database: PostgresDatabase,
        *,
        ttl: float = DEFAULT_TTL,
        wall: WallClock = time.time,
    ) -> None:
        self.name = database.name
        self.ttl = ttl
        self._db = database
        self._wall = wall
        self._create_sql = database.sql(_CREATE)
        self._get_sql = database.sql(_GET)
        self._lock_sql = database.sql(_LOCK)
        self._store_sql = database.sql(_STORE)
        self._store_if_sql = database.sql(_STORE_IF)
        self._known: OrderedDict[str, tuple[int, str]] = OrderedDict()
        """checkout id -> (revision, record as JSON text) of unfinished records."""
        self._unfinished_sql = database.sql(_UNFINISHED)
        self._purge_sql = database.sql(_PURGE)
        self._sweep = Sweep()  # the expired records' purge, with some final writes
        self._add_event_sql = database.sql(_ADD_EVENT)
        self._unsent_sql = database.sql(_UNSENT)
        self._mark_sent_sql = database.sql(_MARK_SENT)
        self._pending_sql = database.sql(_PENDING)

    def _create_params(self, record: CheckoutRecord) -> tuple[Any, ...]:
        """The insert's parameters; the record is remembered at a random first revision,
        which only the row this insert creates can have (a replaced expired row gets its
        old revision + 1), so a claim that inserted nothing leaves a harmless entry."""
        now = self._wall()
        data = new_record_data(record, now)
        final = data["state"] == FINAL
        expires_at = now + self.ttl if final else None
        text = _json(data)
        revision = random.getrandbits(62)
        self._known.pop(data["id"], None)
        self._remember(data["id"], revision, text, final)
        return (data["id"], data["state"], data["created_at"], expires_at, text, revision, now)

    # -- what the journal remembers ------------------------------------------------------

    def _remember(self, checkout_id: str, revision: int, text: str, final: bool) -> None:
        """Keep the record's text at `revision` for the next change. A final record is
        kept too: its async steps write their results into it just after (the fraud
        screening), and follow-ups add events. A later revision already known is kept:
        two changes of one checkout may finish in either order."""
        known = self._known
        kept = known.get(checkout_id)
        if kept is not None and kept[0] > revision:
            return
        known[checkout_id] = (revision, text)
        known.move_to_end(checkout_id)
        if len(known) > REMEMBERED:
            known.popitem(last=False)

    # -- the protocol ------------------------------------------------------------------

    async def create(self, record: CheckoutRecord) -> bool:
        params = self._create_params(record)
        async with self._db.connection() as conn:
            cursor = await conn.execute(self._create_sql, params)
            created = cursor.rowcount == 1
        if not created:
            self._known.pop(record.id, None)
        return created

    def joint_create(self, record: CheckoutRecord) -> JointInsert:
        """`create` as a statement for the idempotency store's claim transaction."""
        return JointInsert(self._db.database, self._create_sql, self._create_params(record))

    def accepts(self, insert: JointInsert) -> bool:
        return insert.database == self._db.database

    async def get(self, checkout_id: str) -> CheckoutRecord | None:
        async with self._db.connection() as conn:
            cursor = await conn.execute(self._get_sql, {"id": checkout_id, "now": self._wall()})
            row = await cursor.fetchone()
        if row is None:
            self._known.pop(checkout_id, None)
            return None
        data, revision = row
        if checkout_id in self._known:  # only refreshed: a read is not worth a dumps
            self._remember(checkout_id, revision, _json(data), data["state"] == FINAL)
        return CheckoutRecord.from_dict(data)

    async def _change(
        self,
        checkout_id: str,
        change: Change[T],
        events: EventsIf | None = None,
        also: Sequence[JointInsert] = (),
    ) -> T:
        """One transaction: apply `change`, store the record, write the change's outbox
        events and the statements `also`; from the remembered record in one round trip
        when it is still current, else by locking the row."""
        for statement in also:
            if not self.accepts(statement):
                raise ValueError(f"{statement.database} is not the database of {self.name}")
        known = self._known.pop(checkout_id, None)  # a failure must not leave it behind
        if known is not None:
            try:
                return await self._change_known(checkout_id, known, change, events, also)
            except Conflict:
                pass  # changed elsewhere (or gone): nothing was written
        return await self._change_locked(checkout_id, change, events, also)

    async def _change_known(
        self,
        checkout_id: str,
        known: tuple[int, str],
        change: Change[T],
        events: EventsIf | None,
        also: Sequence[JointInsert],
    ) -> T:
        """The change applied to a copy of the remembered record and written if the row
        is still at its revision: CAS, events and statements as one transaction in one
        round trip (`PostgresDatabase.atomically`)."""
        revision, text = known
        data: dict[str, Any] = jsoncodec.loads(text)
        now = self._wall()
        was_final = data["state"] == FINAL
        result = change(data, now)
        written, statements = self._writes(data, was_final, now, revision)
        statements += self._extras(result, events, also)
        await self._db.atomically(statements)
        self._remember(checkout_id, revision + 1, written, data["state"] == FINAL)
        return result

    async def _change_locked(
        self,
        checkout_id: str,
        change: Change[T],
        events: EventsIf | None,
        also: Sequence[JointInsert],
    ) -> T:
        """Lock the row, apply `change`, store it back. Pipelined: two round trips, the
        locking read, then the writes with the commit."""
        async with self._db.pipelined() as conn:
            now = self._wall()
            cursor = await conn.execute(self._lock_sql, {"id": checkout_id, "now": now})
            row = await cursor.fetchone()
            if row is None:
                raise KeyError(checkout_id)
            data: dict[str, Any] = row[0]
            revision: int = row[1]
            was_final = data["state"] == FINAL
            result = change(data, now)
            written, statements = self._writes(data, was_final, now, None)
            for sql, params in statements + self._extras(result, events, also):
                await conn.execute(sql, params)
        self._remember(checkout_id, revision + 1, written, data["state"] == FINAL)
        return result

    def _writes(
        self, data: dict[str, Any], was_final: bool, now: float, revision: int | None
    ) -> tuple[str, list[Statement]]:
        """The record's JSON text and the statements that write it back (only over
        `revision`, if given); a record that just became final starts its ttl."""
        final = data["state"] == FINAL
        keep_expiry = final and was_final  # the expiry it got when it became final
        expires_at = now + self.ttl if final else None
        text = _json(data)
        statements: list[Statement] = []
        if revision is None:
            params: tuple[Any, ...] = (data["state"], text, keep_expiry, expires_at, data["id"])
            statements.append((self._store_sql, params))
        else:
            params = (data["state"], text, keep_expiry, expires_at, data["id"], revision, now)
            statements.append((self._store_if_sql, params))
        if final and not was_final and self._sweep.due(now):
            statements.append((self._purge_sql, (now, _PURGE_BATCH)))
        return text, statements

    def _extras(
        self, result: Any, events: EventsIf | None, also: Sequence[JointInsert]
    ) -> list[Statement]:
        """The change's outbox events and the other stores' statements."""
        statements: list[Statement] = []
        if events is not None:
            for event in events(result):
                params = (event.id, event.checkout_id, event.type, _json(event.body))
                statements.append((self._add_event_sql, params))
        statements.extend((statement.sql, statement.params) for statement in also)
        return statements

    async def unsent_events(self, limit: int = 100) -> list[OutboxEvent]:
        async with self._db.connection() as conn:
            cursor = await conn.execute(self._unsent_sql, (max(limit, 0),))
            rows = await cursor.fetchall()
        return [OutboxEvent(row[0], row[1], row[2], row[3]) for row in rows]

    async def mark_events_sent(self, ids: Iterable[str]) -> None:
        sent = list(ids)
        if not sent:
            return
        async with self._db.connection() as conn:
            await conn.execute(self._mark_sent_sql, (sent,))

    async def outbox_pending(self) -> int:
        async with self._db.connection() as conn:
            cursor = await conn.execute(self._pending_sql)
            row = await cursor.fetchone()
        return int(row[0]) if row is not None else 0

    async def unfinished(
        self, older_than: float, limit: int = 100, after: Cursor | None = None
    ) -> list[CheckoutRecord]:
        if limit <= 0:
            return []
        cutoff = self._wall() - older_than
        since, last_id = after if after is not None else (float("-inf"), "")
        async with self._db.connection() as conn:
            cursor = await conn.execute(self._unfinished_sql, (cutoff, since, last_id, limit))
            rows = await cursor.fetchall()
        return [CheckoutRecord.from_dict(row[0]) for row in rows]

    async def close(self) -> None:
        await self._db.close()
