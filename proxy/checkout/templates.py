"""Placeholders in the composite checkout's step requests, and nothing more.

A step's request (path and JSON body) is written in the config with placeholders
such as `{{request.body.items}}` or `{{steps.payment.body.id}}`; the calls of a
step (its request, commit, compensate and resolve) may also name the step itself,
`{{step.name}}` and `{{step.key}}` (its Idempotency-Key `<key>:<step>`), so a
resolve read can ask the upstream what it did under that key. This module exists
so that a config can *describe* where a value comes from without ever being able to
*run* anything: a placeholder is a dotted path of dict keys and list indexes, read
with `[]` look-ups only. There are no expressions, filters, calls or attribute
access, so `{{request.body.__class__}}` is simply a key the body does not have.

Templates are compiled once, when the config is loaded, so a bad placeholder is a
config error with its location, and the checkout's hot path only walks pre-split
parts (no parsing, no regex per request).

Rendering rules:

- A string that is exactly one placeholder (whitespace inside the braces allowed)
  takes the referenced value with its JSON type: list, object, number, bool, null.
- Inside a longer string a value is substituted as text: strings raw, everything
  else as compact JSON text (`5`, `true`, `null`, `[1,2]`, `{"a":1}`). Objects and
  lists become JSON text rather than a render-time error: a config that embeds one
  in, say, a description field is legal at load time, so failing every checkout
  later for it would punish the client for the config's choice.
- In a URL path (`compile_path`) every substituted value is percent-encoded except
  the unreserved characters `A-Z a-z 0-9 - . _ ~`, so a `/` in a value is `%2F` and
  a value can never add path segments or a query. A value that would fill a whole
  segment with `.`, `..` or nothing is refused (`UnsafePathValue`): it would make
  the upstream see a different path than the config names.
- Dict keys are literal; a placeholder in a key is a config error.
- Rendered values are shared with the context (an exact `{{request.body.items}}`
  is the request's own list), so treat a rendered body as read-only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

__all__ = [
    "STEP_FIELDS",
    "CurrentStep",
    "MissingValue",
    "RenderContext",
    "RenderError",
    "StepView",
    "Template",
    "TemplateError",
    "UnsafePathValue",
    "compile_path",
    "compile_template",
]

Source = Literal["request", "steps"]

STEP_FIELDS = ("key", "name")
"""What `{{step.<field>}}` may read: the step whose call is being rendered."""

_OPEN = "{{"
_CLOSE = "}}"
_PATH = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
_ROOTS = ("request", "steps", "step", "checkout", "idempotency_key")


# --- errors -------------------------------------------------------------------------


class TemplateError(ValueError):
    """A placeholder the config may not contain; raised at compile (config load) time."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where


class RenderError(Exception):
    """A placeholder that cannot be filled for this checkout.

    `source` says whose fault it is: "request" (the client sent a body or headers
    without the value; answer 400 with the message) or "steps" (an earlier step did
    not return it; the step that needed it fails).
    """

    def __init__(self, placeholder: str, source: Source, where: str, message: str) -> None:
        super().__init__(message)
        self.placeholder = placeholder
        self.source: Source = source
        self.where = where


class MissingValue(RenderError):
    """The referenced value does not exist: a missing key, index, header or step."""

    def __init__(self, placeholder: str, source: Source, where: str, reason: str) -> None:
        super().__init__(
            placeholder, source, where, f"placeholder {placeholder} has no value: {reason}"
        )
        self.reason = reason


class UnsafePathValue(RenderError):
    """A value that would turn a path segment into `.`, `..` or an empty segment."""

    def __init__(self, placeholder: str, source: Source, where: str, value: str) -> None:
        super().__init__(
            placeholder,
            source,
            where,
            f"placeholder {placeholder} cannot fill a path segment with {value!r}",
        )


# --- what a template is rendered against --------------------------------------------


def _lower_keys(headers: Mapping[str, str]) -> dict[str, str]:
    """Header names folded to lower case; the first of repeated headers wins (as .get)."""
    folded: dict[str, str] = {}
    for name, value in headers.items():
        folded.setdefault(name.lower(), value)
    return folded


