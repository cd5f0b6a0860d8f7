"""Rankings from column strings match a full sort by the stated key, ties included."""

from __future__ import annotations

import numpy as np
import pytest

from rtmonitor.model import IntArray
from rtmonitor.storage.ranking import (
    BoolArray,
    column,
    page,
    silent,
    since,
    slot_count,
    window_packets,
)

CASES = 300


def _blob(*values: int) -> bytes:
    return np.array(values, dtype=">i8").tobytes()


def _groups(
    rng: np.random.Generator, low: int, high: int
) -> tuple[list[IntArray], list[BoolArray]]:
    """1-4 groups of 0-40 slots, scores in [low, high) (few distinct values: many ties),
    about a third of the slots free."""
    scores, live = [], []
    for _ in range(int(rng.integers(1, 5))):
        n = int(rng.integers(0, 41))
        scores.append(rng.integers(low, high, size=n, dtype=np.int64))
        live.append(rng.random(n) < 0.65)
    return scores, live


def _reference(
    scores: list[IntArray], live: list[BoolArray], descending: bool
) -> list[tuple[int, int]]:
    keyed = [
        (int(score[s]), g, s)
        for g, (score, mask) in enumerate(zip(scores, live, strict=True))
        for s in range(len(score))
        if mask[s]
    ]
    keyed.sort(reverse=descending)
    return [(g, s) for _, g, s in keyed]


@pytest.mark.parametrize(
    ("low", "high"),
    [(0, 4), (-3, 3), (2**62 - 3, 2**62), (-(2**62), -(2**62) + 2), (0, 1_000)],
)
def test_page_matches_a_full_sort(low: int, high: int) -> None:
    rng = np.random.default_rng(20240611 + low % 1000)
    for _ in range(CASES):
        scores, live = _groups(rng, low, high)
        descending = bool(rng.integers(0, 2))
        matched = sum(int(m.sum()) for m in live)
        offset = int(rng.integers(0, matched + 3))
        stop = int(rng.integers(max(offset - 2, 0), matched + 6))
        expected = _reference(scores, live, descending)
        got = page(scores, live, offset, stop, descending)
        assert got == (matched, expected[offset:stop]), (scores, live, offset, stop, descending)


def test_page_edges() -> None:
    scores = [np.array([5, 1, 5, 0], dtype=np.int64), np.array([5, 7], dtype=np.int64)]
    live = [np.array([True, True, True, False]), np.array([True, False])]
    assert page(scores, live, 0, 10, False) == (4, [(0, 1), (0, 0), (0, 2), (1, 0)])
    assert page(scores, live, 0, 2, True) == (4, [(1, 0), (0, 2)])
    assert page(scores, live, 1, 3, True) == (4, [(0, 2), (0, 0)])
    assert page(scores, live, 3, 3, False) == (4, [])
    assert page(scores, live, 4, 9, False) == (4, [])
    assert page([], [], 0, 10, True) == (0, [])
    empty = [np.zeros(0, dtype=np.int64)]
    assert page(empty, [np.zeros(0, dtype=np.bool_)], 0, 10, True) == (0, [])
    with pytest.raises(ValueError, match="offset"):
        page(scores, live, -1, 3, False)
    with pytest.raises(ValueError, match="differ"):
        page(scores, [live[1], live[0]], 0, 3, False)


def test_page_of_a_million_ties_takes_them_by_group_and_slot() -> None:
    n = 500_000
    scores = [np.full(n, 9, dtype=np.int64), np.full(n, 9, dtype=np.int64)]
    live = [np.ones(n, dtype=np.bool_), np.ones(n, dtype=np.bool_)]
    live[1][-1] = False
    assert page(scores, live, 0, 3, False) == (2 * n - 1, [(0, 0), (0, 1), (0, 2)])
    assert page(scores, live, 1, 3, True) == (2 * n - 1, [(1, n - 3), (1, n - 4)])


def test_since_and_silent_match_a_full_sort() -> None:
    rng = np.random.default_rng(7)
    for _ in range(CASES):
        seen, _ = _groups(rng, 1, 12)
        # Free slots are zero in every column.
        seen = [np.where(rng.random(len(s)) < 0.3, 0, s) for s in seen]
        bound = int(rng.integers(-2, 14))
        limit = int(rng.integers(0, 50))
        keyed = sorted(
            (int(v), g, s) for g, col in enumerate(seen) for s, v in enumerate(col) if v > 0
        )
        after = [(g, s, v) for v, g, s in keyed if v > bound][:limit]
        assert since(seen, bound, limit) == after
        quiet = [(g, s) for v, g, s in keyed if v <= bound][:limit]
        assert silent(seen, bound, limit) == quiet


def test_column_pads_cuts_and_ignores_a_partial_tail() -> None:
    blob = _blob(1, 2, 3)
    assert column(blob, "packets", 5).tolist() == [1, 2, 3, 0, 0]
    assert column(blob + b"\x07\x00", "bytes", 5).tolist() == [1, 2, 3, 0, 0]
    assert column(blob + b"\x07\x00", "bytes", 4).tolist() == [1, 2, 3, 0]
    assert column(None, "last_seen", 3).tolist() == [0, 0, 0]
    assert column(b"", "last_seen", 2).tolist() == [0, 0]
    assert column(blob, "packets", 0).shape == (0,)
    cut = column(blob, "packets", 2)
    assert cut.tolist() == [1, 2] and cut.dtype == np.int64
    # big-endian, as BITFIELD keeps an i64
    assert column(b"\x00" * 7 + b"\x05", "packets", 1).tolist() == [5]
    big = column(_blob(2**62, -(2**62)), "bytes", 2)
    assert big.tolist() == [2**62, -(2**62)]
    with pytest.raises(ValueError, match="unknown column"):
        column(blob, "nope", 1)
    with pytest.raises(ValueError, match="slots"):
        column(blob, "packets", -1)


def test_rate_column_and_window_packets() -> None:
    blob = _blob(12, 5, 11, 9, 11, 4, 0, 0, 13, 2, 12, 7) + b"\x01" * 31
    rate = column(blob, "rate", 4)
    assert rate.shape == (4, 4)
    assert rate[3].tolist() == [0, 0, 0, 0]
    assert column(blob, "rate", 2).tolist() == [[12, 5, 11, 9], [11, 4, 0, 0]]
    assert window_packets(rate, 12).tolist() == [5, 0, 7, 0]
    assert window_packets(rate, 11).tolist() == [9, 4, 0, 0]
    assert window_packets(rate, 13).tolist() == [0, 0, 2, 0]
    assert window_packets(rate, 0).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="shape"):
        window_packets(np.zeros(4, dtype=np.int64), 1)


def test_slot_count_takes_the_longest_column() -> None:
    blobs = {"packets": _blob(1, 2), "bytes": None, "last_seen": _blob(1), "rate": b"\0" * 100}
    assert slot_count(blobs) == 3
    assert slot_count({"packets": None, "rate": b"\0" * 31}) == 0
    assert slot_count({}) == 0
