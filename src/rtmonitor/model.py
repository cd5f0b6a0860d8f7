"""The domain records every stage shares: validated rows, and the deltas a flush commits.

Receivers make rows and batch deltas, the pipeline merges them into a flush's delta, and
storage writes that. The merge rules live here with the records (sums add, min/max kept,
the newest "last" wins), in Python for single deltas and in numpy for many batches at once.
The pipeline's self-metrics records are here too: ingest processes publish them, the HTTP
node sums and renders them; and the records storage reads back for the HTTP API (devices,
totals, rates), with what defines them once: the id alphabet and the rate windows. This
module imports nothing from the rooms (ingest, pipeline, storage, api).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from operator import getitem
from typing import Any, Literal, TypeAlias, TypeVar

import numpy as np
import numpy.typing as npt

try:  # the compiled numbering of a flush's device keys (see _model.c)
    from rtmonitor._model import number_ids as _c_number_ids

    C_NUMBERING = True
except ImportError:  # without a C compiler: a sort
    C_NUMBERING = False

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
_NO_INTS: IntArray = np.zeros(0, dtype=np.int64)
_NO_FLOATS: FloatArray = np.zeros(0, dtype=np.float64)

# Device ids, and batch producer ids, kinds and value names: 1 to DEVICE_ID_MAX (NAME_MAX)
# of these characters, all ASCII below 0x7f. No braces (Redis Cluster hash-tag delimiters),
# quotes, spaces or control characters (they break Prometheus labels, logs and URLs).
ID_ALPHABET = "A-Z a-z 0-9 . _ : @ / -"  # as error messages and the README name it
ID_CHARS = ID_ALPHABET.replace(" ", "")  # as a regular expression's character class
# POST /v1/telemetry's Idempotency-Key: visible ASCII, single spaces inside (what survives
# HTTP's header whitespace rules), checked by the receiver and declared in the schema.
IDEMPOTENCY_KEY_MAX = 256
IDEMPOTENCY_KEY_PATTERN = r"^[!-~]+( [!-~]+)*$"
DEVICE_ID_MAX = 128
NAME_MAX = 64
# A device record holds at most RECORD_VALUES_MAX values (what one Lua call unpacks: 2 per
# kind, 7 per value name, 3 per rate bucket), kinds and value names at most
# RECORD_NAMES_MAX of them, so at least 40 rate buckets fit (a device keeps ~18). The merge
# (storage/scripts.py MERGE_DEVICES, storage/_merge.c) records no new name past it.
RECORD_VALUES_MAX = 7900
RECORD_NAMES_MAX = RECORD_VALUES_MAX - 3 * 40

# The trailing windows of every rate (seconds): the store sums them, the JSON names them
# `packets_per_s_<w>s` / `bytes_per_s_<w>s` (rate_key), Prometheus labels them `window`.
RATE_WINDOWS_S = (10, 60)
RateUnit: TypeAlias = Literal["packets", "bytes"]

# A validated packet: (device_id, kind, payload bytes, device timestamp ms, values or None).
# Made by the receivers (ingest/validation.py), folded by the aggregator. A plain tuple:
# StreamPackets makes one per packet, and the fold unpacks it in one step.
Row: TypeAlias = tuple[str, str, int, int, dict[str, float] | None]

# A batch's identity for exactly-once counting: (producer_id, batch_id).
BatchId: TypeAlias = tuple[str, int]


class Claim(Enum):
    """Why a flush may not count a batch id: another flush holds it."""

    COMMITTED = "committed"  # counted by an earlier flush: the batch is a resend
    PENDING = "pending"  # claimed by a flush not yet finalized: wait for it to settle


class CommitUnavailable(Exception):
    """Storage could not be reached (or refused a write for now): the same step may be
    tried again, since every step of a commit is idempotent."""


@dataclass(slots=True, kw_only=True)
class ValueStats:
    """Statistics of one named reading of one device over one flush."""

    count: int
    sum: float
    min: float
    max: float
    last: float
    last_ts: int  # device timestamp (ms) of `last`; the newest reading wins on merge


@dataclass(slots=True, kw_only=True)
class DeviceDelta:
    """Everything one device added during one flush interval."""

    packets: int = 0
    bytes: int = 0
    first_seen: int = 0  # receive time, ms since the epoch
    last_seen: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    values: dict[str, ValueStats] = field(default_factory=dict)


@dataclass(slots=True, kw_only=True)
class FlushDelta:
    """The unit of one commit to Redis: all devices' deltas plus rejections.

    Devices come in two forms, both counted in `packets` and `bytes`: `devices`, folded
    packet by packet (StreamPackets' rows), and `parts`, batches kept as columns (a fleet's
    batches touch a device once each: a Python object per device and batch would cost more
    than the rest of the pipeline). `batches()` gives both as columns, for the store."""

    devices: dict[str, DeviceDelta] = field(default_factory=dict)
    parts: list[BatchDelta] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)
    packets: int = 0
    bytes: int = 0

    def __bool__(self) -> bool:
        return bool(self.devices or self.rejected or any(p.entries for p in self.parts))

    @property
    def entries(self) -> int:
        """Per-device deltas held: one per folded device, one per device of each part."""
        return len(self.devices) + sum(p.entries for p in self.parts)

    def add_part(self, part: BatchDelta) -> None:
        """Count a batch's columns in (kept as they are until batches() reduces them)."""
        self.parts.append(part)
        self.packets += part.total_packets
        self.bytes += part.total_bytes

    def release(self) -> None:
        """Let the devices and columns go once a prepared write holds what they add (the
        totals stay, for the stats)."""
        self.devices = {}
        self.parts = []

    def batches(self) -> list[BatchDelta]:
        """Everything this delta adds, as columns (not reduced: see reduce_batches)."""
        if not self.devices:
            return list(self.parts)
        return [BatchDelta.from_devices(self.devices), *self.parts]


