"""A write of one store that another store commits in its own transaction.

The checkout claims its idempotency key and then journals its first record. When both
stores are one PostgreSQL database, the two can commit together: the journal describes
its insert as a `JointInsert` (where it goes, the statement, its parameters) without
running it, and an idempotency store that `accepts` it runs it inside the claim's
transaction (`proxy.idempotency.store.JointClaims`). Either both rows exist afterwards
or neither does, so no crash between the two leaves a claim without its checkout.

The statement is plain SQL text and parameters, so neither store imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class JointInsert:
    """One INSERT for another store to run in its transaction.

    `database` names the database it must run in (`proxy.storage.postgres.database_of`);
    a store in another database must not take it. The statement changes one row when it
    inserts, none when the row was already there.
    """

    database: str
    sql: str
    params: tuple[Any, ...]
