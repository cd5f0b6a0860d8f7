"""The flusher's exactly-once loop through the committer seam, on a real Redis.

The flusher and recovery see only the pipeline's Committer protocol; here it is the real
RedisCommitter. Failures are real (Redis stopped) or injected around the real committer
(a step that ran but whose reply was lost): never a fake of Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from rtmonitor.ingest.columnar import decode_rows
from rtmonitor.ingest.v1.telemetry_pb2 import Packet
from rtmonitor.ingest.validation import Limits, Validator
from rtmonitor.model import BatchDelta, BatchId, Claim, CommitUnavailable, FlushDelta
from rtmonitor.pipeline.aggregator import Aggregator, PendingBatch
from rtmonitor.pipeline.commit import Committer, FlushWrite
from rtmonitor.pipeline.flusher import Flusher
from rtmonitor.pipeline.recovery import Recovery
from rtmonitor.pipeline.work import BatchWork, CommitFailed, CommitTracker
from rtmonitor.storage.committer import RedisCommitter
from rtmonitor.storage.embedded import EmbeddedRedis
from rtmonitor.storage.store import RedisStore

WINDOW_S = 60


def parts(*devices: str, recv_ms: int = 1_000) -> tuple[BatchDelta, ...]:
    """A batch of one packet per listed device (reading t=1.5), aggregated as ingest does."""
    packets = [Packet(device_id=d, kind="k", payload=b"xy", values={"t": 1.5}) for d in devices]
    delta, rejected = decode_rows(packets, Validator(Limits()), recv_ms)
    assert not rejected
    return (delta,)


def submit(agg: Aggregator, batch_id: BatchId, *devices: str) -> CommitTracker:
    """Hand the aggregator one batch, as a receiver does; its tracker resolves on commit."""
    tracker = CommitTracker()
    agg.add(BatchWork(parts=parts(*devices), tracker=tracker, batch_id=batch_id))
    tracker.submitted()
    tracker.close()
    return tracker


def settled(tracker: CommitTracker) -> bool:
    return tracker._done.done() and tracker._done.exception() is None


async def packets_of(store: RedisStore, device_id: str) -> int:
    record = await store.get_device(device_id)
    return 0 if record is None else record.packets


async def journals(store: RedisStore) -> int:
    return int(await store.client.zcard(store.layout.journals))


def flusher_for(committer: Committer, instance: str) -> tuple[Aggregator, Flusher]:
    agg = Aggregator()
    return agg, Flusher(agg, committer, 60.0, dedupe_window_s=WINDOW_S, instance_id=instance)


# --- failure injection around the real committer ---------------------------------------------


@dataclass
class Faults:
    """Which steps fail once, and whether before running or after (a lost reply)."""

    steps: dict[str, str] = field(default_factory=dict)  # step -> "before" | "after"
    seen: list[tuple[str, Any]] = field(default_factory=list)  # (step, flush) in call order


class FaultyWrite:
    def __init__(self, inner: FlushWrite, flush: tuple[str, int], faults: Faults) -> None:
        self.inner, self.flush, self.faults = inner, flush, faults

    async def _step(self, name: str, run: Any) -> Any:
        self.faults.seen.append((name, self.flush))
        when = self.faults.steps.pop(name, None)
        if when == "before":
            raise CommitUnavailable(f"ConnectionError: injected before {name}")
        result = await run()
        if when == "after":
            raise CommitUnavailable(f"TimeoutError: reply to {name} lost")
        return result

    async def prepare(self) -> dict[int, Claim]:
        result: dict[int, Claim] = await self._step("prepare", self.inner.prepare)
        return result

    async def apply(self) -> int:
        result: int = await self._step("apply", self.inner.apply)
        return result

    async def finalize(self, dedupe_window_s: int) -> None:
        await self._step("finalize", lambda: self.inner.finalize(dedupe_window_s))


class FaultyCommitter:
    """The real committer, with `faults` injected into its flush steps."""

    def __init__(self, inner: RedisCommitter, faults: Faults) -> None:
        self.inner, self.faults = inner, faults

    def encode(
        self,
        delta: FlushDelta,
        batch_ids: Sequence[BatchId],
        instance: str,
        seq: int,
    ) -> FaultyWrite:
        write = self.inner.encode(delta, batch_ids, instance, seq)
        return FaultyWrite(write, (instance, seq), self.faults)

    async def heartbeat(self, instance: str, ttl_s: int) -> None:
        await self.inner.heartbeat(instance, ttl_s)

    async def orphans(self, instance: str) -> list[str]:
        return await self.inner.orphans(instance)

    async def recover(self, flush_id: str, instance: str, dedupe_window_s: int) -> bool:
        return await self.inner.recover(flush_id, instance, dedupe_window_s)

    @property
    def retention_s(self) -> int:
        return self.inner.retention_s

    async def expire_silent_devices(self, now_ms: int) -> int:
        return await self.inner.expire_silent_devices(now_ms)


# --- the tests ------------------------------------------------------------------------------


def test_a_batch_id_claimed_by_another_flush_waits_then_counts_as_a_resend(
    redis_server: EmbeddedRedis,
) -> None:
    """A batch whose id another flush has prepared (not finalized) is carried over, the
    rest of the flush commits; once the other flush settles, the batch is a resend: acked
    as a duplicate, never counted twice."""

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "t") as store:
            committer = RedisCommitter(store)
            # Another instance's flush holds ("p", 1): prepared, not yet applied.
            held = committer.encode(parts("a")[0].to_flush_delta(), [("p", 1)], "other", 1)
            assert await held.prepare() == {}

            agg, flusher = flusher_for(committer, "me")
            first = submit(agg, ("p", 1), "a")
            second = submit(agg, ("p", 2), "b")
            await flusher.flush_once()
            assert settled(second) and not settled(first)
            assert flusher.stats.carried_over_batches == 1
            assert agg.pending_batches == 1, "carried over to the next flush"
            assert (await packets_of(store, "a"), await packets_of(store, "b")) == (0, 1)

            # Still pending: carried over again, nothing written.
            await flusher.flush_once()
            assert not settled(first) and flusher.stats.carried_over_batches == 2

            await held.apply()
            await held.finalize(WINDOW_S)
            await flusher.flush_once()
            assert settled(first) and first.duplicate and not second.duplicate
            assert (flusher.stats.duplicate_batches, flusher.stats.duplicate_packets) == (1, 1)
            assert flusher.stats.packets_committed == 1  # b; a was counted by the other
            assert (await packets_of(store, "a"), await packets_of(store, "b")) == (1, 1)
            assert await journals(store) == 0

    asyncio.run(main())


def test_the_same_id_twice_in_one_flush_is_counted_once(redis_server: EmbeddedRedis) -> None:
    """A quick resend lands in the same flush as its original: the first is committed, the
    second carried over and then acknowledged as a duplicate."""

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "t") as store:
            agg, flusher = flusher_for(RedisCommitter(store), "me")
            original = submit(agg, ("p", 7), "a")
            resend = submit(agg, ("p", 7), "a")
            await flusher.flush_once()
            assert settled(original) and not settled(resend)
            await flusher.flush_once()
            assert settled(resend) and resend.duplicate and not original.duplicate
            assert await packets_of(store, "a") == 1

    asyncio.run(main())


@pytest.mark.parametrize("step", ["prepare", "apply", "finalize"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_failed_step_is_retried_with_the_same_flush_id(
    redis_server: EmbeddedRedis, step: str, when: str
) -> None:
    """A step that fails — before it ran, or after it ran with its reply lost — is tried
    again with the same flush (instance, seq): counted once, acked once and not as a
    duplicate, the journal gone."""

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "t") as store:
            faults = Faults({step: when})
            agg, flusher = flusher_for(FaultyCommitter(RedisCommitter(store), faults), "me")
            batch = submit(agg, ("p", 1), "a", "b")
            agg.add(BatchWork(parts=parts("c"), tracker=CommitTracker()))  # no id
            await flusher.flush_once()
            assert settled(batch) and not batch.duplicate
            assert [s for s, _ in faults.seen].count(step) == 2, faults.seen
            assert {flush for _, flush in faults.seen} == {("me", 1)}, "one flush id"
            stats = flusher.stats
            assert (stats.commit_errors, stats.redis_recoveries, stats.redis_error) == (1, 1, None)
            assert stats.packets_committed == 3 and stats.duplicate_batches == 0
            counts = [await packets_of(store, d) for d in ("a", "b", "c")]
            assert counts == [1, 1, 1]
            assert await journals(store) == 0
            # The id is remembered: a resend later is a duplicate.
            resend = submit(agg, ("p", 1), "a", "b")
            await flusher.flush_once()
            assert settled(resend) and resend.duplicate
            assert await packets_of(store, "a") == 1

    asyncio.run(main())


def test_a_prepared_flush_lets_its_columns_go(redis_server: EmbeddedRedis) -> None:
    """Once a flush is prepared (journaled), its batches' and delta's columns are let go
    and the pending budget counts the write's device merges instead: receivers gather the
    next flush while this one is applied. A batch carried over keeps its columns."""

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "t") as store:
            seen: dict[str, Any] = {}
            batches: list[PendingBatch] = []

            class Observed(FaultyWrite):
                async def apply(self) -> int:
                    seen["entries"] = flusher.inflight_entries
                    seen["packets"] = flusher.inflight_packets
                    seen["parts"] = [len(b.parts) for b in batches]
                    return await super().apply()

            class Observing(FaultyCommitter):
                def encode(self, *args: Any) -> FaultyWrite:
                    write = self.inner.encode(*args)
                    return Observed(write, (args[2], args[3]), self.faults)

            agg, flusher = flusher_for(Observing(RedisCommitter(store), Faults()), "me")
            # Another flush holds ("p", 3): that batch waits for the next flush, whole.
            other = await store.prepare("other:1", [store.layout.batch("p", 3)], [])
            assert other == {}
            for n, devices in enumerate([("a", "b"), ("a", "b", "c"), ("d",)], start=1):
                submit(agg, ("p", n), *devices)
            agg.add(BatchWork(parts=parts("a", "e"), tracker=CommitTracker()))  # no id
            batches += agg._batches
            assert agg.pending_entries == 8
            await flusher.flush_once()
            # a b c e merged; the batch of "d" waits for the next flush, whole (its packet and
            # entry in flight until it is put back)
            assert seen == {"entries": 5, "packets": 8, "parts": [0, 0, 1]}
            assert (flusher.inflight_entries, flusher.inflight_packets) == (0, 0)
            assert agg.pending_entries == 1 and flusher.stats.carried_over_batches == 1
            await store.finalize("other:1", [], WINDOW_S, 0)
            await store.client.delete(store.layout.batch("p", 3))
            await flusher.flush_once()
            counts = [await packets_of(store, d) for d in "abcde"]
            assert counts == [3, 2, 1, 1, 1]

    asyncio.run(main())


def test_redis_down_mid_flush_is_retried_until_it_is_back(redis_server: EmbeddedRedis) -> None:
    """A real outage: Redis' errors reach the flusher as CommitUnavailable, and the flush
    goes through once Redis is back (same port, same data)."""

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "t") as store:
            agg, flusher = flusher_for(RedisCommitter(store), "me")
            batch = submit(agg, ("p", 1), "a")
            await asyncio.to_thread(redis_server.stop)
            flush = asyncio.create_task(flusher.flush_once())
            for _ in range(200):
                if flusher.stats.commit_errors:
                    break
                await asyncio.sleep(0.02)
            assert flusher.stats.commit_errors and flusher.stats.redis_error
            assert not flush.done() and not settled(batch)
            await asyncio.to_thread(redis_server.start)
            await asyncio.wait_for(flush, 30)
            assert settled(batch) and not batch.duplicate
            assert flusher.stats.redis_recoveries == 1 and flusher.stats.redis_error is None
            assert await packets_of(store, "a") == 1

    asyncio.run(main())


def test_a_dead_instances_journal_is_replayed_once_and_its_resends_are_duplicates(
    redis_server: EmbeddedRedis,
) -> None:
    """An instance prepares a flush and dies before finishing it (here: storage refuses
    its writes until its shutdown deadline passes, so its senders get an error). Recovery
    on a live instance replays the journal once its heartbeat has expired; the senders'
    resends are then acknowledged as duplicates, and every packet is counted once."""

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "t") as store:
            real = RedisCommitter(store)

            # "dead": its applies never get through; it gives up at its deadline.
            faults = Faults()
            dying = FaultyCommitter(real, faults)
            agg, flusher = flusher_for(dying, "dead")
            await real.heartbeat("dead", 1)
            batch = submit(agg, ("p", 1), "a", "b")
            faults.steps = {"apply": "before"}
            flusher.stop(0.0)
            await flusher.flush_once()
            with pytest.raises(CommitFailed):
                await batch.wait()
            assert flusher.stats.packets_abandoned == 2
            assert await journals(store) == 1 and await packets_of(store, "a") == 0

            live = Recovery(real, "me", WINDOW_S)
            assert await live.run_once() == 0, "the owner's heartbeat is still alive"
            await asyncio.sleep(1.2)  # the heartbeat's TTL runs out: "dead" is dead
            assert await real.orphans("me") == ["dead:1"]
            other = Recovery(real, "other", WINDOW_S)
            recovered = await asyncio.gather(live.run_once(), other.run_once())
            assert sorted(recovered) == [0, 1], "replayed by exactly one instance"
            assert await journals(store) == 0
            assert (await packets_of(store, "a"), await packets_of(store, "b")) == (1, 1)

            # The sender got an error, so it resends to a live instance: a duplicate.
            agg, flusher = flusher_for(real, "me")
            resend = submit(agg, ("p", 1), "a", "b")
            await flusher.flush_once()
            assert settled(resend) and resend.duplicate
            assert flusher.stats.packets_committed == 0
            assert (await packets_of(store, "a"), await packets_of(store, "b")) == (1, 1)

    asyncio.run(main())