def _device(
    devices: dict[str, DeviceDelta],
    device_id: str,
    packets: int,
    nbytes: int,
    first_seen: int,
    last_seen: int,
) -> DeviceDelta:
    """`device_id`'s delta in `devices` with these counts added (a new one if absent)."""
    dev = devices.get(device_id)
    if dev is None:
        dev = devices[device_id] = DeviceDelta(
            packets=packets, bytes=nbytes, first_seen=first_seen, last_seen=last_seen
        )
        return dev
    dev.packets += packets
    dev.bytes += nbytes
    dev.first_seen = min(dev.first_seen, first_seen)
    dev.last_seen = max(dev.last_seen, last_seen)
    return dev


def _add_stats(
    stats: dict[str, ValueStats],
    name: str,
    count: int,
    total: float,
    lo: float,
    hi: float,
    last: float,
    last_ts: int,
) -> None:
    """Merge one reading's statistics: sums add, min/max kept, the newest `last` wins (on a
    tie, the one merged later)."""
    t = stats.get(name)
    if t is None:
        stats[name] = ValueStats(count=count, sum=total, min=lo, max=hi, last=last, last_ts=last_ts)
        return
    t.count += count
    t.sum += total
    t.min = min(t.min, lo)
    t.max = max(t.max, hi)
    if last_ts >= t.last_ts:
        t.last, t.last_ts = last, last_ts


def merge_into(target: FlushDelta, source: FlushDelta) -> None:
    """Add `source` to `target` exactly; `source` is left untouched, so it can be merged
    again elsewhere."""
    target.packets += source.packets
    target.bytes += source.bytes
    target.rejected.update(source.rejected)
    devices = target.devices
    for device_id, src in source.devices.items():
        dev = _device(devices, device_id, src.packets, src.bytes, src.first_seen, src.last_seen)
        kinds = dev.kinds
        for kind, count in src.kinds.items():
            kinds[kind] = kinds.get(kind, 0) + count
        for name, v in src.values.items():
            _add_stats(dev.values, name, v.count, v.sum, v.min, v.max, v.last, v.last_ts)


@dataclass(frozen=True, slots=True)
class Keys:
    """What names a batch's devices across batches, one per device row: objects that stay
    the same for a device while it is known (the validator's entries), and their id()s.
    The batch holds the objects, so no identity is reused while it is pending; a flush
    then numbers a fleet's devices over these integers in numpy (`reduce_batches`)
    instead of looking every device id of every batch up in a dict."""

    holders: Sequence[object]
    ids: IntArray

    @classmethod
    def of(cls, holders: list[Any]) -> Keys:
        return cls(holders, np.fromiter(map(id, holders), np.int64, len(holders)))


