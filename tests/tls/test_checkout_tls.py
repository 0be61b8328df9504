"""The composite checkout through an mTLS upstream: steps, commits and compensations alike.

The shipped checkout runs against the simulator, with payment behind a TLS front
that requires a client certificate and forwards to the simulator's payment
service. Nothing in the checkout knows about TLS: its calls go through the same
`Upstream.call` as proxied requests, so the upstream's `tls:` section applies.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.simulator import Simulator, start_simulator
from tests.checkout.conftest import ORDER, Rig, new_key, sidecar_config, simulator_config
from tests.tls.conftest import Pki, StartTlsUpstream, TlsUpstream


@pytest.fixture
async def tls_rig(
    pki: Pki, start_tls_upstream: StartTlsUpstream, start_sidecar: Any, tmp_path: Path
) -> AsyncIterator[tuple[Rig, TlsUpstream, list[str]]]:
    async with await start_simulator(simulator_config()) as sim:
        paths: list[str] = []
        front = await start_tls_upstream(
            leaf=pki.named_server, require_client_cert=True, handler=forward_to(sim, paths)
        )
        store = f"sqlite://{tmp_path}/sidecar-{uuid.uuid4().hex[:8]}.db"
        data = sidecar_config(sim, store)
        data["upstreams"]["payment"]["url"] = f"https://127.0.0.1:{front.port}"
        data["upstreams"]["payment"]["tls"] = {
            "ca_file": pki.ca_file,
            "cert_file": pki.cert_file,
            "key_file": pki.key_file,
            "server_name": "payment.internal",
        }
        sidecar, url = await start_sidecar(data)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
            yield Rig(sim, sidecar, url, http), front, paths


def forward_to(sim: Simulator, paths: list[str]) -> Any:
    """A handler passing each request on to the simulator's payment service."""

    async def forward(request: web.Request) -> web.Response:
        paths.append(f"{request.method} {request.path}")
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with aiohttp.ClientSession() as http:
            async with http.request(
                request.method,
                sim.url("payment") + request.path_qs,
                headers=headers,
                data=await request.read(),
            ) as answer:
                body = await answer.read()
                kept = {"Content-Type": answer.headers.get("Content-Type", "application/json")}
                return web.Response(status=answer.status, body=body, headers=kept)

    return forward


async def test_checkout_authorizes_and_captures_through_mutual_tls(
    tls_rig: tuple[Rig, TlsUpstream, list[str]], pki: Pki
) -> None:
    rig, front, paths = tls_rig

    reply = await rig.checkout(dict(ORDER))

    assert reply.status == 200, reply.raw
    auth = reply.json()["steps"]["payment"]["body"]["id"]
    assert paths == ["POST /authorize", f"POST /payments/{auth}/capture"]
    assert front.seen_serials == [pki.client_serial] * 2
    assert rig.ledger()["authorizations"][auth]["status"] == "captured"


async def test_rejected_checkout_voids_the_authorization_through_mutual_tls(
    tls_rig: tuple[Rig, TlsUpstream, list[str]], pki: Pki
) -> None:
    rig, front, paths = tls_rig
    order = {**ORDER, "items": [{"sku": "sku-rare", "qty": 5}]}
    # inventory refuses only after payment has authorized, so there is a void to send
    # (a refusal cuts the rest of the fan-out short)
    rig.sim.set_faults("inventory", {"latency": {"dist": "fixed", "ms": 300}})

    reply = await rig.checkout(order, key=new_key())

    assert reply.status == 409, reply.raw
    assert reply.json()["steps"]["payment"]["status"] == "compensated"
    (auth,) = rig.ledger()["authorizations"]
    assert paths == ["POST /authorize", f"POST /payments/{auth}/void"]
    assert front.seen_serials == [pki.client_serial] * 2
    assert rig.ledger()["authorizations"][auth]["status"] == "voided"
