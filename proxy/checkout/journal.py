"""The checkout journal: a durable record of every composite checkout until it is final.

Every checkout is written here before its first upstream call, and every step result,
decision and outstanding commit/compensate job after it. A sidecar killed in the
middle of a checkout finds the unfinished ones at start (`unfinished()`) and finishes
or compensates them from what the journal says, so the journal, not the process, is
the source of truth about a checkout in flight.

Several workers (the request handler, job workers, a recovering replica) write the
same record concurrently, so every change is a small atomic operation on one record
(`set_step`, `resolve_pending`, `finish_if_done` ...) rather than a read, an edit in
Python and a write back, which would lose the update of whoever wrote in between.

The backend is chosen by URL as the idempotency store is (`proxy.storage.open`):
`memory://` (tests), `sqlite:///path` (one sidecar), `redis://host:port/db?prefix=`
(replicas). Final records are kept for a `ttl` (default 7 days) so a repeated request
can still be answered; unfinished records never expire, because a crash must stay
recoverable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol, TypeVar, runtime_checkable

from proxy import jsoncodec
from proxy.checkout.states import CheckoutState
from proxy.storage.errors import StoreUnavailable
from proxy.storage.joint import JointInsert

T = TypeVar("T")

WallClock = Callable[[], float]
"""Wall-clock seconds since the epoch (`time.time`). Journal timestamps are persisted and
compared across restarts and replicas, so a monotonic clock would be meaningless here."""

Cursor = tuple[float, str]
"""Where a page of `unfinished` ended: the last record's `(created_at, id)`."""


def cursor_of(record: CheckoutRecord) -> Cursor:
    return (record.created_at, record.id)


STATES = tuple(CheckoutState)
FINAL = CheckoutState.FINAL
DEFAULT_TTL = 7 * 24 * 3600.0
"""How long a final record is kept: long enough to answer a client retrying for days."""

UPDATABLE_FIELDS = frozenset(
    {"key", "state", "decision", "request", "steps", "pending", "response", "trace", "outcome"}
)
"""What `update` may set; `id`, `created_at` and `updated_at` belong to the journal.
`steps=` and `pending=` replace the whole dict, which undoes a `set_step` or
`resolve_pending` made concurrently by another worker: use them only while no one
else can be writing the record (e.g. at the decision, before any job is queued)."""


class JournalUnavailable(StoreUnavailable):
    """The journal's backend could not be reached; a `StoreUnavailable` with its own words."""

    kind = "checkout journal"


