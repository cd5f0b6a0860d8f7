"""The aggregator: folds validated packets into per-device deltas in memory."""

from __future__ import annotations

import logging
from collections.abc import Callable

from rtmonitor.pipeline.queue import PacketQueue
from rtmonitor.pipeline.work import CommitTracker, Work
from rtmonitor.storage.model import DeviceDelta, FlushDelta, ValueStats

logger = logging.getLogger(__name__)


class Aggregator:
    """Keeps the deltas of the current flush interval; the flusher takes them with swap().

    聚合的意义：同一设备在一个刷新周期内的 N 个包，在内存里合并成一条增量，
    写 Redis 时只需一次（流水线化的）脚本调用，而不是 N 次往返。
    """

    def __init__(self) -> None:
        self._delta = FlushDelta()
        self._trackers: dict[CommitTracker, int] = {}

    @property
    def pending_packets(self) -> int:
        """Packets folded in since the last swap()."""
        return self._delta.packets

    @property
    def pending_devices(self) -> int:
        return len(self._delta.devices)

    def add(self, work: Work) -> None:
        """Fold one queue item into the current delta."""
        delta = self._delta
        devices = delta.devices
        recv = work.recv_ms
        nbytes_total = 0
        for device_id, kind, nbytes, ts, values in work.rows:
            dev = devices.get(device_id)
            if dev is None:
                dev = devices[device_id] = DeviceDelta(first_seen=recv, last_seen=recv)
            elif recv > dev.last_seen:
                dev.last_seen = recv
            elif recv < dev.first_seen:
                dev.first_seen = recv
            dev.packets += 1
            dev.bytes += nbytes
            nbytes_total += nbytes
            kinds = dev.kinds
            kinds[kind] = kinds.get(kind, 0) + 1
            if values:
                stats = dev.values
                for name, value in values.items():
                    s = stats.get(name)
                    if s is None:
                        stats[name] = ValueStats(1, value, value, value, value, ts)
                        continue
                    s.count += 1
                    s.sum += value
                    if value < s.min:
                        s.min = value
                    if value > s.max:
                        s.max = value
                    if ts >= s.last_ts:  # the newest reading wins; ties go to the later arrival
                        s.last = value
                        s.last_ts = ts
        delta.packets += len(work.rows)
        delta.bytes += nbytes_total
        trackers = self._trackers
        trackers[work.tracker] = trackers.get(work.tracker, 0) + 1

    def count_rejected(self, reason: str, packets: int = 1) -> None:
        """Record rejected packets so that they are counted in Redis too, by reason."""
        self._delta.rejected[reason] += packets

    def swap(self) -> tuple[FlushDelta, dict[CommitTracker, int]]:
        """Take the current delta and its trackers; start a new, empty one."""
        delta, trackers = self._delta, self._trackers
        self._delta, self._trackers = FlushDelta(), {}
        return delta, trackers

    async def consume(
        self, queue: PacketQueue[Work], flush_max_packets: int, on_full: Callable[[], None]
    ) -> None:
        """Drain `queue` into the delta until it is closed and empty."""
        while True:
            items = await queue.get_all()
            if not items:
                return
            for work in items:
                self.add(work)
            if self._delta.packets >= flush_max_packets:
                on_full()
