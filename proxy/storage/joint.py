"""A write of one store that another store commits in its own transaction.

The checkout claims its idempotency key and then journals its first record. When both
stores are one database, the two can commit together: the journal describes its insert
as a `JointInsert` (where it goes, the statement, its parameters) without running it,
and an idempotency store that `accepts` it runs it inside the claim's transaction
(`proxy.idempotency.store.JointClaims`). Either both rows exist afterwards or neither
does, so no crash between the two leaves a claim without its checkout.

SQLite and PostgreSQL hand over SQL text and parameters. Redis has no transaction to
share, only a Lua script that runs atomically: there the insert is a `JointScript`, the
body of a script with its own KEYS and ARGV, which the claim's script runs as a function
of its own (`proxy.storage.redis.joint_source`). Both are plain text and values, so
neither store imports the other.
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


@dataclass(frozen=True, slots=True)
class JointScript(JointInsert):
    """A Redis insert for another store's script: Lua instead of SQL.

    `sql` is the Lua body (it reads `KEYS` and `ARGV` and returns 1 when it inserted,
    0 when the record was there already), `params` its ARGV and `keys` its KEYS.
    `database` is `proxy.storage.redis.server_of` the journal's client followed by the
    hash tag of its keys: a store takes it only if both match its own, since a script
    may touch only keys of one server (and, in Redis Cluster, of one slot).

    Redis does not roll a failed script back, so "both or neither" holds when the body
    can fail only before its first write (the journal's create checks and ZADDs first)
    and the other store writes its own key after the body returns.

    A subclass, so the journal and guard protocols that speak of `JointInsert` carry it
    unchanged; a SQL store never takes it, its `database` being no SQL database's.
    """

    keys: tuple[str, ...] = ()

    @property
    def script(self) -> str:
        """The Lua body (kept in `sql`)."""
        return self.sql

    @property
    def args(self) -> tuple[Any, ...]:
        """The script's ARGV (kept in `params`)."""
        return self.params
