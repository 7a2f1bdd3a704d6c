"""Assembly: the store, the servicer, health, reflection, metrics, and shutdown.

:func:`start` builds and starts a server on the running event loop;
:func:`serve` is what the CLI runs (signals, graceful stop);
:class:`BackgroundServer` runs one in a thread, for tests and embedding.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer  # what health.aio re-exports; typed this way
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from masstasker.server.admin import ADMIN_SERVICE_NAME, AdminService
from masstasker.server.auth import TokenInterceptor, TokenSet
from masstasker.server.config import GC_THRESHOLDS, Settings, check_security, format_address, parse_address
from masstasker.server.dashboard import Calls, Dashboard
from masstasker.server.limits import Limits
from masstasker.server.memory_admin import MemoryAdminView
from masstasker.server.metrics import RpcMetrics, StoreCollector, StoreReading
from masstasker.server.metrics_http import start_metrics_http
from masstasker.server.persistence import Persistence
from masstasker.server.service import SERVICE_NAME, MassTaskerService
from masstasker.server.store import Store, TaskSpec
from masstasker.server.tls import exposure_warnings, server_credentials
from masstasker.server.waiters import Waiters

__all__ = ["BackgroundServer", "Server", "serve", "start"]

log = logging.getLogger("masstasker.server")

_SERVING = health_pb2.HealthCheckResponse.SERVING
_START_TIMEOUT = 30.0
# gRPC core's own default for grpc.server.max_pending_requests: room for calls other than waiting Queries.
_MIN_PENDING_CALLS = 1000


class Server:
    """A running MassTasker server; made by :func:`start`."""

    def __init__(
        self,
        grpc_server: grpc.aio.Server,
        store: Store,
        waiters: Waiters,
        health_servicer: HealthServicer,
        host: str,
        port: int,
        settings: Settings,
    ) -> None:
        self.store = store
        self.waiters = waiters
        self.host = host
        self.port = port
        self.settings = settings
        self.http_port: int | None = None
        self.registry: CollectorRegistry | None = None  # this server's metrics, served or not
        self.tokens: TokenSet | None = None  # the accepted bearer tokens, when --auth-token-file is set
        self.persistence: Persistence | None = None
        self._grpc = grpc_server
        self._health = health_servicer
        self._http: Any = None
        self.dashboard: Dashboard | None = None
        self._stopped = False

    @property
    def target(self) -> str:
        """``HOST:PORT`` a client on this machine can dial."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return format_address(host, self.port)

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, release waiting Queries (UNAVAILABLE), give in-flight calls ``grace`` seconds."""
        if self._stopped:
            return
        self._stopped = True
        await self._health.enter_graceful_shutdown()
        self.waiters.release_all()
        await self._grpc.stop(self.settings.shutdown_grace if grace is None else grace)
        if self.dashboard is not None:
            self.dashboard.close()  # ends its live streams, which would hold the listener's threads
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self.persistence is not None:
            await self.persistence.close()

    def reload_tokens(self) -> bool:
        """Re-read ``--auth-token-file`` (SIGHUP does this); calls in flight are not affected.

        Returns False, keeping the current tokens, if the file cannot be used.
        """
        if self.tokens is None:
            log.warning("no --auth-token-file: no tokens to reload")
            return False
        return self.tokens.reload()

    async def wait_for_termination(self) -> None:
        """Return when the gRPC server has stopped."""
        await self._grpc.wait_for_termination()


def _store_reading(
    view: MemoryAdminView, store: Store, waiters: Waiters, clock: Callable[[], int]
) -> Callable[[], Coroutine[Any, Any, StoreReading]]:
    async def read() -> StoreReading:
        return await view.group_stats(clock()), len(waiters), len(store)

    return read


def _pending_calls(settings: Settings) -> int:
    """Queued calls gRPC core starts to shed at: every allowed waiting Query and then some."""
    return settings.max_waiting_queries + _MIN_PENDING_CALLS


async def start(settings: Settings, *, clock: Callable[[], int] = time.time_ns) -> Server:
    """Build, bind and start a server on the running loop; it is SERVING on return.

    Raises OSError when an address, a TLS file or the token file cannot be
    used, ValueError when the security settings contradict each other.
    """
    problem = check_security(settings)
    if problem:
        raise ValueError(problem)
    tokens = TokenSet(settings.auth_token_file) if settings.auth_token_file else None
    credentials = server_credentials(settings)
    loop = asyncio.get_running_loop()
    store = Store(clock)
    persistence = None
    if settings.data_dir:
        persistence = await Persistence.open(
            settings.data_dir, store, fsync=settings.fsync, snapshot_min_log_bytes=settings.snapshot_min_log_bytes
        )
    waiters = Waiters(store, clock)
    registry = CollectorRegistry(auto_describe=False)
    metrics = RpcMetrics(registry)
    service = MassTaskerService(store, waiters, settings, metrics, persistence=persistence)
    admin_view = MemoryAdminView(store)
    admin = AdminService(admin_view, Limits(settings), metrics, clock=clock, persistence=persistence)

    server = grpc.aio.server(
        # No interceptor at all without tokens: it would cost every call.
        interceptors=[TokenInterceptor(tokens)] if tokens is not None else None,
        options=[
            ("grpc.max_receive_message_length", settings.max_msg_size),
            ("grpc.max_send_message_length", settings.max_msg_size),
            # Without this, a second server could bind the same port and split the traffic.
            ("grpc.so_reuseport", 0),
            # Calls that arrived but that grpc.aio has not taken yet wait in gRPC core's
            # pending queue (grpc.aio takes one at a time, ~5,000/s on a small machine).
            # Past 1,000 queued calls core drops new ones at random, past 3,000 all of
            # them, and their clients get CANCELLED: 10,000 workers starting together
            # lost 30-60 % of their Queries. Make room for a burst of every Query we
            # would let wait, plus ordinary traffic (docs/performance.md).
            ("grpc.server.max_pending_requests", _pending_calls(settings)),
            ("grpc.server.max_pending_requests_hard_limit", 2 * _pending_calls(settings)),
        ],
    )
    # Kept: the dashboard calls these same handlers in-process.
    handlers = (service.handler(), admin.handler())
    server.add_generic_rpc_handlers(handlers)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, ADMIN_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
        server,
    )
    address = settings.rpc_address
    host, _ = parse_address(address)
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as exc:
        if persistence is not None:
            await persistence.close()
        raise OSError(f"cannot listen on {address}: {exc}") from exc

    # With a data directory, only its very first start creates the bootstrap
    # task: after a restart, an empty group means the job consumed it.
    fresh = persistence is None or persistence.fresh
    if settings.bootstrap_task_group and fresh and not store.group_size(settings.bootstrap_task_group):
        store.update([TaskSpec(settings.bootstrap_task_group, None)])
        log.info("created the bootstrap task in group %r", settings.bootstrap_task_group)
    if persistence is not None:
        await persistence.sync()

    running = Server(server, store, waiters, health_servicer, host, port, settings)
    running.registry = registry
    running.tokens = tokens
    running.persistence = persistence
    await server.start()
    if settings.listen_http:
        http_host, http_port = parse_address(settings.listen_http)
        registry.register(StoreCollector(loop, _store_reading(admin_view, store, waiters, clock)))
        try:
            metrics_tokens = tokens if settings.metrics_auth else None
            if settings.dashboard != "off":
                running.dashboard = Dashboard(
                    Calls(loop, handlers), mode=settings.dashboard, tokens=tokens, read_tokens=metrics_tokens
                )
            running._http = start_metrics_http(
                http_host, http_port, registry, metrics_tokens, dashboard=running.dashboard
            )
        except OSError as exc:
            await server.stop(None)
            if persistence is not None:
                await persistence.close()
            raise OSError(f"cannot serve metrics on {settings.listen_http}: {exc}") from exc
        running.http_port = running._http.server_port
        log.info("metrics on http://%s/metrics", format_address(http_host, running.http_port))
    await health_servicer.set("", _SERVING)
    await health_servicer.set(SERVICE_NAME, _SERVING)
    log.info(
        "gRPC transport: %s; %s",
        "mutual TLS" if settings.tls_client_ca else "TLS" if credentials else "plaintext",
        f"{len(tokens)} bearer token(s) accepted" if tokens is not None else "no token needed",
    )
    log.info("listening on %s", format_address(host, port))
    for warning in exposure_warnings(settings, host):
        log.warning("%s", warning)
    return running


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
    # Also when there is no token file: SIGHUP's default action would kill the server.
    loop.add_signal_handler(signal.SIGHUP, server.reload_tokens)
    await stopping.wait()
    log.info("shutting down: %.1f s for in-flight calls", settings.shutdown_grace)
    await server.stop()
    log.info("stopped")


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
            return fn(server)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(_START_TIMEOUT)

    def reload_tokens(self) -> bool:
        """:meth:`Server.reload_tokens` on the server's loop: what SIGHUP does to a CLI server."""
        return bool(self.call(lambda server: server.reload_tokens()))

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
