"""The running form of one config: what a request reads, swapped whole on reload.

A request (or a job, or a recovery scan) reads `source.runtime` once and uses that
snapshot to the end, so a reload in the middle can never give it the new plan with
the old upstreams. A reload builds a new `Runtime` and swaps one attribute; nothing
is mutated in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from proxy.checkout.flow import CheckoutFlow
from proxy.checkout.plan import CheckoutPlan
from proxy.config.model import Config
from proxy.idempotency import IdempotencyGuard
from proxy.upstreams import UpstreamRegistry


@dataclass(frozen=True, slots=True)
class Runtime:
    """One config's upstreams and checkout plan, and the stores' guard and flow.

    `flow` and `guard` are None until the durable stores are open (the sidecar's
    start), and `flow` also when no checkout is configured.
    """

    config: Config
    upstreams: UpstreamRegistry
    plan: CheckoutPlan | None
    flow: CheckoutFlow | None = None
    guard: IdempotencyGuard | None = None


class RuntimeSource(Protocol):
    """Whatever holds the runtime in force (the `Sidecar`)."""

    @property
    def runtime(self) -> Runtime: ...
