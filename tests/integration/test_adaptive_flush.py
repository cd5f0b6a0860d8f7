"""Adaptive flushing on a real Redis: when merging takes longer than the interval, the flusher
merges less often (reported in its stats), loses nothing, and a budget still flushes at once.

Redis is made slow around the real committer (each apply waits first), as a fleet too big
for one interval would make it: never a fake of Redis."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from rtmonitor.config import Settings
from rtmonitor.ingest.columnar import decode_rows
from rtmonitor.ingest.v1.telemetry_pb2 import Packet
from rtmonitor.ingest.validation import Limits, Validator
from rtmonitor.model import BatchId, Claim, CommitUnavailable, FlushDelta
from rtmonitor.pipeline.aggregator import Aggregator
from rtmonitor.pipeline.commit import FlushWrite
from rtmonitor.pipeline.flusher import PACE_FLUSHES, Flusher
from rtmonitor.pipeline.pipeline import Pipeline
from rtmonitor.pipeline.work import BatchWork, CommitFailed, CommitTracker
from rtmonitor.runtime import RedisServer, Runtime
from rtmonitor.storage.committer import RedisCommitter
from rtmonitor.storage.embedded import EmbeddedRedis
from rtmonitor.storage.store import RedisStore
from rtmonitor.supervisor import WorkerLink

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


def slow_flusher(store: RedisStore, instance_id: str) -> tuple[Flusher, SlowCommitter]:
    """A flusher (a tick every 50 ms) of a fresh aggregator into a SlowCommitter on `store`."""
    committer = SlowCommitter(store)
    flusher = Flusher(Aggregator(), committer, 0.05, dedupe_window_s=60, instance_id=instance_id)
    return flusher, committer


async def submit_until(
    flusher: Flusher, committer: SlowCommitter, n: int, event: tuple[str, int]
) -> CommitTracker:
    """Batch ("p", n) of device d<n>, a flush asked for, and a wait until `committer` has
    seen `event` (a step and a flush's sequence number)."""
    tracker = submit(flusher.aggregator, ("p", n), f"d{n}")
    flusher.request_flush()
    while event not in committer.events:
        await asyncio.sleep(0.01)
    return tracker


class SlowWrite:
    def __init__(
        self,
        inner: FlushWrite,
        delay_s: float,
        unavailable: int = 0,
        seq: int = 0,
        events: list[tuple[str, int]] | None = None,
    ) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.unavailable = unavailable  # prepares that fail first, as if Redis were away
        self.seq = seq
        self.events = events if events is not None else []  # (step, flush seq), in order
        self.bug = False  # apply raises as a bug would (not an outage)

    async def prepare(self) -> dict[int, Claim]:
        self.events.append(("prepare", self.seq))
        if self.unavailable:
            self.unavailable -= 1
            raise CommitUnavailable("Redis is away (a test's)")
        return await self.inner.prepare()

    async def apply(self) -> int:
        self.events.append(("apply", self.seq))
        await asyncio.sleep(self.delay_s)
        if self.bug:
            raise RuntimeError("a bug (a test's)")
        return await self.inner.apply()

    async def finalize(self, dedupe_window_s: int) -> None:
        await self.inner.finalize(dedupe_window_s)
        self.events.append(("finalized", self.seq))


class SlowCommitter(RedisCommitter):
    """The real committer whose merges take longer: APPLY_S per flush, or `merge_s` per
    device merge (as a fleet's do). Records the device merges of each flush."""

    def __init__(self, store: RedisStore, merge_s: float | None = None) -> None:
        super().__init__(store)
        self.merge_s = merge_s
        self.unavailable = 0  # the next write's prepare fails this many times first
        self.sizes: list[int] = []  # device merges per flush, in order
        self.events: list[tuple[str, int]] = []  # each write's steps: (step, flush seq)
        self.bugs = 0  # the next writes' applies raise (a bug) this many times

    def encode(
        self,
        delta: FlushDelta,
        batch_ids: Sequence[BatchId],
        instance: str,
        seq: int,
    ) -> SlowWrite:  # type: ignore[override]
        merges = len(delta.devices) + sum(p.entries for p in delta.parts)
        self.sizes.append(merges)
        delay = APPLY_S if self.merge_s is None else merges * self.merge_s
        unavailable, self.unavailable = self.unavailable, 0
        inner = super().encode(delta, batch_ids, instance, seq)
        write = SlowWrite(inner, delay, unavailable, seq, self.events)
        write.bug, self.bugs = self.bugs > 0, max(0, self.bugs - 1)
        return write


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
            # the merges' time is the apply step's, and each step has its own
            assert stats.apply_seconds >= APPLY_S * stats.flushes
            steps = (stats.encode_seconds, stats.prepare_seconds, stats.finalize_seconds)
            assert all(0 < s < APPLY_S * stats.flushes / 2 for s in steps), steps

    asyncio.run(main())


# --- the time budget: --max-pending-seconds -----------------------------------------------

MERGE_S = 0.0002  # what one device merge costs "Redis" in the tests below
BATCH = 200  # packets per batch, each a device's


Noted = list[tuple[int, float | None]]  # (entry budget, pace) as each flush was encoded


def pour(
    redis_url: str,
    max_pending_seconds: float,
    fleet: int,
    pace_min_merges: int = BATCH,
    queue_batches: int = 1,
) -> tuple[list[int], Noted, int, float | None]:
    """A load through a real pipeline whose merges cost MERGE_S each: one batch, its commit,
    then 60 more as fast as the pipeline takes them, over `fleet` devices (BATCH each, in
    turn; all validated first, so the pipeline knows them all from the start), through a
    queue of `queue_batches` batches. Returns the device merges of each flush after the
    first, the entry budget and the pace in force as each was encoded,
    --max-pending-devices and the last pace measured."""

    async def main() -> tuple[list[int], Noted, int, float | None]:
        settings = Settings(
            flush_interval=0.05,
            max_pending_seconds=max_pending_seconds,
            queue_max_packets=queue_batches * BATCH,
            dedupe_window=60,
        )
        validator = Validator(Limits())
        prefix = f"t{max_pending_seconds}-{fleet}"
        async with RedisStore.from_url(redis_url, prefix) as store:
            committer = SlowCommitter(store, MERGE_S)
            pipeline = Pipeline(settings, committer, devices=lambda: validator.device_count)
            pipeline.flusher.pace_min_merges = pace_min_merges  # (50,000 when serving)
            noted: Noted = []
            encode = committer.encode

            def encode_and_note(*args: Any) -> SlowWrite:
                noted.append((pipeline.entry_budget(), pipeline.flusher.merge_rate))
                return encode(*args)

            committer.encode = encode_and_note  # type: ignore[method-assign]
            works = []
            for n in range(61):
                ids = [f"d{(n * BATCH + i) % fleet}" for i in range(BATCH)]
                packets = [Packet(device_id=device_id, kind="k") for device_id in ids]
                delta, rejected = decode_rows(packets, validator, 1)
                assert not rejected
                works.append(BatchWork(parts=(delta,), tracker=CommitTracker(), batch_id=("p", n)))
            await pipeline.start()
            trackers = []
            for n, work in enumerate(works):
                work.tracker.submitted()
                work.tracker.close()
                trackers.append(work.tracker)
                await pipeline.queue.put(work, BATCH)
                if n == 0:  # the first flush sets the pace
                    await work.tracker.wait()
            await asyncio.gather(*(t.wait() for t in trackers))
            await pipeline.drain(5.0)
            counts = [r.packets for r in await store.get_devices([f"d{i}" for i in range(fleet)])]
            sent = Counter((n * BATCH + i) % fleet for n in range(61) for i in range(BATCH))
            assert counts == [sent[i] for i in range(fleet)]
            rate = pipeline.flusher.merge_rate
            return committer.sizes[1:], noted[1:], settings.max_pending_devices, rate

    return asyncio.run(main())


async def _flush_steadily(
    store: RedisStore, devices: int, *, concurrent_flush_once: bool = False, warm: int = 0
) -> tuple[SlowCommitter, list[CommitTracker]]:
    """30 one-packet batches, one every 20 ms, each asking for a flush at once, over
    `devices` devices in turn (after `warm` batches pending from the start); with
    `concurrent_flush_once`, flush_once() is called beside run() all the while. Returns the
    committer (its events) and the trackers, all settled."""
    flusher, committer = slow_flusher(store, "o")
    agg = flusher.aggregator
    trackers = [submit(agg, ("w", n), f"d{n % devices}") for n in range(warm)]
    task = asyncio.create_task(flusher.run())
    extra: list[asyncio.Task[None]] = []
    for n in range(30):
        trackers.append(submit(agg, ("p", n), f"d{n % devices}"))
        flusher.request_flush()
        if concurrent_flush_once and n % 3 == 1:
            extra.append(asyncio.create_task(flusher.flush_once()))
        await asyncio.sleep(0.02)
    await asyncio.gather(*extra)
    flusher.stop(5.0)
    await task
    assert all(settled(t) for t in trackers)
    counts = [r.packets for r in await store.get_devices([f"d{i}" for i in range(devices)])]
    assert sum(counts) == 30 + warm and len(set(counts)) == 1
    return committer, trackers


def _steps(events: list[tuple[str, int]]) -> tuple[list[int], dict[tuple[str, int], int]]:
    """The flushes' seqs, in order, and where each (step, seq) happened."""
    return sorted({seq for _, seq in events}), {e: events.index(e) for e in events}


def test_where_each_packet_is_a_merge_the_next_flush_prepares_while_one_applies(
    redis_server: EmbeddedRedis,
) -> None:
    """A device per batch (each packet a device merge, as a million devices sending once a
    minute): while a flush applies (Redis busy for 0.25 s), the next one is taken, encoded
    and prepared, so Redis is not left idle while this process encodes; it applies only
    once the one before it is finalized (a merge call's marker skips what a later flush of
    this instance applied). Every batch counts once."""

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "overlap") as store:
            committer, _ = await _flush_steadily(store, 30)
            seqs, at = _steps(committer.events)
            assert len(seqs) >= 3
            for before, after in zip(seqs, seqs[1:], strict=False):
                assert at["finalized", before] < at["apply", after], committer.events
            overlapped = [
                s for b, s in zip(seqs, seqs[1:], strict=False)
                if at["apply", b] < at["prepare", s] < at["finalized", b]
            ]  # fmt: skip
            assert len(overlapped) >= 2, committer.events

    asyncio.run(main())