@dataclass(slots=True, kw_only=True)
class BatchDelta:
    """One batch's counts kept as columns until its flush: ~150 bytes per device instead of
    ~1 KB of DeviceDelta/ValueStats objects. A pending batch stays separate until the flush
    knows it is not a resend, so with batches spread over many devices this is what the
    pending memory is made of. Entries are in the order the aggregation produced them."""

    device_ids: list[str]
    packets: IntArray  # per device
    nbytes: IntArray
    first_seen: IntArray  # receive times (one batch: its receive time)
    last_seen: IntArray
    kinds: list[str]
    kind_dev: IntArray  # per (device, kind): row in device_ids
    kind_idx: IntArray  # index into kinds
    kind_count: IntArray
    names: list[str]
    value_dev: IntArray  # per (device, value name)
    value_name: IntArray
    count: IntArray
    total: FloatArray
    vmin: FloatArray
    vmax: FloatArray
    last: FloatArray
    last_ts: IntArray
    total_packets: int
    total_bytes: int
    keys: Keys | None = None  # what names each device row across batches, if known

    @classmethod
    def empty(cls) -> BatchDelta:
        """A batch that adds nothing (every packet refused, or none sent)."""
        i, f = _NO_INTS, _NO_FLOATS
        return cls(
            device_ids=[], packets=i, nbytes=i, first_seen=i, last_seen=i,
            kinds=[], kind_dev=i, kind_idx=i, kind_count=i,
            names=[], value_dev=i, value_name=i, count=i, total=f, vmin=f, vmax=f, last=f,
            last_ts=i, total_packets=0, total_bytes=0,
        )  # fmt: skip

    @property
    def entries(self) -> int:
        return len(self.device_ids)

    def merge_into(self, target: FlushDelta) -> None:
        """Add this batch to `target`, exactly as merge_into() adds a FlushDelta."""
        target.packets += self.total_packets
        target.bytes += self.total_bytes
        devices = target.devices
        rows = [
            _device(devices, device_id, *stats)
            for device_id, *stats in zip(
                self.device_ids, self.packets.tolist(), self.nbytes.tolist(),
                self.first_seen.tolist(), self.last_seen.tolist(), strict=True,
            )
        ]  # fmt: skip
        kinds = self.kinds
        for row, k, count in zip(
            self.kind_dev.tolist(), self.kind_idx.tolist(), self.kind_count.tolist(), strict=True
        ):
            of = rows[row].kinds
            of[kinds[k]] = of.get(kinds[k], 0) + count
        names = self.names
        for row, j, *stats in zip(
            self.value_dev.tolist(),
            self.value_name.tolist(),
            self.count.tolist(),
            self.total.tolist(),
            self.vmin.tolist(),
            self.vmax.tolist(),
            self.last.tolist(),
            self.last_ts.tolist(),
            strict=True,
        ):
            _add_stats(rows[row].values, names[j], *stats)

    def to_flush_delta(self) -> FlushDelta:
        delta = FlushDelta()
        self.merge_into(delta)
        return delta

    @classmethod
    def from_devices(cls, devices: Mapping[str, DeviceDelta]) -> BatchDelta:
        """The same deltas as columns (entries grouped by device, in `devices`' order)."""
        kinds: dict[str, int] = {}
        names: dict[str, int] = {}
        kind_ints: list[tuple[int, int, int]] = []  # device row, kind, count
        value_ints: list[tuple[int, int, int, int]] = []  # device row, name, count, last_ts
        value_floats: list[tuple[float, float, float, float]] = []  # sum, min, max, last
        for row, dev in enumerate(devices.values()):
            for kind, count in dev.kinds.items():
                kind_ints.append((row, kinds.setdefault(kind, len(kinds)), count))
            for name, s in dev.values.items():
                value_ints.append((row, names.setdefault(name, len(names)), s.count, s.last_ts))
                value_floats.append((s.sum, s.min, s.max, s.last))
        heads = [(d.packets, d.bytes, d.first_seen, d.last_seen) for d in devices.values()]
        packets, nbytes, first, last = _columns(heads, 4, np.int64)
        kind_dev, kind_idx, kind_count = _columns(kind_ints, 3, np.int64)
        value_dev, value_name, count, last_ts = _columns(value_ints, 4, np.int64)
        total, vmin, vmax, last_value = _columns(value_floats, 4, np.float64)
        return cls(
            device_ids=list(devices), packets=packets, nbytes=nbytes, first_seen=first,
            last_seen=last, kinds=list(kinds), kind_dev=kind_dev, kind_idx=kind_idx,
            kind_count=kind_count, names=list(names), value_dev=value_dev,
            value_name=value_name, count=count, total=total, vmin=vmin, vmax=vmax,
            last=last_value, last_ts=last_ts,
            total_packets=int(packets.sum()), total_bytes=int(nbytes.sum()),
        )  # fmt: skip


