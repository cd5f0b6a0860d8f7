"""Packs a flush's device deltas into the binary form MERGE_DEVICES reads (scripts.py), with
numpy: a few array passes per flush instead of a struct.pack per device, kind and reading.

A device's delta is, little-endian and byte for byte what `struct.pack` would make:
  <ddddHH   packets, bytes, first_seen, last_seen, nkinds, nvalues
  then      (name \\0 <d) per kind                 its count
            (name \\0 <dddddd) per value name       count, sum, min, max, last, last_ts
The sizes of every piece are known from the columns, so each device's offset in one buffer
is a cumulative sum, and every piece is written by one scatter per kind of piece (a memcpy
per piece in storage/_pack.c; numpy's indexing if it was not compiled).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from rtmonitor.model import BatchDelta, IntArray

_c_scatter: Callable[..., None] | None
try:  # one memcpy per piece (storage/_pack.c); numpy's fancy indexing without a compiler
    from rtmonitor.storage._pack import scatter as _c_scatter
except ImportError:  # pragma: no cover - a build without a C compiler
    _c_scatter = None
C_PACK = _c_scatter is not None

_HEAD = np.dtype(
    [("p", "<f8"), ("b", "<f8"), ("f", "<f8"), ("l", "<f8"), ("nk", "<u2"), ("nv", "<u2")]
)
HEAD_SIZE = _HEAD.itemsize  # 36: struct "<ddddHH"
_KIND_NUMBERS = 8
_VALUE_NUMBERS = 48
_Bytes = npt.NDArray[np.uint8]


def pack_deltas(delta: BatchDelta, order: IntArray) -> tuple[bytes, IntArray]:
    """The deltas of the devices `order` lists (rows of `delta`), one after the other, and
    each one's start in that buffer (plus its end: len(order) + 1 offsets).

    `delta` may list a device's kinds and readings anywhere (a stable sort groups them);
    within a device they keep their order."""
    n = len(delta.device_ids)
    kind_dev, kind_at = _grouped(delta.kind_dev)
    value_dev, value_at = _grouped(delta.value_dev)
    kind_names = [k.encode() for k in delta.kinds]
    value_names = [v.encode() for v in delta.names]
    klen = _lengths(kind_names)
    vlen = _lengths(value_names)
    kind_idx = delta.kind_idx[kind_at]
    value_name = delta.value_name[value_at]
    kind_size = klen[kind_idx] + 1 + _KIND_NUMBERS
    value_size = vlen[value_name] + 1 + _VALUE_NUMBERS
    kinds_bytes = np.bincount(kind_dev, weights=kind_size, minlength=n).astype(np.int64)
    values_bytes = np.bincount(value_dev, weights=value_size, minlength=n).astype(np.int64)
    size = (HEAD_SIZE + kinds_bytes + values_bytes)[order]
    offsets = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(size, out=offsets[1:])
    start = np.zeros(n, dtype=np.int64)
    start[order] = offsets[:-1]
    buf = np.zeros(int(offsets[-1]), dtype=np.uint8)

    head = np.empty(n, dtype=_HEAD)
    head["p"], head["b"] = delta.packets, delta.nbytes
    head["f"], head["l"] = delta.first_seen, delta.last_seen
    head["nk"] = np.bincount(kind_dev, minlength=n)
    head["nv"] = np.bincount(value_dev, minlength=n)
    _scatter(buf, start[order], head[order].view(np.uint8).reshape(-1, HEAD_SIZE))

    # Each entry's place: its device's start, past the head (and the kinds, for readings),
    # plus the entries of its device before it.
    at = start[kind_dev] + HEAD_SIZE + _within(kind_dev, kind_size, n)
    _names(buf, at, kind_idx, kind_names, klen)
    counts = delta.kind_count[kind_at].astype("<f8")
    _scatter(buf, at + klen[kind_idx] + 1, counts.view(np.uint8).reshape(-1, _KIND_NUMBERS))

    at = start[value_dev] + HEAD_SIZE + kinds_bytes[value_dev]
    at += _within(value_dev, value_size, n)
    _names(buf, at, value_name, value_names, vlen)
    numbers = np.empty((len(value_dev), 6), dtype="<f8")
    numbers[:, 0] = delta.count[value_at]
    numbers[:, 1] = delta.total[value_at]
    numbers[:, 2] = delta.vmin[value_at]
    numbers[:, 3] = delta.vmax[value_at]
    numbers[:, 4] = delta.last[value_at]
    numbers[:, 5] = delta.last_ts[value_at]
    _scatter(buf, at + vlen[value_name] + 1, numbers.view(np.uint8).reshape(-1, _VALUE_NUMBERS))
    return buf.tobytes(), offsets


def _grouped(dev: IntArray) -> tuple[IntArray, IntArray]:
    """Entries grouped by device (a stable sort unless they already are): the devices in
    that order, and the entries' positions."""
    at = np.arange(len(dev), dtype=np.int64)
    if len(dev) > 1 and bool((dev[1:] < dev[:-1]).any()):
        at = np.argsort(dev, kind="stable")
    return dev[at], at


def _lengths(names: list[bytes]) -> IntArray:
    return np.fromiter(map(len, names), dtype=np.int64, count=len(names))


def _within(dev: IntArray, size: IntArray, n: int) -> IntArray:
    """For entries grouped by device: the bytes of the same device's entries before each."""
    before = np.cumsum(size) - size  # over all entries
    per_device = np.bincount(dev, weights=size, minlength=n).astype(np.int64)
    first = np.cumsum(per_device) - per_device  # where each device's entries begin
    within: IntArray = before - first[dev]
    return within


def _scatter(buf: _Bytes, at: IntArray, rows: _Bytes) -> None:
    """Write row i of `rows` at buf[at[i]:]."""
    if not len(at):
        return
    if _c_scatter is not None:
        _c_scatter(buf, _int64(at), np.ascontiguousarray(rows), rows.shape[1])
    else:  # (an index of 8 bytes per byte written)
        buf[at[:, None] + np.arange(rows.shape[1])] = rows


def _int64(a: IntArray) -> IntArray:
    return np.ascontiguousarray(a, dtype=np.int64)


def _names(
    buf: _Bytes, at: IntArray, which: IntArray, names: list[bytes], lengths: IntArray
) -> None:
    """Write names[which[i]] at buf[at[i]:] (the zero after it is already there)."""
    if not len(at):
        return
    width = int(lengths.max())
    table = np.zeros((len(names), width), dtype=np.uint8)
    for i, name in enumerate(names):
        table[i, : len(name)] = np.frombuffer(name, dtype=np.uint8)
    if _c_scatter is not None:
        _c_scatter(buf, _int64(at), table[which], width, _int64(lengths[which]))
        return
    inside = np.arange(width) < lengths[which][:, None]
    buf[(at[:, None] + np.arange(width))[inside]] = table[which][inside]