def test_where_devices_send_several_packets_a_flush_gathers_until_the_last_is_done(
    redis_server: EmbeddedRedis,
) -> None:
    """Three devices sending in turn: a flush taken early would fold fewer packets into
    each device merge (more merges for the same packets), so none begins before the one
    before it is finalized."""

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "gather") as store:
            committer, _ = await _flush_steadily(store, 3, warm=9)
            seqs, at = _steps(committer.events)
            assert len(seqs) >= 3
            for before, after in zip(seqs, seqs[1:], strict=False):
                assert at["finalized", before] < at["prepare", after], committer.events

    asyncio.run(main())


def test_flush_once_beside_run_applies_in_order(redis_server: EmbeddedRedis) -> None:
    """flush_once() called while run() has a flush applying and the next one preparing:
    each flush still applies after the one begun before it, whoever called it."""

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "beside") as store:
            committer, _ = await _flush_steadily(store, 30, concurrent_flush_once=True)
            seqs, at = _steps(committer.events)
            for before, after in zip(seqs, seqs[1:], strict=False):
                assert at["finalized", before] < at["apply", after], committer.events

    asyncio.run(main())


def test_a_flush_given_up_after_its_prepare_stops_this_instances_commits(
    redis_server: EmbeddedRedis,
) -> None:
    """A flush that fails after its prepare (a bug, not an outage) leaves its journal for
    another instance to replay once this one is gone; a later flush of this instance
    applied meanwhile would make that replay skip its calls. So later flushes are not
    applied: their senders get an error (and resend elsewhere), and /stats and /readyz
    say why until a restart. One that fails after its finalize stops nothing."""

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "broken") as store:
            flusher, committer = slow_flusher(store, "b")
            agg = flusher.aggregator
            ok = submit(agg, ("p", 0), "d0")
            await flusher.flush_once()
            assert settled(ok) and flusher.stats.redis_error is None
            committer.bugs = 1
            failed = submit(agg, ("p", 1), "d1")
            await flusher.flush_once()
            later = submit(agg, ("p", 2), "d2")
            await flusher.flush_once()
            for tracker in (failed, later):
                with pytest.raises(CommitFailed):
                    await tracker.wait()
            error = flusher.stats.redis_error or ""
            assert "flush b:2 could not be completed" in error and "restarted" in error
            # a step that was under way when it broke succeeds: the reason stays
            assert await flusher._retry(store.ping) is None
            assert flusher.stats.redis_error == error
            assert committer.events.count(("apply", 3)) == 0  # never applied
            assert flusher.stats.packets_abandoned == 2
            # its journal waits for b to be gone (b has no heartbeat here), then counts d1
            assert await store.orphan_journals("other") == ["b:2"]
            assert await store.recover("b:2", "other", 60)
            assert [r.packets for r in await store.get_devices(["d0", "d1"])] == [1, 1]
            assert await store.get_device("d2") is None  # never applied

    asyncio.run(main())