def _columns(rows: list[Any], width: int, dtype: type[Any]) -> list[Any]:
    """Tuples of `width` numbers as `width` contiguous arrays (empty ones for no rows)."""
    table = np.array(rows, dtype=dtype).reshape(-1, width)
    return [np.ascontiguousarray(table[:, j]) for j in range(width)]


def number_keys(keys: IntArray, space: int) -> tuple[IntArray, IntArray]:
    """Number the distinct keys (each in range(space)): the distinct keys, sorted, and the
    number of each key. A lookup table when the key space is small, a sort otherwise (so
    that a hostile batch of thousands of devices times thousands of kinds or value names
    cannot allocate their product)."""
    if space > 4 * len(keys) + 4096:
        present, numbers = np.unique(keys, return_inverse=True)
        return present, numbers.reshape(-1)
    seen = np.zeros(space, dtype=np.bool_)
    seen[keys] = True
    present = np.flatnonzero(seen)
    lut = np.zeros(space, dtype=np.int64)
    lut[present] = np.arange(len(present))
    return present, lut[keys]


def latest_of_newest(which: IntArray, slots: int, ts: IntArray) -> IntArray:
    """For each slot in range(slots): the index of its "last" entry — the latest one among
    those with the newest `ts` (entries in arrival order; `which` gives each one's slot).
    The same rule as `_add_stats` and the per-packet fold, without a sort."""
    newest_ts = np.full(slots, np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(newest_ts, which, ts)
    newest = np.flatnonzero(ts == newest_ts[which])
    ends = np.full(slots, -1, dtype=np.int64)
    np.maximum.at(ends, which[newest], newest)
    return ends


# Per-device entries of batches merged in one numpy pass, between two yields to the event
# loop (a pass this size is short): ~50 batches of 100 devices each, or one of 5,000.
MERGE_ENTRIES = 5_000


def _shifted(lists: list[list[str]], index: list[IntArray]) -> IntArray:
    """Each part's index into its own list, as an index into the lists concatenated."""
    offsets = np.cumsum([0] + [len(x) for x in lists[:-1]], dtype=np.int64)
    shifted: IntArray = np.concatenate(index) + np.repeat(offsets, [len(i) for i in index])
    return shifted


# Strings per C-level pass in _unified: one pass holds the GIL throughout, so a flush's
# millions of device ids in one pass (~0.4 s per million) stalled the event loop's
# receivers and reads while a worker thread reduced; 16,384 take a few ms.
_UNIFY_SLICE = 16_384


def _unified(
    lists: list[list[str]], *indexes: list[IntArray]
) -> tuple[list[str], IntArray, list[IntArray]]:
    """Number the strings of every part in one table (first-appearance order): the table,
    each listed string's number, and each set of per-part indexes into the lists as
    numbers in the table."""
    # One C-level dict pass, not a Python call per string: setdefault gives each string the
    # position of its first appearance (the dict keeps them in that order), and numpy turns
    # positions into numbers. A fleet's flush numbers every device of every part here, and
    # each dict operation on a string is a cache miss: the two passes this replaced (number
    # the distinct strings, then look each one up) took twice as long (benchmarks/RESULTS.md,
    # sixth pass).
    slices = [s[i : i + _UNIFY_SLICE] for s in lists for i in range(0, len(s), _UNIFY_SLICE)]
    seen: dict[str, int] = {}
    position = itertools.count()
    first = np.concatenate(
        [np.fromiter(map(seen.setdefault, strings, position), np.int64, len(strings))
         for strings in slices]
        or [_NO_INTS]
    )  # fmt: skip
    _, ids = number_keys(first, len(first))
    keys = iter(seen)
    table: list[str] = []
    while chunk := list(itertools.islice(keys, _UNIFY_SLICE)):
        table += chunk
    return table, ids, [ids[_shifted(lists, index)] for index in indexes]


def _number_ids(keys: IntArray) -> tuple[IntArray, IntArray]:
    """Number the distinct keys in first-appearance order: each one's first position (in
    that order) and each key's number. In C a hash pass without the GIL (_model.c);
    without it, a sort."""
    if C_NUMBERING:
        firsts, numbers = _c_number_ids(np.ascontiguousarray(keys, dtype=np.int64).data)
        return np.frombuffer(firsts, dtype=np.int64), np.frombuffer(numbers, dtype=np.int64)
    return _number_by_sort(keys)


def _number_by_sort(keys: IntArray) -> tuple[IntArray, IntArray]:
    """_number_ids() with numpy: a sort, several times slower than the C pass on keys
    that are not in order (benchmarks/flush_encode.py --shuffled --sort)."""
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order), dtype=np.int64)
    return first[order], rank[inverse.reshape(-1)]


