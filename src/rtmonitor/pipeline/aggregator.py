"""The aggregator: folds validated packets into per-device deltas in memory."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from rtmonitor.model import (
    MERGE_ENTRIES,
    BatchDelta,
    BatchId,
    DeviceDelta,
    FlushDelta,
    Row,
    ValueStats,
    reduce_batches,
)
from rtmonitor.pipeline.queue import PacketQueue
from rtmonitor.pipeline.work import BatchWork, CommitTracker, RowsWork, Work

logger = logging.getLogger(__name__)

# After a small take the aggregator waits this long, so that per-packet streams hand over
# a few packets per wake-up instead of one (each packet's item was taken before the next
# arrived).
_LINGER_S = 0.001
_LINGER_BELOW_PACKETS = 256


@dataclass(slots=True)
class PendingBatch:
    """A batch with an id, kept apart (in its compact column form) until its flush knows it
    is not a resend."""

    batch_id: BatchId
    parts: tuple[BatchDelta, ...]
    tracker: CommitTracker
    packets: int = field(init=False)
    entries: int = field(init=False)  # per-device deltas: what the pending budget counts

    def __post_init__(self) -> None:
        self.packets = sum(p.total_packets for p in self.parts)
        self.entries = sum(p.entries for p in self.parts)

    def release(self) -> None:
        """Let the columns go once a prepared write holds what they add (the counts stay,
        for the ack and the stats)."""
        self.parts = ()


def fold(delta: FlushDelta, rows: list[Row], recv: int) -> None:
    """Add validated rows (received at `recv` ms) to `delta`."""
    devices = delta.devices
    nbytes_total = 0
    for device_id, kind, nbytes, ts, values in rows:
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
                    stats[name] = ValueStats(
                        count=1, sum=value, min=value, max=value, last=value, last_ts=ts
                    )
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
    delta.packets += len(rows)
    delta.bytes += nbytes_total


class Aggregator:
    """Keeps the deltas of the current flush interval; the flusher takes them with swap().

    A device's packets of one interval become one delta, so a flush costs Redis one
    (pipelined) script call per device, not a round trip per packet. Batches with an id are
    kept apart until the flush knows they are not resends.
    """

    def __init__(self) -> None:
        self._delta = FlushDelta()
        self._trackers: dict[CommitTracker, int] = {}
        self._batches: list[PendingBatch] = []
        self._batch_packets = 0
        self._batch_devices = 0
        # Parts of batches without an id, in the delta as columns: reduced to one when the
        # unreduced ones hold as many entries as the reduced one (and MERGE_ENTRIES at
        # least), so a small fleet's many small parts stay few and a big fleet's are not
        # reduced again and again (each reduction costs what the reduced part holds).
        self._reduced_entries = 0
        self._loose_entries = 0
        self._loose_batches = 0  # id-less batches folded since the swap
        # Since this process started, for /stats (Redis has the totals of every instance).
        self.rejected_total: Counter[str] = Counter()

    @property
    def pending_packets(self) -> int:
        """Packets folded in since the last swap()."""
        return self._delta.packets + self._batch_packets

    @property
    def pending_devices(self) -> int:
        return len(self._delta.devices)

    @property
    def pending_entries(self) -> int:
        """Per-device deltas held (one per device per pending batch): what the memory of
        the pending work grows with when each batch spreads over many devices."""
        in_delta = len(self._delta.devices) + self._reduced_entries + self._loose_entries
        return in_delta + self._batch_devices

    @property
    def pending_batches(self) -> int:
        """Batches (with an id or without) whose senders wait for the next flush's ack."""
        return len(self._batches) + self._loose_batches

    def add(self, work: Work) -> None:
        """Fold one queue item into the current delta."""
        self.add_all([work])

    def add_all(self, items: list[Work]) -> None:
        """Fold queue items into the current delta. Rows are folded at once; the parts of
        batches without an id (nothing to deduplicate) join the delta as columns (reduced
        from time to time, see __init__); batches with an id wait, each apart, for the
        flush to settle their id. (So a tie on the newest timestamp between a packet and a
        batch part goes to the part: across streams, arrival order is not defined anyway.)"""
        trackers = self._trackers
        delta = self._delta
        for work in items:
            if isinstance(work, RowsWork):
                fold(delta, work.rows, work.recv_ms)
            elif work.batch_id is None:
                for part in work.parts:
                    delta.add_part(part)
                    self._loose_entries += part.entries
                if work.parts:
                    self._loose_batches += 1
            else:
                self._add_pending(work, work.batch_id)
                continue
            trackers[work.tracker] = trackers.get(work.tracker, 0) + 1
        if self._loose_entries >= max(MERGE_ENTRIES, self._reduced_entries):
            self._reduce_loose()

    def _add_pending(self, work: BatchWork, batch_id: BatchId) -> None:
        batch = PendingBatch(batch_id, work.parts, work.tracker)
        self._batches.append(batch)
        self._batch_packets += batch.packets
        self._batch_devices += batch.entries

    def _reduce_loose(self) -> None:
        parts = self._delta.parts
        if len(parts) > 1:
            parts[:] = [reduce_batches(parts)]
        self._reduced_entries = sum(p.entries for p in parts)
        self._loose_entries = 0

    def carry_over(self, batches: list[PendingBatch]) -> None:
        """Put batches back for the next flush (their id is pending in another flush)."""
        self._batches[:0] = batches
        self._batch_packets += sum(b.packets for b in batches)
        self._batch_devices += sum(b.entries for b in batches)

    def count_rejected(self, reason: str, packets: int = 1) -> None:
        """Record rejected packets so that they are counted in Redis too, by reason."""
        self._delta.rejected[reason] += packets
        self.rejected_total[reason] += packets

    def swap(self) -> tuple[FlushDelta, dict[CommitTracker, int], list[PendingBatch]]:
        """Take the current delta, its trackers and the pending batches; start afresh."""
        taken = self._delta, self._trackers, self._batches
        self._delta, self._trackers, self._batches = FlushDelta(), {}, []
        self._batch_packets = 0
        self._batch_devices = 0
        self._reduced_entries = self._loose_entries = self._loose_batches = 0
        return taken

    async def consume(
        self,
        queue: PacketQueue[Work],
        flush_max_packets: int,
        flush_max_entries: Callable[[], int],
        flush_max_batches: int,
        on_full: Callable[[], None],
        room: Callable[[], int],
    ) -> None:
        """Drain `queue` into the delta until it is closed and empty.

        While too much is waiting to be committed (Redis is slow or away: `room()` <= 0),
        stop taking from the queue: it fills, receivers wait, and clients are pushed back.
        Otherwise take at most `room()` packets' worth (at least one item).
        """
        while True:
            if room() <= 0:
                on_full()
                # At shutdown the queue is closed: drain it anyway (it is bounded).
                while room() <= 0 and not queue.closed:
                    await asyncio.sleep(0.02)
            # (the room as the wait for items ends: meanwhile a flush may have begun, or
            # the budget in force changed)
            items = await queue.get_all(None if queue.closed else room)
            if not items:
                return
            before = self.pending_packets
            self.add_all(items)
            if (
                self.pending_packets >= flush_max_packets
                or self.pending_entries >= flush_max_entries()
                or self.pending_batches >= flush_max_batches
            ):
                on_full()
            elif self.pending_packets - before < _LINGER_BELOW_PACKETS and not queue.closed:
                # A small take: let more gather before the next one (StreamPackets'
                # receivers append to queued items meanwhile), so that single packets do
                # not wake the aggregator once each. Delays counting by <= _LINGER_S.
                await asyncio.sleep(_LINGER_S)
