"""`proxy.jsoncodec`: orjson's speed, the standard library's answers.

A checkout body may hold any JSON a client sends; the journal must copy and read it
back exactly as before, including what orjson handles differently."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import jsoncodec

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet="0123456789-,:[ abc", max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(alphabet="0123456789-,:[ k", max_size=25), inner, max_size=4)
    ),
    max_leaves=12,
)


def test_a_copy_is_what_a_store_gives_back() -> None:
    value = {"a": (1, 2), 3: "three", "nested": [{"x": None, "y": True, "z": 1.5}]}
    assert jsoncodec.copy(value) == {"a": [1, 2], "3": "three", "nested": value["nested"]}


def test_an_integer_beyond_64_bits_stays_exact() -> None:
    big = 123456789012345678901234567890
    body = {"amount": big, "items": [{"qty": -(2**70)}]}
    assert jsoncodec.copy(body) == body
    assert jsoncodec.loads(jsoncodec.dumps(body)) == body
    assert jsoncodec.loads(jsoncodec.dumps_bytes(body)) == body


@pytest.mark.parametrize(
    "text",
    [
        "12345678901234567890123",
        "-12345678901234567890123",
        '{"a": 12345678901234567890123}',
        '{"a":-12345678901234567890123}',
        "[1, \n\t -18446744073709551616]",
        '[[18446744073709551616],{"b":[ 99999999999999999999]}]',
        # a run inside a string first (the search must go on past it), non-ASCII before
        '{"k": "x1234567890123456789012345", "é": 12345678901234567890123}',
    ],
)
def test_an_integer_of_19_digits_or_more_is_read_exactly_wherever_it_stands(text: str) -> None:
    assert jsoncodec.loads(text) == json.loads(text)
    assert jsoncodec.loads(text.encode()) == json.loads(text)


@pytest.mark.parametrize(
    "text",
    [
        '{"key": "bench-sidecar-1795973229206302441-15", "n": 1}',
        '{"id": "1795973229206302441"}',
        '{"x": 0.12345678901234567890123}',
        '{"k": "a,1234567890123456789", "v": [1]}',  # looks like a number's start: slow way
    ],
)
def test_long_digit_runs_that_are_no_integer_read_the_same(text: str) -> None:
    assert jsoncodec.loads(text) == json.loads(text)
    assert jsoncodec.loads(text.encode()) == json.loads(text)


def test_a_snowflake_id_in_a_string_is_left_to_orjson(monkeypatch: pytest.MonkeyPatch) -> None:
    def standard_library(data: str | bytes) -> object:
        raise AssertionError(f"read by the standard library: {data!r}")

    monkeypatch.setattr(jsoncodec.json, "loads", standard_library)
    record = {"key": "order-1795973229206302441", "headers": {"Idempotency-Key": "1" * 20}}

    assert jsoncodec.copy(record) == record


@given(_JSON)
def test_any_json_reads_as_the_standard_library_reads_it(value: object) -> None:
    for text in (json.dumps(value), json.dumps(value, indent=1), jsoncodec.dumps(value)):
        # repr: 2**70 + 1 read as a float would still compare equal to some int
        assert repr(jsoncodec.loads(text)) == repr(json.loads(text))
        assert repr(jsoncodec.loads(text.encode())) == repr(json.loads(text))


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
