"""Loading the config file: YAML to a validated `Config`, or every error with its line.

`load_config` turns every pydantic error into `file:line path: message` using the
line map kept by `proxy.config.source`, and reports errors in `defaults:` once, at
their own line, rather than once per upstream that inherited them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path as FsPath
from typing import Any

from pydantic import ValidationError

from proxy.config import source
from proxy.config.model import Config, semantic_errors
from proxy.config.secrets import FileSecrets
from proxy.config.source import Path, SourceError, dotted

DEFAULT_CONFIG_PATH = "config/sidecar.yaml"


class ConfigError(Exception):
    """A config that must not be used; `errors` lists every problem with its line.

    `secrets` are the files the refused config referenced: a reloader watches them
    too, so that creating a missing secret file retries the load.
    """

    def __init__(self, errors: list[SourceError], secrets: FileSecrets | None = None) -> None:
        self.errors = errors
        self.secrets = secrets if secrets is not None else FileSecrets()
        super().__init__("\n".join(str(e) for e in errors))


def _merge(defaults: Any, override: Any, src: Path, dst: Path, origin: dict[Path, Path]) -> Any:
    """Deep-merge `override` over `defaults`, remembering which leaves came from defaults."""
    if not isinstance(defaults, dict) or not isinstance(override, dict):
        return copy.deepcopy(override)
    merged: dict[str, Any] = {}
    for key, value in defaults.items():
        if key in override:
            merged[key] = _merge(value, override[key], (*src, key), (*dst, key), origin)
        else:
            merged[key] = copy.deepcopy(value)
            origin[(*dst, key)] = (*src, key)
    for key, value in override.items():
        if key not in defaults:
            merged[key] = value
    return merged


def _origin_of(path: Path, origin: Mapping[Path, Path]) -> Path:
    for i in range(len(path), 0, -1):
        if path[:i] in origin:
            return origin[path[:i]] + path[i:]
    return path


def _message(error: Mapping[str, Any]) -> str:
    msg = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "missing":
        return "is required"
    value = error.get("input")
    if error["type"] not in ("value_error",) and isinstance(value, str | int | float):
        return f"{value!r}: {msg}"
    return msg


def validate_text(
    text: str, file: str = "<config>", env: Mapping[str, str] | None = None
) -> tuple[Config | None, list[SourceError]]:
    """Validate YAML text; return the config or every error, each with file, line and path."""
    config, errors, _ = validate_document(source.parse(text, file, env))
    return config, errors


def validate_document(
    doc: source.Document,
) -> tuple[Config | None, list[SourceError], FileSecrets]:
    """Validate a parsed document: the config (or None) and every error, each with its
    line, and the values and files that came from `${file:...}`.

    An error never shows a value read from a file: pydantic echoes the input it
    refused, and a validator may quote it, so every message is redacted here.
    """
    config, errors = _validate(doc)
    if doc.secrets:
        errors = [replace(e, message=doc.secrets.redact(e.message)) for e in errors]
    if config is not None:
        config.attach_file_secrets(doc.secrets)
    return config, errors, doc.secrets


def _validate(doc: source.Document) -> tuple[Config | None, list[SourceError]]:
    file = doc.file
    errors = list(doc.errors)
    if doc.data is None:
        return None, errors
    if not isinstance(doc.data, dict):
        return None, [SourceError(file, 1, "", "the config must be a mapping of sections")]

    data = dict(doc.data)
    origin: dict[Path, Path] = {}
    defaults = data.get("defaults") or {}
    upstreams = data.get("upstreams")
    if isinstance(upstreams, dict) and isinstance(defaults, dict):
        data["upstreams"] = {
            name: _merge(defaults, body, ("defaults",), ("upstreams", name), origin)
            if isinstance(body, dict)
            else body
            for name, body in upstreams.items()
        }

    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        # a value already reported by the YAML layer (an unset ${VAR}) is not also
        # reported as the empty string it left behind
        flagged = {(e.line, e.path) for e in doc.errors}
        seen: set[tuple[str, str]] = set()
        for err in exc.errors():
            loc = _origin_of(tuple(p for p in err["loc"] if p != "[key]"), origin)
            # a model-level check (per_try > total) has no field of its own: drop the
            # class name pydantic appends, keep the section path
            path = dotted(loc)
            msg = _message(err)
            line = doc.line_of(loc)
            if (path, msg) in seen or (line, path) in flagged:
                continue
            seen.add((path, msg))
            errors.append(SourceError(file, line, path, msg))
        errors.extend(semantic_errors(_listeners_only(data), doc))
        return None, _sorted(errors)

    errors.extend(semantic_errors(config, doc))
    if errors:
        return None, _sorted(errors)
    return config, []


def _listeners_only(data: dict[str, Any]) -> Config:
    """A config of just the listeners (or their defaults where invalid), for cross-checks
    that must be reported even when other sections have mistakes."""
    partial: dict[str, Any] = {}
    for section in ("listen", "admin"):
        if section in data:
            try:
                Config.model_validate({section: data[section]})
            except ValidationError:
                continue
            partial[section] = data[section]
    return Config.model_validate(partial)


def _sorted(errors: list[SourceError]) -> list[SourceError]:
    return sorted(errors, key=lambda e: (e.line or 0, e.path))


def load_config(path: str | FsPath, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file; raise ConfigError with every problem."""
    file = str(path)
    try:
        text = FsPath(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([SourceError(file, None, "", f"cannot read: {exc.strerror}")]) from None
    config, errors, secrets = validate_document(source.parse(text, file, env))
    if config is None:
        raise ConfigError(errors, secrets)
    return config


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the config file, for editors and CI linters."""
    schema = Config.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "checkout-sidecar configuration"
    return schema
