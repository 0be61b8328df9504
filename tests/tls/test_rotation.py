"""A client certificate rotated on disk while requests run: none fails, new connections use it.

The files are laid out as Kubernetes mounts a Secret: `tls.crt` and `tls.key` are
symlinks into `..data`, itself a symlink to a timestamped directory; an update
writes a new directory and swaps `..data` in one rename, so certificate and key
change together.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import trustme
from aiohttp import web

from tests.tls.conftest import Pki, StartTlsUpstream, serial_of


def mount_secret(root: Path, leaf: trustme.LeafCert, version: int) -> None:
    """Write `leaf` as a new version of the Secret at `root` and swap it in atomically."""
    version_dir = root / f"..{version}"
    version_dir.mkdir(parents=True)
    (version_dir / "tls.crt").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    (version_dir / "tls.key").write_bytes(leaf.private_key_pem.bytes())
    staged = root / "..data_tmp"
    staged.symlink_to(version_dir.name)
    os.replace(staged, root / "..data")  # the one atomic step
    for name in ("tls.crt", "tls.key"):
        if not (root / name).is_symlink():
            (root / name).symlink_to(f"..data/{name}")


async def test_rotated_client_certificate_is_used_by_new_connections_without_a_failure(
    pki: Pki, start_tls_upstream: StartTlsUpstream, start_sidecar: Any, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    mount_secret(secret, pki.client, 1)

    async def slowish(request: web.Request) -> web.Response:
        await asyncio.sleep(0.01)  # calls are in flight when the files change
        return web.json_response({"ok": True})

    upstream = await start_tls_upstream(require_client_cert=True, handler=slowish)
    tls = {
        "ca_file": pki.ca_file,
        "cert_file": str(secret / "tls.crt"),
        "key_file": str(secret / "tls.key"),
    }
    # a short keep-alive: connections opened with the old certificate idle out soon
    policy = {"url": upstream.url, "tls": tls, "pool": {"keepalive": "200ms"}}
    _, base = await start_sidecar({"upstreams": {"payment": policy}})
    renewed = pki.new_client()
    old_serial, new_serial = pki.client_serial, serial_of(renewed)
    statuses: list[int] = []
    rotated_at: int | None = None

    async def worker(http: aiohttp.ClientSession) -> None:
        async with http.get(f"{base}/payment/pay") as response:
            await response.read()
            statuses.append(response.status)

    async with aiohttp.ClientSession() as http:
        give_up = time.monotonic() + 15
        while time.monotonic() < give_up:
            await asyncio.gather(*(worker(http) for _ in range(4)))
            if rotated_at is None and len(statuses) >= 40:
                mount_secret(secret, renewed, 2)
                rotated_at = len(upstream.seen_serials)
            if rotated_at is not None and upstream.seen_serials[-8:] == [new_serial] * 8:
                break

    assert rotated_at is not None
    assert set(statuses) == {200}, f"{statuses.count(200)} of {len(statuses)} succeeded"
    assert upstream.seen_serials[:rotated_at] == [old_serial] * rotated_at
    assert upstream.seen_serials[-8:] == [new_serial] * 8, "new connections show the new cert"
    assert set(upstream.seen_serials) == {old_serial, new_serial}