def test_a_process_whose_instance_broke_stops_with_exit_code_1(
    redis_server: EmbeddedRedis,
) -> None:
    """The real runtime, serving on free ports: once its flusher gives a prepared flush up
    (a bug in the apply), the process commits nothing more, so it stops in order by itself
    with exit code 1, for its supervisor to start a fresh instance; that flush's journal
    is left for the replay."""

    async def main() -> None:
        settings = Settings(
            host="127.0.0.1", grpc_port=0, http_port=0, flush_interval=0.05,
            dedupe_window=60, redis_url=redis_server.url,
        )  # fmt: skip
        # (as a --workers worker: what it tells the supervisor's /readyz while it stops)
        link = WorkerLink.create()
        runtime = Runtime(settings, RedisServer(redis_server.url), link=link)
        serving = asyncio.create_task(runtime.serve())
        while runtime.ingest is None or not runtime.ingest.serving:
            assert not serving.done(), serving
            await asyncio.sleep(0.02)
        assert runtime.store is not None
        flusher = runtime.ingest.pipeline.flusher
        committer = SlowCommitter(runtime.store)
        committer.bugs = 1
        flusher.committer = committer
        ok = submit(flusher.aggregator, ("p", 0), "d0")
        await asyncio.wait_for(serving, 30)  # returns by itself: no signal was sent
        with pytest.raises(CommitFailed):
            await ok.wait()
        assert runtime.exit_code == 1
        assert committer.events[:2] == [("prepare", 1), ("apply", 1)]
        assert link.serving.is_set()
        stopping, why = link.get_reasons()
        assert stopping == "shutting down" and why.startswith("commits to Redis fail: flush ")
        # its journal is whole: replayed (here at once, not after its heartbeat), d0 counts
        async with RedisStore.from_url(redis_server.url, settings.key_prefix) as store:
            assert await store.recover(f"{flusher.instance_id}:1", "other", 60)
            assert [r.packets for r in await store.get_devices(["d0"])] == [1]

    # (serve() tunes the process's collector and GIL switch interval: put them back)
    threshold, switch = gc.get_threshold(), sys.getswitchinterval()
    try:
        asyncio.run(main())
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
        sys.setswitchinterval(switch)