def _keyed(
    parts: Sequence[BatchDelta], *indexes: list[IntArray], keep: bool = True
) -> tuple[list[str], IntArray, list[IntArray], Keys | None] | None:
    """_unified() for the parts' device ids, from their keys (first-appearance order): the
    same numbering, without touching the strings of every entry, and the table's keys (None
    unless `keep`). None if a part has no keys, or if two keys name one device id (a device
    forgotten by the validator and admitted again between two batches): then the strings
    decide."""
    held = [p.keys for p in parts]
    if None in held:
        return None
    keys = np.concatenate([k.ids for k in held if k is not None])
    # each distinct key's first position (`at`, in order) and each key's number
    at, numbers = _number_ids(keys)
    # Each distinct device's id and holder, read from the part it first appears in, a
    # slice at a time (one C-level pass holds the GIL throughout: _UNIFY_SLICE).
    lists = [p.device_ids for p in parts]
    holders = [k.holders for k in held if k is not None]
    starts = np.cumsum([0] + [len(x) for x in lists], dtype=np.int64)
    part = np.searchsorted(starts, at, side="right") - 1
    local = at - starts[part]
    table: list[str] = []
    kept: list[object] = []
    distinct: set[str] = set()
    for i in range(0, len(at), _UNIFY_SLICE):
        p, x = part[i : i + _UNIFY_SLICE].tolist(), local[i : i + _UNIFY_SLICE].tolist()
        ids: list[str] = list(map(getitem, map(lists.__getitem__, p), x))
        distinct.update(ids)
        table += ids
        if keep:  # (a reference to each device's holder: a cache miss each, at a fleet)
            kept += map(getitem, map(holders.__getitem__, p), x)
    if len(distinct) != len(table):
        return None
    indexed = [numbers[_shifted(lists, index)] for index in indexes]
    return table, numbers, indexed, Keys(kept, keys[at]) if keep else None


def merge_batches(target: FlushDelta, parts: Sequence[BatchDelta]) -> None:
    """Add pending batches to `target`: the same as `part.merge_into(target)` for each part
    in turn (float sums are added in another order), with one Python step per distinct
    device, kind and reading of all the parts instead of one per device of every part."""
    if len(parts) <= 1:
        for part in parts:
            part.merge_into(target)
        return
    reduce_batches(parts).merge_into(target)


