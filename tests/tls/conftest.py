"""A throwaway PKI and real TLS upstreams on loopback, for the TLS tests.

`Pki` is a CA (trustme) with a server certificate for 127.0.0.1 and one for
`payment.internal` only, a client certificate, and a second, unrelated CA; each
written to PEM files in the test's directory, as a mounted Secret would be.
`start_tls_upstream` serves an aiohttp app over TLS and records, per request, the
serial of the client certificate the connection presented (None without one).
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509


@dataclass
class Pki:
    """A CA and the certificates the tests need, with their files under `root`."""

    root: Path
    ca: trustme.CA = field(default_factory=trustme.CA)
    other_ca: trustme.CA = field(default_factory=trustme.CA)

    def __post_init__(self) -> None:
        self.server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.named_server = self.ca.issue_cert("payment.internal")
        self.client = self.ca.issue_cert("checkout-sidecar", common_name="checkout-sidecar")
        self.ca_file = self.write("ca.pem", self.ca.cert_pem.bytes())
        self.other_ca_file = self.write("other-ca.pem", self.other_ca.cert_pem.bytes())
        self.cert_file, self.key_file = self.write_pair("client", self.client)
        self.client_serial = serial_of(self.client)

    def write(self, name: str, data: bytes) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return str(path)

    def write_pair(self, stem: str, leaf: trustme.LeafCert) -> tuple[str, str]:
        cert = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        return self.write(f"{stem}.crt", cert), self.write(
            f"{stem}.key", leaf.private_key_pem.bytes()
        )

    def new_client(self) -> trustme.LeafCert:
        return self.ca.issue_cert("checkout-sidecar", common_name="checkout-sidecar")

    def server_context(
        self,
        leaf: trustme.LeafCert | None = None,
        *,
        require_client_cert: bool = False,
        max_version: ssl.TLSVersion | None = None,
    ) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        (leaf or self.server).configure_cert(context)
        self.ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        if max_version is not None:
            context.maximum_version = max_version
        return context


def serial_of(leaf: trustme.LeafCert) -> int:
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@dataclass
class TlsUpstream:
    server: TestServer
    seen_serials: list[int | None]

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def port(self) -> int:
        port = self.server.port
        assert port is not None
        return port


def recording_app(seen: list[int | None], handler: Any = None) -> web.Application:
    """Answers every request with 200 JSON, noting the client certificate's serial."""

    async def answer(request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        seen.append(int(peer["serialNumber"], 16) if peer else None)
        if handler is not None:
            response: web.StreamResponse = await handler(request)
            return response
        return web.json_response({"path": request.path, "tls": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


StartTlsUpstream = Callable[..., Awaitable[TlsUpstream]]


@pytest.fixture
async def start_tls_upstream(aiohttp_server: Any, pki: Pki) -> StartTlsUpstream:
    """Start a TLS upstream: `await start_tls_upstream(require_client_cert=True)`."""

    async def start(
        *,
        leaf: trustme.LeafCert | None = None,
        require_client_cert: bool = False,
        max_version: ssl.TLSVersion | None = None,
        handler: Any = None,
    ) -> TlsUpstream:
        seen: list[int | None] = []
        context = pki.server_context(
            leaf, require_client_cert=require_client_cert, max_version=max_version
        )
        server = await aiohttp_server(recording_app(seen, handler), host="127.0.0.1", ssl=context)
        return TlsUpstream(server, seen)

    return start