class _FailingTracker(CommitTracker):
    """A tracker whose first commit raises (a bug in acknowledging)."""

    __slots__ = ("raised",)

    def __init__(self) -> None:
        super().__init__()
        self.raised = False

    def committed(self, items: int) -> None:
        if not self.raised:
            self.raised = True
            raise RuntimeError("a bug in an ack (a test's)")
        super().committed(items)


def test_a_bug_in_acknowledging_a_flush_stops_nothing_after_it(
    redis_server: EmbeddedRedis,
) -> None:
    """A flush applied and finalized whose acknowledging raises: its senders get an error
    (the packets are counted: a resend is a duplicate), and the flushes after it go on."""

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "ackbug") as store:
            agg = Aggregator()
            flusher = Flusher(agg, SlowCommitter(store), 0.05, dedupe_window_s=60)
            task = asyncio.create_task(flusher.run())
            delta, _ = decode_rows([Packet(device_id="d0", kind="k")], Validator(Limits()), 1)
            bad = _FailingTracker()
            agg.add(BatchWork(parts=(delta,), tracker=bad, batch_id=("p", 0)))
            bad.submitted()
            bad.close()
            with pytest.raises(CommitFailed):
                await asyncio.wait_for(bad.wait(), 5)
            later = [submit(agg, ("p", n), f"d{n}") for n in range(1, 4)]
            flusher.request_flush()
            await asyncio.wait_for(asyncio.gather(*(t.wait() for t in later)), 5)
            assert flusher.stats.redis_error is None
            flusher.stop(5.0)
            await task
            assert [r.packets for r in await store.get_devices(["d0", "d1"])] == [1, 1]
            # committed, so not counted as abandoned (only its ack failed)
            assert flusher.stats.packets_abandoned == 0

    asyncio.run(main())


