"""Records this process has just decided, for the jobs that only render from them.

A confirmed checkout queues its async steps (fraud screening) and notifications
(the email) right after its decision, and the process that decided it usually runs
them a moment later. Each of those jobs renders its request from what the decision
fixed: the request and every sync step's result, which no later write changes. So
the job reads the record this process holds instead of the journal's copy, a store
round trip (and on PostgreSQL a statement) fewer per job. A job that runs elsewhere,
after a restart, or after this bounded set forgot its checkout reads the journal, as
before; one that decides something from the record's state (an action, a follow-up
waiting for the checkout to be final) always does.
"""

from __future__ import annotations

from collections import OrderedDict

from proxy.checkout.journal import CheckoutRecord

KEPT = 512
"""Checkouts kept: far more than a process decides between queueing a checkout's jobs
and running them (about a second at several hundred checkouts a second). A job whose
checkout was forgotten reads the journal."""


class DecidedRecords:
    """The last `limit` decided records, by checkout id; shared by the flows of a
    process, like its running checkouts."""

    def __init__(self, limit: int = KEPT) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self._limit = limit
        self._records: OrderedDict[str, CheckoutRecord] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def keep(self, record: CheckoutRecord) -> None:
        """Hold `record` (as its decision wrote it) for the jobs it is about to queue."""
        self._records[record.id] = record
        self._records.move_to_end(record.id)
        if len(self._records) > self._limit:
            self._records.popitem(last=False)

    def get(self, checkout_id: str) -> CheckoutRecord | None:
        """The decided record of `checkout_id` if this process holds it."""
        return self._records.get(checkout_id)
