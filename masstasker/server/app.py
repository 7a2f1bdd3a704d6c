"""Assembly: the store, the servicer, health, reflection, metrics, and shutdown.

:func:`start` builds and starts a server on the running event loop;
:func:`serve` is what the CLI runs (signals, graceful stop);
:class:`BackgroundServer` runs one in a thread, for tests and embedding.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer  # what health.aio re-exports; typed this way
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from masstasker.server.admin import ADMIN_SERVICE_NAME, AdminService
from masstasker.server.admission import WaitingAdmission
from masstasker.server.auth import TokenInterceptor, TokenSet
from masstasker.server.config import Settings, check_security, check_store, dial_host, format_address, parse_address
from masstasker.server.dashboard import Calls, Dashboard
from masstasker.server.limits import Limits
from masstasker.server.metrics import RpcMetrics, StoreCollector, StoreReading
from masstasker.server.metrics_http import start_metrics_http
from masstasker.server.service import SERVICE_NAME, MassTaskerService
from masstasker.server.stores import open_store
from masstasker.server.stores.base import TaskStore
from masstasker.server.tls import ServerTls, exposure_warnings

__all__ = ["GC_THRESHOLDS", "BackgroundServer", "Server", "serve", "start", "tune_gc"]

log = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_START_TIMEOUT = 30.0
#: gc.set_threshold() for the server process: (young, middle, old). See :func:`tune_gc`.
GC_THRESHOLDS = (100_000, 50, 100)


class Server:
    """A running MassTasker server; made by :func:`start`."""

    def __init__(
        self,
        *,
        grpc_server: grpc.aio.Server,
        health: HealthServicer,
        store: TaskStore,
        admission: WaitingAdmission,
        settings: Settings,
        host: str,
        port: int,
        registry: CollectorRegistry,
        tokens: TokenSet | None,
        tls: ServerTls | None,
        http: WSGIServer | None,
        dashboard: Dashboard | None = None,
    ) -> None:
        self.store = store
        self.waiters = store.waiters
        self.admission = admission  # the waiting-Query counts and limits
        self.host = host
        self.port = port
        self.settings = settings
        self.registry = registry  # this server's metrics, served or not
        self.tokens = tokens  # the accepted bearer tokens, when --auth-token-file is set
        self.tls = tls  # the TLS files, when --tls-cert is set
        self.http_port: int | None = http.server_port if http is not None else None
        self._grpc = grpc_server
        self._health = health
        self._http = http
        self.dashboard = dashboard  # the web dashboard on the HTTP listener, unless --dashboard off
        self._stopped = False
        self._store_watch: asyncio.Task[str] | None = None
        self.failure: str | None = None  # why the store failed for good, once it has

    @property
    def target(self) -> str:
        """``HOST:PORT`` a client on this machine can dial."""
        return format_address(dial_host(self.host), self.port)

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, release waiting Queries (UNAVAILABLE), give in-flight calls ``grace`` seconds."""
        if self._stopped:
            return
        self._stopped = True
        if self._store_watch is not None:
            self._store_watch.cancel()
        await self._health.enter_graceful_shutdown()
        self.store.release_waiters()
        await self._grpc.stop(self.settings.shutdown_grace if grace is None else grace)
        if self.dashboard is not None:
            self.dashboard.close()  # ends its live streams, which would hold the listener's threads
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        await self.store.close()

    def reload_tokens(self) -> bool:
        """Re-read ``--auth-token-file`` (SIGHUP does this); calls in flight are not affected.

        Returns False, keeping the current tokens, if the file cannot be used.
        """
        if self.tokens is None:
            log.warning("no --auth-token-file: no tokens to reload")
            return False
        return self.tokens.reload()

    def reload_tls(self) -> bool:
        """Re-read ``--tls-cert``/``--tls-key``/``--tls-client-ca`` (SIGHUP does this) for new connections.

        Returns False, keeping the current certificate, if the new files cannot be used.
        """
        if self.tls is None:
            log.warning("no --tls-cert: no TLS files to reload")
            return False
        return self.tls.reload()

    def reload(self) -> None:
        """What SIGHUP does: re-read the token file and the TLS files, whichever are set."""
        if self.tokens is None and self.tls is None:
            log.warning("SIGHUP: no --auth-token-file nor --tls-cert, nothing to reload")
        if self.tokens is not None:
            self.tokens.reload()
        if self.tls is not None:
            self.tls.reload()

    def watch_store(self) -> None:
        """Health follows the store: NOT_SERVING while it is unavailable (a lost database) or once it failed
        for good (a lost data directory, docs/durability.md), SERVING again when it is back."""
        if self._store_watch is not None:
            return

        async def follow(reason: str | None) -> None:
            status = _SERVING if reason is None else _NOT_SERVING
            for name in ("", SERVICE_NAME):
                await self._health.set(name, status)
            if reason is None:
                log.warning("health is SERVING again: the %s is back", self.store.name)
            else:
                log.error("health is NOT_SERVING: %s", reason)

        self.store.on_availability(follow)
        self._store_watch = asyncio.get_running_loop().create_task(self._until_store_fails())

    async def _until_store_fails(self) -> str:
        failure = self.failure = await self.store.failed()
        for name in ("", SERVICE_NAME):
            await self._health.set(name, _NOT_SERVING)
        log.critical("health is NOT_SERVING: %s", failure)
        return failure

    async def wait_for_termination(self) -> None:
        """Return when the gRPC server has stopped."""
        await self._grpc.wait_for_termination()


