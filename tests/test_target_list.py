"""A client given several servers as one gRPC target spreads its calls when asked to (docs/postgres.md).

Servers sharing a PostgreSQL store are interchangeable, so workers can name them all in one target,
``ipv4:HOST:PORT,HOST:PORT``. gRPC's default policy, pick_first, sends everything to the first address;
``grpc.lb_policy_name=round_robin`` spreads calls over all of them. Two in-memory servers (separate
stores) make the split visible: each keeps what it received.
"""

from __future__ import annotations

from masstasker import Client, new_task
from masstasker._pb import masstasker_pb2 as pb
from masstasker.server import BackgroundServer
from masstasker.testing import run_server

CALLS = 40


def sizes(servers: list[BackgroundServer], group: str) -> list[int]:
    counts = []
    for server in servers:
        with Client(server.target) as client:
            counts.append(int(client.rpc.Debug(pb.DebugRequest(group=group, limit=1)).num_tasks))
    return counts


def create_through(target: str, group: str, **options: object) -> None:
    with Client(target, options=list(options.items())) as client:
        for _ in range(CALLS):
            client.create(new_task(group))


def test_round_robin_spreads_calls_over_a_target_list() -> None:
    with run_server(port=0, listen_http="") as a, run_server(port=0, listen_http="") as b:
        target = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
        create_through(target, "rr", **{"grpc.lb_policy_name": "round_robin"})
        spread = sizes([a, b], "rr")
        # Not exactly half each: until both connections are ready, calls go to the one that is.
        assert sum(spread) == CALLS and min(spread) >= CALLS // 4, spread
        # Without the option every call goes to one server: the option is what spreads them.
        create_through(target, "pf")
        assert sorted(sizes([a, b], "pf")) == [0, CALLS]
