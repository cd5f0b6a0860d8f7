"""What the storage room writes: one flush worth of per-device deltas."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


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
