"""`ClientTls` alone: when it looks at the files, and what it keeps when a rotation is half done."""

from __future__ import annotations

import os
import ssl

from proxy.client.http11 import ConnectError, classify_error
from proxy.resilience.clock import FakeClock
from proxy.resilience.outcome import Kind
from proxy.tls import ClientTls, TlsOptions
from tests.tls.conftest import Pki


def options(pki: Pki) -> TlsOptions:
    return TlsOptions(
        ca_file=pki.ca_file, system_ca=False, cert_file=pki.cert_file, key_file=pki.key_file
    )


def replace_file(path: str, data: bytes) -> None:
    staged = f"{path}.new"
    with open(staged, "wb") as f:
        f.write(data)
    os.replace(staged, path)


def test_files_are_looked_at_only_once_per_interval(pki: Pki) -> None:
    clock = FakeClock()
    tls = ClientTls(options(pki), check_every=1.0, clock=clock)
    first = tls.context()
    renewed = pki.new_client()
    replace_file(pki.cert_file, renewed.cert_chain_pems[0].bytes())
    replace_file(pki.key_file, renewed.private_key_pem.bytes())

    assert tls.context() is first, "not looked at before the interval"
    clock.advance(1.0)
    assert tls.context() is not first
    assert tls.reloads == 1


def test_a_half_written_pair_keeps_the_context_in_force_until_the_key_arrives(pki: Pki) -> None:
    clock = FakeClock()
    tls = ClientTls(options(pki), check_every=1.0, clock=clock)
    first = tls.context()
    renewed = pki.new_client()

    replace_file(pki.cert_file, renewed.cert_chain_pems[0].bytes())  # the key is not there yet
    clock.advance(1.0)
    assert tls.context() is first

    replace_file(pki.key_file, renewed.private_key_pem.bytes())
    clock.advance(1.0)
    assert tls.context() is not first


def test_expiry_follows_the_rotated_certificate(pki: Pki) -> None:
    tls = ClientTls(options(pki), check_every=0.0)
    before = dict(tls.seconds_left(now=0.0))
    renewed = pki.new_client()
    replace_file(pki.cert_file, renewed.cert_chain_pems[0].bytes())
    replace_file(pki.key_file, renewed.private_key_pem.bytes())

    assert tls.refresh()
    assert set(before) == {"client", "ca"}
    assert dict(tls.seconds_left(now=0.0))["client"] >= before["client"]


def test_certificate_errors_are_tls_verify_failed() -> None:
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_message = "self-signed certificate"

    outcome = classify_error(error)

    assert outcome.kind is Kind.TLS_VERIFY_FAILED
    assert outcome.reason == "tls_verify_failed"
    assert outcome.detail == "certificate verify failed: self-signed certificate"


def test_other_ssl_errors_while_connecting_are_tls_handshake_failed() -> None:
    cause = ssl.SSLError(1, "[SSL: TLSV1_ALERT_PROTOCOL_VERSION] alert protocol version")
    cause.reason = "TLSV1_ALERT_PROTOCOL_VERSION"
    error = ConnectError(cause)

    outcome = classify_error(error, tls=True)

    assert outcome.kind is Kind.TLS_HANDSHAKE_FAILED
    assert outcome.detail == "TLSV1_ALERT_PROTOCOL_VERSION"


def test_an_ssl_error_after_connecting_is_a_reset_the_upstream_may_have_acted() -> None:
    error = ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] bad record mac")

    assert classify_error(error, tls=True).kind is Kind.RESET


def test_a_reset_while_connecting_is_a_handshake_failure_only_for_https() -> None:
    error = ConnectError(ConnectionResetError())

    assert classify_error(error, tls=True).kind is Kind.TLS_HANDSHAKE_FAILED
    assert classify_error(error, tls=False).kind is Kind.CONNECT_FAILURE
