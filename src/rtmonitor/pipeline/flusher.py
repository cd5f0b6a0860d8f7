"""The flusher: commits the aggregator's deltas through a committer on a timer, exactly once."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from rtmonitor.model import (
    BatchId,
    Claim,
    CommitUnavailable,
    FlushDelta,
    FlushStats,
    reduce_batches,
)
from rtmonitor.pipeline.aggregator import Aggregator, PendingBatch
from rtmonitor.pipeline.commit import Committer, FlushWrite
from rtmonitor.pipeline.work import CommitFailed, CommitTracker

logger = logging.getLogger(__name__)


BACKOFF_START_S = 0.05
BACKOFF_MAX_S = 2.0
# The pace is the slowest of this many last big flushes (see Flusher.merge_rate).
PACE_FLUSHES = 3
# The next flush is begun while one applies only where its packets are about its device
# merges (a million devices, each sending about once per flush): there, merging later
# folds no packets together, and Redis should not wait for this process's encoding.
# Where devices send several packets per flush (100,000 devices at a million packets/s),
# a flush begun early is smaller, so more merges for the same packets (benchmarks/
# RESULTS.md, fifteenth pass).
OVERLAP_MAX_FOLD = 1.5
T = TypeVar("T")
# Backoff jitter from a generator of our own, never the process-global random state.
_JITTER = random.Random()


class _GiveUp(Exception):
    """Redis stayed unreachable past the shutdown deadline."""


@dataclass(slots=True, eq=False)
class _Flush:
    """One flush between its steps: what it took from the aggregator, its write once
    prepared, and the batches the prepare settled."""

    seq: int
    delta: FlushDelta
    trackers: dict[CommitTracker, int]
    batches: list[PendingBatch]
    packets: int
    entries: int  # per-device deltas; once prepared, its device merges (+ carried batches)
    after: asyncio.Future[None] | None  # done once the flush begun before it is
    done: asyncio.Future[None]  # set once this one is (committed or given up)
    started: float = field(default_factory=time.monotonic)
    write: FlushWrite | None = None
    fresh: list[PendingBatch] = field(default_factory=list)  # counted by this flush
    duplicates: list[PendingBatch] = field(default_factory=list)  # committed before
    carried: list[PendingBatch] = field(default_factory=list)  # their id pending elsewhere
    merges: int = 0
    busy: float = 0.0  # seconds in its own steps (not waiting for the flush before it)
    errors: int = 0  # FlushStats.commit_errors as it began (more by its end: it waited)
    journaled: bool = False  # a prepare was sent: its journal may be in Redis
    finalized: bool = False  # applied and finalized: its journal is gone


class Flusher:
    """Takes the aggregator's delta every `interval` seconds (or when asked) and commits it.

    As OpenTelemetry's BatchProcessor: on a timer, sooner when too much is pending, once
    more at shutdown. While Redis is unreachable the same flush is retried with the same
    sequence number (idempotent, storage/scripts.py) and new packets gather in the next
    delta: nothing is lost or counted twice.

    Batches with an id (exactly once) commit in three steps:
      1. prepare: atomically claim the batch ids and write this flush's journal; ids
         already committed are acknowledged as duplicates and not counted, ids claimed by
         another flush wait for the next one;
      2. apply: run the merge scripts (idempotent);
      3. finalize: mark the ids committed (for the dedupe window), delete the journal.
    If the instance dies between 1 and 3, another replays the journal (pipeline/recovery.py).

    Where a flush's packets are about its device merges (OVERLAP_MAX_FOLD), run() takes,
    encodes and prepares the next flush while one applies, so Redis does not wait for the
    encoding (a fifth of a flush at a million devices): there it gave ~10% more packets/s
    and a fresh p99 a second or two shorter, with less memory (benchmarks/RESULTS.md,
    seventeenth pass; on a machine shared with other loads, no more packets/s: fifteenth).
    A flush applies once the one begun before it is done, whoever began it: a merge call
    skips what its marker says a later flush of this instance applied, so applies go in
    sequence order, and at most two flushes are in progress (`inflight_packets`,
    `inflight_entries` count both).
    """

    def __init__(
        self,
        aggregator: Aggregator,
        committer: Committer,
        interval: float,
        *,
        dedupe_window_s: int = 600,
        instance_id: str | None = None,
        stretch: float = 0.0,
        interval_max: float | None = None,
        pace_min_merges: int = 50_000,
    ) -> None:
        self.aggregator = aggregator
        self.committer = committer
        self.interval = interval
        self.stretch = stretch
        self.interval_max = max(interval, interval_max or interval)
        self.dedupe_window_s = dedupe_window_s
        self.stats = FlushStats(interval_s=interval)
        # Unique per process start: markers and journals of instances never collide.
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        # The flushes taken from the aggregator and not yet committed: run() has at most
        # two, one applying (its task) while the next encodes and prepares; a flush_once()
        # beside it, another.
        self._inflight: list[_Flush] = []
        self._applying: asyncio.Task[None] | None = None
        self._last: asyncio.Future[None] | None = None  # the latest flush's `done`
        # Packets per device merge of the latest flush committed (OVERLAP_MAX_FOLD)
        self._fold = float("inf")
        # Why this instance commits nothing more (a flush that may have journaled was
        # given up: see _give_up), else None; `broken` is set with it (not while stopping):
        # the runtime then stops this process, so that a fresh one takes over.
        self._broken: str | None = None
        self.broken = asyncio.Event()
        # Device merges per second: the slowest of the last PACE_FLUSHES flushes that made
        # at least pace_min_merges (None before one did), the pace the pipeline's time
        # budget (--max-pending-seconds) is measured by. A smaller flush's time is mostly
        # its fixed costs: its pace would understate a big one's. The slowest, not the last:
        # on a shared machine (a Redis fork, the load generator) one flush's pace is twice
        # the next one's, and a budget sized by a fast one made the next flush twice as long.
        self.merge_rate: float | None = None
        self.pace_min_merges = max(1, pace_min_merges)
        self._paces: deque[float] = deque(maxlen=PACE_FLUSHES)
        self._seq = 0
        self._wake = asyncio.Event()
        self._stopping = False
        self._deadline: float | None = None  # set by stop(): retries give up after it

    @property
    def inflight_packets(self) -> int:
        """Packets of the flushes under way."""
        return sum(f.packets for f in self._inflight)

    @property
    def inflight_entries(self) -> int:
        """Per-device deltas of the flushes under way (their device merges once prepared)."""
        return sum(f.entries for f in self._inflight)

    def request_flush(self) -> None:
        """Flush now rather than at the next tick (much is pending)."""
        self._wake.set()

    async def run(self) -> None:
        """Flush on every tick until stop(), then once more (the final flush)."""
        try:
            await self._run()
        finally:
            if self._applying is not None:  # cancelled: the flush applying goes with it
                self._applying.cancel()
                await asyncio.gather(self._applying, return_exceptions=True)
                self._applying = None

    async def _run(self) -> None:
        next_tick = time.monotonic() + self.interval
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_tick - time.monotonic()))
            except TimeoutError:
                pass
            requested = self._wake.is_set()  # a budget asked for it: no stretching
            self._wake.clear()
            if self._stopping:
                break
            started = time.monotonic()
            # This flush encodes and prepares while the one before it applies (if any); it
            # applies once that one is done.
            try:
                flush = await self._begin()
            except Exception:  # never die silently: log, and try again next tick
                logger.exception("flush failed unexpectedly")
                flush = None
            try:
                await self._settle()
            except BaseException as exc:  # cancelled: this one is given up, never stranded
                if flush is not None:
                    self._give_up(flush, exc, prepared=flush.journaled)
                raise
            if flush is not None:
                self._applying = asyncio.create_task(self._finish(flush))
                if self._fold > OVERLAP_MAX_FOLD:
                    # Devices send several packets per flush: the longer the next one
                    # gathers, the more packets each of its merges folds together. Not
                    # begun early (and the interval stretches with this flush's own time).
                    await self._settle()
            # (the interval stretches with the last committed flush's time)
            elapsed = self.stats.last_flush_seconds if flush is not None else 0.0
            next_tick = started + self._next_interval(elapsed, requested or flush is None)
        await self._settle()
        await self.flush_once()
        # Batches carried over at the very end (their id pending elsewhere) are not acked.
        _, _, leftover = self.aggregator.swap()
        if leftover:
            self._abandon(FlushDelta(), {}, leftover, "shutdown before their ids were settled")

    def _next_interval(self, elapsed: float, requested: bool) -> float:
        """Adaptive flushing: from the start of a flush to the next, wait `interval`, or
        `stretch` times as long as the flush took if that is longer (capped at
        `interval_max`). A big fleet is then merged less often, with more packets per
        device per merge, instead of keeping Redis busy with back-to-back flushes; every
        pending packet still goes in the next flush, and the budgets still flush at once."""
        interval = min(max(self.interval, self.stretch * elapsed), self.interval_max)
        stats = self.stats
        stats.interval_s = round(interval, 3)
        if interval > self.interval and not requested:  # (requested: or nothing was taken)
            stats.stretched_flushes += 1
        return interval

    async def _settle(self) -> None:
        """Wait for the flush run() left applying, if any (_finish never raises)."""
        task, self._applying = self._applying, None
        if task is not None:
            await task

    def stop(self, deadline_s: float) -> None:
        """End the timer loop; run() then makes its final flush, retrying up to `deadline_s`.

        Call it once the aggregator has drained the queue, so the final flush has it all.
        """
        self._deadline = time.monotonic() + deadline_s
        self._stopping = True
        self._wake.set()

    async def flush_once(self) -> None:
        """Commit the current delta and batches, retrying with capped backoff (applied after
        any flush begun before it: run()'s, if called beside it)."""
        flush = await self._begin()
        if flush is not None:
            await self._finish(flush)

    async def _begin(self) -> _Flush | None:
        """Steps 1-2 of a flush: swap, encode and prepare (None: nothing to flush, or it
        was abandoned). May run while the flush before this one applies."""
        delta, trackers, batches = self.aggregator.swap()
        if not delta and not trackers and not batches:
            return None
        self._seq += 1
        flush = _Flush(
            self._seq, delta, trackers, batches,
            packets=delta.packets + sum(b.packets for b in batches),
            entries=delta.entries + sum(b.entries for b in batches),
            after=self._last, done=asyncio.get_running_loop().create_future(),
            errors=self.stats.commit_errors,
        )  # fmt: skip
        self._last = flush.done
        self._inflight.append(flush)
        if self._broken is not None:
            self._give_up(flush, _GiveUp(self._broken))
            return None
        try:
            await self._prepare(flush)
        except BaseException as exc:  # (cancelled too: its senders hear of it, and the budget)
            # (once a prepare was sent, its journal may be in Redis: nothing after may apply)
            self._give_up(flush, exc, prepared=flush.journaled)
            if not isinstance(exc, Exception):
                raise
            return None
        finally:
            flush.busy += time.monotonic() - flush.started
        return flush

    async def _finish(self, flush: _Flush) -> None:
        """Steps 3-4: apply and finalize, then acknowledge, once the flush begun before it
        is done (applies go in sequence order: a merge call skips what its marker says a
        later flush of this instance applied). Never raises (but CancelledError)."""
        try:
            if flush.after is not None:
                await asyncio.shield(flush.after)
            if self._broken is not None:
                raise _GiveUp(self._broken)
            started = time.monotonic()
            try:
                await self._apply(flush)
            finally:
                flush.busy += time.monotonic() - started
            flush.finalized = True
            self._acknowledge(flush)
        except BaseException as exc:  # (cancelled too)
            if flush.finalized:  # committed: only its acks went wrong
                self._fail_acks(flush, exc)
            else:
                self._give_up(flush, exc, prepared=True)
            if not isinstance(exc, Exception):
                raise
        finally:
            if not flush.done.done():
                flush.done.set_result(None)

    def _acknowledge(self, flush: _Flush) -> None:
        """A flush is committed: its stats, its senders' acks, its carried-over batches."""
        stats = self.stats
        elapsed, merges = flush.busy, flush.merges
        # (a flush that waited for Redis to come back says nothing of its pace)
        waited = stats.commit_errors != flush.errors
        # The pace is over the flush's own seconds, from its start to its end, including a
        # prepare that waited behind the last flush's apply (begun early): that is how long
        # its packets waited, which the budget bounds. (Paced from the last flush's end
        # instead, a million devices' fresh p99 went from 3.9-4.9 s to 6.8 s: RESULTS.md,
        # seventeenth pass.)
        if not waited and merges >= self.pace_min_merges and elapsed > 0:
            self._paces.append(merges / elapsed)
            self.merge_rate = min(self._paces)
        self._inflight.remove(flush)
        stats.flushes += 1
        committed = flush.delta.packets + sum(b.packets for b in flush.fresh)
        stats.packets_committed += committed
        stats.devices_committed += merges
        self._fold = committed / merges if merges else float("inf")
        stats.last_flush_ms = int(time.time() * 1000)
        stats.last_flush_seconds = elapsed
        for tracker, items in flush.trackers.items():
            tracker.committed(items)
        for batch in flush.fresh:
            batch.tracker.committed(1)
        for batch in flush.duplicates:
            stats.duplicate_batches += 1
            stats.duplicate_packets += batch.packets
            batch.tracker.duplicate = True
            batch.tracker.committed(1)
        if flush.carried:
            stats.carried_over_batches += len(flush.carried)
            self.aggregator.carry_over(flush.carried)
        if elapsed > max(1.0, 5 * self.interval):
            logger.warning(
                "flush of %d packets / %d device merges took %.2fs", committed, merges, elapsed
            )

    def _give_up(self, flush: _Flush, exc: BaseException, *, prepared: bool = False) -> None:
        """Fail a flush's acks: Redis stayed away past the shutdown deadline, or a bug (not
        an outage: retrying would loop forever).

        A flush that may have written its journal leaves it to be replayed once this
        instance is gone; were a later flush of this instance applied meanwhile, its
        markers would make the replay skip this one's calls. So this instance commits
        nothing more: it says so (/readyz, /stats) and sets `broken`, and the runtime stops
        the process (exit code 1) for its supervisor to start a fresh one."""
        if flush in self._inflight:
            self._inflight.remove(flush)
        if isinstance(exc, _GiveUp):
            error = str(exc.__cause__ or exc)
        elif isinstance(exc, asyncio.CancelledError):
            error = "the flusher was cancelled"
        else:
            logger.error("flush %s:%d failed", self.instance_id, flush.seq, exc_info=exc)
            error = repr(exc)
        if prepared and self._broken is None:
            self._broken = f"flush {self.instance_id}:{flush.seq} could not be completed ({error})"
            if not self._stopping:
                self._broken += (
                    "; this instance commits nothing more until it is restarted (another "
                    "instance then replays that flush from its journal)"
                )
            logger.error("%s", self._broken)
        if self._broken is not None and not self._stopping:
            self.stats.redis_error = self._broken
            self.broken.set()
        self._abandon(flush.delta, flush.trackers, flush.batches, error)
        if not flush.done.done():
            flush.done.set_result(None)

    def _fail_acks(self, flush: _Flush, exc: BaseException) -> None:
        """A committed flush whose acknowledging failed (a bug): its senders not told yet
        get an error (a resend is a duplicate); nothing is counted as abandoned."""
        if flush in self._inflight:
            self._inflight.remove(flush)
        if not isinstance(exc, asyncio.CancelledError):
            logger.error("acknowledging flush %s:%d failed", self.instance_id, flush.seq,
                         exc_info=exc)  # fmt: skip
        failure = CommitFailed(f"committed, but its acknowledgement failed: {exc!r}")
        _fail(flush.trackers, flush.batches, failure)

    async def _prepare(self, flush: _Flush) -> None:
        """Encode and prepare `flush` (its write, and which batches it counts)."""
        fresh: list[PendingBatch] = []
        seen: set[tuple[str, int]] = set()
        for batch in flush.batches:
            # The same id twice in one flush (a quick resend): settle the first, retry the rest.
            (flush.carried if batch.batch_id in seen else fresh).append(batch)
            seen.add(batch.batch_id)
        delta = flush.delta
        while True:
            batch_ids = [b.batch_id for b in fresh]
            # Reduced and encoded off the event loop: with a fleet that is numpy over one
            # entry per device of every batch (and a dict step each), hundreds of ms that
            # receivers and HTTP requests would otherwise wait behind. `delta` itself stays
            # whole: a conflict reduces it again.
            with self._step("encode"):
                write, flush.merges = await asyncio.to_thread(
                    self._encode, delta, fresh, batch_ids, flush.seq
                )
            # Each step is retried alone with the same flush (instance, seq): all idempotent.
            flush.journaled = True
            with self._step("prepare"):
                conflicts = await self._retry(write.prepare)
            if conflicts:
                flush.journaled = False  # (a prepare with conflicts writes nothing)
                # Nothing was written: drop the resends and try again without them.
                for pos, claim in conflicts.items():
                    (flush.duplicates if claim is Claim.COMMITTED else flush.carried).append(
                        fresh[pos]
                    )
                fresh = [b for pos, b in enumerate(fresh) if pos not in conflicts]
                continue
            break
        # Prepared: the write (and the journal) holds what the delta and the batches add,
        # so their columns are let go and the pending budget counts the write's device
        # merges instead. Receivers then gather the next flush while Redis applies this
        # one: a fleet's batches hold several entries per device merge.
        delta.release()
        for batch in fresh + flush.duplicates:
            batch.release()
        flush.fresh, flush.write = fresh, write
        flush.entries = flush.merges + sum(b.entries for b in flush.carried)

    async def _apply(self, flush: _Flush) -> None:
        """Apply and finalize a prepared flush."""
        write = flush.write
        assert write is not None  # (prepared)
        with self._step("apply"):
            dropped = await self._retry(write.apply)
        if dropped:
            self.stats.record_full_drops += dropped
            # (a device that keeps sending new names logs at every flush: the log's
            # RepeatFilter keeps a few of these lines per window, as for any line)
            logger.warning(
                "device records full: %d new kinds, value names or rate buckets not "
                "recorded (their packets are counted; rtm_record_full_drops, README: "
                "Limits)",
                dropped,
            )
        with self._step("finalize"):
            await self._retry(partial(write.finalize, self.dedupe_window_s))

    @contextmanager
    def _step(self, step: str) -> Iterator[None]:
        """Add the time spent in the block (retries included, and a failing one's) to the
        stats' seconds of `step` (one of model.FLUSH_STEPS)."""
        field = f"{step}_seconds"
        since = time.monotonic()
        try:
            yield
        finally:
            setattr(self.stats, field, getattr(self.stats, field) + time.monotonic() - since)

    def _encode(
        self, delta: FlushDelta, fresh: list[PendingBatch], batch_ids: list[BatchId], seq: int
    ) -> tuple[FlushWrite, int]:
        """The write of `delta` plus the `fresh` batches (reduced to one set of columns),
        and the device merges it makes."""
        parts = delta.batches() + [part for batch in fresh for part in batch.parts]
        merged = FlushDelta(rejected=delta.rejected)
        # (reduced once, for this write: without the devices' keys, whose references
        # were a quarter of the reduction at a million devices: benchmarks/RESULTS.md,
        # twenty-seventh pass)
        reduced = reduce_batches(parts, keep_keys=False)
        merged.add_part(reduced)
        write = self.committer.encode(merged, batch_ids, self.instance_id, seq)
        return write, reduced.entries

    async def _retry(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run `attempt` until storage answers; give up only past the shutdown deadline."""
        backoff = BACKOFF_START_S
        failures = 0
        while True:
            try:
                result = await attempt()
            except CommitUnavailable as exc:
                failures += 1
                self.stats.commit_errors += 1
                # (a broken instance keeps saying why it commits nothing more: _give_up)
                self.stats.redis_error = self._broken or str(exc)
                if failures == 1 or failures % 20 == 0:
                    logger.warning("commit failed (%s); retrying (attempt %d)", exc, failures)
                if self._deadline is not None and time.monotonic() + backoff > self._deadline:
                    raise _GiveUp("Redis unreachable past the shutdown deadline") from exc
                await asyncio.sleep(backoff * _JITTER.uniform(0.5, 1.0))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            if failures:
                self.stats.redis_recoveries += 1
                logger.info("Redis is back: committed after %d failed attempts", failures)
            self.stats.redis_error = self._broken
            return result

    def _abandon(
        self,
        delta: FlushDelta,
        trackers: dict[CommitTracker, int],
        batches: list[PendingBatch],
        error: str,
    ) -> None:
        packets = delta.packets + sum(b.packets for b in batches)
        self.stats.packets_abandoned += packets
        logger.error(
            "%d packets were NOT committed (%s); their senders get an error instead of an "
            "ack and can resend (a prepared journal is replayed by another instance)",
            packets,
            error,
        )
        _fail(trackers, batches, CommitFailed(f"could not commit to Redis: {error}"))


def _fail(
    trackers: dict[CommitTracker, int], batches: list[PendingBatch], failure: CommitFailed
) -> None:
    """Tell the senders of `trackers` and `batches` that their work failed (a tracker
    already settled stays as it is)."""
    for tracker in trackers:
        tracker.failed(failure)
    for batch in batches:
        batch.tracker.failed(failure)
