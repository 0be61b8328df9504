"""Operating the sidecar: reload, shutdown, the admin config view, the logs.

`SidecarProcess` runs `python -m proxy run --config FILE` as a real process, the
way an orchestrator does, and keeps every line it prints so a test can read the
JSON logs afterwards. Its addresses come from the JSON `start` line (stdout is a
pipe here, so the sidecar prints no human banner).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def until(check: Callable[[], Awaitable[bool] | bool], seconds: float = 5.0) -> None:
    """Poll `check` until it is true (TimeoutError after `seconds`).

    For state this process cannot be told about: another process, a socket, a file.
    """
    async with asyncio.timeout(seconds):
        while True:
            outcome = check()
            if await outcome if not isinstance(outcome, bool) else outcome:
                return
            await asyncio.sleep(0.01)


def start_event(line: str) -> dict[str, Any] | None:
    """The sidecar's JSON `start` log line (with `listen` and `admin`), or None."""
    if not line.startswith("{"):
        return None
    try:
        parsed = json.loads(line)
    except ValueError:
        return None
    if isinstance(parsed, dict) and parsed.get("event") == "start":
        return parsed
    return None


class SidecarProcess:
    """One `python -m proxy run` process: its addresses, its stdout lines, its exit."""

    def __init__(
        self, config: Path, *, env: dict[str, str] | None = None, command: str = "run"
    ) -> None:
        self.config = config
        self.command = command
        # LOG_LEVEL wins over the config: only a test that means to set it does
        inherited = {k: v for k, v in os.environ.items() if k != "LOG_LEVEL"}
        self.env = {**inherited, **(env or {})}
        self.lines: list[str] = []
        self._new_line = asyncio.Condition()
        self.listen = ""
        self.admin = ""
        self.stderr = config.parent / f"{config.stem}.stderr.log"
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._addresses: asyncio.Future[None] | None = None

    @property
    def process(self) -> asyncio.subprocess.Process:
        assert self._process is not None, "not started"
        return self._process

    async def start(self, *, timeout: float = 15.0) -> SidecarProcess:
        """Start the process and wait for its JSON `start` line (both addresses)."""
        await self.launch()
        return await self.started(timeout=timeout)

    async def launch(self) -> SidecarProcess:
        """Start the process; do not wait for it to listen."""
        self._addresses = asyncio.get_running_loop().create_future()
        with self.stderr.open("wb") as stderr:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy",
                self.command,
                "--config",
                str(self.config),
                cwd=REPO,
                env=self.env,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
            )
        self._reader = asyncio.create_task(self._read())
        return self

    async def started(self, *, timeout: float = 15.0) -> SidecarProcess:
        """Wait for the JSON `start` line, which carries both addresses."""
        assert self._addresses is not None, "not launched"
        try:
            await asyncio.wait_for(asyncio.shield(self._addresses), timeout)
        except BaseException:
            await self.kill()
            raise
        return self

    async def _read(self) -> None:
        """Keep every stdout line (the pipe never fills) and note the two addresses."""
        stdout = self.process.stdout
        assert stdout is not None and self._addresses is not None
        while raw := await stdout.readline():
            line = raw.decode().rstrip("\n")
            async with self._new_line:
                self.lines.append(line)
                self._new_line.notify_all()
            start = start_event(line)
            if start is not None:
                self.listen, self.admin = start["listen"], start["admin"]
            if self.listen and self.admin and not self._addresses.done():
                self._addresses.set_result(None)
        if not self._addresses.done():
            self._addresses.set_exception(
                AssertionError(f"the sidecar exited before listening: {self.stderr.read_text()}")
            )

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.process.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        """The exit code, once the process exited and its output was read to the end."""
        code = await asyncio.wait_for(self.process.wait(), timeout)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)
        return code

    async def kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._process.wait()
        if self._reader is not None:
            self._reader.cancel()

    def json_lines(self) -> list[dict[str, Any]]:
        """Every stdout line, each parsed as one JSON object (ValueError when one is not)."""
        return [json.loads(line) for line in self.lines]

    async def wait_for_event(self, name: str, timeout: float = 5.0) -> dict[str, Any]:
        """The first log line with `"event": name`, once the process has printed it."""
        async with asyncio.timeout(timeout), self._new_line:
            await self._new_line.wait_for(lambda: bool(self.events(name)))
        return self.events(name)[0]

    def events(self, name: str) -> list[dict[str, Any]]:
        """The JSON lines with `"event": name` (`json_lines` is the check that all are JSON)."""
        found = []
        for line in self.lines:
            with contextlib.suppress(ValueError):
                parsed = json.loads(line)
                if isinstance(parsed, dict) and parsed.get("event") == name:
                    found.append(parsed)
        return found
