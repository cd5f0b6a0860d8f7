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


def _copy_device(dev: DeviceDelta) -> DeviceDelta:
    return DeviceDelta(
        dev.packets,
        dev.bytes,
        dev.first_seen,
        dev.last_seen,
        dict(dev.kinds),
        {
            name: ValueStats(s.count, s.sum, s.min, s.max, s.last, s.last_ts)
            for name, s in dev.values.items()
        },
    )


def merge_into(target: FlushDelta, source: FlushDelta) -> None:
    """Add `source` to `target` exactly (min/max kept, newest `last` wins); `source` is
    left untouched, so it can be merged again elsewhere."""
    target.packets += source.packets
    target.bytes += source.bytes
    target.rejected.update(source.rejected)
    devices = target.devices
    for device_id, src in source.devices.items():
        dev = devices.get(device_id)
        if dev is None:
            devices[device_id] = _copy_device(src)
            continue
        dev.packets += src.packets
        dev.bytes += src.bytes
        dev.first_seen = min(dev.first_seen, src.first_seen)
        dev.last_seen = max(dev.last_seen, src.last_seen)
        kinds = dev.kinds
        for kind, count in src.kinds.items():
            kinds[kind] = kinds.get(kind, 0) + count
        for name, s in src.values.items():
            t = dev.values.get(name)
            if t is None:
                dev.values[name] = ValueStats(s.count, s.sum, s.min, s.max, s.last, s.last_ts)
                continue
            t.count += s.count
            t.sum += s.sum
            t.min = min(t.min, s.min)
            t.max = max(t.max, s.max)
            if s.last_ts >= t.last_ts:
                t.last, t.last_ts = s.last, s.last_ts


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
        devices = target.devices
        recv = self.recv_ms
        rows: list[DeviceDelta] = []
        for device_id, packets, nbytes in zip(
            self.device_ids, self.packets.tolist(), self.nbytes.tolist(), strict=True
        ):
            dev = devices.get(device_id)
            if dev is None:
                dev = devices[device_id] = DeviceDelta(packets, nbytes, recv, recv)
            else:
                dev.packets += packets
                dev.bytes += nbytes
                dev.first_seen = min(dev.first_seen, recv)
                dev.last_seen = max(dev.last_seen, recv)
            rows.append(dev)
        kinds = self.kinds
        for row, k, count in zip(
            self.kind_dev.tolist(), self.kind_idx.tolist(), self.kind_count.tolist(), strict=True
        ):
            of = rows[row].kinds
            of[kinds[k]] = of.get(kinds[k], 0) + count
        names = self.names
        for row, j, c, tot, lo, hi, la, lt in zip(
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
            stats = rows[row].values
            t = stats.get(names[j])
            if t is None:
                stats[names[j]] = ValueStats(c, tot, lo, hi, la, lt)
                continue
            t.count += c
            t.sum += tot
            t.min = min(t.min, lo)
            t.max = max(t.max, hi)
            if lt >= t.last_ts:
                t.last, t.last_ts = la, lt

    def to_flush_delta(self) -> FlushDelta:
        delta = FlushDelta()
        self.merge_into(delta)
        return delta
