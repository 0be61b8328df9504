"""The saga's vocabulary: a checkout's states, its decision, each step's status.

String enums, so a journal record written as JSON reads back as the same values and
a dashboard sees the same words as the code; comparing with the bare strings an
older record holds still works.
"""

from __future__ import annotations

import enum


class CheckoutState(enum.StrEnum):
    """Where a checkout is in the saga; only `FINAL` is finished."""

    STARTED = "started"  # journalled, fanning out
    DECIDED = "decided"  # the decision is journalled
    COMMITTING = "committing"  # commits running or owed
    COMPENSATING = "compensating"  # compensations running or owed
    FINAL = "final"  # nothing owed; the answer is kept


class Decision(enum.StrEnum):
    CONFIRMED = "confirmed"
    REJECTED = "rejected"

    @property
    def action(self) -> Action:
        """What the decision owes the steps that acted."""
        return Action.COMMIT if self is Decision.CONFIRMED else Action.COMPENSATE


class Action(enum.StrEnum):
    COMMIT = "commit"
    COMPENSATE = "compensate"

    @property
    def state(self) -> CheckoutState:
        """The checkout's state while actions of this kind are owed."""
        if self is Action.COMMIT:
            return CheckoutState.COMMITTING
        return CheckoutState.COMPENSATING


class StepStatus(enum.StrEnum):
    """A step's result as the saga tracks it, and as the journal and the answer show it."""

    OK = "ok"  # the upstream acted
    FALLBACK = "fallback"  # a non-critical step failed and took its fallback
    FAILED = "failed"  # no usable answer
    SKIPPED = "skipped"  # `only_if` said no
    DEFERRED = "deferred"  # an async step, run after the decision
    COMPENSATED = "compensated"  # acted, then undone


class ActionResult(enum.StrEnum):
    """How one commit or compensate ended."""

    DONE = "done"
    NOT_NEEDED = "not_needed"  # the step never acted: nothing to undo
    FAILED = "failed"  # still owed; the queue repeats it
