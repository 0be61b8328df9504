"""Live config reload: on SIGHUP, and when the file changes under a running sidecar.

Kubernetes updates a mounted ConfigMap by writing a new directory and swapping the
`..data` symlink, so the file's path never changes while what it resolves to does;
watching the bytes behind the path (not an inotify watch on one inode) sees both
that and an ordinary edit. Kubernetes rotates a mounted Secret the same way, so the
files a config reads through `${file:...}` are watched alike: when the bytes behind
one change, the whole config is loaded again (a secret is a value of the config, and
a rotated one must pass the same validation). A config that does not validate is
refused whole: its errors are logged and counted, and the config in force stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from proxy.config.loader import ConfigError, load_config
from proxy.config.model import Config
from proxy.config.secrets import file_digest
from proxy.observability.logging import LOG_SECRETS

log = logging.getLogger("proxy.reload")


class Reloadable(Protocol):
    loaded: dict[str, object]

    @property
    def config(self) -> Config: ...

    def apply(self, new: Config) -> list[str]: ...


def file_hash(path: str | Path) -> str | None:
    """sha256 of what `path` resolves to now (symlinks followed), or None if unreadable."""
    return file_digest(path)


def changed_files(digests: Mapping[str, str | None]) -> list[str]:
    """The files whose bytes differ now from `digests` (appeared, vanished or rewritten)."""
    return [path for path, digest in digests.items() if file_digest(path) != digest]


class ConfigReloader:
    """Validates and applies a changed config file; counts every attempt."""

    def __init__(
        self,
        path: str | Path,
        target: Reloadable,
        *,
        on_result: object = None,
    ) -> None:
        self.path = Path(path)
        self.target = target
        self._on_result = on_result
        self.current_hash = file_hash(self.path)
        self.secret_files: Mapping[str, str | None] = dict(target.config.file_secrets.digests)
        """The files read by the last load (refused or not) -> sha256 of the bytes read."""
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        target.loaded.update(
            {"hash": self.current_hash or "", "loaded_at": time.time(), "source": str(self.path)}
        )

    async def reload(self, reason: str) -> bool:
        """Load, validate and apply the file; False (old config kept) when it is invalid."""
        async with self._lock:
            digest = file_hash(self.path)
            try:
                config = load_config(self.path)
            except ConfigError as exc:
                if digest is not None:
                    # a file the refused config needs (missing now, say) is watched, so
                    # the load is tried again when it appears or changes; an unreadable
                    # config file says nothing about them, so they stay as they were
                    self.secret_files = dict(exc.secrets.digests)
                log.error(
                    "config reload refused (%s): the old config stays",
                    reason,
                    extra={"event": "config_refused", "errors": [str(e) for e in exc.errors]},
                )
                self._count("error")
                if digest is not None:
                    self.current_hash = digest  # do not retry the same bad bytes every poll
                return False
            self.secret_files = dict(config.file_secrets.digests)
            LOG_SECRETS.use(config.file_secrets)  # before apply logs anything
            restart = self.target.apply(config)
            self.current_hash = digest
            self.target.loaded.update(
                {
                    "hash": digest or "",
                    "loaded_at": time.time(),
                    "source": str(self.path),
                    "restart_required": restart,
                }
            )
            log.info(
                "config reloaded (%s)",
                reason,
                extra={"event": "config_loaded", "hash": digest, "restart_required": restart},
            )
            self._count("ok")
            return True

    def _count(self, result: str) -> None:
        if callable(self._on_result):
            self._on_result(result)

    async def check(self) -> bool | None:
        """Reload if the bytes behind the path, or behind a secret file the config
        reads, changed; None when nothing changed.

        A secret file is compared with the bytes the last load read (not with the
        previous poll), so a change during a load is still seen at the next poll.
        """
        digest = file_hash(self.path)
        if digest is None:
            return None
        if digest != self.current_hash:
            return await self.reload("file changed")
        if changed_files(self.secret_files):
            return await self.reload("secret file changed")
        return None

    def watch(self, interval: float) -> None:
        async def loop() -> None:
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self._stop.wait()
                if self._stop.is_set():
                    return
                try:
                    await self.check()
                except Exception:
                    log.exception("config watch failed")

        self._task = asyncio.create_task(loop(), name="config-watch")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
