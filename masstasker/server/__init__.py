"""The MassTasker server: ``python -m masstasker.server``.

Modules, from the core out:

- ``store``: the in-memory store (tasks, group indices, label index); no I/O;
- ``waiters``: waiting Queries, per-group FIFO queues woken as tasks become visible;
- ``admission``: how many Queries may wait, in total and per connection;
- ``limits``: what one request may ask for (sizes and counts), with the flag for each;
- ``convert``: wire messages <-> store values, and the checks of a request's shape;
- ``service``: the gRPC servicer: request -> store -> response, status codes;
- ``durability/``: the write-ahead log, snapshots and recovery of ``--data-dir``;
- ``auth`` (bearer tokens), ``tls`` (credentials), ``metrics`` and
  ``metrics_http`` (Prometheus);
- ``config``: flags and ``MASSTASKER_*`` variables -> :class:`Settings`;
- ``app``: assembly and lifecycle (:func:`start`, :func:`serve`, :class:`BackgroundServer`);
- ``__main__``: the CLI; ``healthcheck``: the container's health probe.
"""

from masstasker.server.app import BackgroundServer, Server, serve, start
from masstasker.server.config import Settings

__all__ = ["BackgroundServer", "Server", "Settings", "serve", "start"]
