"""Calls to real TLS upstreams on loopback through a real sidecar.

Each test runs a TLS server with certificates from a throwaway CA (`conftest.Pki`)
and a sidecar whose upstream has a `tls:` section pointing at the PEM files.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

import aiohttp
import pytest
from prometheus_client import generate_latest

from proxy.admin import redacted_config
from tests.tls.conftest import Pki, StartTlsUpstream


async def get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.json()


async def test_verified_call_to_an_upstream_of_a_private_ca(
    pki: Pki, start_tls_upstream: StartTlsUpstream, start_sidecar: Any
) -> None:
    upstream = await start_tls_upstream()
    tls = {"ca_file": pki.ca_file}
    _, base = await start_sidecar({"upstreams": {"payment": {"url": upstream.url, "tls": tls}}})

    status, body = await get(f"{base}/payment/charges")

    assert status == 200, body
    assert body == {"path": "/charges", "tls": True}


async def test_upstream_of_an_untrusted_ca_is_refused_with_tls_verify_failed_not_retried(
    pki: Pki, start_tls_upstream: StartTlsUpstream, start_sidecar: Any
) -> None:
    upstream = await start_tls_upstream()
    tls = {"ca_file": pki.other_ca_file}
    _, base = await start_sidecar({"upstreams": {"payment": {"url": upstream.url, "tls": tls}}})

    status, body = await get(f"{base}/payment/charges")

    assert status == 502
    assert body["reason"] == "tls_verify_failed"
    assert body["attempts"] == 1, "a retry meets the same certificate: not retried by default"
    assert "certificate verify failed" in body["error"]
    assert upstream.seen_serials == [], "no request reached the upstream"


async def test_tls_verify_failed_may_be_retried_when_configured(
    pki: Pki, start_tls_upstream: StartTlsUpstream, start_sidecar: Any
) -> None:
    upstream = await start_tls_upstream()
    policy = {
        "url": upstream.url,
        "tls": {"ca_file": pki.other_ca_file},
        "retry": {"on": ["tls-verify-failed"], "attempts": 2, "backoff": {"base": "1ms"}},
    }
    _, base = await start_sidecar({"upstreams": {"payment": policy}})

    status, body = await get(f"{base}/payment/x")

    assert (status, body["reason"], body["attempts"]) == (502, "tls_verify_failed", 2)


async def test_tls_failures_are_counted_and_open_the_breaker(
    pki: Pki, start_tls_upstream: StartTlsUpstream, start_sidecar: Any
) -> None:
    upstream = await start_tls_upstream()
    policy = {
        "url": upstream.url,
        "tls": {"ca_file": pki.other_ca_file},
        "breaker": {"min_calls": 3, "failure_rate": 0.5},
    }
    sidecar, base = await start_sidecar({"upstreams": {"payment": policy}})

    reasons = [(await get(f"{base}/payment/x"))[1]["reason"] for _ in range(4)]

    assert reasons == ["tls_verify_failed"] * 3 + ["circuit_open"]
    scrape = generate_latest(sidecar.metrics.registry).decode()
    assert 'sidecar_attempts_total{result="tls_verify_failed",upstream="payment"} 3.0' in scrape


async def test_upstream_requiring_a_client_certificate_refuses_without_and_serves_with(
    pki: Pki, start_tls_upstream: StartTlsUpstream, start_sidecar: Any
) -> None:
    # TLS 1.2: the server refuses inside the handshake, so the sidecar sees why
    upstream = await start_tls_upstream(
        require_client_cert=True, max_version=ssl.TLSVersion.TLSv1_2
    )
    without = {"url": upstream.url, "tls": {"ca_file": pki.ca_file}}
    with_cert = {
        "url": upstream.url,
        "tls": {"ca_file": pki.ca_file, "cert_file": pki.cert_file, "key_file": pki.key_file},
    }
    _, base = await start_sidecar({"upstreams": {"anon": without, "mtls": with_cert}})

    refused_status, refused = await get(f"{base}/anon/x")
    served_status, served = await get(f"{base}/mtls/x")

    assert (refused_status, refused["reason"]) == (502, "tls_handshake_failed"), refused
    assert served_status == 200, served
    assert upstream.seen_serials == [pki.client_serial]


async def test_tls13_upstream_requiring_a_client_certificate_refuses_without_one(
    pki: Pki, start_tls_upstream: StartTlsUpstream, start_sidecar: Any
) -> None:
    # TLS 1.3 finishes the client's handshake before the server checks the client's
    # certificate: its refusal arrives as the connection closing (see README)
    upstream = await start_tls_upstream(require_client_cert=True)
    tls = {"ca_file": pki.ca_file}
    _, base = await start_sidecar({"upstreams": {"anon": {"url": upstream.url, "tls": tls}}})

    status, body = await get(f"{base}/anon/x")

    assert status == 502
    assert body["reason"] in ("reset", "tls_handshake_failed")
    assert upstream.seen_serials == []


async def test_server_name_other_than_the_url_host_is_sent_and_verified(
    pki: Pki, start_tls_upstream: StartTlsUpstream, start_sidecar: Any
) -> None:
    upstream = await start_tls_upstream(leaf=pki.named_server)  # for payment.internal only
    url = f"https://127.0.0.1:{upstream.port}"
    named = {"url": url, "tls": {"ca_file": pki.ca_file, "server_name": "payment.internal"}}
    unnamed = {"url": url, "tls": {"ca_file": pki.ca_file}}
    _, base = await start_sidecar({"upstreams": {"named": named, "unnamed": unnamed}})

    named_status, _ = await get(f"{base}/named/x")
    unnamed_status, unnamed_body = await get(f"{base}/unnamed/x")

    assert named_status == 200
    assert (unnamed_status, unnamed_body["reason"]) == (502, "tls_verify_failed")
    assert "127.0.0.1" in unnamed_body["error"]


async def test_post_with_a_body_goes_through_the_tls_settings(
    pki: Pki, start_tls_upstream: StartTlsUpstream, start_sidecar: Any
) -> None:
    upstream = await start_tls_upstream(require_client_cert=True)
    tls = {"ca_file": pki.ca_file, "cert_file": pki.cert_file, "key_file": pki.key_file}
    _, base = await start_sidecar({"upstreams": {"payment": {"url": upstream.url, "tls": tls}}})

    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/payment/charges", json={"amount": 1}) as response:
            assert response.status == 200, await response.text()

    assert upstream.seen_serials == [pki.client_serial]


async def test_certificate_expiry_is_a_gauge_per_upstream_and_kind(
    pki: Pki, start_tls_upstream: StartTlsUpstream, start_sidecar: Any
) -> None:
    upstream = await start_tls_upstream()
    tls = {"ca_file": pki.ca_file, "cert_file": pki.cert_file, "key_file": pki.key_file}
    sidecar, _ = await start_sidecar({"upstreams": {"payment": {"url": upstream.url, "tls": tls}}})

    samples = {
        sample.labels["kind"]: sample.value
        for family in sidecar.metrics.registry.collect()
        if family.name == "sidecar_tls_cert_expiry_seconds"
        for sample in family.samples
        if sample.labels["upstream"] == "payment"
    }

    assert set(samples) == {"client", "ca"}
    assert all(seconds > 30 * 86400 for seconds in samples.values()), samples


async def test_insecure_skip_verify_warns_at_load_and_reload_and_shows_in_admin_config(
    pki: Pki,
    start_tls_upstream: StartTlsUpstream,
    start_sidecar: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream = await start_tls_upstream()
    tls = {"insecure_skip_verify": True}
    caplog.set_level(logging.WARNING, logger="proxy")
    sidecar, base = await start_sidecar(
        {"upstreams": {"payment": {"url": upstream.url, "tls": tls}}}
    )
    assert any("verification is off" in r.getMessage() for r in caplog.records)

    status, _ = await get(f"{base}/payment/x")  # untrusted CA, but nothing is checked
    caplog.clear()
    sidecar.apply(sidecar.config)

    assert status == 200
    assert any("verification is off" in r.getMessage() for r in caplog.records)
    shown = redacted_config(sidecar.config)["upstreams"]["payment"]["tls"]
    assert shown["insecure_skip_verify"] is True
