"""What the storage room writes: one flush worth of per-device deltas."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


@dataclass(slots=True)
class ValueStats:
    """Statistics of one named reading of one device over one flush."""

    count: int
    sum: float
    min: float
    max: float
    last: float
    last_ts: int  # device timestamp (ms) of `last`; the newest reading wins on merge


@dataclass(slots=True)
class DeviceDelta:
    """Everything one device added during one flush interval."""

    packets: int = 0
    bytes: int = 0
    first_seen: int = 0  # receive time, ms since the epoch
    last_seen: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    values: dict[str, ValueStats] = field(default_factory=dict)


@dataclass(slots=True)
class FlushDelta:
    """The unit of one commit to Redis: all devices' deltas plus rejections."""

    devices: dict[str, DeviceDelta] = field(default_factory=dict)
    rejected: Counter[str] = field(default_factory=Counter)
    packets: int = 0
    bytes: int = 0

    def __bool__(self) -> bool:
        return bool(self.devices or self.rejected)


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
        dev = devices[device_id] = DeviceDelta(packets, nbytes, first_seen, last_seen)
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
        stats[name] = ValueStats(count, total, lo, hi, last, last_ts)
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


@dataclass(slots=True)
class BatchDelta:
    """One batch's counts kept as columns until its flush: ~150 bytes per device instead of
    ~1 KB of DeviceDelta/ValueStats objects. A pending batch stays separate until the flush
    knows it is not a resend, so with batches spread over many devices this is what the
    pending memory is made of. Entries are in the order the aggregation produced them."""

    device_ids: list[str]
    packets: npt.NDArray[np.int64]  # per device
    nbytes: npt.NDArray[np.int64]
    recv_ms: int
    kinds: list[str]
    kind_dev: npt.NDArray[np.int64]  # per (device, kind): row in device_ids
    kind_idx: npt.NDArray[np.int64]  # index into kinds
    kind_count: npt.NDArray[np.int64]
    names: list[str]
    value_dev: npt.NDArray[np.int64]  # per (device, value name)
    value_name: npt.NDArray[np.int64]
    count: npt.NDArray[np.int64]
    total: npt.NDArray[np.float64]
    vmin: npt.NDArray[np.float64]
    vmax: npt.NDArray[np.float64]
    last: npt.NDArray[np.float64]
    last_ts: npt.NDArray[np.int64]
    total_packets: int
    total_bytes: int

    @property
    def entries(self) -> int:
        return len(self.device_ids)

    def merge_into(self, target: FlushDelta) -> None:
        """Add this batch to `target`, exactly as merge_into() adds a FlushDelta."""
        target.packets += self.total_packets
        target.bytes += self.total_bytes
        devices, recv = target.devices, self.recv_ms
        rows = [
            _device(devices, device_id, packets, nbytes, recv, recv)
            for device_id, packets, nbytes in zip(
                self.device_ids, self.packets.tolist(), self.nbytes.tolist(), strict=True
            )
        ]
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
