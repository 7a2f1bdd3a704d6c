"""The HTTP listener: /metrics, optionally behind the gRPC port's bearer tokens, and the dashboard.

prometheus_client's own ``start_http_server`` has no hook for authentication,
so this is the same thing (its WSGI app on a threading wsgiref server) with a
token check in front. Prometheus sends the token with
``authorization: {credentials_file: ...}`` in its scrape config.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import make_wsgi_app

from masstasker.server.auth import TokenSet

__all__ = ["start_metrics_http"]

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each."""


def _guard(app: WsgiApp, tokens: TokenSet) -> WsgiApp:
    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        problem = tokens.check(environ.get("HTTP_AUTHORIZATION"))
        if problem is None:
            return app(environ, start_response)
        body = (problem + "\n").encode()
        start_response(
            "401 Unauthorized",
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
                ("WWW-Authenticate", 'Bearer realm="masstasker"'),
            ],
        )
        return [body]

    return guarded


def _beside(metrics: WsgiApp, other: WsgiApp) -> WsgiApp:
    """``/metrics`` to Prometheus, every other path to ``other`` (the dashboard)."""

    def route(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        app = metrics if environ.get("PATH_INFO") == "/metrics" else other
        return app(environ, start_response)

    return route


def start_metrics_http(
    host: str, port: int, registry: CollectorRegistry, tokens: TokenSet | None, *, dashboard: WsgiApp | None = None
) -> WSGIServer:
    """Serve ``registry`` on ``host:port`` from a daemon thread; with ``tokens``, only to bearers of one.
    With ``dashboard``, ``/metrics`` is Prometheus's and every other path the dashboard's (which guards
    itself); without, every path answers metrics, as before.

    Stop it with ``shutdown()`` then ``server_close()``.
    """
    app: WsgiApp = make_wsgi_app(registry)
    if tokens is not None:
        app = _guard(app, tokens)
    if dashboard is not None:
        app = _beside(app, dashboard)
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    server_class = type("MetricsServer", (_ThreadingServer,), {"address_family": family})
    httpd: WSGIServer = make_server(host, port, app, server_class, handler_class=_QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="masstasker-metrics", daemon=True).start()
    return httpd
