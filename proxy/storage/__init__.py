"""Plumbing shared by the durable stores (idempotency store, checkout journal, job queue).

`proxy.storage.sqlite` runs blocking sqlite3 work off the event loop; `proxy.storage.redis`
turns a store URL into a redis-py client and Redis failures into the store's own error.
The stores import the module they need, so a SQLite-only sidecar never imports redis.
"""