@dataclass(frozen=True, slots=True)
class StepView:
    """What later placeholders may read from a step that has run."""

    status: int
    body: Any
    headers: Mapping[str, str] = field(default_factory=dict)
    _folded_headers: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_folded_headers", _lower_keys(self.headers))


@dataclass(frozen=True, slots=True)
class CurrentStep:
    """The step whose call is rendered, for `{{step.name}}` and `{{step.key}}`.

    The key is given, not derived here: how a step's key is spelled is the saga's rule
    (`flow.step_key`), and templates only look values up.
    """

    name: str
    key: str


@dataclass(frozen=True, slots=True)
class RenderContext:
    """Everything a placeholder can refer to, for one checkout.

    Header look-ups are case-insensitive whatever mapping is passed in (a plain dict
    or aiohttp's CIMultiDictProxy): names are folded once here, not per look-up.
    `step` is set (by `for_step`) only while one step's own calls are rendered.
    """

    request_body: Any
    request_headers: Mapping[str, str]
    steps: Mapping[str, StepView]
    checkout_id: str
    idempotency_key: str
    step: CurrentStep | None = None
    _folded_headers: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_folded_headers", _lower_keys(self.request_headers))

    def with_step(self, name: str, status: int, body: Any) -> RenderContext:
        """This context plus one more result (a step re-asked, a follow-up call's answer)."""
        steps = dict(self.steps)
        steps[name] = StepView(status, body)
        return RenderContext(
            self.request_body,
            self.request_headers,
            steps,
            self.checkout_id,
            self.idempotency_key,
            self.step,
        )

    def for_step(self, name: str, key: str) -> RenderContext:
        """This context while the calls of step `name` (Idempotency-Key `key`) are rendered."""
        return RenderContext(
            self.request_body,
            self.request_headers,
            self.steps,
            self.checkout_id,
            self.idempotency_key,
            CurrentStep(name, key),
        )


# --- placeholders -------------------------------------------------------------------


