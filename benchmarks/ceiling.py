"""The "ceiling" server: MassTasker's service and messages, canned answers, no store.

It is registered the way the real server registers its servicer (one
generic handler on raw bytes for ``/masstasker.MassTasker/*``, same channel
options) and started the same way (``python -m benchmarks.ceiling --port 0``,
logging ``listening on HOST:PORT``), so the difference between the two is
the work the real server does beyond what the Python gRPC stack costs.

Answers are built once and reused: a Query gets ``max(1, max_tasks)``
tasks shaped like the benchmarks' tasks, an Update gets one ID per created
task. Requests are parsed only when their answer is not cached yet
(a cache keyed on the request bytes, or on the number of created tasks),
which is a few microseconds against the hundreds the gRPC call costs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

import grpc

from benchmarks.payload import sample_task
from masstasker._pb import masstasker_pb2 as pb

__all__ = ["CannedService", "main"]

log = logging.getLogger("benchmarks.ceiling")

SERVICE_NAME = "masstasker.MassTasker"
_MAX_MSG_SIZE = 4 * 1024 * 1024
_CACHE_LIMIT = 4096


class CannedService:
    """Pre-serialized answers for the four MassTasker RPCs."""

    def __init__(self) -> None:
        self._queries: dict[bytes, bytes] = {}
        self._updates: dict[int, bytes] = {}
        self._bulk = pb.BulkSetResponse(num_updated=1).SerializeToString()
        self._debug = pb.DebugResponse(num_tasks=0).SerializeToString()

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler to register with a server."""
        methods = {"Update": self.update, "Query": self.query, "BulkSet": self.bulk_set, "Debug": self.debug}
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME, {name: grpc.unary_unary_rpc_method_handler(fn) for name, fn in methods.items()}
        )

    async def query(self, request: bytes, context: Any) -> bytes:
        """A canned QueryResponse with as many tasks as asked for."""
        answer = self._queries.get(request)
        if answer is None:
            wanted = max(1, pb.QueryRequest.FromString(request).max_tasks)
            response = pb.QueryResponse()
            response.task.CopyFrom(sample_task(1))
            if wanted > 1:
                response.tasks.extend(sample_task(i + 1) for i in range(wanted))
            answer = response.SerializeToString()
            if len(self._queries) < _CACHE_LIMIT:
                self._queries[request] = answer
        return answer

    async def update(self, request: bytes, context: Any) -> bytes:
        """A canned UpdateResponse with one ID per created task."""
        created = len(pb.UpdateRequest.FromString(request).created) if request[:1] == b"\x0a" else 0
        answer = self._updates.get(created)
        if answer is None:
            answer = self._updates[created] = pb.UpdateResponse(created_ids=range(1, created + 1)).SerializeToString()
        return answer

    async def bulk_set(self, request: bytes, context: Any) -> bytes:
        """A canned BulkSetResponse."""
        return self._bulk

    async def debug(self, request: bytes, context: Any) -> bytes:
        """A canned, empty DebugResponse."""
        return self._debug


async def serve(host: str, port: int, grace: float) -> None:
    """Serve canned answers until SIGTERM or SIGINT."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", _MAX_MSG_SIZE),
            ("grpc.max_send_message_length", _MAX_MSG_SIZE),
            ("grpc.so_reuseport", 0),
        ]
    )
    server.add_generic_rpc_handlers((CannedService().handler(),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    log.info("listening on %s:%d", host, bound)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop(grace)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.ceiling --port 0``; the other server flags are accepted and ignored."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ceiling", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--listen-http", default="", help="ignored: the ceiling has no metrics")
    parser.add_argument("--shutdown-grace", type=float, default=1.0, help="seconds in-flight calls get at shutdown")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args.host, args.port, args.shutdown_grace))
    return 0


if __name__ == "__main__":
    sys.exit(main())
