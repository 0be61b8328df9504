"""`redis://host:port/db?prefix=P`: the checkout journal shared by every sidecar replica.

Keys, under the URL's `prefix` (default `checkout-sidecar:journal:`):

- `<prefix>checkout:<id>`  hash, one per checkout. Its fields are split so that every
                           atomic operation is a plain HSET/HDEL, with no JSON decoding
                           (and so no cjson round trip, which would turn `[]` into `{}`
                           and round floats) inside Redis:
    `f:<name>`             a top-level field (`state`, `request`, `created_at` ...), as JSON
    `t:<step>`             marks that the step exists (so an empty result survives)
    `s:["<step>","<k>"]`   one key of one step's result, as JSON: merging a step is HSET
    `p:<action id>`        one outstanding action, as JSON
    `n`                    how many actions are pending, kept by the scripts
- `<prefix>unfinished`     sorted set, id -> created_at, of every non-final checkout:
                           what `unfinished()` reads after a crash.
- `<prefix>outbox`         hash, event id -> the outbox event as JSON, of every event
                           the broker has not confirmed yet.
- `<prefix>outbox:unsent`  sorted set, event id -> write sequence: the outbox's order.
- `<prefix>outbox:seq`     the counter that numbers outbox writes.

An event enters the outbox in the same script as the record change that caused it
(the decision, the finish), so both are kept or neither.

Every write is one Lua script, so the hash and the sorted set change together and two
workers resolving actions of one checkout cannot lose each other's update. A record
that becomes final leaves the sorted set and gets a PEXPIRE of `ttl`; unfinished
records have no expiry. For Redis Cluster, put a hash tag in the prefix
(`prefix={journal}:`) so all keys share a slot.

With the idempotency store on the same Redis (same server and db, and the same hash tag
in both prefixes: `{checkout}:journal:` and `{checkout}:idempotency:` for Redis Cluster)
the first record is inserted by the key's claim script (`joint_create`), and the final
write keeps the key's answer in the same script (`conclude(joint=...)`): one round trip
each, and never a claim without its record. Other layouts write them apart.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from proxy import jsoncodec
from proxy.checkout.journal import (
    DEFAULT_TTL,
    CheckoutRecord,
    Cursor,
    Events,
    JournalUnavailable,
    OutboxEvent,
    WallClock,
    checked_fields,
    clean_events,
    json_copy,
    new_record_data,
)
from proxy.storage.joint import JointInsert, JointScript
from proxy.storage.redis import (
    ceil_ms,
    joint_space,
    sequence_call,
    sequence_source,
    unavailable_on_error,
)

_CURSOR_TIES = 64
"""Records sharing the cursor's exact created_at that one page can step over."""

DEFAULT_PREFIX = "checkout-sidecar:journal:"
_TOP_LEVEL = (
    "id", "key", "state", "decision", "request", "response", "trace",
    "created_at", "updated_at", "outcome",
)  # fmt: skip

# Scripts compare `f:state` with its JSON, `"final"`. `settle` puts a record where its
# state says: final ones expire (once, from when they became final) and leave the
# unfinished set; others never expire and are in it.
_SETTLE = """
local function settle(rec, unfinished, id, ttl_ms)
  if redis.call('HGET', rec, 'f:state') == '"final"' then
    redis.call('ZREM', unfinished, id)
    if redis.call('PTTL', rec) < 0 then redis.call('PEXPIRE', rec, ttl_ms) end
  else
    redis.call('PERSIST', rec)
    redis.call('ZADD', unfinished, tonumber(redis.call('HGET', rec, 'f:created_at')), id)
  end
end
"""

# Lists of strings (field/value pairs, event id/JSON pairs, field names) travel as one
# argument each, a JSON array of strings that `cjson` unpacks: every argument costs the
# client more to encode than the whole array costs the server to decode. Only arrays of
# strings, each of them ASCII JSON or a name, so cjson returns them exactly as sent.
_UNPACK = """
local function list(packed) return cjson.decode(packed) end
local function hset(key, pairs) if #pairs > 0 then redis.call('HSET', key, unpack(pairs)) end end
"""

# KEYS[3..5]: outbox, unsent, seq. Adds the id/event pairs of the packed list `packed`;
# an id already waiting stays as it is.
_OUTBOX = """
local function add_events(packed)
  local events = cjson.decode(packed)
  for i = 1, #events, 2 do
    if redis.call('HSETNX', KEYS[3], events[i], events[i + 1]) == 1 then
      redis.call('ZADD', KEYS[4], redis.call('INCR', KEYS[5]), events[i])
    end
  end
end
"""

