"""What the checkout must never do, proven against the simulator's ledger.

The three invariants of the composite checkout (DESIGN.md, "The composite
checkout"), checked from the outside: what the payment and inventory upstreams
recorded (`GET /_ledger`) against what the clients were answered and what
`GET /checkout/{id}` says once everything is final.

1. No customer is charged twice: at most one authorization per checkout key
   (`<key>:payment`), at most one capture per authorization.
2. Nothing is charged without an order: a capture belongs to a confirmed
   checkout; a rejected checkout's authorization is voided and its reservation
   released (or they never existed); nothing is left `authorized` or `reserved`.
3. No order is confirmed when a critical step failed.

Also the shared plumbing of the soak, latency and crash tests: the shipped
checkout config pointed at a simulator with short timeouts, the simulator as a
subprocess, a sidecar as a subprocess, and bounded waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from proxy.checkout.flow import checkout_id_for
from proxy.config import source as yamlsource

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = REPO / "config" / "sidecar.yaml"
CRITICAL_STEPS = ("inventory", "payment")
UPSTREAMS = ("payment", "inventory", "shipping", "coupon", "fraud")

SIM_CONFIG: dict[str, Any] = {
    "seed": 7,
    "upstreams": {
        "coupon": {"coupons": {"SAVE10": {"percent": 10}, "FIVEOFF": {"amount_off": 500}}},
        "fraud": {"customers": {"cust-bad": "reject"}},
    },
}

Answer = tuple[int, Any]
"""(HTTP status, JSON body) of one `POST /checkout` as a client saw it."""


# -- the invariants ------------------------------------------------------------------


@dataclass
class Verdict:
    """What the ledger and the answers say, per checkout key; `violations` must be empty."""

    decisions: dict[str, str] = field(default_factory=dict)  # key -> confirmed/rejected/...
    violations: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.violations.append(message)


def key_of(idempotency_key: str | None, step: str) -> str | None:
    """The checkout key of an upstream call's key: `<key>:<step>[:action]` -> `<key>`."""
    if not idempotency_key:
        return None
    marker = f":{step}"
    head, found, tail = idempotency_key.rpartition(marker)
    if not found or (tail and not tail.startswith(":")):
        return None
    return head


def decision_of(status: int, body: Any) -> str | None:
    """The decision an answer states: confirmed, rejected, pending, or None (no checkout ran)."""
    if not isinstance(body, dict) or "checkout_id" not in body:
        return None  # 409 in progress, 422, 400, a transport error ...
    if status == 200 and body.get("status") == "confirmed":
        return "confirmed"
    if status == 202:
        return "pending"
    if status in (409, 503) and body.get("decision") == "rejected":
        return "rejected"
    return f"unexpected {status}/{body.get('status')}"


