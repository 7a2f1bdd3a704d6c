"""The lease index against a plain set, under random adds, removals and counts at moving times."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from masstasker.server.stores.memory import leases
from masstasker.server.stores.memory.leases import LeaseIndex

_OPS = st.lists(
    st.tuples(st.sampled_from(["add", "discard", "after", "replace", "complete"]), st.integers(-20, 40)),
    max_size=200,
)


@pytest.mark.parametrize("slack", [0, 1024])
# The fixture sets the same value for every example, so sharing it across them is harmless.
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_agrees_with_a_set(ops: list[tuple[str, int]], slack: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Slack 0 rebuilds the heap as soon as it holds more stale keys than live ones: both paths are covered.
    monkeypatch.setattr(leases, "_SLACK", slack)
    index, model = LeaseIndex(), set()
    for op, key in ops:
        if op == "add":
            index.add(key)
            model.add(key)
        elif op == "discard":
            assert index.discard(key) is (key in model)
            model.discard(key)
        elif op == "replace":  # an owning Query: some keys out (indexed or not), others in (new or not)
            out, new = [key, key + 1], [key + 3, key + 7]
            index.replace(out, new)
            model.difference_update(out)
            model.update(new)
        elif op == "complete":
            batch = [key, key + 1, key + 5]
            index.replace(batch, ())
            model.difference_update(batch)
        else:  # counts at times that mostly move forward, sometimes back (a clock that stepped back)
            assert index.after(key) == sum(1 for k in model if k >= key)
        index._check()
        assert len(index) == len(model)
        assert list(index) == sorted(model)
        assert all((k in index) is (k in model) for k in range(-20, 48))


def test_stale_keys_do_not_pile_up() -> None:
    """A million lease cycles with no read in between leave a heap the size of the live leases, not of the cycles."""
    index = LeaseIndex()
    for key in range(1_000_000):
        index.add(key)
        if key >= 64:
            index.discard(key - 64)
    assert len(index) == 64
    assert len(index._pending) <= 2 * 64 + leases._SLACK + 1
    assert index.after(999_990) == 10
    index._check()