def _json_kind(value: Any) -> str:
    """The JSON name of a value's type, for messages people read."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class _Placeholder:
    """One parsed `{{...}}`: where the value lives, resolved with [] look-ups only."""

    __slots__ = (
        "_resolve",
        "header",
        "own_step",
        "path",
        "source",
        "step",
        "text",
        "trail",
        "where",
    )

    def __init__(self, path: tuple[str, ...], where: str) -> None:
        self.path = path
        self.text = "{{" + ".".join(path) + "}}"
        self.where = where
        self.step: str | None = None
        self.own_step = False  # `{{step.*}}`: the step being rendered, not an earlier one
        self.header = ""
        # `trail` is the keys/indexes walked inside a JSON body; `_resolve` is chosen
        # now so rendering is one call, not a re-dispatch on the root every time.
        self.trail: tuple[str, ...] = ()
        self.source: Source = "request"
        self._resolve: Callable[[RenderContext], Any] = self._checkout_id
        self._bind(path)

    def _fail(self, message: str) -> TemplateError:
        return TemplateError(self.where, f"placeholder {self.text} {message}")

    def _bind(self, path: tuple[str, ...]) -> None:
        root, rest = path[0], path[1:]
        if root == "request":
            self._bind_request(rest)
        elif root == "steps":
            self._bind_step(rest)
        elif root == "step":
            self._bind_own_step(rest)
        elif root == "checkout":
            if rest != ("id",):
                raise self._fail("must be {{checkout.id}}")
            self._resolve = self._checkout_id
        elif root == "idempotency_key":
            if rest:
                raise self._fail("must be {{idempotency_key}}, it has no fields")
            self._resolve = self._idempotency_key
        else:
            raise self._fail(
                f"has unknown root {root!r} (use {', '.join(_ROOTS[:-1])} or {_ROOTS[-1]})"
            )

    def _bind_request(self, rest: tuple[str, ...]) -> None:
        self.source = "request"
        if rest[:1] == ("body",):
            self.trail = rest[1:]
            self._resolve = self._request_body
        elif rest[:1] == ("headers",) and len(rest) == 2:
            self.header = rest[1].lower()
            self._resolve = self._request_header
        else:
            raise self._fail("must be request.body[.<key>...] or request.headers.<name>")

    def _bind_step(self, rest: tuple[str, ...]) -> None:
        self.source = "steps"
        if not rest:
            raise self._fail(
                "must be steps.<step>.status, steps.<step>.body[.<key>...] "
                "or steps.<step>.headers.<name>"
            )
        self.step, field_path = rest[0], rest[1:]
        if field_path == ("status",):
            self._resolve = self._step_status
        elif field_path[:1] == ("body",):
            self.trail = field_path[1:]
            self._resolve = self._step_body
        elif field_path[:1] == ("headers",) and len(field_path) == 2:
            self.header = field_path[1].lower()
            self._resolve = self._step_header
        else:
            raise self._fail(
                f"must be steps.{self.step}.status, steps.{self.step}.body[.<key>...] "
                f"or steps.{self.step}.headers.<name>"
            )

    def _bind_own_step(self, rest: tuple[str, ...]) -> None:
        self.source = "steps"
        self.own_step = True
        if len(rest) != 1 or rest[0] not in STEP_FIELDS:
            raise self._fail("must be {{step.key}} (the step's Idempotency-Key) or {{step.name}}")
        self._resolve = self._step_key if rest[0] == "key" else self._step_name

    def resolve(self, context: RenderContext) -> Any:
        return self._resolve(context)

    def _missing(self, reason: str) -> MissingValue:
        return MissingValue(self.text, self.source, self.where, reason)

    def _walk(self, value: Any, walked: str) -> Any:
        """Follow `trail` through dicts and lists; never getattr, never call."""
        for depth, key in enumerate(self.trail):
            if isinstance(value, dict):
                try:
                    value = value[key]
                    continue
                except KeyError:
                    reason = f"has no key {key!r}"
            elif isinstance(value, list):
                if key.isdigit() and int(key) < len(value):
                    value = value[int(key)]
                    continue
                if key.isdigit():
                    reason = f"has no index {key} (length {len(value)})"
                else:
                    reason = f"is an array, {key!r} is not an index"
            else:
                reason = f"is {_json_kind(value)}, it has no key {key!r}"
            where = ".".join((walked, *self.trail[:depth]))
            raise self._missing(f"{where} {reason}")
        return value

    def _request_body(self, context: RenderContext) -> Any:
        return self._walk(context.request_body, "request.body")

    def _request_header(self, context: RenderContext) -> str:
        try:
            return context._folded_headers[self.header]
        except KeyError:
            raise self._missing(f"request has no header {self.header!r}") from None

    def _step_view(self, context: RenderContext) -> StepView:
        try:
            return context.steps[self.step]  # type: ignore[index]  # step is set for steps.* only
        except KeyError:
            raise self._missing(f"step {self.step!r} has not run") from None

    def _step_status(self, context: RenderContext) -> int:
        return self._step_view(context).status

    def _step_body(self, context: RenderContext) -> Any:
        return self._walk(self._step_view(context).body, f"steps.{self.step}.body")

    def _step_header(self, context: RenderContext) -> str:
        try:
            return self._step_view(context)._folded_headers[self.header]
        except KeyError:
            raise self._missing(f"step {self.step!r} has no header {self.header!r}") from None

    def _current_step(self, context: RenderContext) -> CurrentStep:
        if context.step is None:
            raise self._missing("only a step's own calls know which step they belong to")
        return context.step

    def _step_key(self, context: RenderContext) -> str:
        return self._current_step(context).key

    def _step_name(self, context: RenderContext) -> str:
        return self._current_step(context).name

    def _checkout_id(self, context: RenderContext) -> str:
        return context.checkout_id

    def _idempotency_key(self, context: RenderContext) -> str:
        return context.idempotency_key


def _as_text(value: Any) -> str:
    """A value as it reads inside a longer string: strings raw, the rest as JSON text."""
    if type(value) is str:
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _encode_path_value(value: Any) -> str:
    """Percent-encode all but RFC 3986 unreserved characters; `/` becomes %2F."""
    return quote(_as_text(value), safe="")


def _split(text: str, where: str) -> list[str | _Placeholder]:
    """Literal text and placeholders, in order; empty literals dropped."""
    parts: list[str | _Placeholder] = []
    position = 0
    while True:
        start = text.find(_OPEN, position)
        if start < 0:
            break
        end = text.find(_CLOSE, start + len(_OPEN))
        if end < 0:
            raise TemplateError(
                where, f"unclosed placeholder {text[start : start + 40]!r}: '{{{{' without '}}}}'"
            )
        raw = text[start : end + len(_CLOSE)]
        inner = text[start + len(_OPEN) : end].strip()
        if not inner:
            raise TemplateError(where, f"malformed placeholder {raw!r}: it is empty")
        if not _PATH.fullmatch(inner):
            raise TemplateError(
                where,
                f"malformed placeholder {raw!r}: only dotted names of letters, digits, "
                "'_' and '-' are allowed (list indexes as .0), no expressions",
            )
        if start > position:
            parts.append(text[position:start])
        parts.append(_Placeholder(tuple(inner.split(".")), where))
        position = end + len(_CLOSE)
    if position < len(text):
        parts.append(text[position:])
    return parts


# --- compiled nodes -----------------------------------------------------------------
# Each node renders itself; containers are rebuilt on every render so two checkouts
# never share (and cannot mutate) one rendered dict or list.


class _Node:
    __slots__ = ()

    def render(self, context: RenderContext) -> Any:
        raise NotImplementedError

    def placeholders(self) -> list[_Placeholder]:
        return []


class _Constant(_Node):
    """A scalar, or a string without placeholders."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def render(self, context: RenderContext) -> Any:
        return self.value