# KEYS: record, unfinished. ARGV: id, ttl_ms, created_at, packed field/value pairs. The
# ZADD goes first: it is the one command that can fail (the set's key holding another
# type), and a create that fails writes nothing, which `joint_create` relies on too.
_CREATE = (
    _SETTLE
    + _UNPACK
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local fields = list(ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
hset(KEYS[1], fields)
settle(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
return 1
"""
)

# KEYS: record, unfinished, outbox, unsent, seq. ARGV: id, ttl_ms, replace_steps,
# replace_pending, pending_count, packed fields to read, packed events, packed
# field/value pairs -> the values of the fields to read (HMGET), or the whole hash when
# there are none
_UPDATE = (
    _SETTLE
    + _UNPACK
    + _OUTBOX
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local reads, fields = list(ARGV[6]), list(ARGV[8])
local steps, pending = ARGV[3] == '1', ARGV[4] == '1'
if steps or pending then
  for _, name in ipairs(redis.call('HKEYS', KEYS[1])) do
    local kind = string.sub(name, 1, 2)
    if (steps and (kind == 's:' or kind == 't:')) or (pending and kind == 'p:') then
      redis.call('HDEL', KEYS[1], name)
    end
  end
end
if pending then redis.call('HSET', KEYS[1], 'n', ARGV[5]) end
add_events(ARGV[7])
hset(KEYS[1], fields)
settle(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
if #reads > 0 then return redis.call('HMGET', KEYS[1], unpack(reads)) end
return redis.call('HGETALL', KEYS[1])
"""
)

# KEYS: record. ARGV: field/value pairs (updated_at and the step's fields)
_MERGE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

# KEYS: record. ARGV: updated_at, then action field/value pairs
_ADD_PENDING = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'f:updated_at', ARGV[1])
for i = 2, #ARGV, 2 do
  if redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('HINCRBY', KEYS[1], 'n', 1)
  end
end
return 1
"""

# KEYS: record. ARGV: action field, updated_at, step field/value pairs... -> remaining
_RESOLVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then redis.call('HINCRBY', KEYS[1], 'n', -1) end
redis.call('HSET', KEYS[1], 'f:updated_at', ARGV[2])
if #ARGV >= 3 then redis.call('HSET', KEYS[1], unpack(ARGV, 3)) end
return tonumber(redis.call('HGET', KEYS[1], 'n'))
"""

# KEYS: record, unfinished, outbox, unsent, seq. ARGV: id, ttl_ms, updated_at,
# has_response, response, packed events (written only on finishing)
_FINISH = (
    _SETTLE
    + _OUTBOX
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if tonumber(redis.call('HGET', KEYS[1], 'n')) > 0 then return 0 end
if redis.call('HGET', KEYS[1], 'f:state') == '"final"' then return 0 end
redis.call('HSET', KEYS[1], 'f:state', '"final"', 'f:updated_at', ARGV[3])
if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'f:response', ARGV[5]) end
add_events(ARGV[6])
settle(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
return 1
"""
)

# KEYS: record, unfinished, outbox, unsent, seq. ARGV: id, ttl_ms, updated_at, response,
# packed events, packed resolved action fields, packed step field/value pairs
# -> 1 if it made the record final, 0 if not, -1 if none
_CONCLUDE = (
    _SETTLE
    + _UNPACK
    + _OUTBOX
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
for _, action in ipairs(list(ARGV[6])) do
  if redis.call('HDEL', KEYS[1], action) == 1 then redis.call('HINCRBY', KEYS[1], 'n', -1) end
end
hset(KEYS[1], list(ARGV[7]))
if redis.call('HGET', KEYS[1], 'f:state') == '"final"' then
  redis.call('HSET', KEYS[1], 'f:updated_at', ARGV[3])
  return 0
end
redis.call('HSET', KEYS[1], 'f:updated_at', ARGV[3], 'f:response', ARGV[4])
if tonumber(redis.call('HGET', KEYS[1], 'n')) > 0 then return 0 end
redis.call('HSET', KEYS[1], 'f:state', '"final"')
add_events(ARGV[5])
settle(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
return 1
"""
)

# KEYS: record, unfinished, outbox, unsent, seq. ARGV: updated_at, packed events
_ADD_EVENTS = (
    _OUTBOX
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'f:updated_at', ARGV[1])
add_events(ARGV[2])
return 1
"""
)

# KEYS: outbox, unsent. ARGV: event ids
_MARK_SENT = """
for _, id in ipairs(ARGV) do
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
end
return 1
"""


def _dumps(value: Any) -> str:
    """A field's value as JSON (read back by `_record_from_hash`, and by the scripts
    only as `"final"` and a number)."""
    return jsoncodec.dumps(value)


def _step_field(step: str, name: str) -> str:
    # the standard library's form, byte for byte: a field name must not change between
    # versions (orjson writes non-ASCII as is, json escapes it)
    return "s:" + json.dumps([step, name], separators=(",", ":"))


def _step_pairs(step: str, result: dict[str, Any]) -> list[str]:
    """HSET arguments that merge `result` into `steps[step]`."""
    pairs = ["t:" + step, "1"]
    for name, value in result.items():
        pairs += [_step_field(step, name), _dumps(value)]
    return pairs


def _packed(items: Sequence[str]) -> str:
    """Strings as one script argument, a JSON array for `cjson.decode` (`_UNPACK`)."""
    return json.dumps(items, separators=(",", ":"))


def _packed_events(events: Events) -> str:
    """A script's events argument: id/JSON pairs, packed."""
    pairs: list[str] = []
    for event in clean_events(events):
        pairs += [event.id, _dumps(event.to_dict())]
    return _packed(pairs)