def check_ledger(
    ledger: Mapping[str, Any],
    answers: Iterable[tuple[str, Answer]],
    final: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    critical: Iterable[str] = CRITICAL_STEPS,
) -> Verdict:
    """Check the three invariants; returns the verdict (violations listed, not raised).

    `answers` are (idempotency key, (status, body)) as the clients saw them;
    `final` maps a checkout id to its `GET /checkout/{id}` body once the queue
    has drained (a pending answer's final decision comes from there).
    """
    verdict = Verdict()
    final = final or {}
    critical = tuple(critical)
    authorizations: dict[str, dict[str, Any]] = ledger["authorizations"]
    reservations: dict[str, dict[str, Any]] = ledger["reservations"]

    # what each checkout key was decided, from the answers and then the final GETs
    answered: dict[str, set[str]] = defaultdict(set)
    for key, (status, body) in answers:
        decision = decision_of(status, body)
        if decision is None:
            continue
        if decision.startswith("unexpected"):
            verdict.fail(f"key {key}: {decision} answer {body}")
            continue
        if body["checkout_id"] != checkout_id_for(key):
            verdict.fail(f"key {key}: answered for checkout {body['checkout_id']}")
        answered[key].add(decision)
        # (c) no order confirmed when a critical step failed
        if decision == "confirmed":
            steps = body.get("steps") or {}
            for name in critical:
                got = (steps.get(name) or {}).get("status")
                if got != "ok":
                    verdict.fail(f"key {key}: confirmed with critical step {name} {got!r}")
    keys = set(answered)
    keys |= {k for a in authorizations.values() if (k := key_of(a["idempotency_key"], "payment"))}
    keys |= {k for r in reservations.values() if (k := key_of(r["idempotency_key"], "inventory"))}
    for key in sorted(keys):
        seen = answered.get(key, set()) - {"pending"}
        if len(seen) > 1:
            verdict.fail(f"key {key}: answered both {sorted(seen)}")
        record = final.get(checkout_id_for(key))
        decision: str | None = None
        if record is not None and record.get("state") == "final":
            decision = record.get("decision")
            if seen and decision not in seen:
                verdict.fail(f"key {key}: answered {sorted(seen)} but became {decision}")
            if decision == "confirmed":
                for name in critical:
                    got = (record.get("steps", {}).get(name) or {}).get("status")
                    if got != "ok":
                        verdict.fail(f"key {key}: final confirmed with {name} {got!r}")
        elif record is not None:
            verdict.fail(f"key {key}: checkout still {record.get('state')} ({record})")
        elif len(seen) == 1:
            decision = next(iter(seen))
        verdict.decisions[key] = decision or "unknown"

    # (a) no customer charged twice
    auths_by_key: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for auth in authorizations.values():
        auths_by_key[key_of(auth["idempotency_key"], "payment")].append(auth)
    for key, auths in auths_by_key.items():
        if key is None:
            verdict.fail(f"authorizations without a checkout key: {[a['id'] for a in auths]}")
        elif len(auths) > 1:
            verdict.fail(f"key {key}: {len(auths)} authorizations {[a['id'] for a in auths]}")
    captures = Counter(c["authorization"] for c in ledger["captures"])
    for auth_id, count in captures.items():
        if count > 1:
            verdict.fail(f"authorization {auth_id} captured {count} times")

    # (b) nothing charged without an order, nothing left hanging
    for auth in authorizations.values():
        key = key_of(auth["idempotency_key"], "payment")
        decision = verdict.decisions.get(key or "", "unknown")
        state = auth["status"]
        if state == "authorized":
            verdict.fail(f"key {key}: authorization {auth['id']} left authorized ({decision})")
        if auth["id"] in captures and decision != "confirmed":
            verdict.fail(f"key {key}: authorization {auth['id']} captured but {decision}")
        if decision == "rejected" and state != "voided":
            verdict.fail(f"key {key}: rejected but authorization {auth['id']} is {state}")
        if decision == "confirmed" and state not in ("captured", "refunded"):
            verdict.fail(f"key {key}: confirmed but authorization {auth['id']} is {state}")
    for reservation in reservations.values():
        key = key_of(reservation["idempotency_key"], "inventory")
        decision = verdict.decisions.get(key or "", "unknown")
        state = reservation["status"]
        if state == "reserved":
            verdict.fail(f"key {key}: reservation {reservation['id']} left reserved ({decision})")
        if decision == "rejected" and state != "released":
            verdict.fail(f"key {key}: rejected but reservation {reservation['id']} is {state}")
        if decision == "confirmed" and state != "committed":
            verdict.fail(f"key {key}: confirmed but reservation {reservation['id']} is {state}")
    for key, decision in verdict.decisions.items():
        if decision == "confirmed" and not auths_by_key.get(key):
            verdict.fail(f"key {key}: confirmed without an authorization")
    return verdict


def assert_invariants(
    ledger: Mapping[str, Any],
    answers: Iterable[tuple[str, Answer]],
    final: Mapping[str, Mapping[str, Any]] | None = None,
) -> Verdict:
    """`check_ledger`, failing with every violation listed (at most 30 shown)."""
    verdict = check_ledger(ledger, answers, final)
    if verdict.violations:
        shown = "\n  ".join(verdict.violations[:30])
        raise AssertionError(f"{len(verdict.violations)} invariant violations:\n  {shown}")
    return verdict


