"""The sidecar's own HTTP API described: an OpenAPI 3.1 document kept as package data.

`openapi.yaml` beside this module is the source; `/admin/openapi.json` serves it as
JSON, and `tests/test_openapi.py` checks a running sidecar against it.
"""

from __future__ import annotations

import copy
import functools
import json
from importlib import resources
from typing import Any

import yaml

DOCUMENT = "openapi.yaml"


@functools.cache
def _document_json() -> bytes:
    text = resources.files("proxy.api").joinpath(DOCUMENT).read_text(encoding="utf-8")
    # through JSON once: YAML anchors become copies and every key a string
    return json.dumps(yaml.safe_load(text), indent=2).encode()


def openapi_json() -> bytes:
    """The document as JSON bytes, read once per process."""
    return _document_json()


def openapi_document() -> dict[str, Any]:
    """The document as a fresh dict (callers may change it)."""
    return copy.deepcopy(json.loads(_document_json()))
