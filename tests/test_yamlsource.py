"""The YAML loader under the config: line numbers, duplicate keys, `${VAR}` expansion."""

from __future__ import annotations

import textwrap

import pytest

from proxy.config.source import SourceError, dotted, parse


def yaml_text(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def messages(text: str, env: dict[str, str] | None = None) -> list[str]:
    return [str(e) for e in parse(yaml_text(text), "f.yaml", env={} if env is None else env).errors]


# ---------------------------------------------------------------------------
# line numbers


def test_every_key_records_its_own_line() -> None:
    doc = parse(
        yaml_text(
            """
            listen: 127.0.0.1:8080
            upstreams:
              payment:
                url: http://pay
                retry:
                  on:
                    - timeout
                    - 502
            """
        ),
        "f.yaml",
        env={},
    )

    assert doc.lines[("listen",)] == 1
    assert doc.lines[("upstreams", "payment")] == 3
    assert doc.lines[("upstreams", "payment", "url")] == 4
    assert doc.lines[("upstreams", "payment", "retry", "on", 1)] == 8


def test_line_of_a_path_without_a_line_falls_back_to_its_nearest_ancestor() -> None:
    doc = parse(yaml_text("upstreams:\n  payment:\n    url: http://pay\n"), "f.yaml", env={})

    assert doc.line_of(("upstreams", "payment", "timeout", "total")) == 2


def test_dotted_path_writes_list_indexes_in_brackets() -> None:
    assert dotted(("upstreams", "payment", "retry", "on", 2)) == "upstreams.payment.retry.on[2]"


def test_source_error_reads_file_colon_line_then_path_then_message() -> None:
    error = SourceError("config/sidecar.yaml", 42, "defaults.timeout.total", "too long")

    assert str(error) == "config/sidecar.yaml:42 defaults.timeout.total: too long"


def test_source_error_without_a_line_names_only_the_file() -> None:
    assert str(SourceError("gone.yaml", None, "", "cannot read")) == "gone.yaml cannot read"


# ---------------------------------------------------------------------------
# structure problems


def test_duplicate_key_is_an_error_naming_both_lines() -> None:
    errors = messages(
        """
        upstreams:
          payment:
            url: http://a
          payment:
            url: http://b
        """
    )

    assert errors == [
        "f.yaml:4 upstreams.payment: duplicate key 'payment' (first defined on line 2)"
    ]


def test_duplicate_key_keeps_the_first_definition() -> None:
    doc = parse(yaml_text("listen: a:1\nlisten: b:2\n"), "f.yaml", env={})

    assert doc.data == {"listen": "a:1"}


def test_yaml_merge_key_is_refused_at_its_line() -> None:
    errors = messages(
        """
        base: &base {attempts: 2}
        retry:
          <<: *base
        """
    )

    assert any(e.startswith("f.yaml:3 ") and "merge keys (<<)" in e for e in errors)


def test_complex_key_is_refused() -> None:
    assert messages("? [a, b]\n: 1\n") == ["f.yaml:1 keys must be plain strings"]


def test_invalid_yaml_is_an_error_with_a_line_not_an_exception() -> None:
    doc = parse(
        yaml_text(
            """
            upstreams:
              payment:
                url: http://pay
               timeout: 1s
            """
        ),
        "f.yaml",
        env={},
    )

    assert doc.data is None
    assert [(e.line, e.message.startswith("invalid YAML")) for e in doc.errors] == [(4, True)]


def test_empty_document_is_an_empty_mapping() -> None:
    doc = parse("# nothing but a comment\n", "f.yaml", env={})

    assert (doc.data, doc.errors) == ({}, [])


# ---------------------------------------------------------------------------
# ${VAR} expansion


def test_set_variable_is_substituted() -> None:
    doc = parse("url: ${PAYMENT_URL}\n", "f.yaml", env={"PAYMENT_URL": "http://pay:9101"})

    assert doc.data == {"url": "http://pay:9101"}


def test_variable_is_substituted_inside_a_longer_string() -> None:
    doc = parse("url: http://${HOST}:9101/v1\n", "f.yaml", env={"HOST": "pay.internal"})

    assert doc.data == {"url": "http://pay.internal:9101/v1"}


def test_unset_variable_takes_its_default() -> None:
    doc = parse("url: ${PAYMENT_URL:-http://127.0.0.1:9101}\n", "f.yaml", env={})

    assert doc.data == {"url": "http://127.0.0.1:9101"}


def test_empty_variable_counts_as_unset_for_the_default() -> None:
    doc = parse("url: ${PAYMENT_URL:-http://fallback}\n", "f.yaml", env={"PAYMENT_URL": ""})

    assert doc.data == {"url": "http://fallback"}


def test_empty_default_gives_an_empty_string() -> None:
    doc = parse("token: ${TOKEN:-}\n", "f.yaml", env={})

    assert (doc.data, doc.errors) == ({"token": ""}, [])


def test_unset_variable_without_default_is_an_error_naming_it_and_its_line() -> None:
    errors = messages("admin:\n  token: ${ADMIN_TOKEN}\n")

    assert errors == [
        "f.yaml:2 admin.token: environment variable ADMIN_TOKEN is not set "
        "(use ${ADMIN_TOKEN:-default})"
    ]


def test_every_unset_variable_is_reported() -> None:
    errors = messages("a: ${ONE}\nb: ${TWO}\n")

    assert [e.split(": ", 1)[0] for e in errors] == ["f.yaml:1 a", "f.yaml:2 b"]


def test_variable_holding_yaml_syntax_stays_a_string() -> None:
    doc = parse("token: ${TOKEN}\n", "f.yaml", env={"TOKEN": "{a: 1}\nlisten: 0.0.0.0:80"})

    assert doc.data == {"token": "{a: 1}\nlisten: 0.0.0.0:80"}


def test_variable_holding_a_number_stays_a_string() -> None:
    doc = parse("port: ${PORT}\nflag: ${FLAG}\n", "f.yaml", env={"PORT": "8080", "FLAG": "true"})

    assert doc.data == {"port": "8080", "flag": "true"}


def test_variables_are_not_expanded_in_keys() -> None:
    doc = parse("${SECTION}: 1\n", "f.yaml", env={"SECTION": "listen"})

    assert doc.data == {"${SECTION}": 1}


def test_process_environment_is_used_when_no_env_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SIDECAR_TEST_HOST", "from-environ")

    doc = parse("host: ${SIDECAR_TEST_HOST}\n", "f.yaml")

    assert doc.data == {"host": "from-environ"}