@dataclass
class CheckoutRecord:
    """One composite checkout as the journal keeps it; every field is JSON-able.

    `created_at`/`updated_at` left at 0 are stamped by the journal's wall clock on
    `create`. `steps` maps a step name to its result (`status`, `http_status`, `body`,
    `attempts`, `latency_ms`, ...); `pending` maps an action id to the commit or
    compensate job still outstanding, and the checkout cannot become final while
    anything is pending.
    """

    id: str
    key: str
    state: str = "started"
    decision: str | None = None
    request: dict[str, Any] = field(default_factory=dict)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    pending: dict[str, dict[str, Any]] = field(default_factory=dict)
    response: dict[str, Any] | None = None
    trace: dict[str, Any] | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    outcome: str | None = None

    @property
    def is_final(self) -> bool:
        return self.state == FINAL

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict, sharing their values: `asdict`'s deep copy would be a
        second copy on every journal write, which copies through JSON anyway."""
        return {name: getattr(self, name) for name in _RECORD_FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CheckoutRecord:
        """Build a record from stored data, ignoring fields a newer version may have added."""
        return cls(**{name: value for name, value in data.items() if name in _KNOWN_FIELDS})


_RECORD_FIELDS = tuple(f.name for f in fields(CheckoutRecord))
_KNOWN_FIELDS = frozenset(_RECORD_FIELDS)


@dataclass(frozen=True)
class OutboxEvent:
    """An event waiting in the journal's outbox until a broker confirms it.

    `body` is the whole message (a CloudEvent, built once when the event is written),
    so every redelivery is byte-identical and a consumer dedupes by `id`. The outbox
    keeps one entry per `id`: writing an id already waiting is a no-op.
    """

    id: str
    checkout_id: str
    type: str
    body: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OutboxEvent:
        return cls(str(data["id"]), str(data["checkout_id"]), str(data["type"]), dict(data["body"]))


Events = Sequence[OutboxEvent]
"""Outbox entries written by the same atomic write as a record change."""


@runtime_checkable
class Journal(Protocol):
    """Atomic per-record operations on checkout records.

    Every method raises `StoreUnavailable` when the backend cannot answer; mutations of
    a record that does not exist (never created, or final and expired) raise `KeyError`.
    Each mutation also sets `updated_at` to the journal's wall clock.
    """

    name: str
    """The journal URL with secrets removed, for error bodies and logs."""

    async def create(self, record: CheckoutRecord) -> bool:
        """Store a new record; False (and no change) if the id is already there."""
        ...

    async def get(self, checkout_id: str) -> CheckoutRecord | None: ...

    async def update(
        self, checkout_id: str, *, events: Events = (), **fields: Any
    ) -> CheckoutRecord:
        """Set top-level fields (see `UPDATABLE_FIELDS`; `steps`/`pending` are replaced
        whole); returns the record as stored. `events` enter the outbox in the same
        atomic write (the decision and its events are both kept, or neither)."""
        ...

    async def set_step(self, checkout_id: str, step: str, result: dict[str, Any]) -> None:
        """Merge `result` into `steps[step]` (a shallow merge: other keys stay)."""
        ...

    async def add_pending(self, checkout_id: str, actions: dict[str, dict[str, Any]]) -> None:
        """Record outstanding actions; an id already pending gets the new description."""
        ...

    async def resolve_pending(
        self,
        checkout_id: str,
        action_id: str,
        *,
        step: str | None = None,
        step_fields: dict[str, Any] | None = None,
    ) -> int:
        """Remove `action_id` (a no-op if absent, so a repeated job is harmless), merge
        `step_fields` into `steps[step]` if given, and return how many actions remain."""
        ...

    async def finish_if_done(
        self, checkout_id: str, response: dict[str, Any] | None = None, *, events: Events = ()
    ) -> bool:
        """Make the record final (with `response` if given) if nothing is pending and it
        is not final yet. True for exactly one caller, so only one answers the client.
        `events` enter the outbox in the same write, and only if this call finished it."""
        ...

    async def conclude(
        self,
        checkout_id: str,
        resolved: Mapping[str, tuple[str, dict[str, Any]]],
        response: dict[str, Any],
        *,
        events: Events = (),
        joint: Sequence[JointInsert] = (),
    ) -> bool:
        """The end of a checkout's own run, in one atomic write: remove every action of
        `resolved` (action id -> (step, fields merged into `steps[step]`)) from
        `pending`, then, if nothing is pending and the record is not final, make it
        final with `response` and put `events` in the outbox (True); otherwise keep
        `response` as its answer so far, write no events, and return False. `joint`
        are another store's statements (the idempotency key's answer) run in the same
        transaction; only for a journal that `accepts` them (`JointJournal`)."""
        ...

    async def add_events(self, checkout_id: str, events: Events) -> None:
        """Put `events` of an existing checkout in the outbox (ids already there stay)."""
        ...

    async def unsent_events(self, limit: int = 100) -> list[OutboxEvent]:
        """Events not yet marked sent, oldest first (in the order they were written)."""
        ...

    async def mark_events_sent(self, ids: Iterable[str]) -> None:
        """The broker confirmed these: they leave the outbox (unknown ids are ignored)."""
        ...

    async def outbox_pending(self) -> int:
        """How many events wait in the outbox (for the gauge and its alert)."""
        ...

    async def unfinished(
        self, older_than: float, limit: int = 100, after: Cursor | None = None
    ) -> list[CheckoutRecord]:
        """Non-final records created at least `older_than` seconds ago, oldest first
        (by `created_at`, then `id`), starting after the `after` cursor: the
        `(created_at, id)` of the last record of the previous page."""
        ...

    async def close(self) -> None:
        """Release connections and threads; stored records stay."""
        ...


@runtime_checkable
class JointJournal(Protocol):
    """A journal that shares transactions with an idempotency store in its database.

    Optional (PostgreSQL and SQLite have it): the checkout hands `joint_create(record)`
    to the idempotency guard, so the key's claim and the record commit together, and
    `conclude` runs the key's answer (`accepts`) in the final write.
    """

    def joint_create(self, record: CheckoutRecord) -> JointInsert:
        """`create(record)` as a statement, not run: one row changed when it inserts,
        none when the id is already there (an expired final record is replaced)."""
        ...

    def accepts(self, insert: JointInsert) -> bool:
        """Whether `insert` goes to this journal's database, so `conclude` can run it."""
        ...


