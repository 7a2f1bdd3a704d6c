"""The RPC counter and latency histogram, read from a real server after real calls."""

from __future__ import annotations

import grpc
import pytest

from masstasker._pb import masstasker_pb2 as pb
from masstasker._pb import masstasker_pb2_grpc as pb_grpc
from masstasker.server import BackgroundServer, Settings
from masstasker.server.metrics import _BUCKET_LABELS

WAIT_S = 0.5  # a waiting Query's deadline: its handling time lands above the 0.25 s bucket


def sample(server: BackgroundServer, name: str, **labels: str) -> float:
    value = server.call(lambda s: s.registry.get_sample_value(name, labels))
    return float(value or 0)


def test_counts_and_latency_buckets() -> None:
    with BackgroundServer(Settings(port=0, listen_http="")) as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.MassTaskerStub(channel)
            for _ in range(3):
                stub.Update(pb.UpdateRequest(created=[pb.Task(group="g")]))
            with pytest.raises(grpc.RpcError):
                stub.Query(pb.QueryRequest(group="empty"))
            with pytest.raises(grpc.RpcError):
                stub.Query(pb.QueryRequest(group="empty", wait=True), timeout=WAIT_S)

        update = {"method": "Update", "code": "OK"}
        assert sample(server, "masstasker_rpc_requests_total", **update) == 3
        assert sample(server, "masstasker_rpc_duration_seconds_count", **update) == 3
        assert sample(server, "masstasker_rpc_duration_seconds_bucket", **update, le="+Inf") == 3
        assert sample(server, "masstasker_rpc_duration_seconds_sum", **update) > 0
        notfound = {"method": "Query", "code": "NOT_FOUND"}
        assert sample(server, "masstasker_rpc_requests_total", **notfound) == 1

        # The waited Query ends as DEADLINE_EXCEEDED or CANCELLED (whichever side sees the deadline first).
        waited = [
            {"method": "Query", "code": code}
            for code in ("DEADLINE_EXCEEDED", "CANCELLED")
            if sample(server, "masstasker_rpc_requests_total", method="Query", code=code)
        ]
        assert len(waited) == 1
        [labels] = waited
        buckets = [sample(server, "masstasker_rpc_duration_seconds_bucket", **labels, le=le) for le in _BUCKET_LABELS]
        assert buckets == sorted(buckets), "buckets are cumulative"
        assert buckets[_BUCKET_LABELS.index("0.25")] == 0
        assert buckets[-1] == 1
        assert sample(server, "masstasker_rpc_duration_seconds_sum", **labels) >= 0.25
