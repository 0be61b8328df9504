"""The composite checkout's config: its steps, saga calls and notifications, and the
checks that span them (names that must exist, placeholders that may only look back).

It lives beside the checkout rather than in `proxy.config` because it is the
checkout's vocabulary: `proxy.checkout.plan` compiles these models, and their
placeholders are the checkout's templates. It builds on the config's scalar types
(`proxy.config.values`) and source positions (`proxy.config.source`) and nothing above
them; `proxy.config.model` puts `CheckoutComposite` into the root `Config`.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from proxy.checkout.templates import compile_path, compile_template
from proxy.config.source import Document, SourceError, dotted
from proxy.config.values import Duration, Section


def _confirmed_only() -> list[Outcome]:
    return ["confirmed"]


HttpMethod = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
Outcome = Literal["confirmed", "rejected"]


def _compiles(value: Any, path: str | None, where: str) -> None:
    if path is not None:
        compile_path(path, where)
    if value is not None:
        compile_template(value, where=where)


class Call(Section):
    """One upstream call of the saga (commit, compensate, follow-up), with placeholders."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str | None = Field(None, description="names a follow-up call's result for later calls")
    upstream: str | None = Field(None, description="defaults to the step's upstream")
    method: HttpMethod = "POST"
    path: str
    json_body: Any = Field(None, alias="json")
    headers: dict[str, str] = Field(default_factory=dict)
    only_if: str | None = Field(
        None, description="a placeholder; the call is skipped unless it renders truthy"
    )

    @model_validator(mode="after")
    def _templates(self) -> Call:
        _compiles(self.json_body, self.path, "call")
        if self.only_if is not None:
            _compiles(self.only_if, None, "only_if")
        for value in self.headers.values():
            _compiles(value, None, "headers")
        return self


class StepRequest(Section):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    method: HttpMethod = "POST"
    path: str
    json_body: Any = Field(None, alias="json")
    headers: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _templates(self) -> StepRequest:
        _compiles(self.json_body, self.path, "request")
        for value in self.headers.values():
            _compiles(value, None, "headers")
        return self


RESOLVE_METHODS = ("GET",)
"""A resolve reads; it must never act, and its answer's body is the step's result."""


class StepResolve(Section):
    """A read that says whether a step whose answer was lost acted, without acting.

    Used instead of re-sending the step's request when its answer was lost (a
    timeout, a reset, a 500/502/504): an upstream that does not replay keys would
    act again on a re-send (a second hold on the card, then voided). Its answer:
    404 (or an empty list) means the step never acted; a 2xx JSON object (or a
    one-element list) is what the step did, and is compensated; anything else is
    not known yet, and the queue asks again later. Sent with no Idempotency-Key.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    # a str checked below, not a Literal: every wrong method gets the sentence saying why
    method: str = Field(
        "GET", description="GET only: a resolve reads", json_schema_extra={"enum": ["GET"]}
    )
    path: str
    json_body: Any = Field(None, alias="json")
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _reads_only(cls, value: str) -> str:
        if value not in RESOLVE_METHODS:
            raise ValueError(
                f"{value!r} is not allowed: a resolve only reads whether the step acted, "
                "so it must be GET (another method may act again; HEAD has no body to "
                "say what the step did)"
            )
        return value

    @model_validator(mode="after")
    def _templates(self) -> StepResolve:
        _compiles(self.json_body, self.path, "resolve")
        for value in self.headers.values():
            _compiles(value, None, "headers")
        return self


class StepFallback(Section):
    """The answer a non-critical step takes when its call failed (placeholders allowed)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    json_body: Any = Field(alias="json")

    @model_validator(mode="after")
    def _templates(self) -> StepFallback:
        _compiles(self.json_body, None, "fallback")
        return self


