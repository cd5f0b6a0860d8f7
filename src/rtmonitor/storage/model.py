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
