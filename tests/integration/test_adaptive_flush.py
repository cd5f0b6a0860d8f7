"""Adaptive flushing on a real Redis: when merging takes longer than the interval, the flusher
merges less often (reported in its stats), loses nothing, and a budget still flushes at once.

Redis is made slow around the real committer (each apply waits first), as a fleet too big
for one interval would make it: never a fake of Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from rtmonitor.ingest.columnar import decode_rows
from rtmonitor.ingest.v1.telemetry_pb2 import Packet
from rtmonitor.ingest.validation import Limits, Validator
from rtmonitor.model import BatchId, Claim, FlushDelta
from rtmonitor.pipeline.aggregator import Aggregator
from rtmonitor.pipeline.commit import FlushWrite
from rtmonitor.pipeline.flusher import Flusher
from rtmonitor.pipeline.work import BatchWork, CommitTracker
from rtmonitor.storage.committer import RedisCommitter
from rtmonitor.storage.embedded import EmbeddedRedis
from rtmonitor.storage.store import RedisStore

APPLY_S = 0.25  # what one merge costs "Redis" here


def submit(agg: Aggregator, batch_id: BatchId, device_id: str) -> CommitTracker:
    """Hand the aggregator a batch of one packet, as a receiver does."""
    delta, rejected = decode_rows([Packet(device_id=device_id, kind="k")], Validator(Limits()), 1)
    assert not rejected
    tracker = CommitTracker()
    agg.add(BatchWork(parts=(delta,), tracker=tracker, batch_id=batch_id))
    tracker.submitted()
    tracker.close()
    return tracker


def settled(tracker: CommitTracker) -> bool:
    return tracker._done.done() and tracker._done.exception() is None


class SlowWrite:
    def __init__(self, inner: FlushWrite) -> None:
        self.inner = inner

    async def prepare(self) -> dict[int, Claim]:
        return await self.inner.prepare()

    async def apply(self) -> int:
        await asyncio.sleep(APPLY_S)
        return await self.inner.apply()

    async def finalize(self, dedupe_window_s: int) -> None:
        await self.inner.finalize(dedupe_window_s)


class SlowCommitter(RedisCommitter):
    """The real committer whose merges take APPLY_S longer."""

    def encode(
        self,
        delta: FlushDelta,
        batch_ids: Sequence[BatchId],
        instance: str,
        seq: int,
    ) -> SlowWrite:  # type: ignore[override]
        return SlowWrite(super().encode(delta, batch_ids, instance, seq))


def test_a_slow_merge_stretches_the_interval_and_loses_nothing(
    redis_server: EmbeddedRedis,
) -> None:
    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "a") as store:
            agg = Aggregator()
            flusher = Flusher(
                agg,
                SlowCommitter(store),
                0.05,
                dedupe_window_s=60,
                instance_id="a",
                stretch=2.0,
                interval_max=1.0,
            )
            task = asyncio.create_task(flusher.run())
            trackers: list[CommitTracker] = []
            started = time.monotonic()
            for n in range(40):  # a batch every 50 ms for 2 s
                trackers.append(submit(agg, ("p", n), f"d{n % 5}"))
                await asyncio.sleep(0.05)
            elapsed = time.monotonic() - started
            stats = flusher.stats
            # at least 2 x 0.25 s from one flush's start to the next: not one per 50 ms
            assert stats.interval_s >= 2 * APPLY_S
            assert stats.stretched_flushes >= 1
            assert stats.flushes <= elapsed / (2 * APPLY_S) + 1
            # a budget's request (the aggregator's flush-now) is not stretched
            await asyncio.sleep(1.5)  # every batch so far committed
            before = stats.flushes
            asked = time.monotonic()
            trackers.append(submit(agg, ("p", 40), "d0"))
            flusher.request_flush()
            while stats.flushes == before:
                await asyncio.sleep(0.01)
            assert time.monotonic() - asked < 2 * APPLY_S
            flusher.stop(5.0)
            await task
            assert all(settled(t) for t in trackers)
            counts = [r.packets for r in await store.get_devices([f"d{i}" for i in range(5)])]
            assert counts == [9, 8, 8, 8, 8]
            assert stats.devices_committed >= 5

    asyncio.run(main())