class Step(Section):
    """One upstream call of the checkout and its place in the saga."""

    upstream: str
    request: StepRequest
    critical: bool = Field(True, description="a failed critical step rejects the order")
    hedge: bool = Field(
        False,
        description="the request may be hedged when its upstream has `hedge:` (GET and HEAD, "
        "or any method to an upstream with idempotency: true, since each call is keyed)",
    )
    read_only: bool = Field(
        False,
        description="the request never acts (a quote, a validation): it starts before the "
        "checkout is journalled, so the journal's first write is off the answer's path; a "
        "read-only step is sync and has no commit, compensate or resolve",
    )
    mode: Literal["sync", "async"] = "sync"
    commit: Call | None = None
    compensate: Call | None = None
    resolve: StepResolve | None = Field(
        None,
        description="a read (GET) that says whether the step acted when its answer was lost; "
        "used instead of re-sending the step's request before it is compensated",
    )
    fallback: StepFallback | None = Field(
        None, description="answer when a non-critical step fails (else the upstream's fallback)"
    )
    only_if: str | None = Field(
        None, description="a placeholder; the step is skipped unless it renders truthy"
    )
    skipped: StepFallback | None = Field(None, description="the step's answer when skipped")
    on_fallback: list[Call] = Field(
        default_factory=list, description="calls queued when the fallback was used"
    )
    when: list[Outcome] = Field(
        default_factory=_confirmed_only, description="async steps: after which decision"
    )
    callback: Call | None = Field(None, description="async steps: told the step's result")
    flag_if: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="async steps: call back only when the result's field has one of the values",
    )

    @model_validator(mode="after")
    def _async_rules(self) -> Step:
        if self.only_if is not None:
            _compiles(self.only_if, None, "only_if")
        if self.mode == "async" and (self.commit or self.compensate):
            raise ValueError(
                "an async step runs after the decision: it has no commit or compensate"
            )
        if self.mode == "sync" and (self.callback or self.flag_if):
            raise ValueError("callback and flag_if are for async steps")
        if self.resolve is not None and self.compensate is None:
            raise ValueError(
                "resolve tells the compensate whether a lost call acted: "
                "a step with resolve needs a compensate"
            )
        if self.read_only and (self.commit or self.compensate or self.resolve):
            raise ValueError(
                "a read_only step starts before the checkout is journalled, so it must "
                "never act: it cannot have a commit, compensate or resolve"
            )
        if self.read_only and self.mode == "async":
            raise ValueError(
                "read_only starts a sync step before the journal write; an async step "
                "runs after the decision anyway"
            )
        return self


class Notify(Section):
    """Calls queued after a decision, e.g. the confirmation email."""

    name: str
    when: list[Outcome] = Field(default_factory=_confirmed_only)
    calls: list[Call]


class CheckoutComposite(Section):
    """`POST /checkout`: one consistent decision from five upstreams."""

    route: str = "POST /checkout"
    deadline: Duration = Field("3s", validate_default=True)
    reserve: Duration = Field(
        "500ms",
        validate_default=True,
        description="time kept back from the fan-out for the commit or compensate calls",
    )
    steps: dict[str, Step]
    notify: list[Notify] = Field(default_factory=list)
    recovery_interval: Duration = Field(
        "2s",
        validate_default=True,
        description="how often the journal is read for checkouts other replicas left",
    )

    @field_validator("route")
    @classmethod
    def _route(cls, value: str) -> str:
        method, _, path = value.partition(" ")
        if method != "POST" or not path.startswith("/") or "{" in path:
            raise ValueError(f"{value!r} must be 'POST /path' (a plain path)")
        return value

    @model_validator(mode="after")
    def _reserve_fits(self) -> CheckoutComposite:
        if self.reserve >= self.deadline:
            raise ValueError("reserve must be shorter than deadline")
        return self

    @property
    def path(self) -> str:
        return self.route.partition(" ")[2]


_OWN_STEP_ONLY = (
    "{{step.key}} and {{step.name}} are for a step's own request, commit, compensate and "
    "resolve; here there is no step they could mean (use {{idempotency_key}} or a literal)"
)


