"""One upstream's keep-alive connections: the limit, FIFO waiters, idle expiry."""

from __future__ import annotations

import asyncio
import ssl
from collections import deque

from proxy.client.http11.connection import Connection, Origin
from proxy.client.http11.errors import ConnectError


class Pool:
    """One upstream's keep-alive connections: at most `max_connections`, FIFO waiters.

    A waiter is handed a released connection or a freed slot directly, so a request
    arriving later cannot overtake it. Idle connections are reused most recent
    first and closed after `keepalive` seconds unused; one the upstream closes
    leaves the pool when the loop sees it (`connection_lost`).
    """

    def __init__(
        self,
        max_connections: int,
        keepalive: float,
        connect_timeout: float,
        server_name: str | None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.server_name = server_name  # the TLS server name to ask for (None: the URL's host)
        self.max_connections = max_connections
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.count = 0  # open or opening connections: the slots taken
        self.connections: set[Connection] = set()
        self.waiters: deque[asyncio.Future[Connection | None]] = deque()
        self.origins: dict[tuple[str, str], Origin] = {}
        self.closed = False
        self._sweep: asyncio.TimerHandle | None = None

    async def connection(self, origin: Origin, context: ssl.SSLContext | None) -> Connection:
        """A pooled connection to `origin` made with `context`, else a new one."""
        idle = origin.idle
        while True:
            while idle:
                conn = idle.pop()
                if conn.context is context:
                    return conn
                conn.close()  # made with a rotated-out TLS context: not for new requests
            if self.closed:
                raise ConnectError(ConnectionRefusedError("the upstream's pool is closed"))
            if self.count < self.max_connections or self._close_stale():
                self.count += 1
                return await self._open(origin, context)
            waiter: asyncio.Future[Connection | None] = self.loop.create_future()
            self.waiters.append(waiter)
            try:
                handed = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._pass_on(waiter.result())
                raise
            if handed is None:
                return await self._open(origin, context)  # a slot handed over
            if handed.closed:
                continue  # lost on its way to us (its slot went with it): try again
            if handed.origin is origin and handed.context is context:
                return handed
            handed.close()  # frees its slot (to the next waiter, or to us on the next turn)

    def _close_stale(self) -> bool:
        """Make room by closing an idle connection to another origin or TLS context."""
        for origin in self.origins.values():
            if origin.idle:
                origin.idle.popleft().close()
                return self.count < self.max_connections
        return False

    async def _open(self, origin: Origin, context: ssl.SSLContext | None) -> Connection:
        """Open a connection in a slot already taken; the slot is freed if it fails."""
        loop = self.loop
        try:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    _, conn = await loop.create_connection(
                        lambda: Connection(self, origin, context),
                        origin.host,
                        origin.port,
                        ssl=context,
                        server_hostname=self.server_name if context is not None else None,
                    )
                    assert isinstance(conn, Connection)
            except TimeoutError as exc:
                raise ConnectError(TimeoutError("connect timeout")) from exc
            except OSError as exc:
                raise ConnectError(exc) from exc
        except BaseException:
            self._free_slot()
            raise
        if self.closed:
            conn.close()
            raise ConnectError(ConnectionRefusedError("the upstream's pool is closed"))
        return conn

    def release(self, conn: Connection) -> None:
        """A connection whose answer was read whole: to a waiter, else idle."""
        if self.closed:
            conn.close()
            return
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = self.loop.time()
        conn.origin.idle.append(conn)
        if self._sweep is None:
            self._sweep = self.loop.call_at(conn.idle_since + self.keepalive, self._expire)

    def _pass_on(self, handed: Connection | None) -> None:
        if handed is None:
            self._free_slot()
        else:
            self.release(handed)

    def dropped(self, conn: Connection) -> None:
        """`conn` closed (by us or the upstream): out of the pool, its slot freed."""
        if conn in self.connections:
            self.connections.discard(conn)
            idle = conn.origin.idle
            if idle and conn in idle:
                idle.remove(conn)
            self._free_slot()

    def _free_slot(self) -> None:
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes to the waiter as it is
                return
        self.count -= 1

    def _expire(self) -> None:
        """Close connections idle for `keepalive`; come back for the next one due."""
        self._sweep = None
        deadline = self.loop.time() - self.keepalive
        due: float | None = None
        for origin in self.origins.values():
            idle = origin.idle
            while idle and idle[0].idle_since <= deadline:
                idle[0].close()  # dropped() takes it out of `idle`
            if idle:
                oldest = idle[0].idle_since
                due = oldest if due is None else min(due, oldest)
        if due is not None and not self.closed:
            self._sweep = self.loop.call_at(due + self.keepalive, self._expire)

    def close(self) -> None:
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self.connections):
            conn.close()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(
                    ConnectError(ConnectionRefusedError("the upstream's pool is closed"))
                )