# -- pure record operations, shared by the backends that edit a record in Python ---------


def json_copy(value: Any) -> Any:
    """The value as it will come back from any backend (tuples become lists, ...).

    Also refuses what cannot be stored at the call that tried, not later in a worker.
    """
    return jsoncodec.copy(value)


def check_state(state: Any) -> None:
    if state not in STATES:
        raise ValueError(f"checkout state {state!r} is not one of {', '.join(STATES)}")


def new_record_data(record: CheckoutRecord, now: float) -> dict[str, Any]:
    """The record as first stored: validated, JSON-clean, timestamps stamped."""
    check_state(record.state)
    data = json_copy(record.to_dict())
    if not data["created_at"]:
        data["created_at"] = now
    if not data["updated_at"]:
        data["updated_at"] = data["created_at"]
    return data


def checked_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """`update`'s keyword arguments, validated and JSON-clean."""
    unknown = sorted(set(fields) - UPDATABLE_FIELDS)
    if unknown:
        raise TypeError(
            f"update() cannot set {', '.join(unknown)}; "
            f"updatable: {', '.join(sorted(UPDATABLE_FIELDS))}"
        )
    if "state" in fields:
        check_state(fields["state"])
    return json_copy(dict(fields))


def apply_fields(data: dict[str, Any], changes: Mapping[str, Any], now: float) -> None:
    data.update(changes)
    data["updated_at"] = now


def merge_step(data: dict[str, Any], step: str, result: Mapping[str, Any], now: float) -> None:
    data["steps"].setdefault(step, {}).update(result)
    data["updated_at"] = now


def add_actions(data: dict[str, Any], actions: Mapping[str, Any], now: float) -> None:
    data["pending"].update(actions)
    data["updated_at"] = now


def resolve_action(
    data: dict[str, Any],
    action_id: str,
    step: str | None,
    step_fields: Mapping[str, Any] | None,
    now: float,
) -> int:
    data["pending"].pop(action_id, None)
    if step is not None and step_fields is not None:
        data["steps"].setdefault(step, {}).update(step_fields)
    data["updated_at"] = now
    return len(data["pending"])


def finish(data: dict[str, Any], response: Mapping[str, Any] | None, now: float) -> bool:
    if data["pending"] or data["state"] == FINAL:
        return False
    data["state"] = FINAL
    if response is not None:
        data["response"] = dict(response)
    data["updated_at"] = now
    return True


def conclude_record(
    data: dict[str, Any],
    resolved: Mapping[str, tuple[str, Mapping[str, Any]]],
    response: Mapping[str, Any],
    now: float,
) -> bool:
    for action_id, (step, step_fields) in resolved.items():
        resolve_action(data, action_id, step, step_fields, now)
    if finish(data, response, now):
        return True
    if data["state"] != FINAL:
        data["response"] = dict(response)
    data["updated_at"] = now
    return False