def _group_stats(store: TaskStore, clock: Callable[[], int]) -> Callable[[], Coroutine[Any, Any, StoreReading]]:
    async def read() -> StoreReading:
        # Every statistic from the store's incremental state, in one read (one statement on PostgreSQL);
        # no wait for durability: metrics must go on working after it is lost.
        groups = await store.admin.group_stats(clock(), wait_durable=False)
        return groups, store.waiters.count, sum(stats.total for stats in groups)

    return read


def _grpc_server(
    settings: Settings,
    services: tuple[MassTaskerService, AdminService],
    admission: WaitingAdmission,
    tokens: TokenSet | None,
) -> tuple[grpc.aio.Server, HealthServicer]:
    """The gRPC server with our services, health and reflection registered; not bound yet."""
    server = grpc.aio.server(
        # No interceptor at all without tokens: it would cost every call.
        interceptors=[TokenInterceptor(tokens)] if tokens is not None else None,
        options=[
            ("grpc.max_receive_message_length", settings.max_msg_size),
            ("grpc.max_send_message_length", settings.max_msg_size),
            # Without this, a second server could bind the same port and split the traffic.
            ("grpc.so_reuseport", 0),
            *admission.grpc_options(),
        ],
    )
    server.add_generic_rpc_handlers(tuple(service.handler() for service in services))
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, ADMIN_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    return server, health_servicer


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> tuple[str, int]:
    """Bind the gRPC address, with TLS when there are credentials; the host and the bound port."""
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from exc
    return parse_address(address)[0], port


async def _bootstrap(settings: Settings, store: TaskStore) -> None:
    """Create the bootstrap task, if asked for, on the store's first start and if its group is empty.

    After that first start (of a data directory, or of a PostgreSQL schema), an
    empty group means the job consumed it.
    """
    group = settings.bootstrap_task_group
    if group and await store.bootstrap(group):
        log.info("created the bootstrap task in group %r", group)


def _dashboard(
    settings: Settings, services: tuple[MassTaskerService, AdminService], tokens: TokenSet | None
) -> Dashboard | None:
    """The dashboard, calling the same handlers as the gRPC server in-process, unless it is off."""
    if not settings.listen_http or settings.dashboard == "off":
        return None
    calls = Calls(asyncio.get_running_loop(), tuple(service.handler() for service in services))
    read_tokens = tokens if settings.metrics_auth else None
    return Dashboard(calls, mode=settings.dashboard, tokens=tokens, read_tokens=read_tokens)


def _serve_metrics(
    settings: Settings,
    registry: CollectorRegistry,
    group_stats: Callable[[], Coroutine[Any, Any, StoreReading]],
    tokens: TokenSet | None,
    cleanup: AsyncExitStack,
    dashboard: Dashboard | None,
) -> WSGIServer | None:
    """With ``--listen-http``: serve /metrics (behind the token with ``--metrics-auth``) from a thread,
    and the dashboard at every other path.

    The per-group gauges are registered only then: nobody else reads them.
    """
    if not settings.listen_http:
        return None
    registry.register(StoreCollector(asyncio.get_running_loop(), group_stats))
    host, port = parse_address(settings.listen_http)
    try:
        http = start_metrics_http(host, port, registry, tokens if settings.metrics_auth else None, dashboard=dashboard)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {settings.listen_http}: {exc}") from exc
    cleanup.callback(http.server_close)
    cleanup.callback(http.shutdown)
    if dashboard is not None:
        cleanup.callback(dashboard.close)
    log.info("metrics on http://%s/metrics", format_address(host, http.server_port))
    return http


