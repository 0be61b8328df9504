"""Events of a checkout, for metrics, traces and logs: the saga reports, others subscribe.

The saga never imports a metrics or tracing library. It calls these hooks, whose
methods here do nothing; `proxy.observability.hooks.Telemetry` implements them. The
`around_step` hook wraps a step's work, so a tracer can make it the current span
(children nest under it) and read its result; `checkout_span` is the span of the
whole checkout, from its claim to its answer, so that steps started before the
claim (read-only ones) nest under it too. Without tracing they just run.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext

from proxy.checkout.answer import Answer, StepState
from proxy.checkout.states import ActionResult, Decision


class CheckoutSpan:
    """The checkout's span, told what it answered; a no-op here."""

    def answered(self, answer: Answer) -> None:
        """The flow ran the checkout to `answer`."""

    def ended(self, result: str) -> None:
        """The request ended with `result`, the label `CheckoutHooks.answered` gets."""


NO_SPAN = CheckoutSpan()


class CheckoutHooks:
    """The checkout's telemetry; every method is a no-op here."""

    def trace_context(self) -> dict[str, str] | None:
        """The current trace context, kept in the journal so queued work links back to it."""
        return None

    def checkout_span(self, checkout_id: str) -> AbstractContextManager[CheckoutSpan]:
        """The current span while a checkout is claimed, run and answered."""
        return nullcontext(NO_SPAN)

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