def composite_errors(
    checkout: CheckoutComposite | None, upstreams: Collection[str], doc: Document
) -> list[SourceError]:
    """Names the checkout refers to must exist; placeholders may only look backwards."""
    if checkout is None:
        return []
    out: list[SourceError] = []
    base = ("composite", "checkout", "steps")
    sync_steps = {n for n, s in checkout.steps.items() if s.mode == "sync"}

    def err(path: tuple[str | int, ...], message: str) -> None:
        out.append(SourceError(doc.file, doc.line_of(path), dotted(path), message))

    def refs(path: str | None, body: Any, *extra: Any) -> set[str]:
        found: set[str] = set()
        if path is not None:
            found |= compile_path(path, "x").step_refs()
        for value in (body, *extra):
            if value is not None:
                found |= compile_template(value, where="x").step_refs()
        return found

    def reads_own_step(path: str | None, body: Any, *extra: Any) -> bool:
        if path is not None and compile_path(path, "x").reads_own_step():
            return True
        return any(
            value is not None and compile_template(value, where="x").reads_own_step()
            for value in (body, *extra)
        )

    def check_call(
        call: Call, where: tuple[str | int, ...], allowed: set[str], step: str, *, own: bool
    ) -> None:
        """`own`: the call is one of the step's own (commit, compensate), so it knows
        `{{step.key}}`; follow-ups, callbacks and notifications do not."""
        upstream = call.upstream or checkout.steps[step].upstream
        if upstream not in upstreams:
            err((*where, "upstream"), f"no upstream named {upstream!r}")
        texts = (call.json_body, call.only_if, *call.headers.values())
        for ref in sorted(refs(call.path, *texts)):
            if ref not in allowed:
                err(where, f"placeholder references unknown step {ref!r}")
        if not own and reads_own_step(call.path, *texts):
            err(where, _OWN_STEP_ONLY)

    for name, step in checkout.steps.items():
        where = (*base, name)
        if step.upstream not in upstreams:
            err((*where, "upstream"), f"no upstream named {step.upstream!r}")
        request_refs = refs(
            step.request.path, step.request.json_body, *step.request.headers.values()
        )
        allowed_for_request = set() if step.mode == "sync" else sync_steps
        for ref in sorted(request_refs):
            if ref not in checkout.steps:
                err((*where, "request"), f"placeholder references unknown step {ref!r}")
            elif ref not in allowed_for_request:
                err(
                    (*where, "request"),
                    f"placeholder references step {ref!r}, which runs at the same time "
                    "(sync steps start together; only commit, compensate and async steps "
                    "can use their results)",
                )
        followups = {c.name for c in step.on_fallback if c.name}
        for label, call in (("commit", step.commit), ("compensate", step.compensate)):
            if call is not None:
                check_call(call, (*where, label), sync_steps, name, own=True)
        if step.resolve is not None:
            resolve = step.resolve
            for ref in sorted(refs(resolve.path, resolve.json_body, *resolve.headers.values())):
                if ref == name:
                    err(
                        (*where, "resolve"),
                        f"placeholder references step {ref!r} itself: a resolve runs because "
                        "that step's answer was lost (use {{step.key}} to ask by its key)",
                    )
                elif ref not in sync_steps:
                    err((*where, "resolve"), f"placeholder references unknown step {ref!r}")
        if step.callback is not None:
            check_call(step.callback, (*where, "callback"), sync_steps | {name}, name, own=False)
        for i, call in enumerate(step.on_fallback):
            check_call(call, (*where, "on_fallback", i), sync_steps | followups, name, own=False)
        for label, answer in (("fallback", step.fallback), ("skipped", step.skipped)):
            if answer is not None and (
                refs(None, answer.json_body) or reads_own_step(None, answer.json_body)
            ):
                err((*where, label), "may only use request placeholders")
        if step.only_if is not None and (
            refs(None, step.only_if) or reads_own_step(None, step.only_if)
        ):
            err((*where, "only_if"), "may only use request placeholders")
    for i, notify in enumerate(checkout.notify):
        names = sync_steps | {c.name for c in notify.calls if c.name}
        for j, call in enumerate(notify.calls):
            if call.upstream is None:
                err(("composite", "checkout", "notify", i, "calls", j), "needs an upstream")
            else:
                check_call(
                    call, ("composite", "checkout", "notify", i, "calls", j), names, "", own=False
                )
    if checkout.path.strip("/").split("/")[0] in upstreams:
        err(("composite", "checkout", "route"), "collides with an upstream's proxied path")
    return out
