"""Events of a checkout, for metrics, traces and logs: the saga reports, others subscribe.

The saga never imports a metrics or tracing library. It calls these hooks, whose
methods here do nothing; `proxy.observability.hooks.Telemetry` implements them. The
`around_*` hooks wrap a piece of work, so a tracer can make it the current span
(children nest under it) and read its result; without tracing they just run it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from proxy.checkout.answer import Answer, StepState
from proxy.checkout.states import ActionResult, Decision


class CheckoutHooks:
    """The checkout's telemetry; every method is a no-op here."""

    def trace_context(self) -> dict[str, str] | None:
        """The current trace context, kept in the journal so queued work links back to it."""
        return None

    async def around_checkout(
        self, checkout_id: str, run: Callable[[], Awaitable[Answer]]
    ) -> Answer:
        return await run()

    async def around_step(
        self, step: str, upstream: str, run: Callable[[], Awaitable[StepState]]
    ) -> StepState:
        return await run()

    def decided(self, decision: Decision) -> None:
        pass

    def compensated(self, step: str, result: ActionResult | str) -> None:
        """A compensation ended: done, not_needed, or `queued` when the queue owes it."""

    def answered(self, result: str, seconds: float) -> None:
        """`POST /checkout` answered: confirmed, pending, rejected, replayed, ..."""
