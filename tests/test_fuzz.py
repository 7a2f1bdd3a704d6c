"""Fuzzing the service: every call gets a status code, nothing crashes or hangs, the store stays consistent.

Each test feeds one family of hostile requests (see ``fuzzing.py``) to all
four methods of one server, then checks the store's invariants and that a
normal call still works. The example counts are small to keep CI fast; set
``MASSTASKER_FUZZ_EXAMPLES`` for more, or run ``scripts/fuzz.py`` for a long
campaign with figures.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from masstasker._harness.fuzzing import METHODS, call, messages, raw_bytes, requests, wire_messages
from masstasker._pb import masstasker_pb2 as pb
from masstasker._pb import masstasker_pb2_grpc as pb_grpc
from masstasker.server import BackgroundServer, Settings
from masstasker.testing import store_settings

EXAMPLES = int(os.environ.get("MASSTASKER_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # a real server answers: timing varies, and hangs are caught by call()'s deadline
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
TOKEN = "fuzz-token"
UNAUTHENTICATED = frozenset({grpc.StatusCode.UNAUTHENTICATED})


class Fuzzed:
    """A server under fuzzing and a raw channel to it."""

    def __init__(self, server: BackgroundServer, channel: grpc.Channel) -> None:
        self.server = server
        self.channel = channel

    def healthy(self, metadata: list[tuple[str, str]] | None = None) -> None:
        """The invariants hold and a normal call still works."""
        self.server.call(lambda s: s.admission._check())
        self.server.call(lambda s: s.store.check())
        stub = pb_grpc.MassTaskerStub(self.channel)
        (new,) = stub.Update(
            pb.UpdateRequest(created=[pb.Task(group="after-fuzz")]), timeout=10, metadata=metadata
        ).created_ids
        got = stub.Query(pb.QueryRequest(group="after-fuzz"), timeout=10, metadata=metadata).task
        assert got.id == new
        stub.Update(pb.UpdateRequest(deleted=[pb.TaskRef(id=new)]), timeout=10, metadata=metadata)
        self.server.call(lambda s: s.store.check())


@pytest.fixture(scope="module", params=["memory", "postgres"])
def fuzzed(request: pytest.FixtureRequest) -> Iterator[Fuzzed]:
    """A server in memory, and one on PostgreSQL: hostile strings must round trip there too, never run as SQL."""
    store = str(request.getfixturevalue("postgresql_dsn")) if request.param == "postgres" else "memory"
    with (
        store_settings(store) as store_fields,
        BackgroundServer(Settings(port=0, listen_http="", **store_fields)) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        yield Fuzzed(server, channel)


def method_and(family: Callable[[str], st.SearchStrategy[bytes]]) -> st.SearchStrategy[tuple[str, bytes]]:
    return st.sampled_from(sorted(METHODS)).flatmap(lambda m: st.tuples(st.just(m), family(m)))


@pytest.mark.parametrize(
    "family", [messages, wire_messages, lambda _: raw_bytes()], ids=["messages", "wire", "raw-bytes"]
)
def test_fuzz(fuzzed: Fuzzed, family: Callable[[str], st.SearchStrategy[bytes]]) -> None:
    @FUZZ
    @given(method_and(family))
    def run(case: tuple[str, bytes]) -> None:
        call(fuzzed.channel, *case)

    run()
    fuzzed.healthy()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_raw_bytes_each_method(fuzzed: Fuzzed, method: str) -> None:
    # The "raw random bytes sent to each method", with the edge cases always included.
    for data in (b"", b"\x00", b"\xff" * 64, b"\x08" + b"\xff" * 10, b"\x0a\xff\xff\xff\xff\x0f"):
        call(fuzzed.channel, method, data)

    @FUZZ
    @given(raw_bytes())
    def run(data: bytes) -> None:
        call(fuzzed.channel, method, data)

    run()
    fuzzed.healthy()


def test_fuzz_with_authentication(tmp_path: Path) -> None:
    # Hostile requests and hostile authorization values against a server with tokens on.
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    metadata = [("authorization", f"Bearer {TOKEN}")]
    authorization = st.one_of(
        st.just(f"Bearer {TOKEN}"), st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
    )
    with (
        BackgroundServer(Settings(port=0, listen_http="", auth_token_file=str(tokens))) as server,
        grpc.insecure_channel(server.target) as channel,
    ):

        @FUZZ
        @given(method_and(requests), authorization)
        def run(case: tuple[str, bytes], value: str) -> None:
            code = call(channel, *case, metadata=[("authorization", value)], also=UNAUTHENTICATED)
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                # Only a waiting Query may end so (call() allows it 50 ms): on a loaded machine its deadline can
                # pass before any answer, which says nothing either way about the token.
                return
            assert code == grpc.StatusCode.UNAUTHENTICATED or value.lower().startswith("bearer ")

        run()
        Fuzzed(server, channel).healthy(metadata)


@pytest.mark.parametrize("group", ["", "g"])
def test_debug_with_the_largest_limit(fuzzed: Fuzzed, group: str) -> None:
    # Found by fuzzing: a uint64 limit above sys.maxsize made islice() raise, and Debug answered INTERNAL.
    stub = pb_grpc.MassTaskerStub(fuzzed.channel)
    stub.Update(pb.UpdateRequest(created=[pb.Task(group="g")]), timeout=10)
    response = stub.Debug(pb.DebugRequest(group=group, limit=2**64 - 1), timeout=10)
    assert len(response.tasks) == response.num_tasks >= 1
