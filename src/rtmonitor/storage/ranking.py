"""Device rankings from column strings: pages by a number, recently seen and silent devices.

Each index group keeps one column string per field (raw big-endian int64s, one record
per device slot), written by the merge and ranked here at read time instead of being kept
sorted on every merge. A column grows lazily, so a short or missing one reads as zeros past
its end; a slot holds a device iff its last_seen is above zero. Everything here is pure:
the store fetches the strings and maps (group, slot) pairs back to devices.

Ranking costs O(N) over all slots plus O(k log k) for the k devices a reply needs: the
boundary value is found by partition, and only the candidates at or beyond it are sorted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from rtmonitor.model import IntArray

BoolArray = npt.NDArray[np.bool_]

# Bytes per slot of each column: one int64, or (w1, p1, w2, p2) for the rate; "scores" is
# the rtm module's RTM.WINDOW or RTM.LIVE reply (an int64 per slot, from the columns).
WIDTHS = {"packets": 8, "bytes": 8, "last_seen": 8, "rate": 32, "scores": 8}
# Big-endian, as Redis' BITFIELD reads and writes an i64 (scripts.WRITE_ROWS, the module).
_INT = np.dtype(">i8")
_NO_INTS: IntArray = np.zeros(0, dtype=np.int64)


def slot_count(blobs: Mapping[str, bytes | None]) -> int:
    """The slots of one group: the longest of its columns (partial tails ignored)."""
    return max((len(b) // WIDTHS[f] for f, b in blobs.items() if b), default=0)


def column(blob: bytes | None, field: str, slots: int) -> IntArray:
    """A column string (big-endian int64s, as BITFIELD keeps them) as native int64s over
    `slots` slots: shape (slots,), or (slots, 4) for the rate; zeros past its end."""
    width = WIDTHS.get(field)
    if width is None:
        raise ValueError(f"unknown column {field!r} (known: {', '.join(WIDTHS)})")
    if slots < 0:
        raise ValueError(f"slots must be >= 0, not {slots}")
    ints = width // 8
    have = min(len(blob) // width, slots) if blob else 0
    view: IntArray = _NO_INTS
    if blob and have:
        # A partial record at the end (a write in progress) is ignored, not misread.
        view = np.frombuffer(blob, dtype=_INT, count=have * ints).astype(np.int64)
    if have < slots:
        full = np.zeros(slots * ints, dtype=np.int64)
        full[: have * ints] = view
        view = full
    return view.reshape(slots, 4) if ints == 4 else view


def window_packets(rate: IntArray, window: int) -> IntArray:
    """Each slot's packets in 10-second window `window`, from its (w1, p1, w2, p2) record."""
    if rate.ndim != 2 or rate.shape[1] != 4:
        raise ValueError(f"a rate column has shape (slots, 4), not {rate.shape}")
    older = np.where(rate[:, 2] == window, rate[:, 3], 0)
    return np.where(rate[:, 0] == window, rate[:, 1], older).astype(np.int64, copy=False)


def page(
    scores: Sequence[IntArray],
    live: Sequence[BoolArray],
    offset: int,
    stop: int,
    descending: bool,
) -> tuple[int, list[tuple[int, int]]]:
    """(live slots in all groups, the (group, slot) pairs at ranks [offset, stop)) in the
    order ascending by (score, group, slot); `descending` reverses the whole order, so ties
    go by (group, slot) descending too, as Redis ZRANGE REV orders ties by member."""
    if offset < 0:
        raise ValueError(f"offset must be >= 0, not {offset}")
    values, starts, slots = _gather(scores, live)
    matched = len(values)
    if stop <= offset or offset >= matched:
        return matched, []
    ranked = _first(values, min(stop, matched), descending)[offset:]
    return matched, _pairs(ranked, starts, slots)


def since(last_seen: Sequence[IntArray], since_ms: int, limit: int) -> list[tuple[int, int, int]]:
    """The first `limit` devices seen after `since_ms`, as (group, slot, last_seen) ascending
    by (last_seen, group, slot)."""
    # Free slots are zero: a floor of 0 keeps them out whatever `since_ms` is.
    return _earliest(last_seen, [seen > max(since_ms, 0) for seen in last_seen], limit)


def silent(last_seen: Sequence[IntArray], cutoff_ms: int, limit: int) -> list[tuple[int, int]]:
    """Up to `limit` devices not seen after `cutoff_ms`, as (group, slot), the longest
    silent first (ties by group, slot)."""
    live = [(seen > 0) & (seen <= cutoff_ms) for seen in last_seen]
    return [(g, s) for g, s, _ in _earliest(last_seen, live, limit)]


def _earliest(
    last_seen: Sequence[IntArray], live: Sequence[BoolArray], limit: int
) -> list[tuple[int, int, int]]:
    """The first `limit` live slots by (last_seen, group, slot): (group, slot, last_seen)."""
    values, starts, slots = _gather(last_seen, live)
    if limit <= 0 or not len(values):
        return []
    ranked = _first(values, min(limit, len(values)), descending=False)
    pairs = _pairs(ranked, starts, slots)
    return [(g, s, int(v)) for (g, s), v in zip(pairs, values[ranked].tolist(), strict=True)]


def _gather(
    scores: Sequence[IntArray], live: Sequence[BoolArray]
) -> tuple[IntArray, IntArray, list[IntArray]]:
    """The live slots' scores of all groups end to end (so a position's order is its
    (group, slot) order), where each group starts, and each group's live slots."""
    if len(scores) != len(live):
        raise ValueError(f"{len(scores)} score columns for {len(live)} groups")
    slots: list[IntArray] = []
    for g, (score, mask) in enumerate(zip(scores, live, strict=True)):
        if score.shape != mask.shape or score.ndim != 1:
            raise ValueError(f"group {g}: scores {score.shape} and live {mask.shape} differ")
        slots.append(np.flatnonzero(mask).astype(np.int64, copy=False))
    counts = [len(s) for s in slots]
    starts = np.zeros(len(slots) + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    if not slots:
        return _NO_INTS, starts, slots
    values = np.concatenate([score[s] for score, s in zip(scores, slots, strict=True)])
    return values.astype(np.int64, copy=False), starts, slots


def _first(values: IntArray, k: int, descending: bool) -> IntArray:
    """The positions of the first k (1 <= k <= len) in the order by (value, position),
    ascending or descending, in that order."""
    n = len(values)
    if k >= n:
        chosen = np.arange(n, dtype=np.int64)
    elif descending:
        # The k-th largest value: all above it, then its ties from the highest position.
        bound = np.partition(values, n - k)[n - k]
        above = np.flatnonzero(values > bound)
        ties = np.flatnonzero(values == bound)
        chosen = np.concatenate([above, ties[len(ties) - (k - len(above)) :]])
    else:
        bound = np.partition(values, k - 1)[k - 1]
        below = np.flatnonzero(values < bound)
        ties = np.flatnonzero(values == bound)
        chosen = np.concatenate([below, ties[: k - len(below)]])
    # lexsort's last key is the primary one: value, then position.
    ordered = chosen[np.lexsort((chosen, values[chosen]))].astype(np.int64, copy=False)
    return ordered[::-1] if descending else ordered


def _pairs(positions: IntArray, starts: IntArray, slots: list[IntArray]) -> list[tuple[int, int]]:
    """(group, slot) of positions in the end-to-end order of _gather."""
    groups = (np.searchsorted(starts, positions, side="right") - 1).tolist()
    return [
        (g, int(slots[g][p - starts[g]])) for g, p in zip(groups, positions.tolist(), strict=True)
    ]
