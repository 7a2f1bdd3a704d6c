"""The admin service end to end: a real server, a real gRPC client, tokens, TLS, reflection, metrics."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from clocks import HandClock
from google.protobuf.duration_pb2 import Duration
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pki import Pki, make_pki

from masstasker._pb import masstasker_admin_pb2 as apb
from masstasker._pb import masstasker_admin_pb2_grpc as apb_grpc
from masstasker._pb import masstasker_pb2 as pb
from masstasker._pb import masstasker_pb2_grpc as pb_grpc
from masstasker.server import BackgroundServer

TIMEOUT = 10.0
S = 1_000_000_000


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.fixture
def clock() -> HandClock:
    return HandClock(1_800_000_000 * S)


@pytest.fixture
def clocked(clock: HandClock, make_server: Callable[..., BackgroundServer]) -> BackgroundServer:
    return make_server(clock=clock, listen_http="127.0.0.1:0")


@pytest.fixture
def stubs(clocked: BackgroundServer) -> Iterator[tuple[pb_grpc.MassTaskerStub, apb_grpc.AdminStub]]:
    with grpc.insecure_channel(clocked.target) as channel:
        yield pb_grpc.MassTaskerStub(channel), apb_grpc.AdminStub(channel)


def own(mt: pb_grpc.MassTaskerStub, clock: HandClock, group: str, seconds: int, max_tasks: int = 1) -> list[pb.Task]:
    """An owning Query at the fake clock's now (the servicer's own clock is the real one)."""
    request = pb.QueryRequest(group=group, own_for={"seconds": seconds}, max_tasks=max_tasks)
    request.now.FromNanoseconds(clock())
    response = mt.Query(request, timeout=TIMEOUT)
    return list(response.tasks) or [response.task]


def ids(tasks: object) -> list[int]:
    return [t.id for t in tasks]  # type: ignore[attr-defined]


def test_statistics_and_listings_of_a_job_in_progress(
    clocked: BackgroundServer, stubs: tuple[pb_grpc.MassTaskerStub, apb_grpc.AdminStub], clock: HandClock
) -> None:
    mt, admin = stubs
    created = mt.Update(
        pb.UpdateRequest(
            created=[pb.Task(group="work", labels={"shard": str(i % 2)}) for i in range(10)]
            + [pb.Task(group="work", not_before={"seconds": clock.now // S + 600})]
            + [pb.Task(group="failed", error="<b>boom</b>")]
        ),
        timeout=TIMEOUT,
    ).created_ids
    owned = own(mt, clock, "work", 60, max_tasks=2)
    mt.Update(pb.UpdateRequest(deleted=[pb.TaskRef(id=owned[0].id)]), timeout=TIMEOUT)
    clock.advance(3 * S)

    groups = admin.ListGroups(apb.ListGroupsRequest(), timeout=TIMEOUT)
    assert groups.now.ToNanoseconds() == clock.now
    by_name = {g.group: g for g in groups.groups}
    assert list(by_name) == ["failed", "work"]
    work = by_name["work"]
    assert (work.total, work.visible, work.leased, work.scheduled, work.errors) == (10, 8, 1, 1, 0)
    assert (work.created, work.owned, work.departed) == (11, 2, 1)
    assert work.oldest_visible_age.ToNanoseconds() == 3 * S
    assert not work.history, "ListGroups sends history only when asked"
    assert (by_name["failed"].errors, by_name["failed"].visible) == (1, 1)

    one = admin.GetGroup(apb.GetGroupRequest(group="work"), timeout=TIMEOUT).group
    assert (one.total, one.leased, one.departed) == (10, 1, 1)
    assert one.history and one.history[-1].departed == 1 and one.history[-1].total == 10
    assert one.departure_rate > 0 and one.HasField("eta")
    empty = admin.GetGroup(apb.GetGroupRequest(group="never-used"), timeout=TIMEOUT).group
    assert (empty.total, empty.created, empty.eta.ToNanoseconds()) == (0, 0, 0)

    leased = admin.ListTasks(apb.ListTasksRequest(group="work", state=apb.TASK_STATE_LEASED), timeout=TIMEOUT)
    assert (ids(leased.tasks), list(leased.states)) == ([owned[1].id], [apb.TASK_STATE_LEASED])
    scheduled = admin.ListTasks(apb.ListTasksRequest(group="work", state=apb.TASK_STATE_SCHEDULED), timeout=TIMEOUT)
    assert ids(scheduled.tasks) == [created[10]]
    errors = admin.ListTasks(apb.ListTasksRequest(group="failed", state=apb.TASK_STATE_ERROR), timeout=TIMEOUT)
    assert [t.error for t in errors.tasks] == ["<b>boom</b>"]

    # Every task of the group in queue order, two per page, label-filtered, through the tokens.
    pages, token = [], ""
    while True:
        page = admin.ListTasks(
            apb.ListTasksRequest(
                group="work", page_size=2, page_token=token, selector=pb.LabelSelector(labels={"shard": "0"})
            ),
            timeout=TIMEOUT,
        )
        pages.append(ids(page.tasks))
        token = page.next_page_token
        if not token:
            break
    debug = mt.Debug(pb.DebugRequest(group="work"), timeout=TIMEOUT).tasks
    expected = [t.id for t in debug if t.labels.get("shard") == "0"]
    assert [i for p in pages for i in p] == expected
    assert all(len(p) <= 2 for p in pages) and len(pages) == 2

    got = admin.GetTask(apb.GetTaskRequest(id=owned[1].id), timeout=TIMEOUT)
    assert (got.task.id, got.task.group, got.state) == (owned[1].id, "work", apb.TASK_STATE_LEASED)
    clock.advance(60 * S)  # the lease expires: the task is visible again
    assert admin.GetTask(apb.GetTaskRequest(id=owned[1].id), timeout=TIMEOUT).state == apb.TASK_STATE_VISIBLE
    clocked.call(lambda s: s.store.check())


def test_eta_through_the_api_follows_a_steady_drain(
    stubs: tuple[pb_grpc.MassTaskerStub, apb_grpc.AdminStub], clock: HandClock
) -> None:
    mt, admin = stubs
    mt.Update(pb.UpdateRequest(created=[pb.Task(group="g") for _ in range(400)]), timeout=TIMEOUT)
    for _ in range(60):  # 20 tasks a second for 3 seconds
        clock.advance(S // 20)
        [task] = own(mt, clock, "g", 30)
        mt.Update(pb.UpdateRequest(deleted=[pb.TaskRef(id=task.id)]), timeout=TIMEOUT)
    stats = admin.GetGroup(apb.GetGroupRequest(group="g"), timeout=TIMEOUT).group
    assert abs(stats.departure_rate - 20) < 3
    assert abs(stats.eta.ToNanoseconds() / S - 340 / 20) < 0.15 * 340 / 20
    per_second = [p.departed for p in stats.history]
    assert per_second[-1] <= 60 and per_second == sorted(per_second)


def test_bad_requests_are_invalid_argument_and_missing_tasks_not_found(
    stubs: tuple[pb_grpc.MassTaskerStub, apb_grpc.AdminStub], clocked: BackgroundServer
) -> None:
    mt, admin = stubs
    mt.Update(pb.UpdateRequest(created=[pb.Task(group="g") for _ in range(3)]), timeout=TIMEOUT)
    cases = [
        lambda: admin.ListTasks(apb.ListTasksRequest(group="g", page_token="not a token"), timeout=TIMEOUT),
        lambda: admin.ListTasks(apb.ListTasksRequest(group="g", page_token="-5"), timeout=TIMEOUT),
        lambda: admin.ListTasks(apb.ListTasksRequest(group="g", state=17), timeout=TIMEOUT),  # type: ignore[arg-type]
        lambda: admin.GetGroup(apb.GetGroupRequest(group="x" * 100_000), timeout=TIMEOUT),
        lambda: admin.GetGroup(apb.GetGroupRequest(group="g", history=Duration(seconds=-1)), timeout=TIMEOUT),
        lambda: admin.ListGroups(apb.ListGroupsRequest(step=Duration(seconds=1, nanos=-1)), timeout=TIMEOUT),
    ]
    for case in cases:
        code, details = code_of(case)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details, details
    raw = clocked.call(lambda s: s.target)
    with grpc.insecure_channel(raw) as channel:
        garbage = channel.unary_unary("/masstasker.admin.v1.Admin/GetTask")
        code, details = code_of(lambda: garbage(b"\xff\xff\xff", timeout=TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "GetTaskRequest" in details
    code, details = code_of(lambda: admin.GetTask(apb.GetTaskRequest(id=99), timeout=TIMEOUT))
    assert (code, details) == (grpc.StatusCode.NOT_FOUND, "task 99 does not exist")
    # A page size above the cap is capped, not refused.
    page = admin.ListTasks(apb.ListTasksRequest(group="g", page_size=10**6), timeout=TIMEOUT)
    assert len(page.tasks) == 3 and not page.next_page_token


def test_reflection_lists_and_describes_the_admin_service(clocked: BackgroundServer) -> None:
    with grpc.insecure_channel(clocked.target) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        [listing] = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT
        )
        names = {s.name for s in listing.list_services_response.service}
        assert {"masstasker.MassTasker", "masstasker.admin.v1.Admin"} <= names
        [found] = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="masstasker.admin.v1.Admin")]),
            timeout=TIMEOUT,
        )
        files = found.file_descriptor_response.file_descriptor_proto
        assert any(b"masstasker_admin.proto" in f for f in files)


def test_metrics_export_the_statistics(
    clocked: BackgroundServer, stubs: tuple[pb_grpc.MassTaskerStub, apb_grpc.AdminStub], clock: HandClock
) -> None:
    clocked_clock = clock
    mt, _ = stubs
    mt.Update(pb.UpdateRequest(created=[pb.Task(group="m"), pb.Task(group="m", error="x")]), timeout=TIMEOUT)
    own(mt, clocked_clock, "m", 60)
    port = clocked.server.http_port  # type: ignore[union-attr]
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT).read().decode()
    for line in [
        'masstasker_num_tasks{group="m"} 2.0',
        'masstasker_leased_tasks{group="m"} 1.0',
        'masstasker_error_tasks{group="m"} 1.0',
        'masstasker_scheduled_tasks{group="m"} 0.0',
        'masstasker_oldest_visible_age_seconds{group="m"} 0.0',
        'masstasker_created_total{group="m"} 2.0',
        'masstasker_owned_total{group="m"} 1.0',
        'masstasker_departed_total{group="m"} 0.0',
    ]:
        assert line in page, line


# -- the same rules as the MassTasker service: tokens and TLS -------------------------------------------


def test_admin_calls_need_the_token(make_server: Callable[..., BackgroundServer], tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("admin-s3cret\n")
    server = make_server(auth_token_file=str(tokens))
    with grpc.insecure_channel(server.target) as channel:
        admin = apb_grpc.AdminStub(channel)
        for metadata in ([], [("authorization", "Bearer wrong")]):
            code, _ = code_of(lambda m=metadata: admin.ListGroups(apb.ListGroupsRequest(), metadata=m, timeout=TIMEOUT))  # type: ignore[misc]
            assert code == grpc.StatusCode.UNAUTHENTICATED
        ok = admin.ListGroups(
            apb.ListGroupsRequest(), metadata=[("authorization", "Bearer admin-s3cret")], timeout=TIMEOUT
        )
        assert ok.HasField("now")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_admin_calls_go_over_tls_only(make_server: Callable[..., BackgroundServer], pki: Pki) -> None:
    server = make_server(tls_cert=str(pki.server.cert_path), tls_key=str(pki.server.key_path))
    with grpc.insecure_channel(server.target) as plain:
        code, _ = code_of(lambda: apb_grpc.AdminStub(plain).ListGroups(apb.ListGroupsRequest(), timeout=TIMEOUT))
        assert code == grpc.StatusCode.UNAVAILABLE
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert)
    with grpc.secure_channel(server.target, credentials) as secure:
        assert apb_grpc.AdminStub(secure).ListGroups(apb.ListGroupsRequest(), timeout=TIMEOUT).HasField("now")


# -- the Grafana dashboard shipped in docs/ -----------------------------------------------------------------------


def test_the_grafana_dashboard_uses_only_metrics_the_server_exports(
    clocked: BackgroundServer, stubs: tuple[pb_grpc.MassTaskerStub, apb_grpc.AdminStub], clock: HandClock
) -> None:
    import json
    import re

    from prometheus_client.parser import text_string_to_metric_families

    dashboard = json.loads((Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    used = {name for expr in exprs for name in re.findall(r"\bmasstasker_[a-z_]+\b", expr)}
    assert len(used) >= 12, used
    # Activity, so every family has samples: tasks created, leased, failed, departed, an RPC or two.
    mt, _ = stubs
    mt.Update(pb.UpdateRequest(created=[pb.Task(group="d"), pb.Task(group="d", error="x")]), timeout=TIMEOUT)
    [task] = own(mt, clock, "d", 60)
    mt.Update(pb.UpdateRequest(deleted=[pb.TaskRef(id=task.id)]), timeout=TIMEOUT)
    clock.advance(2 * S)  # a closed second with a departure: the ETA is known
    port = clocked.server.http_port  # type: ignore[union-attr]
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT).read().decode()
    exported = {sample.name for family in text_string_to_metric_families(page) for sample in family.samples}
    assert used <= exported, f"the dashboard uses metrics the server does not export: {sorted(used - exported)}"
