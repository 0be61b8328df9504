"""Live reload: valid configs swapped in under load, invalid ones refused, ConfigMap swaps seen.

Most tests run the sidecar in this process on real sockets and drive its
`ConfigReloader` directly (what `serve` does on SIGHUP and on each poll); one
runs the real command and sends it SIGHUP.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.app import Sidecar
from proxy.client.http11 import Http11Client
from proxy.config.loader import load_config
from proxy.reload import ConfigReloader
from proxy.resilience.fallback import FALLBACK_HEADER
from tests.conftest import StartServer
from tests.operations import SidecarProcess, free_port, until

CLIENTS = 20
MAX_REQUESTS_PER_CLIENT = 2000  # the load is bounded even if a reload hangs


@dataclass
class Backend:
    """A small upstream: a fast `/item`, and a `/slow` that answers when told to."""

    server: TestServer
    release: asyncio.Event = field(default_factory=asyncio.Event)
    slow_arrived: asyncio.Event = field(default_factory=asyncio.Event)
    hits: int = 0

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


@pytest.fixture
async def backend(start_server: StartServer) -> Backend:
    state: dict[str, Backend] = {}

    async def item(request: web.Request) -> web.Response:
        state["backend"].hits += 1
        return web.json_response({"path": request.path})

    async def slow(request: web.Request) -> web.Response:
        state["backend"].slow_arrived.set()
        await asyncio.wait_for(state["backend"].release.wait(), 10)
        return web.json_response({"path": request.path, "slow": True})

    app = web.Application()
    app.router.add_get("/item", item)
    app.router.add_get("/slow", slow)
    state["backend"] = Backend(await start_server(app))
    return state["backend"]


def config_data(
    url: str, store: str, *, toggled_total: str = "3s", extra: bool = False
) -> dict[str, Any]:
    """`steady` and `held` never change; `toggled` and `extra` are what reloads change."""
    upstreams: dict[str, Any] = {
        "steady": {"url": url, "timeout": {"per_try": "2s", "total": "3s"}},
        "held": {"url": url, "fallback": {"stale": True}},
        "toggled": {"url": url, "timeout": {"per_try": "1s", "total": toggled_total}},
    }
    if extra:
        upstreams["extra"] = {"url": url}
    return {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "store": store,
        "reload": {"watch": False},
        "upstreams": upstreams,
    }


def write_config(path: Path, data: dict[str, Any], note: str = "") -> None:
    """Write a config; `note` (a comment) makes each file's bytes differ, as edits do."""
    path.write_text(f"# {note}\n{yaml.safe_dump(data, sort_keys=False)}")


@dataclass
class Running:
    sidecar: Sidecar
    reloader: ConfigReloader
    url: str
    path: Path

    def reloads(self, result: str) -> float:
        value = self.sidecar.metrics.registry.get_sample_value(
            "sidecar_config_reloads_total", {"result": result}
        )
        return value or 0.0


@pytest.fixture
async def running(aiohttp_server: Any, backend: Backend, tmp_path: Path) -> AsyncIterator[Running]:
    """A sidecar on a real socket, loaded from a file, with the reloader `serve` would make."""
    path = tmp_path / "sidecar.yaml"
    write_config(path, config_data(backend.url, f"sqlite://{tmp_path}/state.db"), "initial")
    sidecar = Sidecar(load_config(path))
    server = await aiohttp_server(sidecar.build_app(), host="127.0.0.1")
    reloader = ConfigReloader(path, sidecar, on_result=sidecar.metrics.config_reloaded)
    yield Running(sidecar, reloader, str(server.make_url("")).rstrip("/"), path)
    await reloader.stop()


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any], Any]:
    async with http.get(url) as response:
        return response.status, dict(response.headers), await response.json()


# ---------------------------------------------------------------------------
# 20 reloads under load


