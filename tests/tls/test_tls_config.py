"""The `tls:` section: files read at load, every unusable one a `file:line` error naming it."""

from __future__ import annotations

import datetime
import textwrap

import pytest
from cryptography.hazmat.primitives import serialization

from proxy.config.loader import validate_text
from proxy.config.model import Config
from tests.tls.conftest import Pki


def load(text: str) -> tuple[Config | None, list[str]]:
    config, errors = validate_text(textwrap.dedent(text).lstrip("\n"), "f.yaml", env={})
    return config, [str(e) for e in errors]


def upstream_with_tls(tls: str) -> str:
    """A config whose line 5 is the first line of `tls` (line 4 is `tls:` itself)."""
    body = textwrap.indent(textwrap.dedent(tls).strip("\n") + "\n", "      ")
    return "upstreams:\n  payment:\n    url: https://pay.example\n    tls:\n" + body


def test_a_complete_tls_section_loads(pki: Pki) -> None:
    config, errors = load(
        upstream_with_tls(
            f"""
            ca_file: {pki.ca_file}
            cert_file: {pki.cert_file}
            key_file: {pki.key_file}
            server_name: payment.internal
            min_version: 1.3
            """
        )
    )

    assert errors == []
    assert config is not None
    tls = config.upstreams["payment"].tls
    assert tls is not None
    assert (tls.min_version, tls.server_name, tls.insecure_skip_verify) == (
        "1.3",
        "payment.internal",
        False,
    )
    assert tls.trusts_system is False, "a private CA replaces the system store by default"


def test_defaults_tls_reaches_every_upstream_and_an_upstream_may_add_to_it(pki: Pki) -> None:
    config, errors = load(
        f"""
        defaults:
          tls: {{ca_file: {pki.ca_file}, system_ca: true}}
        upstreams:
          payment:
            url: https://pay.example
            tls: {{cert_file: {pki.cert_file}, key_file: {pki.key_file}}}
          shipping:
            url: https://ship.example
        """
    )

    assert errors == [] and config is not None
    payment, shipping = config.upstreams["payment"].tls, config.upstreams["shipping"].tls
    assert payment is not None and shipping is not None
    assert payment.ca_file == shipping.ca_file == pki.ca_file
    assert payment.cert_file == pki.cert_file and shipping.cert_file is None
    assert payment.trusts_system and shipping.trusts_system


def test_expired_client_certificate_is_refused_at_load_naming_the_file(pki: Pki) -> None:
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    expired = pki.ca.issue_cert("old", not_before=past, not_after=past + datetime.timedelta(1))
    cert_file, key_file = pki.write_pair("expired", expired)

    _, errors = load(upstream_with_tls(f"cert_file: {cert_file}\nkey_file: {key_file}"))

    assert len(errors) == 1
    assert errors[0].startswith(
        f"f.yaml:5 upstreams.payment.tls.cert_file: certificate file {cert_file}: certificate"
    )
    assert "expired on 2020-01-02" in errors[0]


def test_expired_ca_is_refused_at_load_naming_the_file(pki: Pki) -> None:
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    expired = pki.ca.issue_cert("old-ca", not_before=past, not_after=past + datetime.timedelta(1))
    ca_file = pki.write("expired-ca.pem", expired.cert_chain_pems[0].bytes())

    _, errors = load(upstream_with_tls(f"ca_file: {ca_file}"))

    assert len(errors) == 1 and errors[0].startswith(
        f"f.yaml:5 upstreams.payment.tls.ca_file: CA file {ca_file}: certificate"
    )


def test_missing_file_is_an_error_at_its_line_naming_it(pki: Pki) -> None:
    _, errors = load(upstream_with_tls("ca_file: /nonexistent/ca.pem"))

    assert errors == [
        "f.yaml:5 upstreams.payment.tls.ca_file: "
        "CA file /nonexistent/ca.pem: cannot read: No such file or directory"
    ]


def test_file_without_a_certificate_is_an_error_naming_it(pki: Pki) -> None:
    _, errors = load(upstream_with_tls(f"ca_file: {pki.key_file}"))

    assert errors == [
        f"f.yaml:5 upstreams.payment.tls.ca_file: CA file {pki.key_file}: no PEM certificate in it"
    ]


def test_key_of_another_certificate_is_an_error_naming_both_files(pki: Pki) -> None:
    _, other_key = pki.write_pair("other", pki.new_client())

    _, errors = load(upstream_with_tls(f"cert_file: {pki.cert_file}\nkey_file: {other_key}"))

    assert errors == [
        f"f.yaml:4 upstreams.payment.tls: key file {other_key}: "
        f"does not match the certificate in {pki.cert_file}"
    ]


def test_certificate_without_its_key_is_an_error(pki: Pki) -> None:
    _, errors = load(upstream_with_tls(f"cert_file: {pki.cert_file}"))

    assert errors == [
        "f.yaml:4 upstreams.payment.tls: set cert_file and key_file together (a client certificate)"
    ]


def test_error_in_defaults_tls_is_reported_once_at_its_own_line() -> None:
    _, errors = load(
        """
        defaults:
          tls: {ca_file: /nonexistent/ca.pem}
        upstreams:
          payment: {url: https://pay.example}
          shipping: {url: https://ship.example}
        """
    )

    assert errors == [
        "f.yaml:2 defaults.tls.ca_file: "
        "CA file /nonexistent/ca.pem: cannot read: No such file or directory"
    ]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("min_version: '1.1'", "upstreams.payment.tls.min_version: '1.1'"),
        ("system_ca: false", "system_ca: false needs a ca_file"),
        ("server_name: 'https://x'", "is not a host name"),
        ("verify: false", "upstreams.payment.tls.verify: unknown key"),
    ],
)
def test_invalid_tls_settings_are_errors(line: str, problem: str) -> None:
    _, errors = load(upstream_with_tls(line))

    assert len(errors) == 1 and problem in errors[0], errors


def test_tls_failures_are_not_retried_unless_named(pki: Pki) -> None:
    config, errors = load(
        """
        upstreams:
          plain: {url: https://a.example}
          named: {url: https://b.example, retry: {on: [tls-handshake-failed, timeout]}}
        """
    )

    assert errors == [] and config is not None
    assert config.upstreams["plain"].retry.conditions == {"connect-failure", "timeout", "reset"}
    assert config.upstreams["named"].retry.conditions == {"tls-handshake-failed", "timeout"}


def test_encrypted_key_is_an_error_naming_the_file(pki: Pki) -> None:
    key = serialization.load_pem_private_key(pki.client.private_key_pem.bytes(), None)
    locked = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    key_file = pki.write("locked.key", locked)

    _, errors = load(upstream_with_tls(f"cert_file: {pki.cert_file}\nkey_file: {key_file}"))

    assert errors == [
        f"f.yaml:6 upstreams.payment.tls.key_file: key file {key_file}: "
        "is encrypted (use an unencrypted key)"
    ]