def reduce_batches(parts: Sequence[BatchDelta], *, keep_keys: bool = True) -> BatchDelta:
    """The parts as one BatchDelta, with one entry per distinct device, (device, kind) and
    (device, value name), entries grouped by device: what applying the parts in turn adds.
    Without `keep_keys` it carries no device keys (reducing it again numbers its devices by
    their ids): for a flush's write, which is reduced once.

    The parts are numbered into one set of devices, kinds and value names, concatenated,
    and reduced with numpy: counts and sums with add.at/bincount (in part order), min/max
    with minimum.at/maximum.at, "last" as the latest part among those with the newest
    timestamp, as in `_add_stats`. No sort: keys are numbered with a lookup table. One part
    alone is returned as it is (its entries are grouped by device already)."""
    if not parts:
        return BatchDelta.empty()
    if len(parts) == 1:
        return parts[0]
    cat = np.concatenate
    dev_index = [p.kind_dev for p in parts], [p.value_dev for p in parts]
    # The reduced batch keeps its devices' keys, so that reducing it again (the
    # aggregator's loose batches) numbers them by key too.
    keyed = _keyed(parts, *dev_index, keep=keep_keys)
    if keyed is None:
        devices, all_dev, (kind_dev, value_dev) = _unified(
            [p.device_ids for p in parts], *dev_index
        )
        keys = None
    else:
        devices, all_dev, (kind_dev, value_dev), keys = keyed
    kinds, _, (kind,) = _unified([p.kinds for p in parts], [p.kind_idx for p in parts])
    names, _, (value_name,) = _unified([p.names for p in parts], [p.value_name for p in parts])
    n = len(devices)
    packets = np.zeros(n, dtype=np.int64)
    nbytes = np.zeros(n, dtype=np.int64)
    np.add.at(packets, all_dev, cat([p.packets for p in parts]))
    np.add.at(nbytes, all_dev, cat([p.nbytes for p in parts]))
    first = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    last_seen = np.full(n, np.iinfo(np.int64).min, dtype=np.int64)
    np.minimum.at(first, all_dev, cat([p.first_seen for p in parts]))
    np.maximum.at(last_seen, all_dev, cat([p.last_seen for p in parts]))
    n_kinds = max(len(kinds), 1)
    kind_pair, which = number_keys(kind_dev * n_kinds + kind, n * n_kinds)
    per_kind = np.zeros(len(kind_pair), dtype=np.int64)
    np.add.at(per_kind, which, cat([p.kind_count for p in parts]))
    n_names = max(len(names), 1)
    pair, which = number_keys(value_dev * n_names + value_name, n * n_names)
    m = len(pair)
    count = np.zeros(m, dtype=np.int64)
    np.add.at(count, which, cat([p.count for p in parts]))
    total = np.asarray(
        np.bincount(which, weights=cat([p.total for p in parts]), minlength=m), np.float64
    )
    lo = np.full(m, np.inf)
    hi = np.full(m, -np.inf)
    np.minimum.at(lo, which, cat([p.vmin for p in parts]))
    np.maximum.at(hi, which, cat([p.vmax for p in parts]))
    ts = cat([p.last_ts for p in parts])
    ends = latest_of_newest(which, m, ts)
    return BatchDelta(
        device_ids=devices, packets=packets, nbytes=nbytes,
        first_seen=first, last_seen=last_seen,
        kinds=kinds, kind_dev=kind_pair // n_kinds, kind_idx=kind_pair % n_kinds,
        kind_count=per_kind,
        names=names, value_dev=pair // n_names, value_name=pair % n_names,
        count=count, total=total, vmin=lo, vmax=hi,
        last=cat([p.last for p in parts])[ends], last_ts=ts[ends],
        total_packets=sum(p.total_packets for p in parts),
        total_bytes=sum(p.total_bytes for p in parts),
        keys=keys,
    )  # fmt: skip


# --- self-metrics: what each pipeline reports, summed over the ingest processes --------


@dataclass(slots=True)
class FlushStats:
    """Self-metrics of the flusher."""

    flushes: int = 0
    packets_committed: int = 0
    devices_committed: int = 0  # device merges written (a device once per flush it is in)
    interval_s: float = 0.0  # the flush interval in force (adaptive: see Flusher.run)
    stretched_flushes: int = 0  # flushes started later than --flush-interval after the last
    commit_errors: int = 0  # failed attempts to reach Redis
    redis_recoveries: int = 0  # times Redis came back after failing
    last_flush_ms: int = 0
    last_flush_seconds: float = 0.0
    duplicate_batches: int = 0
    duplicate_packets: int = 0
    carried_over_batches: int = 0
    # packets that could not be committed by the shutdown deadline (never acknowledged)
    packets_abandoned: int = 0
    # new kinds, value names and rate buckets that full device records could not take
    # (RECORD_NAMES_MAX; the packets are counted, the names are not)
    record_full_drops: int = 0
    # Seconds spent in each step of the flushes since the start (retries and backoff
    # included): encoding the deltas (this process, a worker thread), preparing (claiming
    # batch ids, writing the journal), applying (the merges: Redis) and finalizing. Where a
    # fleet's flush time goes, and so its freshness.
    encode_seconds: float = 0.0
    prepare_seconds: float = 0.0
    apply_seconds: float = 0.0
    finalize_seconds: float = 0.0
    redis_error: str | None = None  # the last error while Redis is failing, else None


FLUSH_STEPS = ("encode", "prepare", "apply", "finalize")


def flush_steps(stats: FlushStats) -> dict[str, float]:
    """The seconds flushes spent in each step (FLUSH_STEPS), by step."""
    return {step: getattr(stats, f"{step}_seconds") for step in FLUSH_STEPS}


@dataclass(slots=True)
class RecoveryStats:
    journals_recovered: int = 0
    devices_expired: int = 0
    errors: int = 0


