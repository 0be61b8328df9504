"""Builds the sidecar from a Config: its upstreams, its routes, its lifecycle.

`Sidecar` owns what lives as long as a config does (upstream pools and
policies); `serve` binds the listeners and runs until a signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from aiohttp import web

from proxy.admin import AdminApp
from proxy.checkout.flow import ACTION_JOB, ASYNC_STEP_JOB, FOLLOWUP_JOB, CheckoutFlow
from proxy.checkout.jobs import CheckoutJobs
from proxy.checkout.journal import open_journal
from proxy.checkout.plan import CheckoutPlan
from proxy.checkout.recovery import Recovery
from proxy.checkout.route import CheckoutRoute
from proxy.config import Config
from proxy.durable import DurableState
from proxy.observability.metrics import Metrics, StateCollector
from proxy.passthrough import ProxyRoute
from proxy.resilience.clock import Clock, monotonic
from proxy.resilience.pipeline import PipelineHooks
from proxy.upstreams import Upstream, UpstreamRegistry

log = logging.getLogger("proxy")

SIDECAR: web.AppKey[Sidecar] = web.AppKey("sidecar")


class Sidecar:
    """The running form of one Config."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock = monotonic,
        metrics: Metrics | None = None,
        hooks: PipelineHooks | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.hooks = hooks or self.metrics
        self.registry = UpstreamRegistry(
            {
                name: Upstream(name, upstream, hooks=self.hooks, clock=clock)
                for name, upstream in config.upstreams.items()
            }
        )
        self.metrics.prepare(self.registry.names())
        self.metrics.watch(StateCollector(lambda: self.registry))
        self.durable = DurableState(
            config,
            self.registry.get,
            worker_hooks=self.metrics.jobs,
            idempotency_result=self.metrics.idempotency_result,
        )
        self.ready = False
        self.not_ready_reason = "starting"
        self._started = False
        section = config.composite.checkout
        self.plan = CheckoutPlan.of(section) if section is not None else None
        self.checkout: CheckoutFlow | None = None
        self.recovery: Recovery | None = None

    async def start(self, *, run_workers: bool | None = None, recover: bool = True) -> None:
        """Open the durable stores, start the in-process worker and checkout recovery (once)."""
        if self._started:
            return
        self._started = True
        if self.plan is not None:
            # handlers are registered before the worker starts, so no checkout job is
            # ever taken by a worker that does not know its type
            self._journal = await open_journal(self.config.store)
        await self.durable.open(run_workers=False)
        if self.plan is not None:
            assert self.durable.queue is not None
            self.checkout = CheckoutFlow(
                self.plan,
                self.registry.get,
                self._journal,
                self.durable.queue,
                clock=self.clock,
                on_decided=self.metrics.checkout_decided,
            )
            jobs = CheckoutJobs(self.checkout)
            self.durable.register(ACTION_JOB, jobs.action)
            self.durable.register(FOLLOWUP_JOB, jobs.followup)
            self.durable.register(ASYNC_STEP_JOB, jobs.async_step)
            self.recovery = Recovery(self.checkout)
            if recover:
                self.recovery.start(self.plan.recovery_interval)
        self.durable.start_workers(run_workers)

    def build_app(self) -> web.Application:
        """The data-plane app: proxied routes (and, later, the composite checkout)."""
        app = web.Application(client_max_size=self._largest_body_limit())
        route = ProxyRoute(
            self.registry,
            guard=lambda: self.durable.guard,
            key_header=self.config.idempotency.header,
            required_for=frozenset(self.config.idempotency.required_for),
        )
        if self.plan is not None:
            checkout = CheckoutRoute(
                _Late(lambda: self.checkout),  # type: ignore[arg-type]
                _Late(lambda: self.recovery),  # type: ignore[arg-type]
                lambda: self.durable.guard,
                key_header=self.config.idempotency.header,
                scope_header=self.config.idempotency.scope_header,
                on_result=self.metrics.checkout_finished,
            )
            app.router.add_post(self.plan.path, checkout.post)
            app.router.add_get(self.plan.path + "/{id}", checkout.get)
        app.router.add_route("*", "/{upstream}", route.handle)
        app.router.add_route("*", "/{upstream}/{tail:.*}", route.handle)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        app[SIDECAR] = self
        return app

    async def _on_startup(self, app: web.Application) -> None:
        await self.start()

    def build_admin_app(self) -> web.Application:
        """The admin listener's app: metrics, probes, breaker control."""
        return AdminApp(lambda: self).build(self.config.admin.token)

    def _largest_body_limit(self) -> int:
        limits = [u.max_request_body for u in self.config.upstreams.values()]
        return max([self.config.defaults.max_request_body, *limits])

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.close()

    async def close(self) -> None:
        if self.recovery is not None:
            await self.recovery.stop()
        await self.durable.close()
        if self.plan is not None and self._started:
            await self._journal.close()
        await self.registry.close()


class _Late:
    """Stands for an object made at start (after the routes): attribute access is forwarded."""

    def __init__(self, get: Callable[[], object]) -> None:
        self._get = get

    def __getattr__(self, name: str) -> object:
        target = self._get()
        if target is None:
            raise RuntimeError("the sidecar has not started")
        return getattr(target, name)


def install_uvloop() -> bool:
    """Use uvloop when it is installed: the event loop is most of a proxy's cost."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


async def serve(
    config: Config,
    *,
    ready: Callable[[dict[str, str]], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Bind the listeners and run until SIGINT/SIGTERM (or `stop` is set)."""
    sidecar = Sidecar(config)
    runner = web.AppRunner(sidecar.build_app(), access_log=None, handle_signals=False)
    admin = web.AppRunner(sidecar.build_admin_app(), access_log=None, handle_signals=False)
    await runner.setup()
    await admin.setup()
    site = web.TCPSite(runner, config.listen.host, config.listen.port, backlog=1024)
    await site.start()
    await web.TCPSite(admin, config.admin.listen.host, config.admin.listen.port).start()
    addresses = {"listen": _bound(runner), "admin": _bound(admin)}
    sidecar.ready = True
    sidecar.not_ready_reason = ""
    log.info("listening on %s, admin on %s", addresses["listen"], addresses["admin"])
    if ready is not None:
        ready(addresses)

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        sidecar.ready = False
        sidecar.not_ready_reason = "shutting down"
        await runner.cleanup()
        await admin.cleanup()


async def serve_worker(config: Config, *, stop: asyncio.Event | None = None) -> None:
    """Run only the job workers (and checkout recovery) of a config, until a signal.

    For a separate worker process beside sidecars that set `queue.workers: false`,
    or to drain a shared Redis queue with more hands.
    """
    sidecar = Sidecar(config)
    await sidecar.start(run_workers=True)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    log.info("worker running on %s", config.queue_store)
    try:
        await stop.wait()
    finally:
        await sidecar.close()


def _bound(runner: web.AppRunner) -> str:
    for address in runner.addresses:
        host, port = address[0], address[1]
        return f"http://{host}:{port}"
    return ""
