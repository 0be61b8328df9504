"""The composite checkout's config, compiled once: templates parsed, names resolved.

The flow runs for every checkout; everything that can be decided from the config
alone (which steps run together, which templates they render, how their
idempotency keys are spelled) is decided here, at load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.checkout import schema as cfg
from proxy.checkout.templates import (
    MissingValue,
    RenderContext,
    RenderError,
    Template,
    compile_path,
    compile_template,
)


@dataclass(frozen=True)
class CompiledCall:
    """One upstream call with its templates: a step's request, a commit, a follow-up."""

    upstream: str
    method: str
    path: Template
    body: Template | None
    headers: dict[str, Template]
    only_if: Template | None = None
    name: str | None = None

    @classmethod
    def of(
        cls, call: cfg.Call | cfg.StepRequest | cfg.StepResolve, default_upstream: str, where: str
    ) -> CompiledCall:
        upstream = getattr(call, "upstream", None) or default_upstream
        only_if = getattr(call, "only_if", None)
        return cls(
            upstream=upstream,
            method=call.method,
            path=compile_path(call.path, f"{where}.path"),
            body=None
            if call.json_body is None
            else compile_template(call.json_body, where=f"{where}.json"),
            headers={
                k: compile_template(v, where=f"{where}.headers.{k}")
                for k, v in call.headers.items()
            },
            only_if=None
            if only_if is None
            else compile_template(only_if, where=f"{where}.only_if"),
            name=getattr(call, "name", None),
        )

    def render(self, context: RenderContext) -> RenderedCall:
        """The call for this checkout; raises RenderError when a value is missing."""
        return RenderedCall(
            self.upstream,
            self.method,
            self.path.render(context),
            None if self.body is None else self.body.render(context),
            {k: str(t.render(context)) for k, t in self.headers.items()},
        )

    def wanted(self, context: RenderContext) -> bool:
        """Whether `only_if` lets the call run (a missing value means no)."""
        return truthy(self.only_if, context)


def truthy(template: Template | None, context: RenderContext) -> bool:
    if template is None:
        return True
    try:
        value = template.render(context)
    except MissingValue:
        return False
    return bool(value) and value not in ("false", "0", "no")


@dataclass(frozen=True)
class RenderedCall:
    upstream: str
    method: str
    path: str
    body: Any
    headers: dict[str, str]


@dataclass(frozen=True)
class CompiledStep:
    name: str
    upstream: str
    request: CompiledCall
    critical: bool
    mode: str
    commit: CompiledCall | None
    compensate: CompiledCall | None
    fallback: Template | None
    only_if: Template | None
    skipped: Template | None
    on_fallback: tuple[CompiledCall, ...]
    when: frozenset[str]
    callback: CompiledCall | None
    flag_if: dict[str, list[Any]]
    resolve: CompiledCall | None = None
    """The read that says whether a lost call acted; None: the request is sent again."""
    hedge: bool = False
    """The step's request may be hedged (when its upstream hedges and allows it)."""
    read_only: bool = False
    """The request never acts, so it may start before the checkout is journalled."""

    @property
    def is_sync(self) -> bool:
        return self.mode == "sync"


@dataclass(frozen=True)
class CompiledNotify:
    name: str
    when: frozenset[str]
    calls: tuple[CompiledCall, ...]


@dataclass(frozen=True)
class CheckoutPlan:
    path: str
    deadline: float
    reserve: float
    recovery_interval: float
    steps: dict[str, CompiledStep]
    notify: tuple[CompiledNotify, ...] = field(default_factory=tuple)

    @property
    def sync_steps(self) -> list[CompiledStep]:
        return [s for s in self.steps.values() if s.is_sync]

    @property
    def early_steps(self) -> list[CompiledStep]:
        """The sync steps that start before the journal write: they never act."""
        return [s for s in self.steps.values() if s.is_sync and s.read_only]

    @property
    def async_steps(self) -> list[CompiledStep]:
        return [s for s in self.steps.values() if not s.is_sync]

    @property
    def critical(self) -> frozenset[str]:
        """The steps whose failure rejects the order."""
        return frozenset(name for name, step in self.steps.items() if step.critical)

    @classmethod
    def of(cls, section: cfg.CheckoutComposite) -> CheckoutPlan:
        steps: dict[str, CompiledStep] = {}
        for name, step in section.steps.items():
            where = f"composite.checkout.steps.{name}"

            def answer(value: cfg.StepFallback | None, label: str) -> Template | None:
                if value is None:
                    return None
                return compile_template(value.json_body, where=f"{where}.{label}")  # noqa: B023

            steps[name] = CompiledStep(
                name=name,
                upstream=step.upstream,
                request=CompiledCall.of(step.request, step.upstream, f"{where}.request"),
                critical=step.critical,
                hedge=step.hedge,
                read_only=step.read_only,
                mode=step.mode,
                commit=None
                if step.commit is None
                else CompiledCall.of(step.commit, step.upstream, f"{where}.commit"),
                compensate=None
                if step.compensate is None
                else CompiledCall.of(step.compensate, step.upstream, f"{where}.compensate"),
                fallback=answer(step.fallback, "fallback"),
                only_if=None
                if step.only_if is None
                else compile_template(step.only_if, where=f"{where}.only_if"),
                skipped=answer(step.skipped, "skipped"),
                on_fallback=tuple(
                    CompiledCall.of(c, step.upstream, f"{where}.on_fallback[{i}]")
                    for i, c in enumerate(step.on_fallback)
                ),
                when=frozenset(step.when),
                callback=None
                if step.callback is None
                else CompiledCall.of(step.callback, step.upstream, f"{where}.callback"),
                flag_if=dict(step.flag_if),
                resolve=None
                if step.resolve is None
                else CompiledCall.of(step.resolve, step.upstream, f"{where}.resolve"),
            )
        notify = tuple(
            CompiledNotify(
                n.name,
                frozenset(n.when),
                tuple(
                    CompiledCall.of(c, c.upstream or "", f"composite.checkout.notify[{i}]")
                    for c in n.calls
                ),
            )
            for i, n in enumerate(section.notify)
        )
        return cls(
            path=section.path,
            deadline=section.deadline,
            reserve=section.reserve,
            recovery_interval=section.recovery_interval,
            steps=steps,
            notify=notify,
        )


__all__ = [
    "CheckoutPlan",
    "CompiledCall",
    "CompiledNotify",
    "CompiledStep",
    "RenderError",
    "RenderedCall",
    "truthy",
]
