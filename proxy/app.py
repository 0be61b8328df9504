"""Builds the sidecar from a Config: its upstreams, its routes, its lifecycle.

`Sidecar` owns what lives as long as a config does (upstream pools and
policies); `serve` binds the listeners and runs until a signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import RawRequestMessage
from aiohttp.streams import StreamReader

from proxy.admin import AdminApp
from proxy.checkout.call_order import CallOrder
from proxy.checkout.decided import DecidedRecords
from proxy.checkout.final_writes import FinalWrites
from proxy.checkout.flow import ACTION_JOB, ASYNC_STEP_JOB, FOLLOWUP_JOB, CheckoutFlow
from proxy.checkout.jobs import CheckoutJobs
from proxy.checkout.journal import Journal
from proxy.checkout.plan import CheckoutPlan
from proxy.checkout.recovery import Recovery
from proxy.checkout.route import CheckoutRoute
from proxy.config.model import Config, Events
from proxy.dataplane import PROXY_ROUTE, DataPlane, upstream_name
from proxy.durable import DurableState
from proxy.events import EventHooks, EventOptions, EventOutbox
from proxy.events.amqp import AmqpPublisher
from proxy.observability.badrequests import BadRequestLog
from proxy.observability.hooks import JobTelemetry, Telemetry
from proxy.observability.metrics import Metrics, StateCollector
from proxy.observability.traced import traced
from proxy.passthrough import ProxyRoute
from proxy.reload import ConfigReloader
from proxy.resilience.clock import Clock, monotonic
from proxy.resilience.ratelimit import BucketStore
from proxy.runtime import Runtime
from proxy.storage.limits import open_bucket_store
from proxy.storage.open import open_journal
from proxy.storage.url import redact_url
from proxy.upstreams import Upstream, UpstreamHooks, UpstreamRegistry

log = logging.getLogger("proxy")

SIDECAR: web.AppKey[Sidecar] = web.AppKey("sidecar")

RESTART_REQUIRED = (
    "listen", "admin", "store", "idempotency", "queue", "events", "shutdown", "log",
)  # fmt: skip
"""Sections a reload cannot change in a running process (listeners and stores)."""


def open_events(section: Events, journal: Journal, hooks: EventHooks) -> EventOutbox:
    """The events outbox of an `events:` section; connects nothing until a publish."""
    options = EventOptions(
        types=frozenset(section.types),
        source=section.source,
        relay_interval=section.relay_interval,
    )
    publisher = AmqpPublisher(
        section.broker,
        section.exchange,
        connection_name=f"checkout-sidecar events {os.getpid()}",
        timeout=section.publish_timeout,
    )
    return EventOutbox(journal, publisher, options, hooks=hooks)


def warn_insecure_tls(config: Config) -> None:
    """Say, at every load and reload, which upstreams are called without verification.

    `insecure_skip_verify` is for a test bench; a warning each time the config is
    applied keeps it from going unnoticed in production (it also shows in
    /admin/config).
    """
    for name, upstream in config.upstreams.items():
        if upstream.tls is not None and upstream.tls.insecure_skip_verify:
            log.warning(
                "upstream %s: TLS verification is off (tls.insecure_skip_verify): "
                "any server can pose as it",
                name,
                extra={"event": "tls_insecure", "upstream": name},
            )


def _restart_needed(section: str, new: Config, old: Config) -> bool:
    """Whether `section` changed in a way only a restart applies.

    The admin token is read per request, so a rotated token (a `${file:...}` secret)
    applies at once; only the admin listener's address needs a restart.
    """
    if section == "admin":
        return new.admin.listen != old.admin.listen
    return bool(getattr(new, section) != getattr(old, section))


class Sidecar:
    """The running form of a config: its `runtime` snapshot, its stores, its lifecycle."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock = monotonic,
        metrics: Metrics | None = None,
        hooks: UpstreamHooks | None = None,
    ) -> None:
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.telemetry = Telemetry(self.metrics)
        self.hooks = hooks or self.telemetry
        self.durable = DurableState(
            config,
            self._upstream,
            worker_hooks=JobTelemetry(self.metrics),
            idempotency_result=self.metrics.idempotency_result,
        )
        self._journal: Journal | None = None
        self.events: EventOutbox | None = None  # opened at start when `events:` is set
        self._buckets: BucketStore | None = None  # shared rate limits, opened when one is set
        self._running: set[str] = set()  # checkouts this process runs, kept across flows
        self.final_writes = FinalWrites()  # of checkouts answered, kept across flows too
        self._decided = DecidedRecords()  # for the jobs they queue, kept across flows too
        self._call_order = CallOrder()  # what each checkout call takes, across flows too
        self.recovery = Recovery(self._flow)
        self.runtime = self._build(config, None)
        warn_insecure_tls(config)
        self._prepare_metrics()
        self.metrics.watch(StateCollector(self._upstreams))
        self.ready = False
        self.not_ready_reason = "starting"
        self._started = False
        self.loaded: dict[str, object] = {
            "hash": "",
            "loaded_at": time.time(),
            "source": "",
            "restart_required": [],
        }
        self._draining: set[asyncio.Task[Any]] = set()  # reloads, retired pools closing

    @property
    def config(self) -> Config:
        return self.runtime.config

    def _upstream(self, name: str) -> Upstream | None:
        """The named upstream of the config in force (jobs resolve names at run time)."""
        return self.runtime.upstreams.get(name)

    def _upstreams(self) -> UpstreamRegistry:
        return self.runtime.upstreams

    def _flow(self) -> CheckoutFlow:
        """The checkout flow in force, for the queue's checkout jobs and recovery."""
        flow = self.runtime.flow
        if flow is None:
            raise RuntimeError("the checkout flow is not running (stores not open)")
        return flow

    def _build(self, config: Config, previous: Runtime | None) -> Runtime:
        """A runtime for `config`, keeping what did not change from `previous`.

        An upstream whose settings did not change is kept whole (pool, breaker,
        budget, stale cache); a changed one keeps each policy whose own settings did
        not change. Whether a checkout is configured at all is fixed at start (its
        routes are), so a reload that adds or removes one keeps the plan in force.
        """
        upstreams: dict[str, Upstream] = {}
        buckets = self._bucket_store(config)
        for name, section in config.upstreams.items():
            current = previous.upstreams.get(name) if previous is not None else None
            if current is not None and current.config == section:
                upstreams[name] = current
            else:
                upstreams[name] = Upstream(
                    name,
                    section,
                    hooks=self.hooks,
                    clock=self.clock,
                    previous=current.policies if current is not None else None,
                    buckets=buckets,
                )
        registry = UpstreamRegistry(upstreams)
        checkout = config.composite.checkout
        plan = CheckoutPlan.of(checkout) if checkout is not None else None
        if (previous is not None and (previous.plan is None) != (plan is None)) or (
            previous is not None and config.composite == previous.config.composite
        ):
            plan = previous.plan
        flow = None
        queue = self.durable.queue
        if plan is not None and self._journal is not None and queue is not None:
            flow = CheckoutFlow(
                plan,
                registry.get,
                self._journal,
                queue,
                hooks=self.telemetry,
                clock=self.clock,
                running=self._running,
                final_writes=self.final_writes,
                decided=self._decided,
                call_order=self._call_order,
                keys=self.durable.guard,
                events=self.events,
            )
        return Runtime(config, registry, plan, flow, self.durable.guard)

    def _prepare_metrics(self) -> None:
        """The usual series of the upstreams in force at zero (`Metrics.prepare`)."""
        upstreams = self.runtime.upstreams
        self.metrics.prepare(upstreams.names())
        self.metrics.prepare_rate_limits(
            (u.name, u.policies.limiter.options.scope)
            for u in upstreams
            if u.policies.limiter is not None
        )

    def _bucket_store(self, config: Config) -> BucketStore | None:
        """The store of the shared rate limits, opened the first time a config has one.

        Opening connects nothing; the `store` URL needs a restart to change, so one
        store serves every later config.
        """
        if self._buckets is None and any(
            u.rate_limit is not None and u.rate_limit.scope == "shared"
            for u in config.upstreams.values()
        ):
            self._buckets = open_bucket_store(config.store)
        return self._buckets

    def apply(self, new: Config) -> list[str]:
        """Swap in a new config; return the settings that only a restart applies.

        Requests in flight hold the runtime they started with and finish on it; a
        removed or replaced upstream is closed once its calls can be over.
        """
        old = self.runtime
        self.runtime = self._build(new, old)
        warn_insecure_tls(new)
        self._prepare_metrics()
        for upstream in old.upstreams:
            if self.runtime.upstreams.get(upstream.name) is not upstream:
                self._retire(upstream)
        restart = [f for f in RESTART_REQUIRED if _restart_needed(f, new, old.config)]
        if (old.config.composite.checkout is None) != (new.composite.checkout is None):
            restart.append("composite")
        if restart:
            log.warning("config reloaded; these settings apply after a restart: %s", restart)
        return restart

    def _retire(self, upstream: Upstream) -> None:
        """Close a replaced upstream's pool once no call started on it can still run."""

        async def drain() -> None:
            try:
                await asyncio.sleep(upstream.config.timeout.total + 1.0)
            finally:  # also when the sidecar closes first: no pool is left open
                await upstream.close()

        task = asyncio.get_running_loop().create_task(drain(), name=f"drain:{upstream.name}")
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def start(self, *, run_workers: bool | None = None, recover: bool = True) -> None:
        """Open the durable stores, start the in-process worker and checkout recovery (once)."""
        if self._started:
            return
        self._started = True
        config = self.runtime.config
        if self.runtime.plan is not None:
            self._journal = await open_journal(config.store)
            if config.events is not None:
                self.events = open_events(config.events, self._journal, self.metrics.events)
        await self.durable.open(run_workers=False)
        journal = config.store if self._journal is not None else None
        await self.durable.report_durability(self.metrics.store_durability, journal=journal)
        self.runtime = self._build(config, self.runtime)
        plan = self.runtime.plan
        if plan is not None:
            # handlers are registered before the worker starts, so no checkout job is
            # ever taken by a worker that does not know its type
            jobs = CheckoutJobs(self._flow)
            self.durable.register(ACTION_JOB, jobs.action)
            self.durable.register(FOLLOWUP_JOB, jobs.followup)
            self.durable.register(ASYNC_STEP_JOB, jobs.async_step)
            if recover:
                self.recovery.start(plan.recovery_interval)
            if self.events is not None:
                self.events.start()
        self.durable.start_workers(run_workers)

    def data_plane(self) -> DataPlane:
        """The data-plane listener's one handler: each route in `traced`, which returns
        it as it is when tracing is off (a request then runs nothing of tracing)."""
        checkout = CheckoutRoute(self, self.recovery)
        plan = self.runtime.plan
        path = plan.path if plan is not None else "/checkout"
        return DataPlane(
            self,
            traced(
                ProxyRoute(self).handle,
                own_calls=False,  # it forwards the request's headers, traceparent included
                route=PROXY_ROUTE,
                upstream_of=_upstream_of,
            ),
            traced(checkout.post, route=path),
            traced(checkout.get, own_calls=False, route=path + "/{id}"),
        )

    def build_server(self, **kwargs: Any) -> web.Server:
        """The data plane on aiohttp's low-level server, as `serve` runs it.

        No router and no middleware chain: `DataPlane` routes. `kwargs` go to each
        connection's `RequestHandler` (access log, logger). The caller starts and
        closes the sidecar around it (`start`, `close`): a bare server has no hooks.
        """
        handler = self.data_plane()
        limit = self._largest_body_limit()
        loop = asyncio.get_running_loop()

        def make_request(
            message: RawRequestMessage,
            payload: StreamReader,
            protocol: web.RequestHandler,
            writer: AbstractStreamWriter,
            task: asyncio.Task[None],
        ) -> web.BaseRequest:
            # the Application's client_max_size, which a bare server's requests lack
            return web.BaseRequest(
                message, payload, protocol, writer, task, loop, client_max_size=limit
            )

        return web.Server(handler, request_factory=make_request, **kwargs)

    def build_app(self) -> web.Application:
        """The same data plane mounted in an Application, for aiohttp's test fixtures
        and the demo: one catch-all route, and the sidecar's start and close as the
        app's start-up and clean-up."""
        app = web.Application(client_max_size=self._largest_body_limit())
        plane = self.data_plane()

        async def handle(request: web.Request) -> web.StreamResponse:
            return await plane(request)

        app.router.add_route("*", r"/{path:[\s\S]*}", handle)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        app[SIDECAR] = self
        return app

    async def _on_startup(self, app: web.Application) -> None:
        await self.start()

    def build_admin_app(self) -> web.Application:
        """The admin listener's app: metrics, probes, breaker control."""
        return AdminApp(self).build()

    def _largest_body_limit(self) -> int:
        config = self.runtime.config
        limits = [u.max_request_body for u in config.upstreams.values()]
        return max([config.defaults.max_request_body, *limits])

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.close()

    async def close(self) -> None:
        draining = list(self._draining)
        for task in draining:
            task.cancel()
        await asyncio.gather(*draining, return_exceptions=True)
        await self.final_writes.drain()  # answered checkouts' last writes, before the stores close
        await self.recovery.stop()
        if self.events is not None:
            await self.events.stop()
        await self.durable.close()
        if self._journal is not None:
            await self._journal.close()
        await self.runtime.upstreams.close()
        if self._buckets is not None:
            await self._buckets.close()