async def _cancelled_leaves_nothing_waiting(
    task: asyncio.Task[None],
    flusher: Flusher,
    committer: SlowCommitter,
    trackers: list[CommitTracker],
) -> None:
    """Cancel run() (`task`): the senders of its flushes under way get an error, nothing
    stays in flight, and a flush after them neither waits for them nor applies (their
    journals may be half applied: their replay comes first)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    for tracker in trackers:
        with pytest.raises(CommitFailed):
            await asyncio.wait_for(tracker.wait(), 1)
    assert flusher.inflight_packets == 0 and flusher.inflight_entries == 0
    seq = max(seq for _, seq in committer.events) + 1
    later = submit(flusher.aggregator, ("later", 0), "later")
    await asyncio.wait_for(flusher.flush_once(), 2)
    with pytest.raises(CommitFailed):
        await later.wait()
    assert ("apply", seq) not in committer.events


def test_a_flusher_cancelled_while_applying_leaves_nothing_waiting(
    redis_server: EmbeddedRedis,
) -> None:
    """run() cancelled while a flush applies: that flush's senders get an error rather
    than wait for ever, the pending budget lets it go, and a flush after it neither waits
    for it nor applies (its journal may be half applied: its replay comes first)."""

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "cancel") as store:
            flusher, committer = slow_flusher(store, "c")
            task = asyncio.create_task(flusher.run())
            first = await submit_until(flusher, committer, 0, ("apply", 1))
            await _cancelled_leaves_nothing_waiting(task, flusher, committer, [first])

    asyncio.run(main())


def test_a_flusher_cancelled_while_one_applies_and_the_next_is_prepared_strands_neither(
    redis_server: EmbeddedRedis,
) -> None:
    """One device per batch, so the next flush prepares while one applies; run() cancelled
    then: the senders of both get an error, nothing stays in flight, and a flush after
    them does not wait for ever for the one begun before it."""

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "cancel2") as store:
            flusher, committer = slow_flusher(store, "c2")
            task = asyncio.create_task(flusher.run())
            first = submit(flusher.aggregator, ("p", 0), "d0")
            flusher.request_flush()
            await asyncio.wait_for(first.wait(), 5)  # (one packet per merge from now on)
            applying = await submit_until(flusher, committer, 1, ("apply", 2))
            prepared = await submit_until(flusher, committer, 2, ("prepare", 3))
            await asyncio.sleep(0.05)  # (its prepare done; flush 2 applies for 0.25 s)
            assert ("finalized", 2) not in committer.events, committer.events
            await _cancelled_leaves_nothing_waiting(task, flusher, committer, [applying, prepared])

    asyncio.run(main())


def test_an_idle_flusher_does_not_stay_stretched(redis_server: EmbeddedRedis) -> None:
    """After a slow flush the interval is stretched; once there is nothing to flush it is
    back to --flush-interval (an idle tick counts as a flush of no time), and idle ticks
    are not counted as stretched flushes."""

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "idle") as store:
            agg = Aggregator()
            flusher = Flusher(
                agg, SlowCommitter(store), 0.05, dedupe_window_s=60, stretch=2.0,
                interval_max=1.0,
            )  # fmt: skip
            task = asyncio.create_task(flusher.run())
            tracker = submit(agg, ("p", 0), "d0")
            await asyncio.wait_for(tracker.wait(), 5)
            await asyncio.sleep(0.3)  # the tick after the slow flush is stretched
            stretched = flusher.stats.stretched_flushes
            await asyncio.sleep(2.0)  # idle
            assert flusher.stats.interval_s == 0.05
            assert flusher.stats.stretched_flushes <= stretched + 1
            flusher.stop(5.0)
            await task

    asyncio.run(main())


def test_the_time_budget_keeps_a_big_fleets_flushes_short(
    redis_server: EmbeddedRedis,
) -> None:
    """Each merge costs MERGE_S: the pipeline merges ~1/MERGE_S devices per second, so with
    --max-pending-seconds 0.3 a flush holds about 0.3/MERGE_S of them (1,500), not what the
    memory budget (a million entries) lets pile up behind a slow flush. Every device here
    is new (a packet is a merge, as with a million devices), and the fleet soon outnumbers
    the budget twice over."""
    fleet = 61 * BATCH
    timed, noted, max_pending, _ = pour(redis_server.url, 0.3, fleet)
    untimed, _, _, _ = pour(redis_server.url, 0.0, fleet)
    budgets = [budget for budget, _ in noted]
    # the budget in force is what the pace merges in 0.3 s, never below twice the pace's
    # minimum flush (2 x BATCH here): the pace is below 1/MERGE_S (a flush has other costs
    # too), and above the floor's
    for budget, rate in noted:
        assert rate is not None and rate < 1 / MERGE_S, noted
        assert budget == max(2 * BATCH, int(rate * 0.3)) < max_pending, noted
    assert max(budgets) > 2 * BATCH, noted
    # once the fleet outgrew it (the first of these flushes may have gathered before),
    # a flush holds at most the budget, plus the batch that crossed it and what the
    # aggregator had taken as the last flush let go of its entries
    assert max(timed[1:]) <= max(budgets) + 2 * BATCH, (timed, budgets)
    # without it, the pending work grew to several times that behind each slow flush
    assert max(untimed) >= 2 * max(timed[1:]), (untimed, timed)


def test_a_full_queue_is_taken_no_further_than_the_budget(
    redis_server: EmbeddedRedis,
) -> None:
    """A queue that holds many batches (the default holds 100,000 packets: at a million
    devices as many merges as the whole time budget) is taken only as far as the room left
    under the budget: a flush still holds at most the budget and about two batches (the
    take that crosses it, and what was taken as the last flush let its entries go), not the
    budget and a full queue."""
    fleet = 61 * BATCH
    timed, noted, _, _ = pour(redis_server.url, 0.3, fleet, queue_batches=12)
    budgets = [budget for budget, _ in noted]
    assert max(budgets) < 12 * BATCH, noted  # (else the queue would not be the larger)
    assert max(timed[1:]) <= max(budgets) + 2 * BATCH, (timed, budgets)


def test_the_time_budget_leaves_a_small_fleet_alone(
    redis_server: EmbeddedRedis,
) -> None:
    """With fewer devices than twice what a flush merges in 0.3 s, a bigger flush costs no
    more merges (each device once, however many packets): with a pace measured, the time
    budget does not bind (its boundary: test_the_budget_before_and_after_a_pace)."""
    _, noted, max_pending, rate = pour(redis_server.url, 0.3, 2 * BATCH)
    assert rate is not None and {budget for budget, _ in noted} == {max_pending}, noted


def test_the_pace_is_a_big_flushs(redis_server: EmbeddedRedis) -> None:
    """Flushes smaller than pace_min_merges set no pace (their time is mostly fixed costs,
    which would understate a big flush's pace and shrink the budget for nothing): the
    budget stays --max-pending-devices."""
    fleet = 61 * BATCH
    _, noted, max_pending, rate = pour(redis_server.url, 0.3, fleet, pace_min_merges=fleet)
    assert rate is None and {budget for budget, _ in noted} == {max_pending}, noted


def test_the_pace_is_the_slowest_of_the_last_big_flushes(redis_server: EmbeddedRedis) -> None:
    """One slow flush among fast ones (a Redis fork, a busy machine) sets the pace for the
    next PACE_FLUSHES flushes: a budget sized by the fast ones would make a slow flush hold
    several times --max-pending-seconds of work. A flush that waited for Redis to come back
    sets none: its time is the outage's."""

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "paces") as store:
            agg = Aggregator()
            committer = SlowCommitter(store)
            flusher = Flusher(
                agg, committer, 60, dedupe_window_s=60, instance_id="paces", pace_min_merges=10
            )
            paces = []
            for n, merge_s in enumerate([0.01] + [0.001] * PACE_FLUSHES):
                committer.merge_s = merge_s
                trackers = [submit(agg, ("p", n * 20 + i), f"d{n}-{i}") for i in range(20)]
                await flusher.flush_once()
                assert all(settled(t) for t in trackers)
                paces.append(flusher.merge_rate)
            slow = paces[0]
            assert slow is not None and slow < 20 / (20 * 0.01), paces
            # still one of the last PACE_FLUSHES, then not
            assert paces[1:PACE_FLUSHES] == [slow] * (PACE_FLUSHES - 1), paces
            assert (last := paces[PACE_FLUSHES]) is not None and last > 2 * slow, paces
            committer.unavailable, committer.merge_s = 1, 0.01  # (its pace would be slow)
            trackers = [submit(agg, ("p", 1000 + i), f"e-{i}") for i in range(20)]
            await flusher.flush_once()
            assert all(settled(t) for t in trackers) and flusher.stats.commit_errors == 1
            assert flusher.merge_rate == last

    asyncio.run(main())


