"""The runtime lock: every distribution the sidecar needs at run time, pinned.

The image installs `requirements.lock` and nothing else, so the lock must hold the
whole closure of `[project].dependencies` and the `speed` extra, and no test tools.
The pins are the versions installed in this venv (the ones the tests ran against).
Regenerate after a dependency change with:

    .venv/bin/python -m tests.deploy.lockfile > requirements.lock
"""

from __future__ import annotations

import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_EXTRAS = ("speed",)
HEADER = """\
# Runtime dependencies of checkout-sidecar, pinned: the image installs exactly these.
# Generated from the venv the tests ran in; regenerate after changing pyproject.toml with
#     .venv/bin/python -m tests.deploy.lockfile > requirements.lock
"""


def runtime_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    project = tomllib.loads(pyproject.read_text())["project"]
    listed = list(project["dependencies"])
    for extra in RUNTIME_EXTRAS:
        listed += project.get("optional-dependencies", {}).get(extra, [])
    return [Requirement(line) for line in listed]


def applies(requirement: Requirement, extras: frozenset[str]) -> bool:
    """Whether `requirement` (a line of some distribution's metadata) is needed when that
    distribution was asked for with `extras` (`psycopg[binary]` needs psycopg-binary)."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({"extra": extra}) for extra in {"", *extras})


def _requires(dist_requires: list[str] | None, extras: frozenset[str]) -> list[Requirement]:
    """A distribution's own requirements that apply when it is installed with `extras`."""
    lines = [Requirement(line) for line in dist_requires or []]
    return [line for line in lines if applies(line, extras)]


def runtime_closure(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """Canonical name -> `Name==version` for every runtime distribution, transitively."""
    pins: dict[str, str] = {}
    done: set[tuple[str, frozenset[str]]] = set()
    todo = [req for req in runtime_requirements(pyproject) if applies(req, frozenset())]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        extras = frozenset(requirement.extras)
        if (name, extras) in done:
            continue
        done.add((name, extras))
        try:
            dist = distribution(requirement.name)
        except PackageNotFoundError as exc:
            raise LookupError(
                f"{requirement.name} is not installed: run `make test` (pip install -e "
                "'.[test,speed]') before locking"
            ) from exc
        pins[name] = f"{dist.metadata['Name']}=={dist.version}"
        todo.extend(_requires(dist.requires, extras))
    return pins


def render_lock(pins: dict[str, str]) -> str:
    return HEADER + "".join(f"{pins[name]}\n" for name in sorted(pins))


def read_lock(path: Path = ROOT / "requirements.lock") -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            pins[canonicalize_name(Requirement(line).name)] = line
    return pins


def lock_problems(
    lock: dict[str, str], pyproject: Path = ROOT / "pyproject.toml"
) -> tuple[list[str], list[str]]:
    """(errors, notes) of a lock against the project's runtime requirements.

    Every requirement edge is followed from pyproject.toml: the required distribution
    must be pinned, at a version its requirer accepts. A pinned distribution's own
    requirements are known from this venv's metadata when the venv has that version;
    when it has another (a fresh venv resolved newer releases), that edge is left
    unchecked and said in a note, not an error: the lock may still be right.
    """
    pinned = {name: Version(pin.split("==", 1)[1]) for name, pin in lock.items()}
    errors: list[str] = []
    notes: list[str] = []
    expanded: set[str] = set()
    expanded_with: set[tuple[str, frozenset[str]]] = set()
    todo = [
        (req, "pyproject.toml")
        for req in runtime_requirements(pyproject)
        if applies(req, frozenset())
    ]
    while todo:
        requirement, requirer = todo.pop()
        name = canonicalize_name(requirement.name)
        if name not in pinned:
            errors.append(f"{requirement.name} (required by {requirer}) is not in the lock")
            continue
        if not requirement.specifier.contains(pinned[name], prereleases=True):
            errors.append(f"the lock pins {lock[name]} but {requirer} needs {requirement}")
        extras = frozenset(requirement.extras)
        if (name, extras) in expanded_with:
            continue
        expanded.add(name)
        expanded_with.add((name, extras))
        try:
            dist = distribution(requirement.name)
        except PackageNotFoundError:
            notes.append(f"{lock[name]} is not installed here: its requirements are unchecked")
            continue
        if Version(dist.version) != pinned[name]:
            notes.append(f"{lock[name]}: this venv has {dist.version}, requirements unchecked")
            continue
        todo.extend((line, lock[name]) for line in _requires(dist.requires, extras))
    unused = sorted(set(pinned) - expanded)
    if unused:
        (notes if notes else errors).append(f"the lock holds what nothing requires: {unused}")
    return errors, notes


if __name__ == "__main__":
    sys.stdout.write(render_lock(runtime_closure()))
