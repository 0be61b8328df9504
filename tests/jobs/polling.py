"""Bounded polling for conditions that only real time makes true (Redis idle times,
a worker's background loop): fail after a deadline instead of hanging."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def eventually(check: Callable[[], Awaitable[bool]], *, seconds: float = 3.0) -> None:
    """Await `check()` every 10 ms until it is true; TimeoutError after `seconds`."""
    async with asyncio.timeout(seconds):
        while True:
            if await check():
                return
            await asyncio.sleep(0.01)