R = TypeVar("R")


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpReply:
    """An HTTP receiver's answer (POST /v1/telemetry, /v1/metrics): built by the receiver
    in ingest/, sent as it is by the route in api/."""

    status: int
    body: bytes
    media_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class IngestStats:
    """The receivers' figures (gRPC streams, message budget, device slots)."""

    active_streams: int = 0
    streams_refused: int = 0
    streams_refused_by_reason: dict[str, int] = field(default_factory=dict)
    messages_refused_by_reason: dict[str, int] = field(default_factory=dict)
    inflight_message_bytes: int = 0
    streams_waiting_for_bytes: int = 0
    inflight_message_waits: int = 0
    streams_idle_closed: int = 0
    devices_known: int = 0
    # The MQTT bridge (ingest/mqtt.py), when --mqtt-url is set: bridges connected to their
    # broker now, connections made, messages received, and acknowledged (after their commit).
    mqtt_connected: int = 0
    mqtt_connects: int = 0
    mqtt_messages: int = 0
    mqtt_messages_acked: int = 0
    mqtt_messages_unacked: int = 0
    # delivered again after a reconnect while this process held them: counted once
    mqtt_messages_redelivered: int = 0
    # Refused tokens and packets outside a token's device prefix, by `<reason>:<token>`.
    auth_refused: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueStats:
    packets: int = 0
    items: int = 0
    max_packets: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingStats:
    """Received but not yet committed: in the aggregator, and in the flush under way."""

    packets: int = 0
    devices: int = 0
    batches: int = 0
    inflight_packets: int = 0
    device_entries: int = 0
    inflight_device_entries: int = 0
    max_device_entries: int = 0  # --max-pending-devices
    # the budget in force: max_device_entries, or less by --max-pending-seconds
    device_entry_budget: int = 0
    max_pending_packets: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineStats:
    """One ingest process's pipeline (or the sum of several): queue, pending deltas,
    flushes, recovery, packets rejected by reason, and its receivers' figures."""

    ingest: IngestStats = field(default_factory=IngestStats)
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    queue: QueueStats = field(default_factory=QueueStats)
    pending: PendingStats = field(default_factory=PendingStats)
    flush: FlushStats = field(default_factory=FlushStats)
    recovery: RecoveryStats = field(default_factory=RecoveryStats)

    def to_json(self) -> dict[str, Any]:
        """The /stats sections (the shape GET /stats has always had)."""
        return {
            "ingest": {
                **dataclasses.asdict(self.ingest),
                "rejected_by_reason": dict(sorted(self.rejected_by_reason.items())),
            },
            "queue": dataclasses.asdict(self.queue),
            "pending": dataclasses.asdict(self.pending),
            "flush": dataclasses.asdict(self.flush),
            "recovery": dataclasses.asdict(self.recovery),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> PipelineStats:
        """The inverse of to_json(); fields it does not know (a newer replica's) are
        ignored, missing ones take their default (an older replica's)."""
        ingest = dict(doc.get("ingest") or {})
        rejected = ingest.pop("rejected_by_reason", {})
        pending = dict(doc.get("pending") or {})
        # (a replica from before the time budget: its budget is its memory budget)
        pending.setdefault("device_entry_budget", pending.get("max_device_entries", 0))
        return cls(
            ingest=_build(IngestStats, ingest),
            rejected_by_reason=dict(rejected),
            queue=_build(QueueStats, doc.get("queue")),
            pending=_build(PendingStats, pending),
            flush=_build(FlushStats, doc.get("flush")),
            recovery=_build(RecoveryStats, doc.get("recovery")),
        )

    @classmethod
    def total(cls, parts: Iterable[PipelineStats]) -> PipelineStats:
        """The sum over several processes: counts and gauges add up (limits too: the
        capacity of all of them); the latest flush's duration, and any Redis error."""
        items = list(parts)
        flushes = [p.flush for p in items]
        latest = max(flushes, key=lambda f: f.last_flush_ms, default=FlushStats())
        flush = _sum(FlushStats, flushes)
        flush.last_flush_ms = latest.last_flush_ms
        flush.last_flush_seconds = latest.last_flush_seconds
        flush.redis_error = next((f.redis_error for f in flushes if f.redis_error), None)
        return cls(
            ingest=_sum(IngestStats, [p.ingest for p in items]),
            rejected_by_reason=_add_counts(p.rejected_by_reason for p in items),
            queue=_sum(QueueStats, [p.queue for p in items]),
            pending=_sum(PendingStats, [p.pending for p in items]),
            flush=flush,
            recovery=_sum(RecoveryStats, [p.recovery for p in items]),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceStats:
    """What an ingest process publishes next to its heartbeat: who it is, and its stats."""

    instance_id: str
    pid: int
    uptime_s: float
    stats: PipelineStats

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "uptime_s": self.uptime_s, **self.stats.to_json()}

    @classmethod
    def from_json(cls, instance_id: str, doc: Mapping[str, Any]) -> InstanceStats:
        return cls(
            instance_id=instance_id,
            pid=int(doc.get("pid") or 0),
            uptime_s=float(doc.get("uptime_s") or 0.0),
            stats=PipelineStats.from_json(doc),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceStats:
    """GET /stats of one process: its readiness, the ingest instances sharing its Redis
    (this process's own, if it ingests, and the published ones) and their sum, and the
    sections of the parts this process runs (HTTP connections, the embedded Redis)."""

    instance_id: str | None  # this process's ingest instance, if it ingests
    uptime_s: float
    ready: bool
    not_ready_reasons: list[str]
    instances: dict[str, InstanceStats]
    total: PipelineStats
    instances_error: str | None = None  # why the published instances could not be read
    http: dict[str, Any] | None = None
    embedded_redis: dict[str, Any] | None = None
    auth: dict[str, Any] | None = None  # the tokens in force (names) and refusals

    def to_json(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "uptime_s": self.uptime_s,
            "ready": self.ready,
            "not_ready_reasons": self.not_ready_reasons,
            # the pipeline sections are the sum over "instances"
            **self.total.to_json(),
            "instances": {i: s.to_json() for i, s in sorted(self.instances.items())},
            "instances_error": self.instances_error,
            "http": self.http,
            "embedded_redis": self.embedded_redis,
            "auth": self.auth,
        }


def _build(cls: type[R], doc: Mapping[str, Any] | None) -> R:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in (doc or {}).items() if k in names})