def outcome_counts(answers: Iterable[tuple[str, Answer]]) -> Counter[str]:
    """confirmed / pending / rejected 409 / rejected 503 / in progress 409 / other, by answer."""
    counts: Counter[str] = Counter()
    for _, (status, body) in answers:
        decision = decision_of(status, body)
        if decision in ("confirmed", "pending"):
            counts[decision] += 1
        elif decision == "rejected":
            counts[f"rejected {status}"] += 1
        elif status == 409:
            counts["in progress 409"] += 1
        else:
            counts[f"other {status}"] += 1
    return counts


# -- talking to the sidecar and the simulator ----------------------------------------


def checkout_body(i: int, *, coupon: bool | None = None) -> dict[str, Any]:
    """A valid checkout; every third one carries a coupon unless told."""
    body: dict[str, Any] = {
        "items": [{"sku": f"sku-{i % 7}", "qty": 1 + i % 3}],
        "amount": 1000 + 10 * i,
        "currency": "EUR",
        "customer": f"cust-{i}",
        "card": "4242",
        "address": {"country": "DE", "zip": "10115"},
    }
    if coupon if coupon is not None else i % 3 == 0:
        body["coupon"] = "SAVE10"
    return body


async def post_checkout(
    session: aiohttp.ClientSession, base: str, key: str, body: Mapping[str, Any]
) -> Answer:
    """One checkout; a transport error is answered as status 0 with the error's name."""
    try:
        async with session.post(
            f"{base}/checkout", json=body, headers={"Idempotency-Key": key}
        ) as response:
            return response.status, await response.json(content_type=None)
    except (TimeoutError, aiohttp.ClientError) as exc:
        return 0, {"transport_error": type(exc).__name__}


async def final_records(
    session: aiohttp.ClientSession, base: str, keys: Iterable[str]
) -> dict[str, dict[str, Any]]:
    """`GET /checkout/{id}` of every key's checkout that the journal knows."""
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        checkout_id = checkout_id_for(key)
        async with session.get(f"{base}/checkout/{checkout_id}") as response:
            if response.status == 200:
                out[checkout_id] = await response.json()
    return out


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        response.raise_for_status()
        return await response.json()


async def set_faults(
    session: aiohttp.ClientSession, urls: Mapping[str, str], faults: Mapping[str, Any]
) -> None:
    """`POST /_faults` to every upstream in `urls` (replacing their faults)."""
    for url in urls.values():
        async with session.post(f"{url}/_faults", json=dict(faults)) as response:
            assert response.status == 200, await response.text()


async def wait_until(
    condition: Callable[[], Awaitable[bool]], timeout: float, what: str, every: float = 0.1
) -> float:
    """Poll `condition` until true; fails after `timeout` s. Returns the seconds waited."""
    started = time.monotonic()
    while True:
        if await condition():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(every)


async def admin_metric(session: aiohttp.ClientSession, admin: str, name: str) -> float | None:
    """One unlabelled sample from the admin listener's `/metrics`."""
    async with session.get(f"{admin}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{}"):
            return float(line.rsplit(" ", 1)[1])
    return None


async def drained(sidecar: Any) -> bool:
    """An in-process sidecar has no unfinished checkout and no job left in its queue."""
    assert sidecar.runtime.flow is not None and sidecar.durable.queue is not None
    unfinished = await sidecar.runtime.flow.journal.unfinished(older_than=0)
    return not unfinished and await sidecar.durable.queue.depth() == 0


# -- configs -------------------------------------------------------------------------


