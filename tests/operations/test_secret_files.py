"""Secrets from files in a running sidecar: rotated on disk, hidden in `/admin/config` and logs.

Kubernetes mounts a Secret as a directory whose files are symlinks through `..data`
to a timestamped directory, and rotates it by swapping `..data`; these tests do the
same on disk and drive the `ConfigReloader` that `serve` polls (one test runs the
real command and lets its own watch loop see the rotation).
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.app import Sidecar
from proxy.config.loader import load_config
from proxy.observability.logging import LOG_SECRETS, JsonFormatter
from proxy.reload import ConfigReloader
from tests.operations import SidecarProcess, free_port

TOKEN = "adm1n-t0ken-from-file-5e8a"
ROTATED = "adm1n-t0ken-rotated-77b0"
PASSWORD = "st0re-pa55-from-file-c3d1"
HEADER = "Bearer step-key-from-file-90af"


def mount_secret(directory: Path, version: str, files: dict[str, str]) -> None:
    """What the kubelet does: a new timestamped dir, `..data` swapped to it in one rename,
    and (the first time) one symlink per key through `..data`."""
    directory.mkdir(exist_ok=True)
    (directory / version).mkdir()
    for name, content in files.items():
        (directory / version / name).write_text(content)
    tmp_link = directory / "..data_tmp"
    tmp_link.symlink_to(version)
    os.replace(tmp_link, directory / "..data")
    for name in files:
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")


def config_data(secrets: Path, **extra: Any) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0", "token": f"${{file:{secrets}/token}}"},
        "store": f"redis://app:${{file:{secrets}/password}}@127.0.0.1:6379/0",
        "queue": {"store": f"sqlite://{secrets.parent}/queue.db"},
        "reload": {"watch": False},
        "upstreams": {"payment": {"url": "http://127.0.0.1:9101"}},
        "composite": {
            "checkout": {
                "steps": {
                    "payment": {
                        "upstream": "payment",
                        "critical": True,
                        "request": {
                            "path": "/authorize",
                            "headers": {"X-Provider-Key": f"${{file:{secrets}/header}}"},
                        },
                    }
                }
            }
        },
        **extra,
    }


@dataclass
class Mounted:
    sidecar: Sidecar
    reloader: ConfigReloader
    path: Path
    secrets: Path


@pytest.fixture(autouse=True)
def no_log_secrets_left() -> Iterator[None]:
    """`LOG_SECRETS` is process-wide: each test starts and ends with none."""
    LOG_SECRETS.clear()
    yield
    LOG_SECRETS.clear()


@pytest.fixture
async def mounted(tmp_path: Path) -> AsyncIterator[Mounted]:
    secrets = tmp_path / "secrets"
    mount_secret(
        secrets, "..2026_01", {"token": TOKEN + "\n", "password": PASSWORD, "header": HEADER}
    )
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config_data(secrets)))
    sidecar = Sidecar(load_config(path))
    reloader = ConfigReloader(path, sidecar)
    yield Mounted(sidecar, reloader, path, secrets)
    await reloader.stop()
    await sidecar.close()


# ---------------------------------------------------------------------------
# reload


async def test_a_rewritten_secret_file_is_seen_and_reloaded(mounted: Mounted) -> None:
    assert await mounted.reloader.check() is None
    assert mounted.sidecar.config.admin.token == TOKEN

    (mounted.secrets / "..data" / "token").write_text(ROTATED + "\n")

    assert await mounted.reloader.check() is True
    assert mounted.sidecar.config.admin.token == ROTATED
    assert await mounted.reloader.check() is None, "one change, one reload"


async def test_a_kubernetes_secret_rotation_by_symlink_swap_is_reloaded(mounted: Mounted) -> None:
    assert await mounted.reloader.check() is None

    mount_secret(
        mounted.secrets, "..2026_02", {"token": ROTATED, "password": PASSWORD, "header": HEADER}
    )

    assert (mounted.secrets / "token").read_text() == ROTATED
    assert await mounted.reloader.check() is True
    assert mounted.sidecar.config.admin.token == ROTATED
    assert mounted.sidecar.loaded["restart_required"] == [], "a new admin token applies live"


async def test_a_new_admin_listen_address_still_needs_a_restart(mounted: Mounted) -> None:
    data = config_data(mounted.secrets)
    data["admin"]["listen"] = "127.0.0.1:1"
    mounted.path.write_text(yaml.safe_dump(data))

    assert await mounted.reloader.check() is True
    assert mounted.sidecar.loaded["restart_required"] == ["admin"]


async def test_a_secret_file_that_breaks_the_config_keeps_the_old_one(mounted: Mounted) -> None:
    (mounted.secrets / "..data" / "token").write_text("")

    assert await mounted.reloader.check() is False
    assert mounted.sidecar.config.admin.token == TOKEN
    assert await mounted.reloader.check() is None, "the same bad bytes are not retried"

    (mounted.secrets / "..data" / "token").write_text(ROTATED)
    assert await mounted.reloader.check() is True
    assert mounted.sidecar.config.admin.token == ROTATED


async def test_a_missing_secret_file_is_refused_then_loaded_when_it_appears(
    mounted: Mounted,
) -> None:
    data = config_data(mounted.secrets)
    data["upstreams"]["payment"]["url"] = f"http://svc:${{file:{mounted.secrets}/later}}@pay"
    mounted.path.write_text(yaml.safe_dump(data))

    assert await mounted.reloader.check() is False
    assert "payment" in mounted.sidecar.config.upstreams
    assert mounted.sidecar.config.upstreams["payment"].url == "http://127.0.0.1:9101"
    assert await mounted.reloader.check() is None

    (mounted.secrets / "later").write_text("upstream-pa55\n")

    assert await mounted.reloader.check() is True
    assert mounted.sidecar.config.upstreams["payment"].url == "http://svc:upstream-pa55@pay"


async def test_a_config_file_missing_for_a_moment_does_not_stop_the_secret_watch(
    mounted: Mounted,
) -> None:
    aside = mounted.path.with_suffix(".aside")
    mounted.path.rename(aside)
    assert await mounted.reloader.reload("SIGHUP") is False
    aside.rename(mounted.path)

    (mounted.secrets / "..data" / "token").write_text(ROTATED)

    assert await mounted.reloader.check() is True
    assert mounted.sidecar.config.admin.token == ROTATED


async def test_a_file_no_longer_referenced_is_no_longer_watched(mounted: Mounted) -> None:
    data = config_data(mounted.secrets)
    data["admin"]["token"] = "inline-token"
    mounted.path.write_text(yaml.safe_dump(data))
    assert await mounted.reloader.check() is True

    (mounted.secrets / "..data" / "token").write_text(ROTATED)

    assert await mounted.reloader.check() is None


# ---------------------------------------------------------------------------
# /admin/config


async def admin_config(aiohttp_server: Any, sidecar: Sidecar, token: str) -> tuple[int, str]:
    server = await aiohttp_server(sidecar.build_admin_app(), host="127.0.0.1")
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            server.make_url("/admin/config"), headers={"Authorization": f"Bearer {token}"}
        ) as response,
    ):
        return response.status, await response.text()


async def test_admin_config_hides_every_value_read_from_a_file(
    aiohttp_server: Any, mounted: Mounted
) -> None:
    status, text = await admin_config(aiohttp_server, mounted.sidecar, TOKEN)

    assert status == 200
    assert [s for s in (TOKEN, PASSWORD, HEADER, "step-key-from-file") if s in text] == []
    config = json.loads(text)["config"]
    assert config["admin"]["token"] == "***"
    assert config["store"] == "redis://app:***@127.0.0.1:6379/0"
    step = config["composite"]["checkout"]["steps"]["payment"]
    assert step["request"]["headers"] == {"X-Provider-Key": "***"}, "not a secret by its name"


async def test_admin_config_hides_a_file_value_wherever_it_sits(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    (tmp_path / "tenant").write_text("tenant-9f1b3\n")
    path = tmp_path / "sidecar.yaml"
    data = {
        "admin": {"listen": "127.0.0.1:0"},
        "upstreams": {"payment": {"url": f"http://pay.example/${{file:{tmp_path}/tenant}}"}},
    }
    path.write_text(yaml.safe_dump(data))
    sidecar = Sidecar(load_config(path))

    _, text = await admin_config(aiohttp_server, sidecar, "")

    assert json.loads(text)["config"]["upstreams"]["payment"]["url"] == "http://pay.example/***"


async def test_a_rotated_admin_token_is_required_at_once(
    aiohttp_server: Any, mounted: Mounted
) -> None:
    server = await aiohttp_server(mounted.sidecar.build_admin_app(), host="127.0.0.1")
    (mounted.secrets / "..data" / "token").write_text(ROTATED)
    assert await mounted.reloader.check() is True

    async with aiohttp.ClientSession() as http:
        for token, status in ((TOKEN, 401), (ROTATED, 200)):
            async with http.get(
                server.make_url("/admin/config"), headers={"Authorization": f"Bearer {token}"}
            ) as response:
                assert response.status == status, token


# ---------------------------------------------------------------------------
# logs


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """The lines `proxy.*` loggers write, through the JSON formatter the sidecar uses."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("proxy")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield out
    logger.removeHandler(handler)
    logger.setLevel(previous)


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


