"""The sidecar's configuration: one YAML file, validated before anything starts.

The models are plain data (pydantic v2), so the same definitions give validation
with field paths, defaults, and the JSON Schema for editors. The package is layered,
each module importing only those above it in this list:

- `secrets`: `${file:/path}` values read from files, trimmed, and remembered
  (`FileSecrets`) so they can be redacted everywhere and their files watched.
- `source`: YAML with the line of every key, duplicate keys refused, `${VAR}` and
  `${file:/path}` substitution in scalars; `SourceError` is one problem with its
  file and line.
- `values`: scalar types (durations, listen addresses, URLs, status sets) and the
  `Section` base model.
- `upstream`: an upstream's policy sections (timeouts, retry, pool, breaker,
  bulkhead, fallback, tls); `defaults:` has the same shape. Its `tls` section
  reads the certificate files it names through `proxy.tls`, a leaf module.
- (`proxy.checkout.schema`: the composite checkout's sections and cross-checks,
  kept beside the checkout; it builds on `values` and `source` only.)
- `model`: the sidecar's own sections, the root `Config`, and cross-section checks.
- `loader`: `load_config` / `validate_text`, pydantic errors to `file:line path:
  message`, `ConfigError`, `json_schema`.
- `options`: config sections to the resilience and job options, in one place.

This file imports nothing, on purpose: `model` imports `proxy.checkout.schema`,
which imports `values`, so re-exporting `model` here would make importing any part
of the package (even `values`) load the checkout schema first, a cycle. Import each
name from the module that defines it: `from proxy.config.model import Config`.
"""
