"""Batches as columns: decode, validate and aggregate with numpy — per-batch work in C.

Both batch forms end up as one `_Table` of columns, and one code path validates and
aggregates it:

- a `Columns` message carries packed little-endian arrays; `np.frombuffer` reads them
  without copying;
- row batches (`Batch.packets`) are read straight from the message's bytes into the same
  columns by a small C reader (`_rows.c`), without a Python object per packet. Where that
  reader is not built (no C compiler at install) or declines a message, protobuf parses it
  and the packets are transposed with C-level passes (`map(attrgetter(...))`,
  `dict.fromkeys`, `np.fromiter`): slower, but still no Python statement per packet.

Validation runs on whole columns (masks) and on the dictionaries (each distinct device id,
kind and value name is checked once per batch, not once per packet). The result is the
batch's FlushDelta, exactly what folding the same packets one by one would give: counts
and sums accumulate in packet order (np.bincount), min/max with ufunc.at, "last" as the
latest packet among those with the newest timestamp (model.latest_of_newest).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from itertools import chain, repeat
from operator import attrgetter, getitem, is_
from typing import Any

import numpy as np
import numpy.typing as npt

from rtmonitor.ingest.v1.telemetry_pb2 import Batch, Columns, Packet
from rtmonitor.ingest.validation import (
    MAX_CLOCK_AHEAD_MS,
    UNKNOWN,
    UNSPECIFIED_KIND,
    Known,
    Reason,
    Validator,
    Vocabulary,
    device_ids_ok,
)
from rtmonitor.model import BatchDelta, Keys, latest_of_newest, number_keys

try:
    from rtmonitor.ingest._rows import Rows as _WireRows
    from rtmonitor.ingest._rows import TooLarge as _WireTooLarge
    from rtmonitor.ingest._rows import read_rows as _read_rows

    C_ROWS = True  # the compiled row reader is built (see setup.py)
except ImportError:  # installed without a C compiler: protobuf's parser reads every batch
    C_ROWS = False
try:
    from rtmonitor.ingest._devices import addresses as _addresses
    from rtmonitor.ingest._devices import distinct as _distinct

    C_KEYS = True  # the compiled dictionary encoder and Keys (see _devices.c)
except ImportError:  # without a C compiler: a dict pass and Keys.of, an int per device
    C_KEYS = False

# Reason codes in the per-packet code array; 0 = accepted.
_REASONS: list[Reason] = list(Reason)
_CODE = {reason: i + 1 for i, reason in enumerate(_REASONS)}
_BAD_INDEX = _CODE[Reason.INVALID_COLUMN_INDEX]
IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
_NO_INTS: IntArray = np.zeros(0, dtype=np.int64)
_NO_FLOATS: FloatArray = np.zeros(0, dtype=np.float64)

_device_id = attrgetter("device_id")
_kind = attrgetter("kind")
_payload = attrgetter("payload")
_timestamp = attrgetter("timestamp_ms")
_values = attrgetter("values")
_vocab = attrgetter("vocab")


class ColumnsError(ValueError):
    """The columns are inconsistent (wrong lengths): the whole batch is refused."""


@dataclass(slots=True)
class _Table:
    """One batch as columns. Dictionaries hold distinct entries; an index of -1 points past
    the client's dictionary (a columnar batch's `invalid_column_index`)."""

    n: int
    device_ids: list[str]
    dev_idx: IntArray
    kinds: list[str]  # "" already read as "unspecified"
    kind_idx: IntArray
    size: IntArray | None  # payload bytes; None = all 0
    ts: IntArray | None  # device clock in ms, 0 = receive time; None = all receive time
    names: list[str]  # value names
    # One entry per reading, in packet order within each value name: its packet, its name
    # (index into names) and its value.
    v_pos: IntArray
    v_name: IntArray
    v_val: FloatArray


def _encode(strings: list[str], empty_as: str | None = None) -> tuple[list[str], IntArray]:
    """Dictionary-encode a column of strings (first-appearance order) in C-level passes;
    with `empty_as`, "" is read as that entry."""
    if C_KEYS and empty_as is None:
        # one C pass, presized; hashing here caches each id's hash for the validator
        table, index = _distinct(strings)
        return table, np.frombuffer(index, dtype=np.int64)
    distinct = dict.fromkeys(strings)
    if len(distinct) == len(strings) and (empty_as is None or "" not in distinct):
        # all distinct (a batch spread over a large fleet): the index is the position
        return list(distinct), np.arange(len(strings), dtype=np.int64)
    if empty_as is not None and "" in distinct:
        slot: dict[str, int] = {}
        lookup = {s: slot.setdefault(s or empty_as, len(slot)) for s in distinct}
        return list(slot), np.fromiter(map(lookup.__getitem__, strings), np.int64, len(strings))
    lookup = dict(zip(distinct, range(len(distinct)), strict=True))
    return list(lookup), np.fromiter(map(lookup.__getitem__, strings), np.int64, len(strings))


def _dictionary(
    entries: Sequence[str], index: npt.NDArray[Any], empty_as: str | None = None
) -> tuple[list[str], IntArray]:
    """A client's dictionary and the index into it, re-pointed at its distinct entries
    (-1 for an index past the dictionary): a repeated entry must not split one device's
    counts in two."""
    distinct, canon = _encode(list(entries), empty_as)
    return distinct, np.append(canon, -1)[np.minimum(index.astype(np.int64), len(entries))]


def _column(data: bytes, dtype: str, count: int, name: str) -> npt.NDArray[Any] | None:
    if not data:
        return None
    width = np.dtype(dtype).itemsize
    if len(data) != count * width:
        raise ColumnsError(
            f"column {name} has {len(data)} bytes; {count} packets need {count * width} "
            f"({dtype} little-endian each), or leave it empty"
        )
    return np.frombuffer(data, dtype=dtype)


def check_columns(cols: Columns, max_values_per_packet: int) -> None:
    """Bound every dimension of a Columns message before any work per column or per
    dictionary entry (each check is O(1) on protobuf's containers): a batch of one packet
    could otherwise carry millions of value columns or dictionary entries. `count` itself
    is bounded by --max-batch-packets (parse_batch), the column lengths by `count` as each
    column is read (`_column`)."""
    n = cols.count
    # Each packet has at most --max-values-per-packet readings, so a batch with more
    # columns than that many per packet holds columns without a reading, or a packet over
    # the limit: junk either way. Heterogeneous batches (packets with different readings)
    # stay possible; the message size then bounds columns x count.
    if len(cols.values) > n * max_values_per_packet:
        raise ColumnsError(
            f"{len(cols.values)} value columns for {n} packets; a batch carries at most "
            f"count x --max-values-per-packet ({n} x {max_values_per_packet}) of them"
        )
    for name, entries in (("device_ids", cols.device_ids), ("kinds", cols.kinds)):
        if len(entries) > n:
            raise ColumnsError(
                f"{name} has {len(entries)} entries for {n} packets (count): a dictionary "
                "holds at most one entry per packet"
            )
    packed = (cols.device_index, cols.kind_index, cols.payload_size, cols.timestamp_ms)
    if n == 0 and (any(packed) or cols.values):
        raise ColumnsError("columns carry data but count is 0")


def _table_from_columns(cols: Columns) -> _Table:
    n = cols.count
    dev_col = _column(cols.device_index, "<u4", n, "device_index")
    if dev_col is None:
        raise ColumnsError("device_index is required (count > 0)")
    kind_col = _column(cols.kind_index, "<u4", n, "kind_index")
    size_col = _column(cols.payload_size, "<u4", n, "payload_size")
    ts_col = _column(cols.timestamp_ms, "<i8", n, "timestamp_ms")
    value_cols = [
        (vc.name, _column(vc.values, "<f8", n, f"values[{vc.name}]")) for vc in cols.values
    ]
    names = [name for name, _ in value_cols]
    if len(set(names)) != len(names):
        raise ColumnsError("a value name appears in two value columns")
    kind_entries = list(cols.kinds) or [UNSPECIFIED_KIND]
    if kind_col is None:
        if len(kind_entries) != 1:
            raise ColumnsError("kind_index is empty but there are several kinds")
        kind_col = np.zeros(n, dtype=np.int64)
    device_ids, dev_idx = _dictionary(cols.device_ids, dev_col)
    kinds, kind_idx = _dictionary(kind_entries, kind_col, empty_as=UNSPECIFIED_KIND)
    # Wide value columns (NaN = no reading) to one long list of readings.
    pos: list[IntArray] = []
    which: list[IntArray] = []
    val: list[FloatArray] = []
    for j, (_, values) in enumerate(value_cols):
        if values is None:
            continue
        p = np.flatnonzero(~np.isnan(values))
        pos.append(p)
        which.append(np.full(len(p), j, dtype=np.int64))
        val.append(values[p].astype(np.float64))
    return _Table(
        n,
        device_ids,
        dev_idx,
        kinds,
        kind_idx,
        None if size_col is None else size_col.astype(np.int64),
        None if ts_col is None else ts_col.astype(np.int64),
        names,
        np.concatenate(pos) if pos else _NO_INTS,
        np.concatenate(which) if which else _NO_INTS,
        np.concatenate(val) if val else _NO_FLOATS,
    )


def _table_from_rows(packets: Sequence[Packet]) -> _Table:
    """Transpose row packets into columns. Every pass is a C-level iteration (map, zip,
    chain, np.fromiter) over protobuf's C objects; no Python statement runs per packet."""
    n = len(packets)
    device_ids, dev_idx = _encode(list(map(_device_id, packets)))
    kinds, kind_idx = _encode(list(map(_kind, packets)), empty_as=UNSPECIFIED_KIND)
    size = np.fromiter(map(len, map(_payload, packets)), np.int64, n)
    ts = np.fromiter(map(_timestamp, packets), np.int64, n)
    maps = list(map(_values, packets))
    per_packet = np.fromiter(map(len, maps), np.int64, n)
    m = int(per_packet.sum())
    if m:
        keys = list(chain.from_iterable(maps))  # iterating a map container yields its keys
        names, v_name = _encode(keys)
        owners = chain.from_iterable(map(repeat, maps, per_packet.tolist()))
        v_val = np.fromiter(map(getitem, owners, keys), np.float64, m)
        v_pos = np.repeat(np.arange(n, dtype=np.int64), per_packet)
    else:
        names, v_name, v_val, v_pos = [], _NO_INTS, _NO_FLOATS, _NO_INTS
    return packed_table(
        n, device_ids, dev_idx, kinds, kind_idx, size, ts, names, v_pos, v_name, v_val
    )


def packed_table(
    n: int,
    device_ids: list[str],
    dev_idx: IntArray,
    kinds: list[str],
    kind_idx: IntArray,
    size: IntArray,
    ts: IntArray,
    names: list[str],
    v_pos: IntArray,
    v_name: IntArray,
    v_val: FloatArray,
) -> _Table:
    """A table from full columns: an all-zero size or ts column is left out (None)."""
    return _Table(
        n,
        device_ids,
        dev_idx,
        kinds,
        kind_idx,
        size if size.any() else None,
        ts if ts.any() else None,
        names,
        v_pos,
        v_name,
        v_val,
    )


def _table_from_wire(rows: _WireRows) -> _Table:
    """The C reader's columns (`_rows.read_rows`) as a table."""
    kinds = rows.kinds
    kind_idx: IntArray = np.frombuffer(rows.kind_idx, np.int64)
    if "" in kinds:  # "" is read as "unspecified", which may be in the batch as well
        kinds, kind_idx = _dictionary(kinds, kind_idx, empty_as=UNSPECIFIED_KIND)
    size: IntArray = np.frombuffer(rows.size, np.int64)
    ts: IntArray = np.frombuffer(rows.ts, np.int64)
    return packed_table(
        len(rows.dev_idx) // 8,
        rows.device_ids,
        np.frombuffer(rows.dev_idx, np.int64),
        kinds,
        kind_idx,
        size,
        ts,
        rows.names,
        np.frombuffer(rows.v_pos, np.int64),
        np.frombuffer(rows.v_name, np.int64),
        np.frombuffer(rows.v_val, np.float64),
    )


@dataclass(slots=True)
class ParsedBatch:
    """A Batch message read: its header, and its packets not yet validated. `rows` is a
    table when the C reader read them, else protobuf's packet objects."""

    producer_id: str
    batch_id: int
    columns: Columns | None
    rows: _Table | Sequence[Packet]

    @property
    def count(self) -> int:
        rows = self.rows.n if isinstance(self.rows, _Table) else len(self.rows)
        return rows + (self.columns.count if self.columns is not None else 0)

    @property
    def device_entries(self) -> int:
        """The entries of its device dictionaries (for protobuf's rows, its packets): a
        bound on its distinct devices, read without decoding anything."""
        rows = len(self.rows.device_ids) if isinstance(self.rows, _Table) else len(self.rows)
        return rows + (len(self.columns.device_ids) if self.columns is not None else 0)


class BatchTooLarge(ValueError):
    """A batch with more packets than allowed: refused whole, before it is decoded."""

    def __init__(self, batch_id: int, packets: int) -> None:
        super().__init__(f"batch {batch_id} has {packets} packets")
        self.batch_id = batch_id
        self.packets = packets


def parse_batch(raw: bytes, max_packets: int, compiled: bool = C_ROWS) -> ParsedBatch:
    """Read a serialized Batch. Raises protobuf's DecodeError if it is not one, and
    BatchTooLarge past `max_packets` (before building anything per packet). Row batches go
    through the C reader (`compiled`), which hands anything unusual back to protobuf."""
    if compiled:
        read = _read_rows(raw, max_packets)
        if isinstance(read, _WireTooLarge):
            raise BatchTooLarge(read.batch_id, read.packets)
        if read is not None:
            return ParsedBatch(read.producer_id, read.batch_id, None, _table_from_wire(read))
    batch = Batch.FromString(raw)
    columns = batch.columns if batch.HasField("columns") else None
    parsed = ParsedBatch(batch.producer_id, batch.batch_id, columns, batch.packets)
    if parsed.count > max_packets:
        raise BatchTooLarge(batch.batch_id, parsed.count)  # one refused message
    return parsed


def decode_columns(
    cols: Columns, validator: Validator, recv_ms: int, device_prefix: str | None = None
) -> tuple[BatchDelta, Counter[str]]:
    """A columnar batch: the aggregated delta of its accepted packets, and the refused ones
    by reason. Raises ColumnsError if the message itself is inconsistent or exceeds a bound
    (see check_columns). With `device_prefix`, packets of other devices are refused
    (`device_not_permitted`)."""
    check_columns(cols, validator.limits.max_values_per_packet)
    if cols.count == 0:
        return BatchDelta.empty(), Counter()
    return _validate_and_aggregate(_table_from_columns(cols), validator, recv_ms, device_prefix)


def decode_rows(
    rows: _Table | Sequence[Packet],
    validator: Validator,
    recv_ms: int,
    device_prefix: str | None = None,
) -> tuple[BatchDelta, Counter[str]]:
    """A row batch (read by the C reader, or protobuf's packets): the aggregated delta of its
    accepted packets, and the refused ones by reason — the same result as the same packets
    sent as columns (`device_prefix` as for decode_columns)."""
    if not isinstance(rows, _Table):
        if not rows:
            return BatchDelta.empty(), Counter()
        # One list of protobuf's packet objects, so that each column pass reuses them.
        rows = _table_from_rows(list(rows))
    if rows.n == 0:
        return BatchDelta.empty(), Counter()
    return _validate_and_aggregate(rows, validator, recv_ms, device_prefix)


def _validate_and_aggregate(
    t: _Table, validator: Validator, recv_ms: int, device_prefix: str | None = None
) -> tuple[BatchDelta, Counter[str]]:
    # The validator's lock for what reads or grows its table, not for building the table
    # or aggregating: the entries kept stay valid once it is let go (see Known).
    with validator.lock:
        entries = validator.entries(t.device_ids)
        vocabs: list[Vocabulary | None] = list(map(_vocab, entries))
        code = _reason_codes(t, validator, recv_ms, device_prefix, vocabs)
        ok = code == 0
        if ok.any():
            _admit(t, validator, vocabs, code, ok)
            ok = code == 0
            entries = validator.known(t.device_ids, entries)
    rejected: Counter[str] = Counter()
    if not ok.all():
        counts = np.bincount(code, minlength=len(_REASONS) + 1)
        for c in np.flatnonzero(counts[1:]).tolist():
            rejected[str(_REASONS[c])] = int(counts[c + 1])
    if not ok.any():
        return BatchDelta.empty(), rejected
    return _aggregate(t, ok, recv_ms, entries), rejected


def _reason_codes(
    t: _Table,
    validator: Validator,
    recv_ms: int,
    device_prefix: str | None,
    vocabs: list[Vocabulary | None],
) -> npt.NDArray[np.uint8]:
    """Per packet: 0 if it passes the stateless checks, else its reason's code."""
    n, lim = t.n, validator.limits
    # Reason codes, later checks first so that the earliest failing check wins (the same
    # precedence as Validator.check for one packet). Lookup tables have one extra slot at
    # the end for index -1 (past the client's dictionary).
    code = np.zeros(n, dtype=np.uint8)
    if len(t.v_pos):
        code[t.v_pos[~np.isfinite(t.v_val)]] = _CODE[Reason.NON_FINITE_VALUE]
        bad_name = np.array([not validator.name_ok(x) for x in t.names], dtype=np.bool_)
        if bad_name.any():
            code[t.v_pos[bad_name[t.v_name]]] = _CODE[Reason.INVALID_VALUE_NAME]
        readings = np.bincount(t.v_pos, minlength=n)
        code[readings > lim.max_values_per_packet] = _CODE[Reason.TOO_MANY_VALUES]
    kind_code = np.array(
        [0 if validator.name_ok(k) else _CODE[Reason.INVALID_KIND] for k in t.kinds] + [_BAD_INDEX],
        dtype=np.uint8,
    )
    if kind_code.any():
        by_kind = kind_code[t.kind_idx]
        code = np.where(by_kind != 0, by_kind, code)
    if t.ts is not None:
        code[(t.ts < 0) | (t.ts > recv_ms + MAX_CLOCK_AHEAD_MS)] = _CODE[Reason.BAD_TIMESTAMP]
    if t.size is not None:
        code[t.size > lim.max_payload_bytes] = _CODE[Reason.PAYLOAD_TOO_LARGE]
    dev_code = _device_codes(t.device_ids, vocabs, validator, device_prefix)
    if dev_code.any():
        by_dev = dev_code[t.dev_idx]
        code = np.where(by_dev != 0, by_dev, code)
    return code


def _device_codes(
    device_ids: list[str],
    vocabs: list[Vocabulary | None],
    validator: Validator,
    prefix: str | None,
) -> npt.NDArray[np.uint8]:
    """Per distinct device of the batch (plus a last slot for an index past the client's
    dictionary): its refusal code, or 0. A device outside the token's prefix is refused
    before anything else is checked (it must not take a --max-devices slot). A device in
    the current generation (`vocabs`) is valid; the others' ids are checked together, one
    by one only if one of them is refused."""
    n = len(device_ids)
    codes = np.zeros(n + 1, dtype=np.uint8)
    codes[n] = _BAD_INDEX
    if prefix is not None:
        permitted = np.fromiter(map(str.startswith, device_ids, repeat(prefix)), np.bool_, n)
        codes[:n][~permitted] = _CODE[Reason.DEVICE_NOT_PERMITTED]
    if None not in vocabs:
        return codes  # every device known: nothing to check
    unknown = np.flatnonzero(np.fromiter(map(is_, vocabs, repeat(None)), np.bool_, n))
    unknown = unknown[codes[unknown] == 0].tolist()
    ids = list(map(device_ids.__getitem__, unknown))
    if not device_ids_ok(ids):
        reason = validator.device_reason
        codes[unknown] = [_CODE[r] if (r := reason(d)) else 0 for d in ids]
    return codes


def _aggregate(
    t: _Table, ok: npt.NDArray[np.bool_], recv_ms: int, entries: list[Known]
) -> BatchDelta:
    """The accepted packets (`ok`) as one delta: each device of the batch gets a row
    (numbered over the device index), and everything per packet is a bincount over those
    rows. The delta keeps the devices' validator `entries` (model.BatchDelta.keys)."""
    n, n_dev, n_kind = t.n, len(t.device_ids), len(t.kinds)
    positions = np.flatnonzero(ok)
    uniq, rows = number_keys(t.dev_idx[positions], n_dev)
    u = len(uniq)
    group = np.full(n, -1, dtype=np.int64)  # per packet: its device's row, -1 if refused
    group[positions] = rows
    packets = np.bincount(rows, minlength=u).astype(np.int64)
    if t.size is not None:
        # float64 sums are exact below 2**53 bytes per device and batch
        nbytes = np.bincount(rows, weights=t.size[positions], minlength=u).astype(np.int64)
    else:
        nbytes = np.zeros(u, dtype=np.int64)
    pairs, pair_numbers = number_keys(rows * n_kind + t.kind_idx[positions], u * n_kind)
    pair_counts = np.bincount(pair_numbers, minlength=len(pairs))
    values = _aggregate_values(t, group, u, recv_ms)
    # uniq is sorted: with every device of the batch accepted, it is all of them in order
    ids = t.device_ids
    if u == n_dev:
        kept, held = list(ids), entries
    else:
        rows_kept = uniq.tolist()
        kept, held = (
            list(map(ids.__getitem__, rows_kept)),
            list(map(entries.__getitem__, rows_kept)),
        )
    seen = np.full(u, recv_ms, dtype=np.int64)  # the batch's receive time, first and last
    return BatchDelta(
        device_ids=kept,
        packets=packets,
        nbytes=nbytes,
        first_seen=seen,
        last_seen=seen,
        kinds=t.kinds,
        kind_dev=pairs // n_kind,
        kind_idx=pairs % n_kind,
        kind_count=pair_counts.astype(np.int64),
        names=t.names,
        value_dev=values.dev,
        value_name=values.name,
        count=values.count,
        total=values.total,
        vmin=values.vmin,
        vmax=values.vmax,
        last=values.last,
        last_ts=values.last_ts,
        total_packets=int(packets.sum()),
        total_bytes=int(nbytes.sum()),
        keys=_keys(held),
    )


def _keys(held: list[Known]) -> Keys | None:
    """The batch's keys; None (the flush then numbers its devices by their ids) if one of
    them has no entry, which admission rules out: exactness does not rest on it."""
    if C_KEYS:
        keys = Keys(held, np.frombuffer(_addresses(held), dtype=np.int64))
    else:
        keys = Keys.of(held)
    return None if (keys.ids == id(UNKNOWN)).any() else keys


# Admission groups devices by the kinds and value names they use in a batch, as bit masks:
# up to this many distinct kinds (and names) in a batch; past it, one device at a time.
_MASK_BITS = 62


def _admit(
    t: _Table,
    validator: Validator,
    vocabs: list[Vocabulary | None],
    code: npt.NDArray[np.uint8],
    ok: npt.NDArray[np.bool_],
) -> None:
    """The stateful limits (devices, kinds and value names per device) for the devices of
    the batch with something new (not in the current generation, or a kind or value name
    not in their vocabulary); refusals are written into `code`. A device with nothing new
    is skipped: admit() would neither change nor refuse anything for it."""
    distinct = list(dict.fromkeys(vocabs))
    if None not in distinct and all(v.has(t.kinds, t.names) for v in distinct if v):
        return  # the steady state: every device known, nothing in the batch new to any
    used = _Used(t, ok)
    rows = _numbered(vocabs, distinct)
    need = np.zeros(len(t.device_ids), dtype=np.bool_)
    need[used.k_dev[_uncovered(distinct, rows[used.k_dev], used.k_item, t.kinds, "kinds")]] = True
    if len(used.n_dev):
        uncovered = _uncovered(distinct, rows[used.n_dev], used.n_item, t.names, "names")
        need[used.n_dev[uncovered]] = True
    if not need.any():
        return  # the steady state: every device known, nothing new
    needed = np.flatnonzero(need)
    if len(t.kinds) > _MASK_BITS or len(t.names) > _MASK_BITS:
        _admit_each(t, validator, code, used, needed)
        return
    rows = rows[needed]
    if None in distinct:
        missing = rows == distinct.index(None)
        needed, rows, distinct = _admit_devices(
            t, validator, code, used, needed, rows, distinct, missing
        )
    if len(needed):
        _admit_groups(
            t, validator, code, ok, used, needed, _group_keys(t, used, needed, rows), distinct
        )


class _Used:
    """What the batch's packets that passed so far (`ok`) use: (device, kind) per packet,
    (device, value name) per reading."""

    __slots__ = ("positions", "k_dev", "k_item", "n_dev", "n_item")

    def __init__(self, t: _Table, ok: npt.NDArray[np.bool_]) -> None:
        self.positions: IntArray = np.flatnonzero(ok)
        self.k_dev: IntArray = t.dev_idx[self.positions]
        self.k_item: IntArray = t.kind_idx[self.positions]
        self.n_dev: IntArray = _NO_INTS
        self.n_item: IntArray = _NO_INTS
        if len(t.v_pos):
            v_ok = ok[t.v_pos]
            self.n_dev = t.dev_idx[t.v_pos[v_ok]]
            self.n_item = t.v_name[v_ok]


def _numbered(vocabs: list[Vocabulary | None], distinct: list[Vocabulary | None]) -> IntArray:
    """Each device's number among the `distinct` vocabularies (a fleet's devices share a
    handful), in a C-level pass."""
    if len(distinct) == 1:
        return np.zeros(len(vocabs), dtype=np.int64)
    number = dict(zip(distinct, range(len(distinct)), strict=True))
    return np.fromiter(map(number.__getitem__, vocabs), np.int64, len(vocabs))


def _uncovered(
    distinct: list[Vocabulary | None], rows: IntArray, items: IntArray, entries: list[str],
    field: str,
) -> npt.NDArray[np.bool_]:  # fmt: skip
    """Per (vocabulary row, item) entry: True if the item (kind or value name) is not in
    that vocabulary, or there is none. Checked once per distinct pair."""
    width = len(entries)
    pairs, numbers = number_keys(rows * width + items, len(distinct) * width)
    missing = [
        (v := distinct[p // width]) is None or entries[p % width] not in getattr(v, field)
        for p in pairs.tolist()
    ]
    return np.array(missing, dtype=np.bool_)[numbers]


def _first_seen(t: _Table, used: _Used, devices: IntArray) -> IntArray:
    """These devices in order of their first packet that passed so far."""
    first = np.full(len(t.device_ids), t.n, dtype=np.int64)
    np.minimum.at(first, used.k_dev, used.positions)
    return devices[np.argsort(first[devices], kind="stable")]


def _admit_each(
    t: _Table, validator: Validator, code: npt.NDArray[np.uint8], used: _Used, needed: IntArray
) -> None:
    """admit() for each of these devices in order of first appearance (a batch with too many
    distinct kinds or value names to group its devices by)."""
    n_dev, n_kind, n_names = len(t.device_ids), len(t.kinds), len(t.names)
    kinds_of: dict[int, list[str]] = {}
    for key in number_keys(used.k_dev * n_kind + used.k_item, n_dev * n_kind)[0].tolist():
        kinds_of.setdefault(key // n_kind, []).append(t.kinds[key % n_kind])
    names_of: dict[int, list[str]] = {}
    for key in number_keys(used.n_dev * n_names + used.n_item, n_dev * n_names)[0].tolist():
        names_of.setdefault(key // n_names, []).append(t.names[key % n_names])
    ok = code == 0
    for d in _first_seen(t, used, needed).tolist():
        reason, refused_kinds, refused_names = validator.admit(
            t.device_ids[d], kinds_of.get(d, ()), names_of.get(d, ())
        )
        if reason is not None or refused_kinds or refused_names:
            mine = ok & (t.dev_idx == d)
            _refuse(t, code, mine, reason, refused_kinds, refused_names)


def _refuse(
    t: _Table,
    code: npt.NDArray[np.uint8],
    mine: npt.NDArray[np.bool_],
    reason: Reason | None,
    refused_kinds: AbstractSet[str],
    refused_names: AbstractSet[str],
) -> None:
    """Refusals of admission for the packets `mine` (rare, a limit was reached: full-length
    masks are fine here)."""
    if reason is not None:
        code[mine] = _CODE[reason]
        return
    for kind in refused_kinds:
        code[mine & (t.kind_idx == t.kinds.index(kind))] = _CODE[Reason.TOO_MANY_KINDS]
    for name in refused_names:
        j = t.names.index(name)
        hit = np.zeros(t.n, dtype=np.bool_)
        hit[t.v_pos[t.v_name == j]] = True
        code[mine & hit & (code == 0)] = _CODE[Reason.TOO_MANY_VALUE_NAMES]


def _admit_devices(
    t: _Table,
    validator: Validator,
    code: npt.NDArray[np.uint8],
    used: _Used,
    needed: IntArray,
    rows: IntArray,
    distinct: list[Vocabulary | None],
    missing: npt.NDArray[np.bool_],
) -> tuple[IntArray, IntArray, list[Vocabulary | None]]:
    """The `missing` ones of the needed devices (not in the current generation): moved up
    from the previous one, or new ones admitted while --max-devices has room, in order of
    first appearance (the others' packets are refused). Returns the needed devices left,
    their vocabularies' rows and the vocabularies (None: a new device's)."""
    found = validator.promote(list(map(t.device_ids.__getitem__, needed[missing].tolist())))
    found_distinct = list(dict.fromkeys(found))
    rows = rows.copy()
    rows[missing] = len(distinct) + _numbered(found, found_distinct)
    distinct = distinct + found_distinct
    new = needed[missing][np.fromiter(map(is_, found, repeat(None)), np.bool_, len(found))]
    room = validator.room
    if len(new) <= room:
        return needed, rows, distinct
    refused = _first_seen(t, used, new)[room:]
    mine = np.zeros(len(t.device_ids) + 1, dtype=np.bool_)
    mine[refused] = True
    code[(code == 0) & mine[t.dev_idx]] = _CODE[Reason.TOO_MANY_DEVICES]
    keep = ~mine[needed]
    return needed[keep], rows[keep], distinct


def _group_keys(
    t: _Table, used: _Used, needed: IntArray, rows: IntArray
) -> tuple[list[tuple[int, int, int]], IntArray, IntArray]:
    """The needed devices grouped by (vocabulary row, kinds used, value names used), the
    last two as bit masks over the batch's dictionaries: the distinct groups, and the
    needed devices' positions in group order with the bounds between groups."""
    n_dev = len(t.device_ids)
    kmask = np.zeros(n_dev, dtype=np.int64)
    np.bitwise_or.at(kmask, used.k_dev, np.left_shift(1, used.k_item))
    nmask = np.zeros(n_dev, dtype=np.int64)
    np.bitwise_or.at(nmask, used.n_dev, np.left_shift(1, used.n_item))
    kinds_used, k_num = number_keys(kmask[needed], 1 << len(t.kinds))
    names_used, n_num = number_keys(nmask[needed], 1 << len(t.names))
    a, b = len(kinds_used), len(names_used)
    keys, which = number_keys((rows * a + k_num) * b + n_num, (int(rows.max()) + 1) * a * b)
    groups = [
        (key // (a * b), int(kinds_used[key // b % a]), int(names_used[key % b]))
        for key in keys.tolist()
    ]
    order = np.argsort(which, kind="stable")
    return groups, order, np.cumsum(np.bincount(which, minlength=len(keys)))[:-1]


def _admit_groups(
    t: _Table,
    validator: Validator,
    code: npt.NDArray[np.uint8],
    ok: npt.NDArray[np.bool_],
    used: _Used,
    needed: IntArray,
    grouped: tuple[list[tuple[int, int, int]], IntArray, IntArray],
    distinct: list[Vocabulary | None],
) -> None:
    """Admission for devices grouped by (vocabulary, kinds used, value names used): what one
    device of a group is admitted, every device of it is (Validator.extend)."""
    groups, order, bounds = grouped
    for (row, km, nm), members in zip(groups, np.split(needed[order], bounds), strict=True):
        kinds = [k for j, k in enumerate(t.kinds) if km >> j & 1]
        names = [x for j, x in enumerate(t.names) if nm >> j & 1]
        vocab, refused_kinds, refused_names = validator.extend(distinct[row], kinds, names)
        validator.settle(list(map(t.device_ids.__getitem__, members.tolist())), vocab)
        if refused_kinds or refused_names:
            in_group = np.zeros(len(t.device_ids) + 1, dtype=np.bool_)
            in_group[members] = True
            _refuse(t, code, ok & in_group[t.dev_idx], None, refused_kinds, refused_names)


@dataclass(slots=True, kw_only=True)
class _ValueColumns:
    """The statistics of a batch's readings, one entry per (device row, value name)."""

    dev: IntArray
    name: IntArray
    count: IntArray
    total: FloatArray
    vmin: FloatArray
    vmax: FloatArray
    last: FloatArray
    last_ts: IntArray


_NO_VALUES = _ValueColumns(
    dev=_NO_INTS,
    name=_NO_INTS,
    count=_NO_INTS,
    total=_NO_FLOATS,
    vmin=_NO_FLOATS,
    vmax=_NO_FLOATS,
    last=_NO_FLOATS,
    last_ts=_NO_INTS,
)


def _aggregate_values(t: _Table, group: IntArray, u: int, recv_ms: int) -> _ValueColumns:
    """count/sum/min/max/last per (device row, value name) over the accepted readings."""
    n_names = len(t.names)
    if not len(t.v_pos):
        return _NO_VALUES
    owner = group[t.v_pos]
    sel = owner >= 0  # readings of accepted packets
    if not sel.any():
        return _NO_VALUES
    x = t.v_val[sel]
    # one slot per (device row, value name) present
    slot_keys, dense = number_keys(owner[sel] * n_names + t.v_name[sel], u * n_names)
    slots = len(slot_keys)
    count = np.bincount(dense, minlength=slots)
    total = np.bincount(dense, weights=x, minlength=slots)  # sequential: packet order
    vmin = np.full(slots, np.inf)
    vmax = np.full(slots, -np.inf)
    np.minimum.at(vmin, dense, x)
    np.maximum.at(vmax, dense, x)
    # "last": the newest device timestamp wins; among equal timestamps, the later packet
    if t.ts is None:  # every packet at receive time: simply the latest reading
        last_at = np.zeros(slots, dtype=np.int64)
        np.maximum.at(last_at, dense, np.arange(len(dense)))
        last, last_ts = x[last_at], np.full(slots, recv_ms, dtype=np.int64)
    else:
        ts = t.ts[t.v_pos[sel]]
        ts = np.where(ts == 0, recv_ms, ts)
        ends = latest_of_newest(dense, slots, ts)
        last, last_ts = x[ends], ts[ends]
    return _ValueColumns(
        dev=slot_keys // n_names,
        name=slot_keys % n_names,
        count=count.astype(np.int64),
        total=total.astype(np.float64),
        vmin=vmin,
        vmax=vmax,
        last=last.astype(np.float64),
        last_ts=last_ts,
    )


@dataclass(slots=True)
class Records:
    """Packets gathered by a receiver that is not protobuf rows (OTLP, HTTP JSON), one list
    entry per packet and one per reading, in packet order: the same columns a batch has."""

    device_ids: list[str]
    kinds: list[str]
    sizes: list[int]  # payload bytes
    ts: list[int]  # device clock in ms, 0 = receive time
    v_pos: list[int]  # per reading: its packet (index into the lists above)
    v_names: list[str]
    v_vals: list[float]

    @classmethod
    def new(cls) -> Records:
        return cls([], [], [], [], [], [], [])

    def __len__(self) -> int:
        return len(self.device_ids)


# A receiver that builds the columns itself (OTLP's C reader) hands over a table: one
# entry per packet in dev_idx/kind_idx/size/ts, one per reading in v_pos/v_name/v_val.
PacketTable = _Table


def compact(entries: Sequence[str], index: IntArray) -> tuple[list[str], IntArray]:
    """A dictionary cut down to the entries `index` uses, in order of first use (as
    _encode would have built it from the used entries alone), and the index re-pointed."""
    used, first = np.unique(index, return_index=True)
    order = used[np.argsort(first, kind="stable")]
    remap = np.zeros(len(entries), dtype=np.int64)
    remap[order] = np.arange(len(order), dtype=np.int64)
    return [entries[i] for i in order.tolist()], remap[index]


def dictionary(entries: Sequence[str], index: IntArray) -> tuple[list[str], IntArray]:
    """A dictionary whose entries may repeat, made distinct (first appearance) and the
    index re-pointed (see _dictionary)."""
    return _dictionary(entries, index)


def decode_records(
    records: Records | PacketTable,
    validator: Validator,
    recv_ms: int,
    device_prefix: str | None = None,
) -> tuple[BatchDelta, Counter[str]]:
    """A receiver's packets: the aggregated delta of the accepted ones and the refused ones
    by reason, through the same validation and aggregation as a batch (`device_prefix` as
    for decode_columns)."""
    if isinstance(records, _Table):
        if records.n == 0:
            return BatchDelta.empty(), Counter()
        return _validate_and_aggregate(records, validator, recv_ms, device_prefix)
    n = len(records)
    if n == 0:
        return BatchDelta.empty(), Counter()
    device_ids, dev_idx = _encode(records.device_ids)
    kinds, kind_idx = _encode(records.kinds, empty_as=UNSPECIFIED_KIND)
    size = np.array(records.sizes, dtype=np.int64)
    ts = np.array(records.ts, dtype=np.int64)
    if records.v_names:
        names, v_name = _encode(records.v_names)
        v_pos = np.array(records.v_pos, dtype=np.int64)
        v_val = np.array(records.v_vals, dtype=np.float64)
    else:
        names, v_name, v_pos, v_val = [], _NO_INTS, _NO_INTS, _NO_FLOATS
    table = packed_table(
        n, device_ids, dev_idx, kinds, kind_idx, size, ts, names, v_pos, v_name, v_val
    )
    return _validate_and_aggregate(table, validator, recv_ms, device_prefix)
