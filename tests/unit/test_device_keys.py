"""storage/_pack.c's wrapped(): a merge call's device keys joined in C, the same str as
keys.py's list comprehension for every id (ASCII, the validator's rule, and any other), and
nothing written or leaked for a bad row or id. Run under AddressSanitizer too (make
test-asan)."""

from __future__ import annotations

import string
import sys
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtmonitor.storage import keys
from rtmonitor.storage._pack import wrapped
from rtmonitor.storage.keys import KeyLayout

_IDS = st.one_of(
    st.text(alphabet=string.ascii_letters + string.digits + "._:@/-", min_size=1, max_size=40),
    st.text(max_size=12),  # (not an id the validator admits: the join is still right)
)


@settings(max_examples=300, deadline=None)
@given(
    ids=st.lists(_IDS, min_size=1, max_size=60),
    picks=st.lists(st.integers(min_value=0, max_value=10**6), max_size=80),
    head=st.sampled_from(["rtm:d:{", "", "ünï:d:{", "\U0001f600:{"]),
    tail=st.sampled_from(["}", "", "é}"]),
)
def test_wrapped_joins_as_python(ids: list[str], picks: list[int], head: str, tail: str) -> None:
    rows = np.array([p % len(ids) for p in picks], dtype=np.int64)
    joined = wrapped(head, ids, rows, tail)
    assert joined == [head + ids[r] + tail for r in rows.tolist()]
    assert all(type(key) is str for key in joined)


def test_device_keys_at_with_and_without_c(monkeypatch: pytest.MonkeyPatch) -> None:
    layout = KeyLayout("rtm")
    ids = [f"dev-{n}" for n in range(1000)] + ["ü-1"]
    rows = np.array([1000, 3, 999, 3, 0], dtype=np.int64)
    expected = layout.device_keys(ids[r] for r in rows.tolist())
    assert expected[0] == "rtm:d:{ü-1}" and expected[1] == layout.device("dev-3")
    assert layout.device_keys_at(ids, rows) == expected
    # a numpy view that is not contiguous, or of another integer type, is made one first
    assert layout.device_keys_at(ids, np.repeat(rows, 2)[::2].astype(np.int32)) == expected
    monkeypatch.setattr(keys, "_c_wrapped", None)
    assert layout.device_keys_at(ids, rows) == expected
    assert layout.device_keys_at(ids, rows[:0]) == []


def test_what_wrapped_refuses() -> None:
    ids = ["a", "b"]
    for bad in (2, -1, 2**40):
        with pytest.raises(IndexError, match="outside the ids"):
            wrapped("h", ids, np.array([0, bad], dtype=np.int64), "t")
    with pytest.raises(TypeError, match="is a bytes, not a str"):
        wrapped("h", ["a", b"b"], np.array([1], dtype=np.int64), "t")  # type: ignore[list-item]
    with pytest.raises(TypeError, match="buffer of int64"):
        wrapped("h", ids, np.array([0], dtype=np.int32), "t")
    with pytest.raises(TypeError):
        wrapped("h", ("a", "b"), np.array([0], dtype=np.int64), "t")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        wrapped(b"h", ids, np.array([0], dtype=np.int64), "t")  # type: ignore[arg-type]
    assert wrapped("h", [], np.zeros(0, dtype=np.int64), "t") == []


def test_wrapped_leaks_nothing() -> None:
    # the ids' references and the keys made before a bad row or id are given back
    name, other = "x" * 40, "ü" * 20
    ids: list[object] = [name, other, 7]
    rows = np.array([0, 1, 0, 1], dtype=np.int64)
    bad_row, bad_id = np.array([0, 1, 5], dtype=np.int64), np.array([0, 1, 2], dtype=np.int64)
    before = (sys.getrefcount(name), sys.getrefcount(other))
    tracemalloc.start()
    for n in range(3000):
        if n == 1000:
            start = tracemalloc.get_traced_memory()[0]
        for bad in (bad_row, bad_id):
            try:  # (not pytest.raises: what it keeps of each exception would count)
                wrapped("rtm:d:{", ids, bad, "}")  # type: ignore[arg-type]
            except (IndexError, TypeError):
                pass
        wrapped("rtm:d:{", ids, rows, "}")  # type: ignore[arg-type]
    grown = tracemalloc.get_traced_memory()[0] - start
    tracemalloc.stop()
    assert (sys.getrefcount(name), sys.getrefcount(other)) == before
    assert grown < 20_000, grown  # (four keys leaked per call: ~1 MB over 2,000 calls)
