"""No module imports from a layer above it.

The sidecar is layered so that each part can be read, tested and replaced alone:
pure policy (`proxy.resilience`) knows nothing of config or I/O; the config package
knows the schemas but not the runtime that uses them; the stores (idempotency
records, the journal, the queue) take plain values and never the config models, so
a new backend does not drag the config in. An import that points the wrong way
compiles and runs, and a cycle is then "fixed" with an import inside a function;
these tests read every module's imports with `ast` (nothing is imported) and fail
on the first such edge instead.
"""

from __future__ import annotations

import ast
import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PROXY = Path(__file__).resolve().parents[1] / "proxy"


@dataclass(frozen=True)
class Layer:
    """Modules matching `modules` (fnmatch patterns) may import only `may_import`
    (module or package prefixes; None: any) and never `must_not_import`."""

    modules: tuple[str, ...]
    why: str
    may_import: tuple[str, ...] | None = None
    must_not_import: tuple[str, ...] = ()


CONFIG = ("proxy.config", "proxy.config.*")

# The first layer whose patterns match a module is the one it is checked against,
# so the more specific rows come first.
LAYERS: tuple[Layer, ...] = (
    Layer(
        ("proxy.durations",),
        "a leaf: the config and the stores (a journal URL's ?ttl=) both parse durations",
        may_import=(),
    ),
    Layer(
        ("proxy.tls",),
        "a leaf: the config checks the TLS files at load, the client builds its context",
        may_import=(),
    ),
    Layer(
        ("proxy.config.options",),
        "the one seam from config sections to the options of the policies and the worker",
        may_import=("proxy.config", "proxy.resilience", "proxy.jobs.worker", "proxy.tls"),
    ),
    Layer(
        CONFIG,
        "the config describes the sidecar; it does not run it",
        may_import=(
            "proxy.config",
            "proxy.durations",
            "proxy.storage.url",
            "proxy.resilience.rules",
            "proxy.resilience.outcome",
            "proxy.checkout.schema",
            "proxy.checkout.templates",
            "proxy.tls",
        ),
    ),
    Layer(
        ("proxy.checkout.schema",),
        "the checkout's config builds on the config's scalar types, below the flow and plan",
        may_import=("proxy.config.values", "proxy.config.source", "proxy.checkout.templates"),
    ),
    Layer(
        ("proxy.checkout.templates",),
        "placeholders are pure text handling, used by the schema and the plan alike",
        may_import=(),
    ),
    Layer(
        ("proxy.resilience", "proxy.resilience.*"),
        "pure policy: options in, outcomes out, a clock passed in",
        may_import=("proxy.resilience",),
    ),
    Layer(
        (
            "proxy.checkout.journal*",
            "proxy.idempotency",
            "proxy.idempotency.*",
            "proxy.jobs",
            "proxy.jobs.*",
            "proxy.storage",
            "proxy.storage.*",
        ),
        "stores take plain values (a URL, a TTL), so a new backend needs no config models",
        must_not_import=("proxy.config",),
    ),
)

# Imports in these modules sit at module level: an import inside a function here
# would be hiding a cycle.
MODULE_LEVEL_IMPORTS_ONLY = (*CONFIG, "proxy.durations", "proxy.tls", "proxy.checkout.schema")


def module_name(path: Path) -> str:
    parts = path.relative_to(PROXY.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def proxy_modules() -> dict[str, ast.Module]:
    return {
        module_name(path): ast.parse(path.read_text(encoding="utf-8"), str(path))
        for path in sorted(PROXY.rglob("*.py"))
    }


MODULES = proxy_modules()


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def imported(module: str, tree: ast.Module) -> Iterator[tuple[str, ast.stmt]]:
    """Every `proxy` module that `module` imports, with the statement (submodules
    named in `from package import submodule` count as the submodule)."""
    is_package = module in MODULES and (PROXY.parent / module.replace(".", "/")).is_dir()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")
                if not is_package:
                    package = package[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in MODULES else base), node


def layer_of(module: str) -> Layer | None:
    for layer in LAYERS:
        if any(fnmatch.fnmatchcase(module, pattern) for pattern in layer.modules):
            return layer
    return None


def wrong_way(module: str, target: str, layer: Layer) -> bool:
    if not within(target, "proxy"):
        return False
    if any(within(target, banned) for banned in layer.must_not_import):
        return True
    return layer.may_import is not None and not any(
        within(target, allowed) for allowed in layer.may_import
    )


@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer.modules[0])
def test_every_layer_names_existing_modules(layer: Layer) -> None:
    assert any(layer_of(name) is layer for name in MODULES), f"no module is in {layer.modules}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_only_from_its_layer_or_below(module: str) -> None:
    layer = layer_of(module)
    if layer is None:
        return
    bad = sorted(
        f"line {node.lineno}: {target}"
        for target, node in imported(module, MODULES[module])
        if wrong_way(module, target, layer)
    )
    assert not bad, f"{module} imports across its layer ({layer.why}): {bad}"


@pytest.mark.parametrize(
    "module",
    sorted(
        name
        for name in MODULES
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in MODULE_LEVEL_IMPORTS_ONLY)
    ),
)
def test_config_layers_import_at_module_level(module: str) -> None:
    tree = MODULES[module]
    top = {id(node) for node in tree.body}
    nested = sorted(
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in top
    )
    assert not nested, f"{module} imports inside a function or block at lines {nested}"


def test_a_wrong_way_import_is_caught() -> None:
    layer = layer_of("proxy.checkout.journal_sqlite")
    assert layer is not None
    assert wrong_way("proxy.checkout.journal_sqlite", "proxy.config.values", layer)
    resilience = layer_of("proxy.resilience.breaker")
    assert resilience is not None
    assert wrong_way("proxy.resilience.breaker", "proxy.forward", resilience)
    assert not wrong_way("proxy.resilience.breaker", "proxy.resilience.clock", resilience)
