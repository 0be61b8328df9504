"""`GET /admin/config`: the config in force, its hash and load time, with every secret hidden."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.app import Sidecar
from proxy.config.loader import load_config
from proxy.reload import ConfigReloader

TOKEN = "adm1n-t0ken-value"
SECRETS = (TOKEN, "hunter2", "idem-pa55", "upstream-pa55", "p@ss", "query-pa55")


def secret_config(tmp_path: Path) -> dict[str, Any]:
    return {
        "admin": {"listen": "127.0.0.1:0", "token": TOKEN},
        "store": "redis://:hunter2@127.0.0.1:6379/0",
        "idempotency": {"store": "redis://app:idem-pa55@127.0.0.1:6379/1"},
        # redis-py also takes the password from the query string
        "queue": {"store": "rediss://redis.internal:6380/2?password=query-pa55&socket_timeout=1"},
        "reload": {"watch": False},
        "upstreams": {
            "payment": {"url": "http://svc:upstream-pa55@127.0.0.1:9101"},
            # a raw @ in the password: the whole password is hidden, not just its start
            "fraud": {"url": "http://svc:p@ss@127.0.0.1:9105"},
        },
    }


@pytest.fixture
async def admin(aiohttp_server: Any, tmp_path: Path) -> tuple[str, Path, ConfigReloader]:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(secret_config(tmp_path)))
    sidecar = Sidecar(load_config(path))
    reloader = ConfigReloader(path, sidecar)  # as `serve` makes it: the hash of the file
    server = await aiohttp_server(sidecar.build_admin_app(), host="127.0.0.1")
    return str(server.make_url("")).rstrip("/"), path, reloader


async def get_config(url: str, token: str | None = TOKEN) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{url}/admin/config", headers=headers) as response,
    ):
        return response.status, await response.text()


async def test_admin_config_needs_the_token(admin: tuple[str, Path, ConfigReloader]) -> None:
    url, _, _ = admin

    assert (await get_config(url, token=None))[0] == 401
    assert (await get_config(url, token="wrong"))[0] == 401


async def test_admin_config_hides_the_token_and_every_password(
    admin: tuple[str, Path, ConfigReloader],
) -> None:
    url, _, _ = admin

    status, text = await get_config(url)

    assert status == 200
    assert [secret for secret in SECRETS if secret in text] == []
    config = yaml.safe_load(text)["config"]
    assert config["admin"]["token"] == "***"
    assert config["store"] == "redis://:***@127.0.0.1:6379/0"
    assert config["idempotency"]["store"] == "redis://app:***@127.0.0.1:6379/1"
    assert (
        config["queue"]["store"] == "rediss://redis.internal:6380/2?password=***&socket_timeout=1"
    )
    upstreams = config["upstreams"]
    assert upstreams["payment"]["url"] == "http://svc:***@127.0.0.1:9101"
    assert upstreams["fraud"]["url"] == "http://svc:***@127.0.0.1:9105"
    # what is not secret is shown as it is in force
    assert config["admin"]["listen"] == "127.0.0.1:0"
    assert upstreams["payment"]["timeout"] == {"connect": "250ms", "per_try": "1s", "total": "3s"}


async def test_admin_config_shows_the_hash_and_load_time_of_the_config_in_force(
    admin: tuple[str, Path, ConfigReloader],
) -> None:
    url, path, reloader = admin
    _, text = await get_config(url)
    before = yaml.safe_load(text)
    assert before["hash"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert before["loaded_at"] <= time.time()
    assert before["source"] == str(path)

    data = secret_config(path.parent)
    data["upstreams"]["payment"]["timeout"] = {"total": "2s"}
    path.write_text(yaml.safe_dump(data))
    assert await reloader.check() is True

    _, text = await get_config(url)
    after = yaml.safe_load(text)
    assert after["hash"] == hashlib.sha256(path.read_bytes()).hexdigest() != before["hash"]
    assert after["loaded_at"] >= before["loaded_at"]
    assert after["config"]["upstreams"]["payment"]["timeout"]["total"] == "2s"
    assert after["restart_required"] == []