async def start(settings: Settings, *, clock: Callable[[], int] = time.time_ns) -> Server:
    """Build, bind and start a server on the running loop; it is SERVING on return.

    ``clock`` (ns since the epoch) is the one time source of the store, the
    waiters and the servicer. Raises OSError when an address, a TLS file or
    the token file cannot be used, ValueError when the security settings
    contradict each other; whatever was started by then is stopped again.
    """
    problem = check_security(settings) or check_store(settings)
    if problem:
        raise ValueError(problem)
    tokens = TokenSet(settings.auth_token_file) if settings.auth_token_file else None
    tls = ServerTls.from_settings(settings)
    credentials = tls.credentials() if tls is not None else None
    async with AsyncExitStack() as cleanup:
        store = await open_store(settings, clock)
        cleanup.push_async_callback(store.close)
        admission = WaitingAdmission(settings)
        registry = CollectorRegistry(auto_describe=False)
        store.register_metrics(registry)
        metrics = RpcMetrics(registry)
        service = MassTaskerService(store, admission, settings, metrics, clock=clock)
        admin = AdminService(store.admin, Limits(settings), metrics, clock=clock)
        grpc_server, health_servicer = _grpc_server(settings, (service, admin), admission, tokens)
        host, port = _bind(grpc_server, settings.rpc_address, credentials)
        await _bootstrap(settings, store)
        await grpc_server.start()
        cleanup.push_async_callback(grpc_server.stop, None)
        dashboard = _dashboard(settings, (service, admin), tokens)
        http = _serve_metrics(settings, registry, _group_stats(store, clock), tokens, cleanup, dashboard)
        server = Server(
            grpc_server=grpc_server,
            health=health_servicer,
            store=store,
            admission=admission,
            settings=settings,
            host=host,
            port=port,
            registry=registry,
            tokens=tokens,
            tls=tls,
            http=http,
            dashboard=dashboard,
        )
        await health_servicer.set("", _SERVING)
        await health_servicer.set(SERVICE_NAME, _SERVING)
        server.watch_store()
        _log_started(settings, host, port, tokens, tls=credentials is not None)
        cleanup.pop_all()  # started: from now on Server.stop() releases everything
    return server


def _log_started(settings: Settings, host: str, port: int, tokens: TokenSet | None, *, tls: bool) -> None:
    log.info(
        "gRPC transport: %s; %s",
        "mutual TLS" if settings.tls_client_ca else "TLS" if tls else "plaintext",
        f"{len(tokens)} bearer token(s) accepted" if tokens is not None else "no token needed",
    )
    log.info("listening on %s", format_address(host, port))
    for warning in exposure_warnings(settings, host):
        log.warning("%s", warning)


# -- a store that fails for good (a lost data directory, docs/durability.md) ----------------------------------


async def _stop_requested_or_store_failed(stopping: asyncio.Event, server: Server) -> None:
    # The watch task, not the bare failure: once it is done, health already says NOT_SERVING and why.
    stop_requested = asyncio.ensure_future(stopping.wait())
    waits: list[asyncio.Future[Any]] = [stop_requested]
    if server._store_watch is not None:
        waits.append(server._store_watch)
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop_requested.cancel()


def tune_gc() -> None:
    """Make the cycle collector cheap for a process that holds millions of tasks.

    Stored tasks never form cycles, but CPython's collector still scans every
    one of them, so with default thresholds loading a million tasks spends a
    quarter of its time in collections that find nothing. Fewer, larger young
    collections cut that (create-1000 benchmark: 257k -> 335k tasks/s, p99 208 -> 38 ms) and what
    was imported at start-up is frozen out of every scan. Process-wide, so only
    the CLI does it, not an embedding application.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    server = await start(settings)
    tune_gc()
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    # Also when there is nothing to reload: SIGHUP's default action would kill the server.
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    await _stop_requested_or_store_failed(stopping, server)
    failure = server.failure
    if failure is not None:
        log.critical("exiting because %s: a restart recovers every acknowledged change", failure)
    log.info("shutting down: %.1f s for in-flight calls", settings.shutdown_grace)
    await server.stop()
    log.info("stopped")
    if failure is not None:
        raise OSError(failure)


class BackgroundServer:
    """A server on its own event loop in a daemon thread; a context manager.

    ``with BackgroundServer(Settings(port=0, listen_http="")) as srv:`` then
    dial ``srv.target``.
    """

    def __init__(self, settings: Settings | None = None, *, clock: Callable[[], int] = time.time_ns) -> None:
        self.settings = settings or Settings(port=0, listen_http="")
        self._clock = clock
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="masstasker-server", daemon=True)
        self.server: Server | None = None

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        assert self.server is not None, "not started"
        return self.server.port

    @property
    def target(self) -> str:
        """``HOST:PORT`` to dial."""
        assert self.server is not None, "not started"
        return self.server.target

    def call(self, fn: Callable[[Server], Any]) -> Any:
        """Run ``fn(server)`` on the server's loop and return its result (tests inspect the store this way)."""
        assert self.server is not None, "not started"
        server = self.server

        async def run() -> Any:
            result = fn(server)
            # A store's methods are coroutines: await them on the server's loop too.
            return await result if inspect.isawaitable(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(_START_TIMEOUT)

    def reload_tokens(self) -> bool:
        """:meth:`Server.reload_tokens` on the server's loop: what SIGHUP does to a CLI server."""
        return bool(self.call(lambda server: server.reload_tokens()))

    def reload_tls(self) -> bool:
        """:meth:`Server.reload_tls` on the server's loop: what SIGHUP does to a CLI server's TLS files."""
        return bool(self.call(lambda server: server.reload_tls()))

    def start(self) -> BackgroundServer:
        """Start the thread and the server; return when it serves."""
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(start(self.settings, clock=self._clock), self._loop)
        self.server = future.result(_START_TIMEOUT)
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop the server and the thread."""
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop).result(_START_TIMEOUT + (grace or 0))
            self.server = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(_START_TIMEOUT)
        if not self._loop.is_closed() and not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
