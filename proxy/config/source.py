"""The config file as YAML with line numbers, duplicate-key detection and substitution.

Platform teams edit the config by hand; every error must point at a line. PyYAML's
safe loader forgets where values came from and silently keeps the last of two
duplicate keys, so this loader records the line of every key and refuses
duplicates, and it expands `${VAR}` (the environment) and `${file:/path}` (a
secret file, `proxy.config.secrets`) in scalar strings only (never in keys, never
re-parsed as YAML, in one pass so a substituted value is never expanded again), so
neither a variable nor a file can inject structure, and a variable cannot make the
sidecar read a file. What came from files is recorded in `Document.secrets`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from proxy.config.secrets import FileSecrets, SecretFileError, read_secret_file

Path = tuple[str | int, ...]

_SUBSTITUTION = re.compile(
    r"\$\{(?:file:(?P<file>[^}]*)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>.*?))?)\}"
)


@dataclass(frozen=True)
class SourceError:
    """One problem in the file, with where it is."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where} {self.path}: {self.message}" if self.path else f"{where} {self.message}"


@dataclass
class Document:
    """Parsed YAML plus the line of every path in it."""

    data: Any
    lines: dict[Path, int] = field(default_factory=dict)
    file: str = "<config>"
    errors: list[SourceError] = field(default_factory=list)
    secrets: FileSecrets = field(default_factory=FileSecrets)
    """Values read from `${file:...}` (to redact) and the files behind them (to watch)."""

    def line_of(self, path: Path) -> int | None:
        """The line of `path`, or of its nearest ancestor that has one."""
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), None)


def dotted(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


class _Builder:
    def __init__(self, file: str, env: Mapping[str, str]) -> None:
        self.file = file
        self.env = env
        self.lines: dict[Path, int] = {}
        self.errors: list[SourceError] = []
        self.scalars = yaml.SafeLoader("")  # only its scalar constructors are used
        # each file is read once per parse, so two references to it see the same value
        self.file_values: dict[str, str] = {}
        self.file_digests: dict[str, str | None] = {}

    def secrets(self) -> FileSecrets:
        return FileSecrets.of(self.file_values.values(), self.file_digests)

    def build(self, node: yaml.Node, path: Path) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    self._error(key_node, path, "YAML merge keys (<<) are not supported")
                    continue
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if not isinstance(key, str):
                    self._error(key_node, path, "keys must be plain strings")
                    continue
                child = (*path, key)
                if key in out:
                    first = self.lines.get(child)
                    self._error(
                        key_node, child, f"duplicate key '{key}' (first defined on line {first})"
                    )
                    continue
                self.lines[child] = key_node.start_mark.line + 1
                out[key] = self.build(value_node, child)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        assert isinstance(node, yaml.ScalarNode)  # the only node kind left
        return self._scalar(node, path)

    def _scalar(self, node: yaml.ScalarNode, path: Path) -> Any:
        resolved = self.scalars.construct_object(node, deep=True)
        if isinstance(resolved, str) and "${" in resolved:
            return self._expand(resolved, node, path)
        return resolved

    def _expand(self, text: str, node: yaml.Node, path: Path) -> str:
        def replace(match: re.Match[str]) -> str:
            if match.group("file") is not None:
                return self._read_file(match.group("file").strip(), node, path)
            name, default = match.group("name"), match.group("default")
            if name in self.env and self.env[name] != "":
                return self.env[name]
            if default is not None:
                return default
            self._error(
                node, path, f"environment variable {name} is not set (use ${{{name}:-default}})"
            )
            return ""

        return _SUBSTITUTION.sub(replace, text)

    def _read_file(self, file: str, node: yaml.Node, path: Path) -> str:
        if file in self.file_values:
            return self.file_values[file]
        try:
            value, digest = read_secret_file(file)
        except SecretFileError as exc:
            if file.startswith("/"):  # watched, so fixing the file triggers a reload
                self.file_digests[file] = exc.digest
            self._error(node, path, str(exc))
            return ""
        self.file_values[file] = value
        self.file_digests[file] = digest
        return value

    def _error(self, node: yaml.Node, path: Path, message: str) -> None:
        self.errors.append(SourceError(self.file, node.start_mark.line + 1, dotted(path), message))


def parse(text: str, file: str = "<config>", env: Mapping[str, str] | None = None) -> Document:
    """Parse YAML text into plain data with a line for every path.

    Syntax errors and duplicate keys come back in `Document.errors` rather than as
    exceptions, so `validate` can report every problem at once.
    """
    builder = _Builder(file, os.environ if env is None else env)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        return Document(None, {}, file, [SourceError(file, line, "", f"invalid YAML: {problem}")])
    if node is None:
        return Document({}, {(): 1}, file, [])
    data = builder.build(node, ())
    return Document(data, builder.lines, file, builder.errors, builder.secrets())