def _sum(cls: type[R], items: list[R]) -> R:
    """Field by field: numbers add up, counts by reason add up key by key; other fields
    (text) keep their default."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        column = [getattr(item, f.name) for item in items]
        if f.type in (int, float, "int", "float"):
            values[f.name] = sum(column)
        elif f.type in (dict[str, int], "dict[str, int]"):
            values[f.name] = _add_counts(column)
    return cls(**values)


def _add_counts(counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for c in counts:
        total.update(c)
    return dict(sorted(total.items()))


# --- what the API reads: device records, totals, rates ------------------------------------


def rate_key(unit: RateUnit, window_s: int) -> str:
    """A rate's field name in the JSON (`packets_per_s_10s`)."""
    return f"{unit}_per_s_{window_s}s"


@dataclass(frozen=True, slots=True, kw_only=True)
class Rates:
    """Packets/s and bytes/s over each of RATE_WINDOWS_S, of complete seconds, summed over
    every instance; keyed by the window in seconds."""

    packets_per_s: dict[int, float]
    bytes_per_s: dict[int, float]

    def to_json(self) -> dict[str, float]:
        """{"packets_per_s_10s": ..., "bytes_per_s_10s": ..., ...}, window by window."""
        out: dict[str, float] = {}
        for window in RATE_WINDOWS_S:
            out[rate_key("packets", window)] = self.packets_per_s[window]
            out[rate_key("bytes", window)] = self.bytes_per_s[window]
        return out


# Not frozen: a page of 1,000 devices with 64 readings each makes 64,000 of these, and a
# frozen dataclass's __init__ is markedly slower.
@dataclass(slots=True, kw_only=True)
class ValueRecord:
    """Statistics of one named reading of one device, over every packet counted.

    `sum` is inf, -inf or nan once it left the range of a double: then `overflow` is set
    and there is no `mean` (the JSON shows null, Prometheus +Inf, -Inf or NaN)."""

    count: int
    sum: float
    min: float
    max: float
    last: float
    last_timestamp_ms: int  # device timestamp of `last`

    @property
    def overflow(self) -> bool:
        return not math.isfinite(self.sum)

    @property
    def mean(self) -> float | None:
        return None if self.overflow or not self.count else self.sum / self.count


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceRecord:
    """Everything counted for one device, across every instance (times: ms since epoch)."""

    device_id: str
    packets: int
    bytes: int
    first_seen: int | None  # receive time of the first packet
    last_seen: int | None  # receive time of the latest packet
    kinds: dict[str, int]
    values: dict[str, ValueRecord]
    rate: Rates

    def online(self, now_ms: float, offline_after_s: float) -> bool:
        """A packet arrived within the offline threshold."""
        return now_ms - (self.last_seen or 0) <= offline_after_s * 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class Totals:
    """Totals over every device and instance."""

    devices: int
    packets: int
    bytes: int
    rejected_by_reason: dict[str, int]  # packets refused by validation
    rate: Rates

    @property
    def rejected(self) -> int:
        return sum(self.rejected_by_reason.values())