def sidecar_config(
    urls: Mapping[str, str],
    *,
    store: str,
    deadline: str = "1s",
    reserve: str = "300ms",
    connect: str = "250ms",
    per_try: str = "300ms",
    total: str = "700ms",
    recovery_interval: str = "200ms",
    listen: str = "127.0.0.1:0",
    admin: str = "127.0.0.1:0",
) -> dict[str, Any]:
    """The shipped `config/sidecar.yaml`, its checkout untouched, pointed at `urls` with
    short timeouts, a fast queue and a short recovery interval (for tests)."""
    # the project's own YAML reading: `on:` stays a key, ${VAR:-default} its default
    data = yamlsource.parse(SHIPPED_CONFIG.read_text(), str(SHIPPED_CONFIG), env={}).data
    data["listen"] = listen
    data["admin"] = {"listen": admin}
    data["store"] = store
    data["queue"].update(
        concurrency=8,
        poll_interval="50ms",
        retry={"max_attempts": 30, "base": "100ms", "multiplier": 2, "max": "1s"},
    )
    data["defaults"]["timeout"] = {"connect": connect, "per_try": per_try, "total": total}
    data["defaults"]["retry"]["backoff"] = {
        "base": "20ms",
        "multiplier": 2,
        "max": "100ms",
        "jitter": "full",
    }
    for name, upstream in data["upstreams"].items():
        upstream.pop("timeout", None)
        if name == "orders":
            upstream["url"] = f"{urls['fraud']}/_notify"
        else:
            upstream["url"] = urls[name]
    checkout = data["composite"]["checkout"]
    checkout.update(deadline=deadline, reserve=reserve, recovery_interval=recovery_interval)
    return data


def write_yaml(path: Path, data: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False))
    return path


# -- processes -----------------------------------------------------------------------


class Process:
    """A `python -m proxy ...` child: started, its ready lines read, always stopped.

    Its stdout (ready lines, and JSON logs) is read all along into `log_path` beside
    its stderr, so a chatty child never blocks on a full pipe.
    """

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._drain: asyncio.Task[None] | None = None

    async def start(self, ready: Callable[[list[str]], bool], timeout: float = 20.0) -> None:
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy",
                *self.args,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self._drain = asyncio.create_task(self._read(self.proc.stdout))
        try:
            async with asyncio.timeout(timeout):
                while not ready(self.lines):
                    if self._drain.done():
                        raise AssertionError(
                            f"{self.args} exited before it was ready:\n"
                            + self.log_path.read_text()[-3000:]
                        )
                    await asyncio.sleep(0.02)
        except BaseException:
            await self.stop()
            raise

    async def _read(self, stream: asyncio.StreamReader | None) -> None:
        assert stream is not None
        while line := await stream.readline():
            self.lines.append(line.decode(errors="replace").rstrip())
            with self.log_path.open("ab") as log:
                log.write(line)

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye, as a crash."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        if self.proc is not None:
            if self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.terminate()
                try:
                    async with asyncio.timeout(10):
                        await self.proc.wait()
                except TimeoutError:
                    self.kill()
                    await self.proc.wait()
            self.proc = None
        if self._drain is not None:
            with contextlib.suppress(Exception):
                await self._drain
            self._drain = None


async def start_simulator_process(
    config: Mapping[str, Any], tmp: Path
) -> tuple[Process, dict[str, str]]:
    """`checkout-sidecar simulator` on free ports; returns it and its upstream URLs."""
    data = {**config, "upstreams": {n: {"port": 0, **u} for n, u in config["upstreams"].items()}}
    path = write_yaml(tmp / "simulator.yaml", data)
    process = Process(["simulator", "--config", str(path)], tmp / "simulator.log")

    def urls_of(lines: list[str]) -> dict[str, str]:
        pairs = (line.split() for line in lines)
        return {p[0]: p[1] for p in pairs if len(p) == 2 and p[0] in UPSTREAMS}

    await process.start(lambda lines: len(urls_of(lines)) == len(UPSTREAMS))
    urls = urls_of(process.lines)
    return process, urls


async def start_sidecar_process(config: Path, log_path: Path) -> tuple[Process, str, str]:
    """`checkout-sidecar run --config` as a child; returns it, its URL and its admin URL."""
    process = Process(["run", "--config", str(config)], log_path)

    def addresses(lines: list[str]) -> dict[str, str]:
        # the JSON `start` log line: {"event": "start", "listen": URL, "admin": URL, ...}
        for line in lines:
            if line.startswith("{") and '"start"' in line:
                entry = json.loads(line)
                if entry.get("event") == "start":
                    return {"listen": entry["listen"], "admin": entry["admin"]}
        return {}

    await process.start(lambda lines: {"listen", "admin"} <= set(addresses(lines)))
    found = addresses(process.lines)
    return process, found["listen"], found["admin"]