class _Exact(_Node):
    """A string that is exactly one placeholder: the value keeps its JSON type."""

    __slots__ = ("placeholder",)

    def __init__(self, placeholder: _Placeholder) -> None:
        self.placeholder = placeholder

    def render(self, context: RenderContext) -> Any:
        return self.placeholder.resolve(context)

    def placeholders(self) -> list[_Placeholder]:
        return [self.placeholder]


class _Text(_Node):
    """Literal text with placeholders substituted as text."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[str | _Placeholder]) -> None:
        self.parts = tuple(parts)

    def render(self, context: RenderContext) -> str:
        return "".join(
            # `type(...) is str` is the fast test on this hot path; mypy narrows only isinstance
            part if type(part) is str else _as_text(part.resolve(context))  # type: ignore[union-attr]
            for part in self.parts
        )

    def placeholders(self) -> list[_Placeholder]:
        return [part for part in self.parts if isinstance(part, _Placeholder)]


class _Path(_Node):
    """A URL path: substituted values are percent-encoded, dot segments refused."""

    __slots__ = ("checked_segments", "parts")

    def __init__(self, parts: list[str | _Placeholder]) -> None:
        self.parts = tuple(parts)
        # Encoded values never contain '/', '?' or '#', so the rendered path has the
        # same segments as the template. Worked out once: which segments (before any
        # query) hold a placeholder, and so could render as `.`, `..` or nothing.
        skeleton = "".join(p if isinstance(p, str) else "\0" for p in self.parts)
        placeholders = iter(p for p in self.parts if isinstance(p, _Placeholder))
        checked: list[tuple[int, _Placeholder]] = []
        for index, segment in enumerate(_path_only(skeleton).split("/")):
            if "\0" in segment:
                checked.append((index, next(placeholders)))
                for _ in range(segment.count("\0") - 1):
                    next(placeholders)
        self.checked_segments = tuple(checked)

    def render(self, context: RenderContext) -> str:
        rendered = "".join(
            # `type(...) is str` is the fast test on this hot path; mypy narrows only isinstance
            part if type(part) is str else _encode_path_value(part.resolve(context))  # type: ignore[union-attr]
            for part in self.parts
        )
        if self.checked_segments:
            segments = _path_only(rendered).split("/")
            for index, placeholder in self.checked_segments:
                if segments[index] in ("", ".", ".."):
                    raise UnsafePathValue(
                        placeholder.text, placeholder.source, placeholder.where, segments[index]
                    )
        return rendered

    def placeholders(self) -> list[_Placeholder]:
        return [part for part in self.parts if isinstance(part, _Placeholder)]


def _path_only(text: str) -> str:
    """The part of a path before its query or fragment."""
    for mark in "?#":
        cut = text.find(mark)
        if cut >= 0:
            text = text[:cut]
    return text


class _List(_Node):
    __slots__ = ("items",)

    def __init__(self, items: list[_Node]) -> None:
        self.items = tuple(items)

    def render(self, context: RenderContext) -> list[Any]:
        return [item.render(context) for item in self.items]

    def placeholders(self) -> list[_Placeholder]:
        return [p for item in self.items for p in item.placeholders()]


class _Dict(_Node):
    __slots__ = ("entries",)

    def __init__(self, entries: list[tuple[str, _Node]]) -> None:
        self.entries = tuple(entries)

    def render(self, context: RenderContext) -> dict[str, Any]:
        return {key: node.render(context) for key, node in self.entries}

    def placeholders(self) -> list[_Placeholder]:
        return [p for _, node in self.entries for p in node.placeholders()]


# --- public surface -----------------------------------------------------------------


class Template:
    """A compiled request body or path, rendered once per checkout step."""

    __slots__ = ("_placeholders", "_root", "where")

    def __init__(self, root: _Node, where: str) -> None:
        self._root = root
        self.where = where
        self._placeholders = tuple(root.placeholders())

    def render(self, context: RenderContext) -> Any:
        """The value with every placeholder filled; raises a RenderError if one cannot be."""
        return self._root.render(context)

    def step_refs(self) -> set[str]:
        """Names of the steps this template reads, for unknown-step and ordering checks."""
        return {p.step for p in self._placeholders if p.step is not None}

    def reads_own_step(self) -> bool:
        """Whether it uses `{{step.key}}` or `{{step.name}}`, which only a step's calls know."""
        return any(p.own_step for p in self._placeholders)

    def placeholders(self) -> tuple[str, ...]:
        """Every placeholder, canonical (`{{steps.payment.body.id}}`), in document order."""
        return tuple(p.text for p in self._placeholders)

    def __repr__(self) -> str:
        return f"Template(where={self.where!r}, placeholders={list(self.placeholders())!r})"