def test_the_budget_before_and_after_a_pace(redis_server: EmbeddedRedis) -> None:
    """With no pace yet, a big fleet's flushes are held to twice pace_min_merges (big enough
    to measure a pace; not --max-pending-devices, which at a million devices made the first
    flush take ~10 s). Then the budget is what the pace merges in --max-pending-seconds,
    never below that floor, and binds only where the devices known outnumber it twice
    over; --max-pending-seconds 0 keeps the memory budget."""

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "first") as store:
            for seconds, devices, rate, budget in [
                (2.0, 1_000_000, None, 100_000),  # no pace yet: the floor
                (2.0, 200_000, None, 1_000_000),  # not twice the floor
                (2.0, 200_001, None, 100_000),
                (2.0, 1_000_000, 200_000.0, 400_000),  # 2 s of a 200,000/s pace
                (2.0, 800_000, 200_000.0, 1_000_000),  # not twice the budget
                (2.0, 800_001, 200_000.0, 400_000),
                (2.0, 1_000_000, 10_000.0, 100_000),  # a slow pace: the floor
                (0.5, 10_000_000, 3_000_000.0, 1_000_000),  # capped by the memory budget
                (0.0, 1_000_000, 200_000.0, 1_000_000),  # off
            ]:
                settings = Settings(max_pending_seconds=seconds)
                known = functools.partial(int, devices)
                pipeline = Pipeline(settings, RedisCommitter(store), devices=known)
                pipeline.flusher.merge_rate = rate
                assert pipeline.entry_budget() == budget, (seconds, devices, rate)

    asyncio.run(main())