def _upstream_of(request: web.BaseRequest, *args: Any) -> str:
    """The proxied request's upstream, for its span: the route's `name` argument."""
    return str(args[0]) if args else upstream_name(request.raw_path)


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
    config_path: str | None = None,
    ready: Callable[[dict[str, str]], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Bind the listeners and run until SIGTERM/SIGINT (or `stop`); reload on SIGHUP.

    The signal handlers are installed before anything binds: a SIGHUP that comes
    before the config reloader exists is remembered and applied once it does, and
    a SIGTERM during start-up shuts down cleanly as soon as start-up ends.

    Shutdown, in order: /readyz turns 503 at once; the listener keeps accepting for
    `shutdown.drain_delay` so the load balancer can notice; then it stops accepting
    and requests and checkouts in flight get `shutdown.grace` to finish; the workers
    finish or release their jobs. A second signal, or the grace running out, exits
    at once: the journal makes that safe.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = _ServeSignals(stop)
    signals.install(loop)
    try:
        await _serve(config, config_path, ready, stop, signals)
    finally:
        signals.remove(loop)


async def _serve(
    config: Config,
    config_path: str | None,
    ready: Callable[[dict[str, str]], None] | None,
    stop: asyncio.Event,
    signals: _ServeSignals,
) -> None:
    loop = asyncio.get_running_loop()
    sidecar = Sidecar(config)
    grace = config.shutdown.grace
    # aiohttp's request handler logs through this: a request it cannot parse becomes
    # one info line and a count in sidecar_bad_requests_total, not an error traceback
    bad_requests = BadRequestLog(sidecar.metrics)
    runner = web.ServerRunner(
        sidecar.build_server(
            access_log=logging.getLogger("proxy.access") if config.log.access_log else None,
            logger=bad_requests,
        ),
        handle_signals=False,
        shutdown_timeout=grace,
    )
    admin = web.AppRunner(
        sidecar.build_admin_app(),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=1.0,
        logger=bad_requests,
    )
    reloader: ConfigReloader | None = None
    started = False
    try:
        await sidecar.start()
        started = True
        await runner.setup()
        await admin.setup()
        site = web.TCPSite(runner, config.listen.host, config.listen.port, backlog=1024)
        await site.start()
        await web.TCPSite(admin, config.admin.listen.host, config.admin.listen.port).start()
        addresses = {"listen": _bound(runner), "admin": _bound(admin)}
        quiet_garbage_collector()

        if config_path is not None:
            reloader = ConfigReloader(
                config_path, sidecar, on_result=sidecar.metrics.config_reloaded
            )
            if config.reload.watch:
                reloader.watch(config.reload.poll_interval)
        sidecar.ready = True
        sidecar.not_ready_reason = ""
        _announce_start(addresses)
        if ready is not None:
            ready(addresses)

        async def reload_now(reloader: ConfigReloader) -> None:
            await reloader.reload("SIGHUP")

        def reload() -> None:
            if reloader is not None:
                task = loop.create_task(reload_now(reloader))
                sidecar._draining.add(task)
                task.add_done_callback(sidecar._draining.discard)

        signals.on_hangup(reload)  # runs at once for a SIGHUP held during start-up
        await stop.wait()
    finally:
        sidecar.ready = False
        sidecar.not_ready_reason = "shutting down"
        log.info(
            "shutdown: not ready, draining",
            extra={"event": "shutdown", "drain_delay": config.shutdown.drain_delay},
        )
        signals.on_hangup(None)
        if reloader is not None:
            await reloader.stop()
        await asyncio.sleep(config.shutdown.drain_delay)
        forced = loop.call_later(grace + 1.0, _exit_now)
        await runner.cleanup()  # stop accepting; in-flight requests get `grace`
        await admin.cleanup()
        if started:
            await sidecar.close()
        forced.cancel()
        log.info("shutdown complete", extra={"event": "shutdown_complete"})


def _announce_start(addresses: dict[str, str]) -> None:
    """The JSON `start` line, written at every log level: it is how a process reading
    the sidecar's stdout learns the bound addresses (a banner is for terminals only)."""
    record = log.makeRecord(
        log.name,
        logging.INFO,
        __file__,
        0,
        "checkout-sidecar started",
        (),
        None,
        extra={"event": "start", "listen": addresses["listen"], "admin": addresses["admin"]},
    )
    log.handle(record)  # not log.info: the level check is what this line skips


class _ServeSignals:
    """SIGTERM/SIGINT stop (a second one exits at once); SIGHUP reloads, or waits for it.

    Installed before the listeners bind, so no signal meets its default action (which
    for SIGHUP and SIGTERM is death) while the sidecar starts.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, stop: asyncio.Event) -> None:
        self.stop = stop
        self.count = 0
        self.hangup_pending = False
        self._reload: Callable[[], None] | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        handlers = {
            signal.SIGINT: self.terminate,
            signal.SIGTERM: self.terminate,
            signal.SIGHUP: self.hangup,
        }
        for sig, handler in handlers.items():
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, handler)

    def remove(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in self.SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)

    def terminate(self) -> None:
        self.count += 1
        if self.count > 1:
            log.warning("second signal: exiting now", extra={"event": "shutdown_forced"})
            os._exit(1)
        self.stop.set()

    def hangup(self) -> None:
        if self._reload is None:
            self.hangup_pending = True  # applied when the reloader exists
            return
        self._reload()

    def on_hangup(self, reload: Callable[[], None] | None) -> None:
        """Reload with `reload` from now on (None: hold SIGHUPs); runs one held SIGHUP."""
        self._reload = reload
        if reload is not None and self.hangup_pending:
            self.hangup_pending = False
            reload()


def quiet_garbage_collector() -> None:
    """Move what start-up allocated out of the collector's sight, and collect less often.

    A proxy allocates and frees short-lived objects per request and keeps almost
    nothing; full collections over the ~60k start-up objects cost ~9% of CPU and
    reclaimed nothing (profiled under wrk). Reference counting still frees
    everything; only cycles wait a little longer.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def _exit_now() -> None:
    log.warning("shutdown grace expired: exiting now", extra={"event": "shutdown_forced"})
    os._exit(1)


async def serve_worker(config: Config, *, stop: asyncio.Event | None = None) -> None:
    """Run only the job workers (and checkout recovery) of a config, until a signal.

    For a separate worker process beside sidecars that set `queue.workers: false`,
    or to drain a shared Redis queue with more hands. The signal handlers come
    first: a SIGTERM while the stores open stops the worker once they are open, and
    a SIGHUP (sent to every process by some config reloaders) is logged, not fatal.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = _ServeSignals(stop)
    signals.on_hangup(_worker_hangup)
    signals.install(loop)
    sidecar = Sidecar(config)
    try:
        await sidecar.start(run_workers=True)
        log.info(
            "checkout-sidecar worker started",
            extra={"event": "worker_start", "queue": redact_url(config.queue_store)},
        )
        await stop.wait()
    finally:
        signals.remove(loop)
        await sidecar.close()


def _worker_hangup() -> None:
    log.info("SIGHUP: a worker does not reload; restart it", extra={"event": "sighup_ignored"})


def _bound(runner: web.BaseRunner) -> str:
    for address in runner.addresses:
        host, port = address[0], address[1]
        return f"http://{host}:{port}"
    return ""
