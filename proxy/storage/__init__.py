"""What the durable stores (idempotency store, checkout journal, job queue) share.

- `proxy.storage.open`: the one opener from a store URL to a backend, per store kind;
  the only module that knows which backend a scheme names.
- `proxy.storage.url`: `StoreUrl`, how every store reads its URL, and `redact_url`.
- `proxy.storage.errors`: `StoreUnavailable`, raised by every store that cannot answer.
- `proxy.storage.sqlite`: blocking sqlite3 work on a store's own thread, WAL, safe opens.
- `proxy.storage.redis`: a redis-py client from a store URL, Redis failures as the
  store's own error.
- `proxy.storage.postgres`: a psycopg pool from a store URL, the schema migrated under
  an advisory lock, PostgreSQL failures as the store's own error.
- `proxy.storage.joint`: `JointInsert`, one store's insert run in another store's
  transaction (the checkout's claim and first journal record).

Imports point one way: the opener imports the protocol modules and (when a URL names
them) the backends; backends import their protocol module and the plumbing here, never
the opener. Nothing is re-exported from this package, so importing the plumbing never
imports a backend, and a SQLite-only sidecar never imports redis-py or psycopg.
"""