async def test_twenty_reloads_under_load_fail_no_request_and_keep_unchanged_state(
    running: Running, backend: Backend, tmp_path: Path
) -> None:
    sidecar, base = running.sidecar, running.url
    store = f"sqlite://{tmp_path}/state.db"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        # `held` has a good GET in its stale cache, then its breaker is forced open
        status, _, _ = await get(http, f"{base}/held/item")
        assert status == 200
        held = sidecar.runtime.upstreams.get("held")
        steady = sidecar.runtime.upstreams.get("steady")
        toggled = sidecar.runtime.upstreams.get("toggled")
        assert held is not None and steady is not None and toggled is not None
        assert held.policies.breaker is not None
        held.policies.breaker.force_open()
        held_breaker, held_fallback = held.policies.breaker, held.policies.fallback
        steady_breaker, toggled_breaker = steady.policies.breaker, toggled.policies.breaker

        done = asyncio.Event()
        completed: list[int] = []
        failures: list[str] = []

        async def client() -> None:
            for _ in range(MAX_REQUESTS_PER_CLIENT):
                if done.is_set():
                    return
                try:
                    async with http.get(f"{base}/steady/item") as response:
                        await response.read()
                        if response.status != 200:
                            failures.append(f"{response.status} {response.headers}")
                except Exception as exc:  # every kind of failure counts against the reload
                    failures.append(repr(exc))
                completed.append(1)

        clients = [asyncio.create_task(client()) for _ in range(CLIENTS)]
        extra_breakers: list[object] = []
        try:
            for number in range(20):
                # let the load run between two reloads: every client gets about a turn
                seen = len(completed)
                await until(lambda seen=seen: len(completed) >= seen + CLIENTS)

                before = sidecar.config
                valid = number % 2 == 0
                step = number // 2
                data = config_data(
                    backend.url,
                    store,
                    toggled_total="2500ms" if step % 2 == 0 else "3s",
                    extra=step % 2 == 0,
                )
                if not valid:
                    data["upstreams"]["toggled"]["timeout"]["total"] = "10x"
                write_config(running.path, data, f"reload {number}")

                applied = await running.reloader.check()

                assert applied is valid, number
                if not valid:
                    assert sidecar.config is before, "a refused config must leave the old one"
                    continue
                assert sidecar.runtime.upstreams.get("steady") is steady, (
                    "unchanged upstream kept whole"
                )
                current_toggled = sidecar.runtime.upstreams.get("toggled")
                assert current_toggled is not None
                assert current_toggled.config.timeout.total == (2.5 if step % 2 == 0 else 3.0)
                assert current_toggled.policies.breaker is toggled_breaker
                extra = sidecar.runtime.upstreams.get("extra")
                if step % 2 == 0:
                    assert extra is not None and extra.policies.breaker is not None
                    assert all(extra.policies.breaker is not b for b in extra_breakers)
                    assert extra.policies.breaker.state == "closed", "a new upstream starts fresh"
                    extra_breakers.append(extra.policies.breaker)
                    status, _, body = await get(http, f"{base}/extra/item")
                    assert (status, body) == (200, {"path": "/item"})
                else:
                    assert extra is None
                    status, _, body = await get(http, f"{base}/extra/item")
                    assert (status, body["reason"]) == (404, "unknown_upstream")
        finally:
            done.set()
            await asyncio.gather(*clients)

        assert failures == []
        assert len(completed) >= 20 * CLIENTS
        assert running.reloads("ok") == 10
        assert running.reloads("error") == 10

        steady_now = sidecar.runtime.upstreams.get("steady")
        held_now = sidecar.runtime.upstreams.get("held")
        assert steady_now is not None and held_now is not None
        assert steady_now.policies.breaker is steady_breaker
        assert held_now.policies.breaker is held_breaker
        assert held_now.policies.fallback is held_fallback
        assert held_breaker.state == "open"
        # the stale answer cached before the 20 reloads still serves the open breaker
        hits = backend.hits
        status, headers, body = await get(http, f"{base}/held/item")
        assert (status, body) == (200, {"path": "/item"})
        assert headers[FALLBACK_HEADER] == "circuit_open"
        assert backend.hits == hits


async def test_a_refused_config_is_counted_and_the_old_one_keeps_serving(
    running: Running, backend: Backend, tmp_path: Path
) -> None:
    sidecar = running.sidecar
    before = sidecar.config
    loaded = dict(sidecar.loaded)
    data = config_data(backend.url, f"sqlite://{tmp_path}/state.db", extra=True)
    data["upstreams"]["extra"]["timeout"] = {"total": "soon"}
    write_config(running.path, data)

    assert await running.reloader.reload("SIGHUP") is False

    assert sidecar.config is before
    assert sidecar.runtime.upstreams.get("extra") is None
    assert sidecar.loaded == loaded, "the hash and load time are those of the config in force"
    assert (running.reloads("error"), running.reloads("ok")) == (1, 0)
    # the same bad bytes are not refused again on every poll ...
    assert await running.reloader.check() is None
    assert running.reloads("error") == 1
    async with aiohttp.ClientSession() as http:
        status, _, _ = await get(http, f"{running.url}/steady/item")
    assert status == 200


async def test_a_request_in_flight_finishes_on_the_upstream_a_reload_removed(
    running: Running, backend: Backend, tmp_path: Path
) -> None:
    sidecar = running.sidecar
    removed = sidecar.runtime.upstreams.get("toggled")
    assert removed is not None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        in_flight = asyncio.create_task(get(http, f"{running.url}/toggled/slow"))
        await asyncio.wait_for(backend.slow_arrived.wait(), 5)
        client = removed.client
        assert isinstance(client, Http11Client)

        data = config_data(backend.url, f"sqlite://{tmp_path}/state.db")
        del data["upstreams"]["toggled"]
        write_config(running.path, data)
        assert await running.reloader.check() is True

        status, _, body = await get(http, f"{running.url}/toggled/item")
        assert (status, body["reason"]) == (404, "unknown_upstream")
        backend.release.set()
        status, _, body = await in_flight
        assert (status, body) == (200, {"path": "/slow", "slow": True})

    # ... and the removed upstream's pool is closed once no call on it can still run
    assert not client.closed
    await until(lambda: client.closed, seconds=removed.config.timeout.total + 3)


