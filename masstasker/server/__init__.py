"""The MassTasker server: ``python -m masstasker.server``.

Modules: ``store`` (the in-memory store, no I/O), ``waiters`` (waiting
Queries), ``convert`` (wire <-> store, validation), ``service`` (the gRPC
servicer), ``durability`` (the write-ahead log and snapshots of
``--data-dir``), ``metrics``, ``config`` (flags and environment), ``app``
(assembly and lifecycle).
"""

from masstasker.server.app import BackgroundServer, Server, serve, start
from masstasker.server.config import Settings

__all__ = ["BackgroundServer", "Server", "Settings", "serve", "start"]
