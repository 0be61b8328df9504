"""The checkout carries on through a Redis Sentinel failover.

A master, two replicas and a Sentinel of the test's own hold every store of a sidecar
(`store: redis+sentinel://...`, whose writes wait for every replica in sync) in front
of the simulator. Clients send checkouts in a bounded loop (a refused one is retried
with its key, as a client would); meanwhile `SENTINEL FAILOVER` moves the master, and
the traffic goes on until the old master is demoted and checkouts have succeeded on the
new one. Then, once the queue drained:

- refusals happened only as `503 store_unavailable` (or a rejected checkout's own
  answer, or `409` while a key's first attempt ran): nothing ran unprotected;
- no checkout key was authorized twice (the simulator's payment ledger);
- nothing is left hanging: every authorization captured or voided, every
  reservation committed or released, every checkout final;
- checkouts succeed again after the failover.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from proxy.app import Sidecar
from proxy.simulator import start_simulator
from proxy.storage.sentinel import MASTER_CHECK_INTERVAL
from tests.checkout.conftest import sidecar_config, simulator_config
from tests.checkout.ledger_checks import (
    Answer,
    assert_invariants,
    checkout_body,
    drained,
    final_records,
    key_of,
    wait_until,
)
from tests.storage.redis_servers import SentinelSet, sentinel_set

CLIENTS = 4
MAX_CHECKOUTS_PER_CLIENT = 400  # the loop's bound; the test stops it long before
ATTEMPTS_PER_KEY = 4
CONFIRMED_AFTER_FAILOVER = 10
SETTLE_MARGIN = 1.5
"""Seconds past the stores' master check in which a request begun before it may still
be refused (its checkout's deadline is 3 s, most steps finish in milliseconds)."""


@dataclass(frozen=True)
class Sent:
    """One answer as a client saw it, and when it was sent (monotonic seconds)."""

    key: str
    answer: Answer
    sent_at: float


def refusal_kind(status: int, body: Any) -> str | None:
    """What an answer that is not a confirmed or pending checkout was, or None if it was."""
    reason = body.get("reason") if isinstance(body, dict) else None
    if status in (200, 202):
        return None
    if isinstance(body, dict) and body.get("decision") == "rejected":
        return f"rejected {status}"
    if status == 503 and reason == "store_unavailable":
        return "store_unavailable"
    if status == 409 and reason == "idempotency_key_in_progress":
        return "in_progress"
    return f"unexpected {status} {body}"


async def send(http: aiohttp.ClientSession, url: str, key: str, body: Any) -> Answer:
    """`POST /checkout` once; an answer that is not JSON (a 500's text) is kept as text,
    a transport error is status 0 (as `post_checkout` has it)."""
    try:
        async with http.post(
            f"{url}/checkout", json=body, headers={"Idempotency-Key": key}
        ) as response:
            status, text = response.status, await response.text()
    except (TimeoutError, aiohttp.ClientError) as exc:
        return 0, {"transport_error": type(exc).__name__}
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


async def leftovers(sidecar: Sidecar) -> str:
    """What keeps the sidecar from draining, for the failure message."""
    flow, queue = sidecar.runtime.flow, sidecar.durable.queue
    assert flow is not None and queue is not None
    unfinished = await flow.journal.unfinished(older_than=0)
    records = [(r.id, r.state, r.decision, sorted(r.pending)) for r in unfinished[:5]]
    dead = [(job.id, job.last_error) for job in await queue.dead()][:5]
    return (
        f"not drained: queue depth {await queue.depth()}, dead letters {dead}, "
        f"{len(unfinished)} unfinished checkouts {records}"
    )


@pytest.fixture
def sentinels() -> Any:
    # two replicas, as a Sentinel deployment runs: the stores' writes wait for one
    # (`wait_replicas`, 1 by default), and after the failover the new master has the
    # other at once, instead of only once the old master rejoins as a replica
    with sentinel_set(
        down_after_ms=1000,
        failover_timeout_ms=3000,
        master_args=("--min-replicas-to-write", "1", "--min-replicas-max-lag", "1"),
        replicas=2,
    ) as servers:
        yield servers


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_checkouts_carry_on_through_a_sentinel_failover(
    sentinels: SentinelSet,
    start_sidecar: Callable[..., Awaitable[tuple[Sidecar, str]]],
) -> None:
    async with await start_simulator(simulator_config()) as sim:
        data = sidecar_config(sim, sentinels.url(prefix=f"fo-{uuid.uuid4().hex[:8]}:"))
        # recovery takes up a checkout whose journal write failed mid-run
        data["composite"]["checkout"]["recovery_interval"] = "500ms"
        # a key whose first attempt failed is not blocked for the default minute
        data["idempotency"]["in_progress_timeout"] = "5s"
        # a job whose ack the old master refused is taken again within the test
        data["queue"]["visibility_timeout"] = "5s"
        # a compensation that met the failover (or an upstream breaker a loaded machine
        # opened) is retried for about 30 s, inside the drain's 40 s, not dead-lettered
        # after the shared config's 5 s
        data["queue"]["retry"] = {
            "max_attempts": 60,
            "base": "50ms",
            "multiplier": 2,
            "max": "500ms",
        }
        sidecar, url = await start_sidecar(data)
        gauge = sidecar.metrics.registry.get_sample_value
        assert gauge("sidecar_store_durable", {"store": "journal"}) == 0.0  # no persistence

        sent: list[Sent] = []
        stop = asyncio.Event()
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(timeout=timeout) as http:

            async def client(number: int) -> None:
                for i in range(MAX_CHECKOUTS_PER_CLIENT):
                    if stop.is_set():
                        return
                    key = f"fo-{number}-{i}-{uuid.uuid4().hex[:6]}"
                    body = checkout_body(number * 1000 + i)
                    for _ in range(ATTEMPTS_PER_KEY):
                        started = time.monotonic()
                        answer = await send(http, url, key, body)
                        sent.append(Sent(key, answer, started))
                        if refusal_kind(*answer) not in ("store_unavailable", "in_progress"):
                            break
                        await asyncio.sleep(0.3)  # Retry-After: 1, shortened

            def confirmed(since: float) -> int:
                return sum(
                    1 for s in sent if s.sent_at >= since and refusal_kind(*s.answer) is None
                )

            async def confirmed_since(since: float, count: int) -> bool:
                return confirmed(since) >= count

            clients = [asyncio.create_task(client(n)) for n in range(CLIENTS)]
            try:
                await wait_until(lambda: confirmed_since(0, 5), 20, "checkouts before failover")
                old = await asyncio.to_thread(sentinels.failover)
                failover_at = time.monotonic()
                new, switch_s = await asyncio.to_thread(sentinels.wait_for_new_master, old)
                ended_s = await asyncio.to_thread(sentinels.wait_for_failover_end)
                ended_at = time.monotonic()
                demoted_s = await asyncio.to_thread(sentinels.wait_for_demotion, old)
                demoted_at = time.monotonic()
                await wait_until(
                    lambda: confirmed_since(demoted_at, CONFIRMED_AFTER_FAILOVER),
                    30,
                    "checkouts confirmed after the failover",
                )
            finally:
                stop.set()
                await asyncio.gather(*clients)

            try:
                await wait_until(lambda: drained(sidecar), 40, "the queue and journal to drain")
            except AssertionError:
                raise AssertionError(await leftovers(sidecar)) from None
            keys = sorted({s.key for s in sent})
            final = await final_records(http, url, keys)

        kinds = Counter(refusal_kind(*s.answer) or "ok" for s in sent)
        refused = [s for s in sent if refusal_kind(*s.answer) == "store_unavailable"]
        window = (
            f"{min(s.sent_at for s in refused) - failover_at:+.1f}s to "
            f"{max(s.sent_at for s in refused) - failover_at:+.1f}s"
            if refused
            else "none"
        )
        report = (
            f"{len(sent)} answers over {len(keys)} keys: {dict(kinds)}; Sentinel switched "
            f"{switch_s:.1f}s after SENTINEL FAILOVER and ended it {ended_s:.1f}s after "
            f"that, old master demoted {demoted_s:.1f}s after that; master {old} -> {new}; "
            f"refusals sent {window} from the failover: "
            f"{Counter(str(s.answer[1].get('error'))[:160] for s in refused).most_common(3)}"
        )
        print(report)
        unexpected = [s for s in sent if (refusal_kind(*s.answer) or "").startswith("unexpected")]
        assert not unexpected, f"{report}\nunexpected answers: {unexpected[:5]}"
        # refusals only while the master moves: never before, and none once the Sentinel
        # ended its failover (writes wait for it: a replica it has still to point at the
        # new master could confirm a write the new master never gets) and the stores'
        # next master check has seen that, although the old master still answers (and
        # refuses writes) until it is demoted
        settled = ended_at + MASTER_CHECK_INTERVAL + SETTLE_MARGIN
        assert all(failover_at - 1 <= s.sent_at <= settled for s in refused), report

        ledger = sim.ledger.snapshot()
        try:
            assert_invariants(ledger, [(s.key, s.answer) for s in sent], final)
        except AssertionError as failed:
            # when each offending key was sent and what it got, against the failover's
            # moments: what a rare failure needs to be read afterwards
            named = {s.key for s in sent if s.key in str(failed)}
            timeline = "\n  ".join(
                f"{s.key} sent {s.sent_at - failover_at:+.2f}s: {s.answer[0]} "
                f"{str(s.answer[1])[:200]}"
                for s in sent
                if s.key in named
            )
            raise AssertionError(
                f"{failed}\n{report}\nfailover ended {ended_at - failover_at:+.2f}s, old master"
                f" demoted {demoted_at - failover_at:+.2f}s; the keys' answers:\n  {timeline}"
            ) from None
        authorized = Counter(
            key_of(a["idempotency_key"], "payment") for a in ledger["authorizations"].values()
        )
        assert authorized and max(authorized.values()) == 1, report
        held = [a for a in ledger["authorizations"].values() if a["status"] == "authorized"]
        reserved = [r for r in ledger["reservations"].values() if r["status"] == "reserved"]
        assert not held and not reserved, report
        # checkouts succeed again after the failover: every client's last answer is one
        assert confirmed(demoted_at) >= CONFIRMED_AFTER_FAILOVER, report
