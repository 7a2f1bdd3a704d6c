"""Long fuzz campaign against an in-process MassTasker server; prints the figures for the record.

    python scripts/fuzz.py --minutes 10 --seed 1

Rounds of the three hypothesis families from ``masstasker/_harness/fuzzing.py`` (well-formed
messages with extreme values, wire-level mutations, raw bytes) against all
four methods, with and without authentication, alternating with byte-level
mutations (flips, inserts, deletions, splices, truncations) of requests the
families produced. Every call must get a status code from :data:`FINE`;
the store's ``_check()`` runs after every batch and the store is emptied when
it grows large. A crash is recorded and the campaign goes on. The exit
status is 1 if anything crashed.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from masstasker._harness.fuzzing import METHODS, call, messages, raw_bytes, wire_messages
from masstasker._pb import masstasker_pb2 as pb
from masstasker._pb import masstasker_pb2_grpc as pb_grpc
from masstasker.server import BackgroundServer, Settings
from masstasker.server.stores.memory.store import GroupRef

TOKEN = "fuzz-campaign-token"
BATCH = 500  # hypothesis examples per batch
MUTATIONS = 2000  # byte-level mutations per batch
MAX_STORE = 200_000  # empty the store beyond this many tasks
FAMILIES: dict[str, Callable[[str], st.SearchStrategy[bytes]]] = {
    "messages": messages,
    "wire": wire_messages,
    "raw": lambda _: raw_bytes(),
}
UNAUTHENTICATED = frozenset({grpc.StatusCode.UNAUTHENTICATED})


class Campaign:
    """Counts calls, status codes and crashes against one server."""

    def __init__(self, server: BackgroundServer, channel: grpc.Channel, metadata: list[tuple[str, str]] | None):
        self.server = server
        self.channel = channel
        self.metadata = metadata
        self.calls = 0
        self.codes: collections.Counter[str] = collections.Counter()
        self.crashes: list[str] = []
        self.checks = 0
        self.corpus: list[tuple[str, bytes]] = []

    def send(self, method: str, data: bytes, metadata: list[tuple[str, str]] | None = None) -> None:
        self.calls += 1
        also = UNAUTHENTICATED if metadata is not None else frozenset()
        try:
            code = call(self.channel, method, data, metadata if metadata is not None else self.metadata, also)
        except AssertionError as exc:
            self.crashes.append(str(exc))
            self.codes["CRASH"] += 1
            return
        self.codes[code.name] += 1

    def hypothesis_batch(self, family: str, batch_seed: int) -> None:
        strategy = st.sampled_from(sorted(METHODS)).flatmap(lambda m: st.tuples(st.just(m), FAMILIES[family](m)))
        corpus = self.corpus

        @seed(batch_seed)
        @settings(max_examples=BATCH, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(strategy)
        def run(case: tuple[str, bytes]) -> None:
            self.send(*case)
            if len(case[1]) < 4096 and len(corpus) < 5000:
                corpus.append(case)

        run()

    def auth_batch(self, batch_seed: int) -> None:
        """Hostile authorization values with any request: refused unless the token is right."""
        rng = random.Random(batch_seed)
        values = [f"Bearer {TOKEN}", f"bearer {TOKEN}", "Bearer", "Bearer ", f"Bearer {TOKEN}x", "Basic abc", ""]
        for _ in range(BATCH // 5):
            value = rng.choice(values) if rng.random() < 0.5 else _printable(rng, rng.randint(0, 100))
            method, data = rng.choice(self.corpus) if self.corpus else ("Debug", b"")
            self.send(method, data, [("authorization", value)])

    def mutation_batch(self, batch_seed: int) -> None:
        rng = random.Random(batch_seed)
        for _ in range(MUTATIONS):
            method, data = rng.choice(self.corpus)
            other = rng.choice(self.corpus)[1]
            self.send(rng.choice([method, method, method, rng.choice(sorted(METHODS))]), _mutate(rng, data, other))

    def check(self) -> None:
        """The invariants hold; empty the store if the campaign made it big."""

        def check_and_trim(server: object) -> int:
            store = server.store.store  # type: ignore[attr-defined]  # the in-memory Store behind the seam
            server.store.waiters._check()  # type: ignore[attr-defined]
            store._check()
            if len(store) > MAX_STORE:
                store.update([], [GroupRef(group) for group, _ in list(store.groups())])
                store._check()
            return len(store)

        self.server.call(check_and_trim)
        self.checks += 1

    def healthy(self) -> bool:
        """A normal call still works at the end."""
        stub = pb_grpc.MassTaskerStub(self.channel)
        try:
            (new,) = stub.Update(
                pb.UpdateRequest(created=[pb.Task(group="after-fuzz")]), timeout=10, metadata=self.metadata
            ).created_ids
            return bool(
                stub.Query(pb.QueryRequest(group="after-fuzz"), timeout=10, metadata=self.metadata).task.id == new
            )
        except grpc.RpcError as exc:
            self.crashes.append(f"normal call after fuzzing failed: {exc}")
            return False


def _printable(rng: random.Random, size: int) -> str:
    return "".join(chr(rng.randint(0x20, 0x7E)) for _ in range(size))


def _mutate(rng: random.Random, data: bytes, other: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(7)
        at = rng.randint(0, len(out))
        if kind == 0 and out:  # flip bits
            out[min(at, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif kind == 1:  # insert random bytes
            out[at:at] = rng.randbytes(rng.randint(1, 8))
        elif kind == 2 and out:  # delete a run
            del out[at : at + rng.randint(1, 8)]
        elif kind == 3 and out:  # duplicate a run
            start = rng.randrange(len(out))
            out[at:at] = out[start : start + rng.randint(1, 64)]
        elif kind == 4:  # splice another request in
            cut = rng.randint(0, len(other))
            out[at:] = other[cut:]
        elif kind == 5:  # truncate
            del out[at:]
        elif out:  # an interesting byte
            out[min(at, len(out) - 1)] = rng.choice([0x00, 0x7F, 0x80, 0xFF, 0x0A, 0x12, 0x1A, 0x08])
    return bytes(out)


def run(minutes: float, base_seed: int) -> dict[str, object]:
    """The campaign: plaintext server, then the same with tokens on, half the time each."""
    started = time.monotonic()
    figures: dict[str, object] = {"seed": base_seed, "minutes": minutes}
    total_calls, total_crashes, total_checks, codes = 0, [], 0, collections.Counter[str]()
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens"
        tokens.write_text(TOKEN + "\n")
        for phase, extra in (("plain", {}), ("auth", {"auth_token_file": str(tokens)})):
            deadline = started + 60 * minutes * (0.5 if phase == "plain" else 1.0)
            metadata = [("authorization", f"Bearer {TOKEN}")] if extra else None
            with (
                BackgroundServer(Settings(port=0, listen_http="", **extra)) as server,  # type: ignore[arg-type]
                grpc.insecure_channel(server.target) as channel,
            ):
                campaign = Campaign(server, channel, metadata)
                batch = 0
                while time.monotonic() < deadline:
                    batch_seed = base_seed * 1_000_003 + batch
                    family = list(FAMILIES)[batch % len(FAMILIES)]
                    campaign.hypothesis_batch(family, batch_seed)
                    campaign.mutation_batch(batch_seed)
                    if extra:
                        campaign.auth_batch(batch_seed)
                    campaign.check()
                    batch += 1
                    print(
                        f"[{phase}] batch {batch}: {campaign.calls} calls, {len(campaign.crashes)} crashes, "
                        f"{time.monotonic() - started:.0f} s",
                        file=sys.stderr,
                        flush=True,
                    )
                healthy = campaign.healthy()
                campaign.check()
            figures[phase] = {"calls": campaign.calls, "crashes": len(campaign.crashes), "healthy_after": healthy}
            total_calls += campaign.calls
            total_crashes += campaign.crashes
            total_checks += campaign.checks
            codes.update(campaign.codes)
    figures.update(
        calls=total_calls,
        crashes=len(total_crashes),
        invariant_checks=total_checks,
        status_codes=dict(codes.most_common()),
        seconds=round(time.monotonic() - started, 1),
        first_crashes=total_crashes[:10],
    )
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to fuzz (default %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="makes the campaign reproducible (default %(default)s)")
    args = parser.parse_args()
    figures = run(args.minutes, args.seed)
    print(json.dumps(figures, indent=2))
    return 1 if figures["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