def _compile_string(text: str, where: str) -> _Node:
    parts = _split(text, where)
    if not parts:
        return _Constant(text)
    if len(parts) == 1:
        only = parts[0]
        return _Exact(only) if isinstance(only, _Placeholder) else _Constant(text)
    return _Text(parts)


def _compile(value: Any, where: str) -> _Node:
    if isinstance(value, str):
        return _compile_string(value, where)
    if value is None or isinstance(value, bool | int | float):
        return _Constant(value)
    if isinstance(value, list | tuple):
        return _List([_compile(item, f"{where}[{index}]") for index, item in enumerate(value)])
    if isinstance(value, dict):
        entries: list[tuple[str, _Node]] = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise TemplateError(where, f"key {key!r} must be a string (JSON object keys are)")
            if _OPEN in key:
                raise TemplateError(
                    where, f"key {key!r}: placeholders are allowed in values, not in keys"
                )
            entries.append((key, _compile(item, f"{where}.{key}")))
        return _Dict(entries)
    raise TemplateError(
        where,
        f"{type(value).__name__} is not a JSON value (use a string, number, "
        "boolean, null, list or object)",
    )


def compile_template(value: Any, *, where: str) -> Template:
    """Compile a JSON-like request body (or any part of one) at config load.

    `where` names the config location (e.g. `checkout.steps.payment.request.body`);
    every TemplateError, and every RenderError later, carries it so a person can
    find the line to fix.
    """
    return Template(_compile(value, where), where)


def compile_path(text: str, where: str) -> Template:
    """Compile a request path; rendering gives a str with values percent-encoded."""
    if not isinstance(text, str):
        raise TemplateError(where, f"a path must be a string, got {_json_kind(text)}")
    return Template(_Path(_split(text, where)), where)
