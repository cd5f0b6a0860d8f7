"""Columnar batches: decode, validate and aggregate with numpy — per-batch work in C.

A `Columns` message carries packed little-endian arrays; `np.frombuffer` reads them without
copying. Validation runs on whole columns (masks) and on the dictionaries (each distinct
device id, kind and value name is checked once per batch, not once per packet). The result
is the batch's FlushDelta, exactly what folding the same packets one by one would give:
counts and sums accumulate in packet order (np.bincount), min/max/last by sorting.

列式批次：逐包的 Python 循环换成整列的 numpy 运算（掩码、bincount、排序），
Python 只对“本批出现的不同设备/kind/数值名”循环——每批的工作在 C 里完成。
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import numpy.typing as npt

from rtmonitor.ingest.v1.telemetry_pb2 import Columns
from rtmonitor.ingest.validation import (
    UNSPECIFIED_KIND,
    Reason,
    Validator,
    device_id_reason,
    name_ok,
)
from rtmonitor.storage.model import DeviceDelta, FlushDelta, ValueStats

_MAX_CLOCK_AHEAD_MS = 24 * 3600 * 1000
# Reason codes in the per-packet code array; 0 = accepted.
_REASONS: list[Reason] = list(Reason)
_CODE = {reason: i + 1 for i, reason in enumerate(_REASONS)}
IntArray = npt.NDArray[np.int64]


class ColumnsError(ValueError):
    """The columns are inconsistent (wrong lengths): the whole batch is refused."""


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


def decode_columns(
    cols: Columns, validator: Validator, recv_ms: int
) -> tuple[FlushDelta, Counter[str]]:
    """The aggregated delta of the accepted packets, and the refused ones by reason.

    Raises ColumnsError if the message itself is inconsistent.
    """
    n = cols.count
    delta = FlushDelta()
    rejected: Counter[str] = Counter()
    if n == 0:
        if cols.device_index or cols.values:
            raise ColumnsError("columns carry data but count is 0")
        return delta, rejected
    lim = validator.limits
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

    device_ids = list(cols.device_ids)
    kinds = list(cols.kinds) or [UNSPECIFIED_KIND]
    if kind_col is None and len(kinds) != 1:
        raise ColumnsError("kind_index is empty but there are several kinds")

    # Reason codes, later checks first so that the earliest failing check wins (the same
    # precedence as Validator.check for one packet).
    code = np.zeros(n, dtype=np.uint8)

    def mark(mask: npt.NDArray[np.bool_], reason: Reason) -> None:
        code[mask] = _CODE[reason]

    present: list[npt.NDArray[np.bool_]] = []
    for name, values in value_cols:
        if values is None:
            present.append(np.zeros(n, dtype=np.bool_))
            continue
        has = ~np.isnan(values)
        present.append(has)
        mark(has & ~np.isfinite(values), Reason.NON_FINITE_VALUE)
        if not name_ok(name):
            mark(has, Reason.INVALID_VALUE_NAME)
    if present:
        per_packet = np.sum(present, axis=0)
        mark(per_packet > lim.max_values_per_packet, Reason.TOO_MANY_VALUES)
    kind_reason = np.array(
        [0] + [0 if name_ok(k) else _CODE[Reason.INVALID_KIND] for k in kinds], dtype=np.uint8
    )
    if kind_col is None:
        kind_idx = np.zeros(n, dtype=np.int64)
    else:
        kind_idx = kind_col.astype(np.int64)
        out_of_range = kind_idx >= len(kinds)
        kind_idx[out_of_range] = 0
        k_codes = kind_reason[kind_idx + 1]
        code[k_codes != 0] = k_codes[k_codes != 0]
        mark(out_of_range, Reason.INVALID_COLUMN_INDEX)
    if kind_col is None and kind_reason[1]:
        code[:] = kind_reason[1]
    if ts_col is None:
        ts = np.full(n, recv_ms, dtype=np.int64)
    else:
        ts = np.where(ts_col == 0, recv_ms, ts_col)
        mark((ts_col < 0) | (ts_col > recv_ms + _MAX_CLOCK_AHEAD_MS), Reason.BAD_TIMESTAMP)
    if size_col is not None:
        mark(size_col > lim.max_payload_bytes, Reason.PAYLOAD_TOO_LARGE)
    dev_reason = np.array(
        [0] + [_CODE[r] if (r := device_id_reason(d)) else 0 for d in device_ids],
        dtype=np.uint8,
    )
    dev_idx = dev_col.astype(np.int64)
    bad_index = dev_idx >= len(device_ids)
    dev_idx[bad_index] = -1
    d_codes = dev_reason[dev_idx + 1]
    code[d_codes != 0] = d_codes[d_codes != 0]
    mark(bad_index, Reason.INVALID_COLUMN_INDEX)

    # Stateful limits, once per distinct device of the batch (in order of first appearance).
    # Everything per packet is a bincount over small dense indexes (O(n), no sorting); the
    # Python loop runs once per distinct device, and masks are built only to refuse.
    n_dev, n_kind = len(device_ids), len(kinds)
    ok = code == 0
    if ok.any():
        d_ok, k_ok = dev_idx[ok], kind_idx[ok]
        kind_pairs = np.bincount(d_ok * n_kind + k_ok, minlength=n_dev * n_kind)
        kinds_of = kind_pairs.reshape(n_dev, n_kind) > 0
        names_of = [np.bincount(dev_idx[ok & has], minlength=n_dev) > 0 for has in present]
        positions = np.flatnonzero(ok)
        _, first = np.unique(d_ok, return_index=True)
        for d in d_ok[np.sort(first)].tolist():
            reason, refused_kinds, refused_names = validator.admit(
                device_ids[d],
                [kinds[k] for k in np.flatnonzero(kinds_of[d]).tolist()],
                [names[j] for j in range(len(names)) if names_of[j][d]],
            )
            if reason is None and not refused_kinds and not refused_names:
                continue
            mine = np.zeros(n, dtype=np.bool_)
            mine[positions[d_ok == d]] = True
            if reason is not None:
                code[mine] = _CODE[reason]
                continue
            for k in refused_kinds:
                code[mine & (kind_idx == kinds.index(k))] = _CODE[Reason.TOO_MANY_KINDS]
            for name in refused_names:
                j = names.index(name)
                code[mine & present[j] & (code == 0)] = _CODE[Reason.TOO_MANY_VALUE_NAMES]
        ok = code == 0

    if not ok.all():
        counts = np.bincount(code, minlength=len(_REASONS) + 1)
        for c in np.flatnonzero(counts[1:]):
            rejected[str(_REASONS[c])] = int(counts[c + 1])
    if not ok.any():
        return delta, rejected

    # Aggregation of the accepted packets, per distinct device: bincount over the device
    # index (dense, small), then a lookup table from device index to its row.
    positions = np.flatnonzero(ok)
    d_ok = dev_idx[positions]
    packets_by_dev = np.bincount(d_ok, minlength=n_dev)
    uniq = np.flatnonzero(packets_by_dev)
    u = len(uniq)
    lut = np.zeros(n_dev, dtype=np.int64)
    lut[uniq] = np.arange(u)
    inv = lut[d_ok]
    packets = packets_by_dev[uniq]
    if size_col is not None:
        # float64 sums are exact below 2**53 bytes per device and batch
        nbytes = np.bincount(inv, weights=size_col[positions], minlength=u).astype(np.int64)
    else:
        nbytes = np.zeros(u, dtype=np.int64)
    k_ok = kind_idx[positions]
    pair_counts = np.bincount(inv * n_kind + k_ok, minlength=u * n_kind)
    devices = [DeviceDelta(int(packets[i]), int(nbytes[i]), recv_ms, recv_ms) for i in range(u)]
    for p in np.flatnonzero(pair_counts).tolist():
        devices[p // n_kind].kinds[kinds[p % n_kind]] = int(pair_counts[p])
    ts_ok = ts[positions]
    same_ts = ts_col is None  # every packet at receive time: "last" is the last packet
    for j, (name, values) in enumerate(value_cols):
        if values is None:
            continue
        sel = present[j][positions]
        if not sel.any():
            continue
        di = inv[sel]
        x = values[positions][sel]
        count = np.bincount(di, minlength=u)
        total = np.bincount(di, weights=x, minlength=u)  # sequential: packet order
        vmin = np.full(u, np.inf)
        vmax = np.full(u, -np.inf)
        np.minimum.at(vmin, di, x)
        np.maximum.at(vmax, di, x)
        if same_ts:
            last_pos = np.zeros(u, dtype=np.int64)
            np.maximum.at(last_pos, di, np.arange(len(di)))  # the last packet per device
            last = x[last_pos]
            last_ts = np.full(u, recv_ms, dtype=np.int64)
        else:
            # newest device timestamp wins; among equal timestamps, the later packet
            t = ts_ok[sel]
            by_time = np.lexsort((np.arange(len(di)), t, di))
            ends = np.r_[np.flatnonzero(np.diff(di[by_time])), len(di) - 1]
            groups = di[by_time][ends]
            last = np.zeros(u)
            last_ts = np.zeros(u, dtype=np.int64)
            last[groups] = x[by_time][ends]
            last_ts[groups] = t[by_time][ends]
        for g in np.flatnonzero(count).tolist():
            devices[g].values[name] = ValueStats(
                int(count[g]),
                float(total[g]),
                float(vmin[g]),
                float(vmax[g]),
                float(last[g]),
                int(last_ts[g]),
            )
    for i, d in enumerate(uniq.tolist()):
        delta.devices[device_ids[d]] = devices[i]
    delta.packets = int(packets.sum())
    delta.bytes = int(nbytes.sum())
    return delta, rejected