async def test_a_log_line_never_shows_a_secret_read_from_a_file(
    mounted: Mounted, log_output: io.StringIO
) -> None:
    await mounted.reloader.reload("SIGHUP")  # sets the secrets every log line hides
    url = mounted.sidecar.config.store
    log = logging.getLogger("proxy.storage")

    log.warning("cannot reach %s", url, extra={"event": "store_down", "url": url})
    try:
        raise ConnectionError(f"AUTH failed for {PASSWORD}")
    except ConnectionError:
        log.exception("store error", extra={"detail": {"nested": [TOKEN, (HEADER,)]}})

    text = log_output.getvalue()
    assert [s for s in (TOKEN, PASSWORD, HEADER) if s in text] == []
    warning, error = [line for line in lines(log_output) if line["logger"] == "proxy.storage"]
    assert warning["msg"] == "cannot reach redis://app:***@127.0.0.1:6379/0"
    assert warning["url"] == "redis://app:***@127.0.0.1:6379/0"
    assert "AUTH failed for ***" in error["error"]
    assert error["detail"] == {"nested": ["***", ["***"]]}


async def test_a_rotated_secret_and_the_one_it_replaced_are_both_hidden(
    mounted: Mounted, log_output: io.StringIO
) -> None:
    await mounted.reloader.reload("SIGHUP")
    (mounted.secrets / "..data" / "token").write_text(ROTATED)
    assert await mounted.reloader.check() is True

    logging.getLogger("proxy.admin").info("old %s new %s", TOKEN, ROTATED)

    assert lines(log_output)[-1]["msg"] == "old *** new ***"


