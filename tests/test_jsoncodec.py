"""`proxy.jsoncodec`: orjson's speed, the standard library's answers.

A checkout body may hold any JSON a client sends; the journal must copy and read it
back exactly as before, including what orjson handles differently."""

from __future__ import annotations

import json
import math

import pytest

from proxy import jsoncodec


def test_a_copy_is_what_a_store_gives_back() -> None:
    value = {"a": (1, 2), 3: "three", "nested": [{"x": None, "y": True, "z": 1.5}]}
    assert jsoncodec.copy(value) == {"a": [1, 2], "3": "three", "nested": value["nested"]}


def test_an_integer_beyond_64_bits_stays_exact() -> None:
    big = 123456789012345678901234567890
    body = {"amount": big, "items": [{"qty": -(2**70)}]}
    assert jsoncodec.copy(body) == body
    assert jsoncodec.loads(jsoncodec.dumps(body)) == body
    assert jsoncodec.loads(jsoncodec.dumps_bytes(body)) == body


def test_nan_written_by_an_older_version_is_still_read() -> None:
    old = json.dumps({"score": float("nan")})  # the standard library writes NaN
    assert math.isnan(jsoncodec.loads(old)["score"])
    assert jsoncodec.copy({"score": float("nan")}) == {"score": None}


def test_what_is_not_json_is_a_value_error_and_what_json_cannot_hold_a_type_error() -> None:
    with pytest.raises(ValueError):
        jsoncodec.loads("{not json")
    with pytest.raises(ValueError):
        jsoncodec.loads(b"")
    with pytest.raises(TypeError):
        jsoncodec.dumps({"when": object()})


def test_output_is_compact_and_unicode_survives() -> None:
    text = jsoncodec.dumps({"city": "Zürich", "n": [1, 2]})
    assert " " not in text.replace("Zürich", "")
    assert jsoncodec.loads(text) == {"city": "Zürich", "n": [1, 2]}
    assert jsoncodec.loads(text.encode()) == {"city": "Zürich", "n": [1, 2]}
