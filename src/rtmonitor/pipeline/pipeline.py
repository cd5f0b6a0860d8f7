"""The pipeline of one ingest process: bounded queue -> aggregator -> flusher (-> Redis),
recovery of dead instances' journals, and the backpressure policy that ties them."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

from rtmonitor.config import Settings
from rtmonitor.model import PendingStats, PipelineStats, QueueStats
from rtmonitor.pipeline.aggregator import Aggregator
from rtmonitor.pipeline.commit import Committer
from rtmonitor.pipeline.flusher import Flusher
from rtmonitor.pipeline.queue import PacketQueue
from rtmonitor.pipeline.recovery import Recovery
from rtmonitor.pipeline.work import Work


class Pipeline:
    """Built from Settings; start() runs its loops, drain() ends them without losing an
    acknowledged packet, stats() reports it. Receivers put Work on `queue`."""

    def __init__(
        self,
        settings: Settings,
        committer: Committer,
        devices: Callable[[], int] | None = None,
    ) -> None:
        self.settings = settings
        # The distinct devices this process may hold deltas for (its validator's), which
        # bound the merges of a flush (entry_budget); None: unknown, no time budget.
        self.devices = devices
        self.queue: PacketQueue[Work] = PacketQueue(settings.queue_max_packets)
        self.aggregator = Aggregator()
        self.flusher = Flusher(
            self.aggregator,
            committer,
            settings.flush_interval,
            dedupe_window_s=settings.dedupe_window,
            stretch=settings.flush_stretch,
            interval_max=settings.flush_interval_max,
        )
        self.recovery = Recovery(committer, self.flusher.instance_id, settings.dedupe_window)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._drained = False

    @property
    def instance_id(self) -> str:
        """Unique per process start: names this pipeline's markers, journals, heartbeat."""
        return self.flusher.instance_id

    @property
    def redis_error(self) -> str | None:
        """The last commit error while commits to Redis fail (e.g. Redis full), else None."""
        return self.flusher.stats.redis_error

    @property
    def broken(self) -> asyncio.Event:
        """Set once this instance commits nothing more (Flusher._give_up): redis_error says
        why."""
        return self.flusher.broken

    def entry_budget(self) -> int:
        """The per-device deltas pending work may hold: --max-pending-devices (memory), or
        fewer where flushes would take much longer than --max-pending-seconds.

        A flush costs about one device merge per distinct device it holds, and the flusher
        measures its pace in merges per second (the slowest of the last few flushes of at
        least Flusher.pace_min_merges: a smaller one's time is mostly fixed costs). The
        budget is then the merges that pace makes in --max-pending-seconds, and never fewer
        than twice pace_min_merges (100,000), before a pace is known too: a flush, triggered
        at half the budget, is then always big enough to measure the pace again (a low
        reading, say a flush slowed by a fork of Redis, is not kept for good).

        A flush's merges are at most its entries, and at most the devices this process knows
        (`devices`: those admitted within the last one or two --retention periods). The
        budget binds only where those devices outnumber it twice over: with
        a million devices, each packet of a batch its own merge, a budget sized for memory
        alone made each flush take ~10 s; with 100,000, a flush of a million entries still
        merges 100,000 devices, each less often the bigger the flush (throttling it there
        cost ~8% of the rate for no fresher counts)."""
        s, rate, floor = self.settings, self.flusher.merge_rate, self.flusher.pace_min_merges
        if not s.max_pending_seconds or self.devices is None:
            return s.max_pending_devices
        merges = max(2 * floor, int((rate or 0.0) * s.max_pending_seconds))
        if self.devices() <= 2 * merges:
            return s.max_pending_devices
        return min(s.max_pending_devices, merges)

    def room(self) -> int:
        """Packets the aggregator may still take from the queue (<= 0: none).

        Memory grows with packets (rows) and with per-device deltas (batches spread over
        many devices): at either bound the aggregator stops taking from the queue, the
        queue fills and receivers push their clients back. Below them, a take is bounded
        by the room left (a packet adds at most one delta), so that taking a full queue at
        once cannot overshoot the budget by the queue's capacity (at a million devices one
        flush in several held twice the budget in force, 230,000 merges in 4.8 s)."""
        s, agg, flusher = self.settings, self.aggregator, self.flusher
        return min(
            s.max_pending_packets - agg.pending_packets - flusher.inflight_packets,
            self.entry_budget() - agg.pending_entries - flusher.inflight_entries,
        )

    async def start(self) -> None:
        """Heartbeat first (no journal of ours may look orphaned), then the loops."""
        s = self.settings
        await self.recovery.heartbeat()
        self._tasks["recovery"] = asyncio.create_task(self.recovery.run(), name="recovery")
        self._tasks["aggregator"] = asyncio.create_task(
            self.aggregator.consume(
                self.queue,
                s.flush_max_packets,
                lambda: self.entry_budget() // 2,
                # A sender waits for acks with at most --max-inflight-batches batches out
                # per stream: holding half of that before flushing keeps a stream's window
                # ahead of the ack latency, whatever the batch size (small row batches
                # would otherwise wait for the timer, and throughput = window / latency).
                s.max_inflight_batches // 2,
                self.flusher.request_flush,
                self.room,
            ),
            name="aggregator",
        )
        self._tasks["flusher"] = asyncio.create_task(self.flusher.run(), name="flusher")

    async def drain(self, deadline_s: float) -> None:
        """Close the queue, fold what it holds, make the final flush (retried up to
        `deadline_s` if Redis is away), stop recovery. Call it once receivers stopped
        putting; calling it twice is harmless."""
        if self._drained:
            return
        self._drained = True
        # The queue first: the aggregator takes what is left, then returns.
        self.queue.close()
        if (task := self._tasks.get("aggregator")) is not None:
            await task
        # The final flush has it all now.
        self.flusher.stop(deadline_s)
        if (task := self._tasks.get("flusher")) is not None:
            await task
        self.recovery.stop()
        if (task := self._tasks.get("recovery")) is not None:
            await task

    def stats(self) -> PipelineStats:
        """A snapshot (the receivers' section, `ingest`, is the ingest node's to fill)."""
        s, agg, flusher = self.settings, self.aggregator, self.flusher
        return PipelineStats(
            rejected_by_reason=dict(sorted(agg.rejected_total.items())),
            queue=QueueStats(
                packets=self.queue.packets,
                items=len(self.queue),
                max_packets=s.queue_max_packets,
            ),
            pending=PendingStats(
                packets=agg.pending_packets,
                devices=agg.pending_devices,
                batches=agg.pending_batches,
                inflight_packets=flusher.inflight_packets,
                device_entries=agg.pending_entries,
                inflight_device_entries=flusher.inflight_entries,
                max_device_entries=s.max_pending_devices,
                device_entry_budget=self.entry_budget(),
                max_pending_packets=s.max_pending_packets,
            ),
            flush=dataclasses.replace(flusher.stats),
            recovery=dataclasses.replace(self.recovery.stats),
        )