# ---------------------------------------------------------------------------
# a Kubernetes ConfigMap: the `..data` symlink is swapped atomically


def swap_configmap(directory: Path, version: str, text: str) -> None:
    """What the kubelet does: a new timestamped dir, then `..data` replaced in one rename."""
    (directory / version).mkdir()
    (directory / version / "sidecar.yaml").write_text(text)
    tmp_link = directory / "..data_tmp"
    tmp_link.symlink_to(version)
    os.replace(tmp_link, directory / "..data")


async def test_a_configmap_symlink_swap_is_detected_and_applied(
    backend: Backend, tmp_path: Path
) -> None:
    mount = tmp_path / "config"
    mount.mkdir()
    store = f"sqlite://{tmp_path}/state.db"
    first = yaml.safe_dump(config_data(backend.url, store))
    second = yaml.safe_dump(config_data(backend.url, store, toggled_total="2s", extra=True))
    (mount / "..2026_01").mkdir()
    (mount / "..2026_01" / "sidecar.yaml").write_text(first)
    (mount / "..data").symlink_to("..2026_01")
    (mount / "sidecar.yaml").symlink_to("..data/sidecar.yaml")
    path = mount / "sidecar.yaml"
    sidecar = Sidecar(load_config(path))
    reloader = ConfigReloader(path, sidecar, on_result=sidecar.metrics.config_reloaded)
    try:
        assert await reloader.check() is None
        steady_breaker = sidecar.runtime.upstreams.get("steady").policies.breaker  # type: ignore[union-attr]

        swap_configmap(mount, "..2026_02", second)

        assert path.is_symlink() and path.read_text() == second
        assert await reloader.check() is True
        assert sidecar.runtime.upstreams.get("extra") is not None
        assert sidecar.config.upstreams["toggled"].timeout.total == 2.0
        assert sidecar.runtime.upstreams.get("steady").policies.breaker is steady_breaker  # type: ignore[union-attr]
        assert sidecar.loaded["hash"] == hashlib.sha256(second.encode()).hexdigest()
        assert await reloader.check() is None, "one swap, one reload"
    finally:
        await reloader.stop()
        await sidecar.close()


async def test_the_watch_loop_sees_a_configmap_swap_on_its_own(
    backend: Backend, tmp_path: Path
) -> None:
    mount = tmp_path / "config"
    mount.mkdir()
    store = f"sqlite://{tmp_path}/state.db"
    swap_configmap(mount, "..2026_01", yaml.safe_dump(config_data(backend.url, store)))
    (mount / "sidecar.yaml").symlink_to("..data/sidecar.yaml")
    sidecar = Sidecar(load_config(mount / "sidecar.yaml"))
    reloader = ConfigReloader(mount / "sidecar.yaml", sidecar)
    reloader.watch(0.02)
    try:
        swap_configmap(
            mount, "..2026_02", yaml.safe_dump(config_data(backend.url, store, extra=True))
        )
        await until(lambda: sidecar.runtime.upstreams.get("extra") is not None)
    finally:
        await reloader.stop()
        await sidecar.close()


# ---------------------------------------------------------------------------
# the real process


async def test_sighup_reloads_the_edited_file_and_admin_config_shows_the_new_hash(
    backend: Backend, tmp_path: Path
) -> None:
    path = tmp_path / "sidecar.yaml"
    data = config_data(backend.url, f"sqlite://{tmp_path}/state.db")
    data["listen"] = f"127.0.0.1:{free_port()}"
    data["admin"] = {"listen": f"127.0.0.1:{free_port()}"}
    data["shutdown"] = {"drain_delay": "50ms", "grace": "2s"}
    write_config(path, data)
    sidecar = await SidecarProcess(path).start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            _, _, before = await get(http, f"{sidecar.admin}/admin/config")
            assert before["hash"] == hashlib.sha256(path.read_bytes()).hexdigest()

            data["upstreams"]["extra"] = {"url": backend.url}
            write_config(path, data, "edited")
            sidecar.signal(signal.SIGHUP)

            async def reloaded() -> bool:
                _, _, now = await get(http, f"{sidecar.admin}/admin/config")
                return bool(now["hash"] != before["hash"])

            await until(reloaded)
            _, _, after = await get(http, f"{sidecar.admin}/admin/config")
            assert after["hash"] == hashlib.sha256(path.read_bytes()).hexdigest()
            assert after["loaded_at"] > before["loaded_at"]
            assert "extra" in after["config"]["upstreams"]
            status, _, body = await get(http, f"{sidecar.listen}/extra/item")
            assert (status, body) == (200, {"path": "/item"})

        sidecar.signal(signal.SIGTERM)
        assert await sidecar.wait(10) == 0, sidecar.stderr.read_text()
        assert [e["hash"] for e in sidecar.events("config_loaded")] == [after["hash"]]
    finally:
        await sidecar.kill()