async def test_a_refused_reload_does_not_log_the_secret_it_refused(
    mounted: Mounted, log_output: io.StringIO
) -> None:
    (mounted.secrets / "bad-grace").write_text("grace-is-s3cret-1a2b\n")
    data = config_data(
        mounted.secrets, shutdown={"grace": f"${{file:{mounted.secrets}/bad-grace}}"}
    )
    mounted.path.write_text(yaml.safe_dump(data))

    assert await mounted.reloader.check() is False

    (refused,) = [line for line in lines(log_output) if line.get("event") == "config_refused"]
    assert [e for e in refused["errors"] if "shutdown.grace" in e] != []
    assert "grace-is-s3cret-1a2b" not in log_output.getvalue()


def test_no_secrets_no_scrubbing() -> None:
    record = logging.LogRecord("proxy", logging.INFO, __file__, 1, "plain %s", ("text",), None)

    assert not LOG_SECRETS
    assert json.loads(JsonFormatter().format(record))["msg"] == "plain text"


# ---------------------------------------------------------------------------
# the real process


async def test_the_sidecar_reads_rotates_and_hides_a_secret_file(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    mount_secret(secrets, "..2026_01", {"token": TOKEN + "\n"})
    path = tmp_path / "sidecar.yaml"
    data = {
        "listen": f"127.0.0.1:{free_port()}",
        "admin": {"listen": f"127.0.0.1:{free_port()}", "token": f"${{file:{secrets}/token}}"},
        "store": f"sqlite://{tmp_path}/state.db",
        "shutdown": {"drain_delay": "50ms", "grace": "2s"},
        "reload": {"watch": True, "poll_interval": "50ms"},
        "upstreams": {"payment": {"url": "http://127.0.0.1:9101"}},
    }
    path.write_text(yaml.safe_dump(data))
    sidecar = await SidecarProcess(path).start()
    try:
        async with aiohttp.ClientSession() as http:

            async def status(token: str) -> int:
                headers = {"Authorization": f"Bearer {token}"}
                async with http.get(f"{sidecar.admin}/admin/config", headers=headers) as got:
                    return got.status

            assert await status(TOKEN) == 200
            mount_secret(secrets, "..2026_02", {"token": ROTATED})
            await sidecar.wait_for_event("config_loaded")
            assert await status(ROTATED) == 200
            assert await status(TOKEN) == 401
        sidecar.signal()
        assert await sidecar.wait(10) == 0
    finally:
        await sidecar.kill()
    output = "\n".join(sidecar.lines) + sidecar.stderr.read_text()
    assert TOKEN not in output and ROTATED not in output
    sidecar.json_lines()  # every line is JSON
