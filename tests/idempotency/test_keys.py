"""Pure rules: which keys are valid, and when two requests are the same payload."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.idempotency import fingerprint, parse_key_header, scoped_key, validate_key

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


def test_printable_ascii_keys_up_to_255_are_valid() -> None:
    assert validate_key("8e03978e-40d5-43e8-bc93-6894a57f9324") is None
    assert validate_key("order 42:payment:commit") is None
    assert validate_key("x" * 255) is None


def test_empty_overlong_and_control_character_keys_are_invalid() -> None:
    assert "empty" in (validate_key("") or "")
    assert "256" in (validate_key("x" * 256) or "")
    assert "position 3" in (validate_key("abc\x00") or "")
    assert validate_key("caf\u00e9") is not None
    assert validate_key("tab\there") is not None


def test_structured_field_string_key_means_the_bare_key() -> None:
    assert parse_key_header('"abc-1"') == ("abc-1", None)
    assert parse_key_header(r'"a\"b"') == ('a"b', None)
    assert parse_key_header("abc-1") == ("abc-1", None)
    assert parse_key_header('"a"b"')[1] is not None


@settings(max_examples=50)
@given(document=st.dictionaries(st.text(), json_values), indent=st.none() | st.integers(0, 4))
def test_json_fingerprint_ignores_key_order_and_whitespace(
    document: dict[str, object], indent: int | None
) -> None:
    compact = json.dumps(document).encode()
    reordered = json.dumps(dict(reversed(list(document.items()))), indent=indent).encode()
    assert fingerprint("POST", "/orders", compact, "application/json") == fingerprint(
        "post", "/orders", reordered, "application/json; charset=utf-8"
    )


def test_fingerprint_tells_method_path_and_body_apart() -> None:
    base = fingerprint("POST", "/orders", b'{"a":1}', "application/json")
    assert base != fingerprint("PUT", "/orders", b'{"a":1}', "application/json")
    assert base != fingerprint("POST", "/refunds", b'{"a":1}', "application/json")
    assert base != fingerprint("POST", "/orders", b'{"a":2}', "application/json")


def test_non_json_bodies_are_hashed_raw() -> None:
    assert fingerprint("POST", "/x", b"a=1&b=2", "application/x-www-form-urlencoded") != (
        fingerprint("POST", "/x", b"b=2&a=1", "application/x-www-form-urlencoded")
    )
    # Invalid JSON under a JSON content type still gets a stable, raw fingerprint.
    assert fingerprint("POST", "/x", b"{nope", "application/json") == fingerprint(
        "POST", "/x", b"{nope", "application/json"
    )


@given(
    parts=st.tuples(st.text(), st.text(), st.text()),
    other=st.tuples(st.text(), st.text(), st.text()),
)
def test_scoped_keys_never_collide_across_scopes(
    parts: tuple[str, str, str], other: tuple[str, str, str]
) -> None:
    if parts != other:
        assert scoped_key(*parts) != scoped_key(*other)
