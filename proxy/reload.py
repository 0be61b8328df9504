"""Live config reload: on SIGHUP, and when the file changes under a running sidecar.

Kubernetes updates a mounted ConfigMap by writing a new directory and swapping the
`..data` symlink, so the file's path never changes while what it resolves to does;
watching the bytes behind the path (not an inotify watch on one inode) sees both
that and an ordinary edit. A config that does not validate is refused whole: its
errors are logged and counted, and the config in force stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from pathlib import Path
from typing import Protocol

from proxy.config.loader import ConfigError, load_config
from proxy.config.model import Config

log = logging.getLogger("proxy.reload")


class Reloadable(Protocol):
    loaded: dict[str, object]

    def apply(self, new: Config) -> list[str]: ...


def file_hash(path: str | Path) -> str | None:
    """sha256 of what `path` resolves to now (symlinks followed), or None if unreadable."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


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
                log.error(
                    "config reload refused (%s): the old config stays",
                    reason,
                    extra={"event": "config_refused", "errors": [str(e) for e in exc.errors]},
                )
                self._count("error")
                if digest is not None:
                    self.current_hash = digest  # do not retry the same bad bytes every poll
                return False
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
        """Reload if the bytes behind the path changed; None when nothing changed."""
        digest = file_hash(self.path)
        if digest is None or digest == self.current_hash:
            return None
        return await self.reload("file changed")

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