def _record_pairs(data: dict[str, Any]) -> list[str]:
    """HSET arguments for a whole new record."""
    pairs: list[str] = []
    for name in _TOP_LEVEL:
        pairs += ["f:" + name, _dumps(data[name])]
    for step, result in data["steps"].items():
        pairs += _step_pairs(step, result)
    for action_id, action in data["pending"].items():
        pairs += ["p:" + action_id, _dumps(action)]
    pairs += ["n", str(len(data["pending"]))]
    return pairs


def _record_from_hash(fields: dict[str, str]) -> CheckoutRecord:
    data: dict[str, Any] = {"steps": {}, "pending": {}}
    steps: dict[str, dict[str, Any]] = data["steps"]
    for name, value in fields.items():
        kind, _, rest = name.partition(":")
        if kind == "f":
            data[rest] = jsoncodec.loads(value)
        elif kind == "t":
            steps.setdefault(rest, {})
        elif kind == "s":
            step, key = jsoncodec.loads(rest)
            steps.setdefault(step, {})[key] = jsoncodec.loads(value)
        elif kind == "p":
            data["pending"][rest] = jsoncodec.loads(value)
    return CheckoutRecord.from_dict(data)


class RedisJournal:
    """Checkout records as Redis hashes, changed only by Lua scripts."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        name: str,
        prefix: str = DEFAULT_PREFIX,
        ttl: float = DEFAULT_TTL,
        wall: WallClock = time.time,
    ) -> None:
        self.name = name
        self.prefix = prefix
        self.ttl = ttl
        self._wall = wall
        self._redis = client
        self._unfinished_key = prefix + "unfinished"
        self._outbox_keys = [prefix + "outbox", prefix + "outbox:unsent", prefix + "outbox:seq"]
        self._create = client.register_script(_CREATE)
        self._update = client.register_script(_UPDATE)
        self._merge = client.register_script(_MERGE)
        self._add_pending = client.register_script(_ADD_PENDING)
        self._resolve = client.register_script(_RESOLVE)
        self._finish = client.register_script(_FINISH)
        self._add_events = client.register_script(_ADD_EVENTS)
        self._conclude = client.register_script(_CONCLUDE)
        self._mark_sent = client.register_script(_MARK_SENT)
        self._space = joint_space(client, prefix)
        self._joint_conclude: dict[tuple[str, ...], AsyncScript] = {}

    def _key(self, checkout_id: str) -> str:
        return f"{self.prefix}checkout:{checkout_id}"

    def _ttl_ms(self) -> int:
        return ceil_ms(self.ttl)

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        with unavailable_on_error(self.name, JournalUnavailable):
            return await script(keys=keys, args=args)

    # -- the protocol ------------------------------------------------------------------

    def _create_call(self, record: CheckoutRecord) -> tuple[list[str], list[Any]]:
        data = new_record_data(record, self._wall())
        keys = [self._key(data["id"]), self._unfinished_key]
        args = [
            data["id"],
            self._ttl_ms(),
            _dumps(data["created_at"]),
            _packed(_record_pairs(data)),
        ]
        return keys, args

    async def create(self, record: CheckoutRecord) -> bool:
        keys, args = self._create_call(record)
        return int(await self._call(self._create, keys, args)) == 1

    # -- writes shared with the idempotency store's scripts (JointJournal) ---------------

    def joint_create(self, record: CheckoutRecord) -> JointInsert:
        """`create` as a script body for the claim's script; its `database` is "" (taken
        by no store) when this journal's prefix opens a hash tag it never closes."""
        keys, args = self._create_call(record)
        return JointScript(self._space or "", _CREATE, tuple(args), keys=tuple(keys))

    def accepts(self, insert: JointInsert) -> bool:
        """`insert` is a Redis script whose keys live where this journal's do."""
        return (
            isinstance(insert, JointScript)
            and self._space is not None
            and insert.database == self._space
        )

    async def get(self, checkout_id: str) -> CheckoutRecord | None:
        with unavailable_on_error(self.name, JournalUnavailable):
            fields: dict[str, str] = await self._redis.hgetall(  # type: ignore[assignment]
                self._key(checkout_id)
            )  # redis-py's stubs cannot tell a decode_responses client's str from bytes
        return _record_from_hash(fields) if fields else None

    async def update(
        self, checkout_id: str, *, events: Events = (), **fields: Any
    ) -> CheckoutRecord:
        changes = checked_fields(fields)
        steps: dict[str, dict[str, Any]] | None = changes.pop("steps", None)
        pending: dict[str, Any] | None = changes.pop("pending", None)
        changes["updated_at"] = self._wall()
        pairs = [item for name, value in changes.items() for item in ("f:" + name, _dumps(value))]
        for step, result in (steps or {}).items():
            pairs += _step_pairs(step, result)
        for action_id, action in (pending or {}).items():
            pairs += ["p:" + action_id, _dumps(action)]
        # the caller's values are the record's steps and pending when it replaces both
        reads = (
            [] if steps is None or pending is None
            else ["f:" + name for name in _TOP_LEVEL if name not in changes]
        )  # fmt: skip
        args = [
            checkout_id,
            self._ttl_ms(),
            "0" if steps is None else "1",
            "0" if pending is None else "1",
            str(len(pending or {})),
            _packed(reads),
            _packed_events(events),
            _packed(pairs),
        ]
        keys = [self._key(checkout_id), self._unfinished_key, *self._outbox_keys]
        reply = await self._call(self._update, keys, args)
        if not reply:
            raise KeyError(checkout_id)
        if not reads:
            return _record_from_hash(dict(zip(reply[::2], reply[1::2], strict=True)))
        # steps and pending replaced: the record is what was written plus the top-level
        # fields it kept, so only those come back and are decoded
        data = {name[2:]: jsoncodec.loads(value) for name, value in zip(reads, reply, strict=True)}
        return CheckoutRecord.from_dict({**data, **changes, "steps": steps, "pending": pending})

    async def set_step(self, checkout_id: str, step: str, result: dict[str, Any]) -> None:
        pairs = ["f:updated_at", _dumps(self._wall()), *_step_pairs(step, json_copy(result))]
        if not int(await self._call(self._merge, [self._key(checkout_id)], pairs)):
            raise KeyError(checkout_id)

    async def add_pending(self, checkout_id: str, actions: dict[str, dict[str, Any]]) -> None:
        args = [_dumps(self._wall())]
        for action_id, action in json_copy(actions).items():
            args += ["p:" + action_id, _dumps(action)]
        if not int(await self._call(self._add_pending, [self._key(checkout_id)], args)):
            raise KeyError(checkout_id)

    async def resolve_pending(
        self,
        checkout_id: str,
        action_id: str,
        *,
        step: str | None = None,
        step_fields: dict[str, Any] | None = None,
    ) -> int:
        args = ["p:" + action_id, _dumps(self._wall())]
        if step is not None and step_fields is not None:
            args += _step_pairs(step, json_copy(step_fields))
        remaining = int(await self._call(self._resolve, [self._key(checkout_id)], args))
        if remaining < 0:
            raise KeyError(checkout_id)
        return remaining

    async def finish_if_done(
        self, checkout_id: str, response: dict[str, Any] | None = None, *, events: Events = ()
    ) -> bool:
        keys = [self._key(checkout_id), self._unfinished_key, *self._outbox_keys]
        has_response = response is not None
        args = [
            checkout_id,
            self._ttl_ms(),
            _dumps(self._wall()),
            "1" if has_response else "0",
            _dumps(response) if has_response else "",
            _packed_events(events),
        ]
        done = int(await self._call(self._finish, keys, args))
        if done < 0:
            raise KeyError(checkout_id)
        return done == 1

    async def conclude(
        self,
        checkout_id: str,
        resolved: Mapping[str, tuple[str, dict[str, Any]]],
        response: dict[str, Any],
        *,
        events: Events = (),
        joint: Sequence[JointInsert] = (),
    ) -> bool:
        others: list[JointScript] = []
        for statement in joint:
            if not self.accepts(statement):
                raise ValueError(f"{statement.database!r} is not this journal's Redis")
            assert isinstance(statement, JointScript)
            others.append(statement)
        keys = [self._key(checkout_id), self._unfinished_key, *self._outbox_keys]
        actions = ["p:" + action_id for action_id in resolved]
        pairs: list[str] = []
        for step, step_fields in resolved.values():
            pairs += _step_pairs(step, json_copy(step_fields))
        args = [
            checkout_id,
            self._ttl_ms(),
            _dumps(self._wall()),
            _dumps(response),  # what json_copy would give, without the round trip
            _packed_events(events),
            _packed(actions),
            _packed(pairs),
        ]
        if others:
            script = self._conclude_with(tuple(other.script for other in others))
            parts = [(keys, args), *((other.keys, other.args) for other in others)]
            keys, args = sequence_call(parts)
        else:
            script = self._conclude
        done = int(await self._call(script, keys, args))
        if done < 0:
            raise KeyError(checkout_id)
        return done == 1

    def _conclude_with(self, bodies: tuple[str, ...]) -> AsyncScript:
        """`conclude`'s script followed by other stores' writes (the key's answer), as
        one script: registered once per combination, which is one in practice."""
        script = self._joint_conclude.get(bodies)
        if script is None:
            script = self._redis.register_script(sequence_source((_CONCLUDE, *bodies)))
            self._joint_conclude[bodies] = script
        return script

    async def add_events(self, checkout_id: str, events: Events) -> None:
        keys = [self._key(checkout_id), self._unfinished_key, *self._outbox_keys]
        args = [_dumps(self._wall()), _packed_events(events)]
        if not int(await self._call(self._add_events, keys, args)):
            raise KeyError(checkout_id)

    async def unsent_events(self, limit: int = 100) -> list[OutboxEvent]:
        if limit <= 0:
            return []
        outbox, unsent, _ = self._outbox_keys
        with unavailable_on_error(self.name, JournalUnavailable):
            # decoded replies: str ids and bodies, which redis-py's stubs cannot tell
            ids: list[str] = await self._redis.zrange(unsent, 0, limit - 1)  # type: ignore[assignment]
            if not ids:
                return []
            found: list[str | None] = await self._redis.hmget(outbox, ids)  # type: ignore[assignment]
        return [OutboxEvent.from_dict(json.loads(raw)) for raw in found if raw is not None]

    async def mark_events_sent(self, ids: Iterable[str]) -> None:
        sent = list(ids)
        if sent:
            await self._call(self._mark_sent, self._outbox_keys[:2], sent)

    async def outbox_pending(self) -> int:
        with unavailable_on_error(self.name, JournalUnavailable):
            return int(await self._redis.zcard(self._outbox_keys[1]))

    async def unfinished(
        self, older_than: float, limit: int = 100, after: Cursor | None = None
    ) -> list[CheckoutRecord]:
        if limit <= 0:
            return []
        cutoff = self._wall() - older_than
        since = "-inf" if after is None else repr(after[0])
        with unavailable_on_error(self.name, JournalUnavailable):
            # the sorted set orders equal scores by member, as (created_at, id) does; the
            # page starts at the cursor's score (inclusive) and skips what it already had
            scored: list[tuple[str, float]] = await self._redis.zrangebyscore(  # type: ignore[assignment]
                self._unfinished_key,
                since,
                repr(cutoff),
                start=0,
                num=limit + _CURSOR_TIES,
                withscores=True,
            )  # decoded: str ids, which redis-py's stubs cannot tell
            ids = [cid for cid, score in scored if after is None or (score, cid) > after][:limit]
            if not ids:
                return []
            async with self._redis.pipeline(transaction=False) as pipe:
                for checkout_id in ids:
                    pipe.hgetall(self._key(checkout_id))
                replies = await pipe.execute()
            stale = [cid for cid, fields in zip(ids, replies, strict=True) if not fields]
            if stale:  # deleted behind our back; never true for records we wrote
                await self._redis.zrem(self._unfinished_key, *stale)
        # A record may have become final between the two reads; it is not unfinished.
        records = [_record_from_hash(fields) for fields in replies if fields]
        return [record for record in records if not record.is_final]

    async def close(self) -> None:
        await self._redis.aclose()