Change = Callable[[dict[str, Any], float], T]
"""An edit of one record's data at wall time `now`, returning what the operation returns."""


def clean_events(events: Events) -> list[OutboxEvent]:
    """The events JSON-clean (refusing what cannot be stored at the call that tried)."""
    return [OutboxEvent.from_dict(json_copy(event.to_dict())) for event in events]


EventsIf = Callable[[Any], Events]
"""Which events a change writes, given what the change returned (finish: only if True)."""


def _always(events: Events) -> EventsIf:
    return lambda _result: events


class EditingJournal:
    """The mutations of `Journal` for backends that edit a record in Python.

    Each validates and JSON-cleans its arguments at the call, then hands one of the
    pure operations above to `_change`, which the backend implements: load the record,
    apply the change, store it back and write the change's outbox events, all as one
    atomic step.
    """

    async def _change(
        self,
        checkout_id: str,
        change: Change[T],
        events: EventsIf | None = None,
        also: Sequence[JointInsert] = (),
    ) -> T:
        """Apply `change` to the stored record atomically, with the outbox entries
        `events(result)` and the statements `also` in the same write; `KeyError` if
        there is no record."""
        raise NotImplementedError

    async def update(
        self, checkout_id: str, *, events: Events = (), **fields: Any
    ) -> CheckoutRecord:
        changes = checked_fields(fields)
        cleaned = clean_events(events)

        def change(data: dict[str, Any], now: float) -> CheckoutRecord:
            apply_fields(data, changes, now)
            return CheckoutRecord.from_dict(json_copy(data))

        return await self._change(checkout_id, change, _always(cleaned) if cleaned else None)

    async def add_events(self, checkout_id: str, events: Events) -> None:
        cleaned = clean_events(events)

        def change(data: dict[str, Any], now: float) -> None:
            data["updated_at"] = now

        await self._change(checkout_id, change, _always(cleaned))

    async def set_step(self, checkout_id: str, step: str, result: dict[str, Any]) -> None:
        result = json_copy(result)
        await self._change(checkout_id, lambda data, now: merge_step(data, step, result, now))

    async def add_pending(self, checkout_id: str, actions: dict[str, dict[str, Any]]) -> None:
        actions = json_copy(actions)
        await self._change(checkout_id, lambda data, now: add_actions(data, actions, now))

    async def resolve_pending(
        self,
        checkout_id: str,
        action_id: str,
        *,
        step: str | None = None,
        step_fields: dict[str, Any] | None = None,
    ) -> int:
        step_fields = json_copy(step_fields)

        def change(data: dict[str, Any], now: float) -> int:
            return resolve_action(data, action_id, step, step_fields, now)

        return await self._change(checkout_id, change)

    async def finish_if_done(
        self, checkout_id: str, response: dict[str, Any] | None = None, *, events: Events = ()
    ) -> bool:
        response = json_copy(response)
        cleaned = clean_events(events)

        def if_finished(finished: bool) -> Events:
            return cleaned if finished else ()

        return await self._change(
            checkout_id,
            lambda data, now: finish(data, response, now),
            if_finished if cleaned else None,
        )

    async def conclude(
        self,
        checkout_id: str,
        resolved: Mapping[str, tuple[str, dict[str, Any]]],
        response: dict[str, Any],
        *,
        events: Events = (),
        joint: Sequence[JointInsert] = (),
    ) -> bool:
        settled = {aid: (step, json_copy(f)) for aid, (step, f) in resolved.items()}
        response = json_copy(response)
        cleaned = clean_events(events)

        def if_finished(finished: bool) -> Events:
            return cleaned if finished else ()

        return await self._change(
            checkout_id,
            lambda data, now: conclude_record(data, settled, response, now),
            if_finished if cleaned else None,
            joint,
        )
