"""Config validation: every mistake in the YAML comes back as `file:line path: message`."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from proxy.config.loader import ConfigError, json_schema, load_config, validate_text
from proxy.config.model import Config

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = REPO / "config" / "sidecar.yaml"
DURATION_MESSAGE = "is not a duration (use 250ms, 2s, 1m)"


def yaml_text(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def valid(text: str, env: dict[str, str] | None = None) -> Config:
    config, errors = validate_text(yaml_text(text), "f.yaml", env={} if env is None else env)
    assert errors == []
    assert config is not None
    return config


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    config, errors = validate_text(yaml_text(text), "f.yaml", env={} if env is None else env)
    assert config is None
    return [str(e) for e in errors]


def with_upstream(body: str) -> str:
    """A config whose line 3 is the first line of `body`, inside `upstreams.payment`."""
    return "upstreams:\n  payment:\n" + textwrap.indent(yaml_text(body).rstrip("\n") + "\n", "    ")


# ---------------------------------------------------------------------------
# durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("2s", 2.0), ("1m", 60.0), ("24h", 86400.0), ("1.5s", 1.5)],
)
def test_duration_with_a_unit_parses_to_seconds(text: str, seconds: float) -> None:
    config = valid(f"defaults:\n  pool:\n    keepalive: {text}\n")

    assert config.defaults.pool.keepalive == pytest.approx(seconds)


@pytest.mark.parametrize(("text", "shown"), [("10x", "'10x'"), ("5", "5"), ("-1s", "'-1s'")])
def test_invalid_duration_is_an_error_at_its_line(text: str, shown: str) -> None:
    errors = errors_of(f"listen: 127.0.0.1:8080\ndefaults:\n  pool:\n    keepalive: {text}\n")

    assert f"f.yaml:4 defaults.pool.keepalive: {shown} {DURATION_MESSAGE}" in errors


def test_invalid_duration_inside_an_upstream_names_the_full_path() -> None:
    errors = errors_of(
        with_upstream(
            """
            url: http://pay
            retry:
              backoff:
                base: 10x
            """
        )
    )

    assert f"f.yaml:6 upstreams.payment.retry.backoff.base: '10x' {DURATION_MESSAGE}" in errors


# ---------------------------------------------------------------------------
# ${VAR} substitution, through the whole config


def test_set_variable_fills_an_upstream_url() -> None:
    config = valid(with_upstream("url: ${PAYMENT_URL}"), env={"PAYMENT_URL": "http://pay:9101"})

    assert config.upstreams["payment"].url == "http://pay:9101"


def test_unset_variable_with_default_uses_the_default() -> None:
    config = valid(with_upstream("url: ${PAYMENT_URL:-http://127.0.0.1:9101}"))

    assert config.upstreams["payment"].url == "http://127.0.0.1:9101"


def test_empty_variable_is_treated_as_unset_by_the_default() -> None:
    config = valid(
        with_upstream("url: ${PAYMENT_URL:-http://127.0.0.1:9101}"), env={"PAYMENT_URL": ""}
    )

    assert config.upstreams["payment"].url == "http://127.0.0.1:9101"


def test_unset_variable_without_default_is_an_error_naming_it_and_its_line() -> None:
    errors = errors_of(with_upstream("url: ${PAYMENT_URL}"))

    assert any(
        e.startswith("f.yaml:3 upstreams.payment.url: environment variable PAYMENT_URL is not set")
        for e in errors
    )


def test_variable_holding_yaml_syntax_is_not_parsed_as_yaml() -> None:
    config = valid("admin:\n  token: ${ADMIN_TOKEN}\n", env={"ADMIN_TOKEN": "{a: 1}"})

    assert config.admin.token == "{a: 1}"


def test_variable_in_a_key_is_not_expanded() -> None:
    errors = errors_of("${SECTION}: 127.0.0.1:8080\n", env={"SECTION": "listen"})

    assert "f.yaml:1 ${SECTION}: unknown key" in errors


# ---------------------------------------------------------------------------
# unknown keys


def test_unknown_top_level_key_is_an_error_at_its_line() -> None:
    errors = errors_of("listen: 127.0.0.1:8080\nlisten_adress: 127.0.0.1:8081\n")

    assert "f.yaml:2 listen_adress: unknown key" in errors


def test_unknown_key_inside_an_upstream_is_an_error_at_its_line() -> None:
    errors = errors_of(with_upstream("url: http://pay\ntimeuot: {total: 1s}"))

    assert "f.yaml:4 upstreams.payment.timeuot: unknown key" in errors


def test_unknown_key_inside_defaults_retry_is_an_error_at_its_line() -> None:
    errors = errors_of("defaults:\n  retry:\n    attempt: 3\n")

    assert "f.yaml:3 defaults.retry.attempt: unknown key" in errors


# ---------------------------------------------------------------------------
# upstream URLs and names


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://pay.internal", "must start with http:// or https://"),
        ("http://", "has no host"),
        ("http://pay.internal/?region=eu", "must not carry a query string"),
    ],
)
def test_bad_upstream_url_is_an_error_at_its_line(url: str, problem: str) -> None:
    errors = errors_of(with_upstream(f"url: '{url}'"))

    assert any(
        e.startswith(f"f.yaml:3 upstreams.payment.url: '{url}'") and problem in e for e in errors
    )


def test_missing_upstream_url_is_required() -> None:
    errors = errors_of(with_upstream("retry: {attempts: 2}"))

    assert "f.yaml:2 upstreams.payment.url: is required" in errors


def test_upstream_url_loses_its_trailing_slash() -> None:
    config = valid(with_upstream("url: http://pay.internal/v1/"))

    assert config.upstreams["payment"].url == "http://pay.internal/v1"


def test_duplicate_upstream_name_is_an_error_naming_both_lines() -> None:
    errors = errors_of(
        """
        upstreams:
          payment:
            url: http://a
          payment:
            url: http://b
        """
    )

    assert "f.yaml:4 upstreams.payment: duplicate key 'payment' (first defined on line 2)" in errors


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("Payment", "upstream name 'Payment' must be lower case"),
        ("checkout", "upstream name 'checkout' is reserved"),
    ],
)
def test_invalid_upstream_name_is_an_error(name: str, problem: str) -> None:
    errors = errors_of(f"upstreams:\n  {name}:\n    url: http://pay\n")

    assert any(e.startswith("f.yaml:") and problem in e for e in errors)


def test_invalid_upstream_name_is_reported_at_its_own_line() -> None:
    errors = errors_of("upstreams:\n  coupon:\n    url: http://c\n  Payment:\n    url: http://p\n")

    assert any(e.startswith("f.yaml:4 upstreams.Payment: upstream name") for e in errors)


def test_invalid_upstream_name_does_not_hide_errors_in_other_upstreams() -> None:
    errors = errors_of("upstreams:\n  Payment:\n    url: http://p\n  coupon:\n    url: ftp://c\n")

    assert any(e.startswith("f.yaml:5 upstreams.coupon.url:") for e in errors)


# ---------------------------------------------------------------------------
# rules between fields


def test_per_try_longer_than_total_is_an_error_at_the_timeout_line() -> None:
    errors = errors_of(with_upstream("url: http://pay\ntimeout: {per_try: 5s, total: 1s}"))

    assert "f.yaml:4 upstreams.payment.timeout: per_try (5s) is longer than total (1s)" in errors


def test_backoff_max_below_base_is_an_error_at_the_backoff_line() -> None:
    errors = errors_of(with_upstream("url: http://pay\nretry:\n  backoff: {base: 2s, max: 1s}"))

    assert "f.yaml:5 upstreams.payment.retry.backoff: max (1s) is smaller than base (2s)" in errors


def test_unknown_retry_condition_is_an_error_with_its_index() -> None:
    errors = errors_of(
        with_upstream(
            """
            url: http://pay
            retry:
              on:
                - timeout
                - 502
                - bogus
            """
        )
    )

    assert any(
        e.startswith("f.yaml:8 upstreams.payment.retry.on[2]: 'bogus' is not a retry condition")
        for e in errors
    )


def test_success_status_as_retry_condition_is_an_error_with_its_index() -> None:
    errors = errors_of(with_upstream("url: http://pay\nretry:\n  on: [timeout, 502, 200]"))

    assert any(
        e.startswith("f.yaml:5 upstreams.payment.retry.on[2]: 200 is not a retryable status")
        for e in errors
    )


# ---------------------------------------------------------------------------
# defaults: merge


def test_upstream_inherits_every_default_it_does_not_override() -> None:
    config = valid(
        """
        defaults:
          timeout: {connect: 100ms, per_try: 2s, total: 9s}
          retry: {attempts: 5, backoff: {base: 50ms, max: 500ms}, on: [timeout, 503]}
          pool: {max_connections: 7, keepalive: 1m}
          max_request_body: 1MiB
        upstreams:
          payment:
            url: http://pay
        """
    )

    payment = config.upstreams["payment"]
    assert payment.timeout == config.defaults.timeout
    assert payment.retry == config.defaults.retry
    assert payment.pool == config.defaults.pool
    assert payment.max_request_body == 1024 * 1024
    assert (payment.timeout.connect, payment.retry.attempts, payment.pool.keepalive) == (
        0.1,
        5,
        60.0,
    )


def test_upstream_overriding_a_deep_key_keeps_its_siblings_from_defaults() -> None:
    config = valid(
        """
        defaults:
          timeout: {connect: 100ms, per_try: 2s, total: 9s}
          retry: {backoff: {base: 50ms, max: 800ms}}
        upstreams:
          payment:
            url: http://pay
            timeout: {per_try: 500ms}
            retry: {backoff: {base: 20ms}}
        """
    )

    payment = config.upstreams["payment"]
    assert (payment.timeout.connect, payment.timeout.per_try, payment.timeout.total) == (
        0.1,
        0.5,
        9.0,
    )
    assert (payment.retry.backoff.base, payment.retry.backoff.max) == (0.02, 0.8)


def test_upstream_override_does_not_leak_into_other_upstreams() -> None:
    config = valid(
        """
        defaults:
          retry: {attempts: 4}
        upstreams:
          payment:
            url: http://pay
            retry: {attempts: 2}
          coupon:
            url: http://coupon
        """
    )

    assert config.upstreams["payment"].retry.attempts == 2
    assert config.upstreams["coupon"].retry.attempts == 4
    assert config.defaults.retry.attempts == 4


def test_invalid_default_is_reported_once_at_the_defaults_line() -> None:
    errors = errors_of(
        """
        defaults:
          pool:
            keepalive: 10x
        upstreams:
          payment: {url: http://pay}
          coupon: {url: http://coupon}
          fraud: {url: http://fraud}
        """
    )

    assert [e for e in errors if DURATION_MESSAGE in e] == [
        f"f.yaml:3 defaults.pool.keepalive: '10x' {DURATION_MESSAGE}"
    ]


def test_unknown_key_in_defaults_is_reported_once_at_its_line() -> None:
    errors = errors_of(
        """
        defaults:
          retry:
            attempt: 3
        upstreams:
          payment: {url: http://pay}
          coupon: {url: http://coupon}
        """
    )

    assert [e for e in errors if "unknown key" in e] == [
        "f.yaml:3 defaults.retry.attempt: unknown key"
    ]


# ---------------------------------------------------------------------------
# admin listener


def test_admin_beyond_loopback_without_token_is_an_error() -> None:
    errors = errors_of("admin:\n  listen: 0.0.0.0:9901\n")

    assert any(e.startswith("f.yaml:2 admin.listen: 0.0.0.0:9901 is not loopback") for e in errors)


def test_admin_beyond_loopback_with_empty_token_variable_is_an_error() -> None:
    errors = errors_of(
        "admin:\n  listen: 0.0.0.0:9901\n  token: ${ADMIN_TOKEN:-}\n", env={"ADMIN_TOKEN": ""}
    )

    assert any("is not loopback" in e for e in errors)


def test_admin_beyond_loopback_with_token_is_accepted() -> None:
    config = valid("admin:\n  listen: 0.0.0.0:9901\n  token: s3cret\n")

    assert (config.admin.listen.host, config.admin.listen.port) == ("0.0.0.0", 9901)


def test_bracketed_ipv6_loopback_admin_is_loopback() -> None:
    config = valid("admin:\n  listen: '[::1]:9901'\n")

    assert (config.admin.listen.host, config.admin.listen.port) == ("::1", 9901)
    assert config.admin.listen.is_loopback


def test_admin_on_the_same_address_as_listen_is_an_error() -> None:
    errors = errors_of("listen: 127.0.0.1:8080\nadmin:\n  listen: 127.0.0.1:8080\n")

    assert "f.yaml:3 admin.listen: must differ from listen" in errors


# ---------------------------------------------------------------------------
# reporting


def test_every_mistake_is_reported_sorted_by_line() -> None:
    errors = errors_of(
        """
        upstreams:
          payment:
            url: ftp://pay
            retry: {attempts: 2}
          coupon:
            url: http://coupon
            retries: 2
        defaults:
          pool:
            keepalive: 10x
        """
    )

    assert len(errors) == 3
    assert [int(re.match(r"f\.yaml:(\d+) ", e)[1]) for e in errors] == [3, 7, 10]


def test_unset_variable_is_not_also_reported_as_an_invalid_value() -> None:
    errors = errors_of(with_upstream("url: ${PAYMENT_URL}"))

    assert [e for e in errors if e.startswith("f.yaml:3 ")] == [
        "f.yaml:3 upstreams.payment.url: environment variable PAYMENT_URL is not set "
        "(use ${PAYMENT_URL:-default})"
    ]


def test_yaml_level_and_model_level_errors_are_merged_in_line_order() -> None:
    errors = errors_of(
        """
        upstreams:
          payment:
            url: ftp://pay
          payment:
            url: http://pay
        listne: 127.0.0.1:8080
        """
    )

    assert [e.split(" ", 1)[0] for e in errors] == ["f.yaml:3", "f.yaml:4", "f.yaml:6"]


def test_admin_beyond_loopback_is_reported_alongside_other_mistakes() -> None:
    errors = errors_of("defaults:\n  pool:\n    keepalive: 10x\nadmin:\n  listen: 0.0.0.0:9901\n")

    assert any(e.startswith("f.yaml:5 admin.listen:") for e in errors)


def test_invalid_yaml_syntax_is_an_error_with_its_line() -> None:
    errors = errors_of(with_upstream("url: http://pay") + "   timeout: {total: 1s}\n")

    assert len(errors) == 1
    assert errors[0].startswith("f.yaml:4 invalid YAML:")


def test_config_that_is_not_a_mapping_is_an_error() -> None:
    assert errors_of("- listen\n- admin\n") == ["f.yaml:1 the config must be a mapping of sections"]


def test_empty_file_gives_the_defaults() -> None:
    config = valid("")

    assert (config.listen.port, config.admin.listen.port, config.upstreams) == (8080, 9901, {})


# ---------------------------------------------------------------------------
# load_config and the shipped file


def test_shipped_config_validates_with_an_empty_environment() -> None:
    config = load_config(SHIPPED_CONFIG, env={})

    assert config.upstreams
    assert config.admin.listen.is_loopback


def test_shipped_config_reads_upstream_urls_from_the_environment() -> None:
    config = load_config(SHIPPED_CONFIG, env={"PAYMENT_UPSTREAM": "https://pay.example"})

    assert config.upstreams["payment"].url == "https://pay.example"


def test_load_config_raises_with_every_error_and_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("listne: 1\ndefaults:\n  pool: {keepalive: 10x}\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})

    assert [(e.file, e.line) for e in caught.value.errors] == [(str(path), 1), (str(path), 3)]


def test_load_config_of_a_missing_file_says_it_cannot_read_it(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"

    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})

    assert str(caught.value) == f"{path} cannot read: No such file or directory"


# ---------------------------------------------------------------------------
# JSON Schema


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    assert ref.startswith("#/$defs/")
    return schema["$defs"][ref.removeprefix("#/$defs/")]


def test_schema_is_json_serialisable_and_names_its_dialect() -> None:
    schema = json.loads(json.dumps(json_schema()))

    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["type"] == "object"


def test_schema_describes_upstreams_as_a_map_of_upstream_objects() -> None:
    schema = json_schema()

    upstreams = schema["properties"]["upstreams"]
    assert upstreams["type"] == "object"
    upstream = _resolve(schema, upstreams["additionalProperties"])
    assert "url" in upstream["required"]
    assert upstream["properties"]["url"]["type"] == "string"


def test_schema_describes_defaults_with_the_policy_sections() -> None:
    schema = json_schema()

    defaults = _resolve(schema, schema["properties"]["defaults"])
    assert {"timeout", "retry", "pool"} <= set(defaults["properties"])


def test_schema_refuses_unknown_keys_in_sections() -> None:
    schema = json_schema()

    assert schema["additionalProperties"] is False
    assert _resolve(schema, schema["properties"]["defaults"])["additionalProperties"] is False


def test_schema_durations_are_strings_with_a_pattern_matching_valid_durations() -> None:
    schema = json_schema()
    timeouts = _resolve(
        schema, _resolve(schema, schema["properties"]["defaults"])["properties"]["timeout"]
    )

    per_try = timeouts["properties"]["per_try"]
    assert per_try["type"] == "string"
    pattern = re.compile(per_try["pattern"])
    assert all(pattern.search(text) for text in ("250ms", "2s", "1m", "24h", "1.5s"))
    assert not any(pattern.search(text) for text in ("10x", "5", "-1s"))


def test_schema_defaults_match_their_own_pattern() -> None:
    mismatched: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if "pattern" in node and "default" in node:
                default = node["default"]
                if not (isinstance(default, str) and re.search(node["pattern"], default)):
                    mismatched.append(f"{where}: {default!r}")
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    walk(json_schema(), "#")

    assert mismatched == []


def test_schema_is_a_valid_json_schema_when_jsonschema_is_installed() -> None:
    jsonschema = pytest.importorskip("jsonschema")

    jsonschema.Draft202012Validator.check_schema(json_schema())
