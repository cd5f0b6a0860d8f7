"""The flusher: commits the aggregator's deltas to Redis on a timer, retrying outages."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from dataclasses import dataclass

from redis.exceptions import RedisError

from rtmonitor.pipeline.aggregator import Aggregator
from rtmonitor.pipeline.work import CommitFailed, CommitTracker
from rtmonitor.storage.model import FlushDelta
from rtmonitor.storage.store import RedisStore

logger = logging.getLogger(__name__)

BACKOFF_START_S = 0.05
BACKOFF_MAX_S = 2.0


@dataclass(slots=True)
class FlushStats:
    """Self-metrics of the flusher."""

    flushes: int = 0
    packets_committed: int = 0
    commit_errors: int = 0
    last_flush_ms: int = 0
    last_flush_seconds: float = 0.0
    # packets that could not be committed by the shutdown deadline (never acknowledged)
    packets_abandoned: int = 0
    redis_error: str | None = None  # the last error while Redis is failing, else None


class Flusher:
    """Takes the aggregator's delta every `interval` seconds (or when asked) and commits it.

    刷新策略（参考 OpenTelemetry 的 BatchProcessor）：按定时器刷新，积压太多时提前刷新，
    关闭时做最后一次刷新。Redis 不可用时，同一份增量带着同一个 flush id 反复重试
    （幂等，见 storage/scripts.py），期间新数据在下一份增量里继续累积——不丢，也不重复。
    """

    def __init__(self, aggregator: Aggregator, store: RedisStore, interval: float) -> None:
        self.aggregator = aggregator
        self.store = store
        self.interval = interval
        self.stats = FlushStats()
        # Unique per process start: flush ids (and so idempotency markers) never collide
        # between instances or restarts.
        self.instance_id = uuid.uuid4().hex[:12]
        self._seq = 0
        self._wake = asyncio.Event()
        self._stopping = False
        self._deadline: float | None = None  # set by stop(): retries give up after it

    def request_flush(self) -> None:
        """Flush now rather than at the next tick (much is pending)."""
        self._wake.set()

    async def run(self) -> None:
        """Flush on every tick until stop(), then once more (the final flush)."""
        next_tick = time.monotonic() + self.interval
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_tick - time.monotonic()))
            except TimeoutError:
                pass
            self._wake.clear()
            if self._stopping:
                break
            next_tick = time.monotonic() + self.interval
            try:
                await self.flush_once()
            except Exception:  # never die silently: log, and try again next tick
                logger.exception("flush failed unexpectedly")
        await self.flush_once()

    def stop(self, deadline_s: float) -> None:
        """End the timer loop; run() then makes its final flush, retrying up to `deadline_s`.

        Call it once the aggregator has drained the queue, so the final flush has it all.
        """
        self._deadline = time.monotonic() + deadline_s
        self._stopping = True
        self._wake.set()

    async def flush_once(self) -> None:
        """Commit the current delta, retrying with capped backoff (until the stop deadline)."""
        delta, trackers = self.aggregator.swap()
        if not delta and not trackers:
            return
        self._seq += 1
        flush_id = f"{self.instance_id}:{self._seq}"
        started = time.monotonic()
        error = await self._commit_with_retry(delta, flush_id)
        if error is not None:
            self._abandon(delta, trackers, error)
            return
        elapsed = time.monotonic() - started
        stats = self.stats
        stats.flushes += 1
        stats.packets_committed += delta.packets
        stats.last_flush_ms = int(time.time() * 1000)
        stats.last_flush_seconds = elapsed
        for tracker, items in trackers.items():
            tracker.committed(items)
        if elapsed > max(1.0, 5 * self.interval):
            logger.warning(
                "flush of %d packets / %d devices took %.2fs",
                delta.packets,
                len(delta.devices),
                elapsed,
            )

    async def _commit_with_retry(self, delta: FlushDelta, flush_id: str) -> BaseException | None:
        backoff = BACKOFF_START_S
        failures = 0
        while True:
            try:
                await self.store.commit(delta, flush_id)
            except (RedisError, OSError) as exc:
                failures += 1
                self.stats.commit_errors += 1
                self.stats.redis_error = f"{type(exc).__name__}: {exc}"
                if failures == 1 or failures % 20 == 0:
                    logger.warning(
                        "commit of %d packets failed (%s); retrying (attempt %d)",
                        delta.packets,
                        self.stats.redis_error,
                        failures,
                    )
                if self._deadline is not None and time.monotonic() + backoff > self._deadline:
                    return exc
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            except Exception as exc:
                # A bug, not an outage: retrying would loop forever. Fail these acks loudly.
                logger.exception("commit of flush %s failed", flush_id)
                return exc
            if failures:
                logger.info("Redis is back: committed after %d failed attempts", failures)
            self.stats.redis_error = None
            return None

    def _abandon(
        self, delta: FlushDelta, trackers: dict[CommitTracker, int], error: BaseException
    ) -> None:
        self.stats.packets_abandoned += delta.packets
        logger.error(
            "%d packets from %d devices were NOT committed (%s); their senders get an error "
            "instead of an ack and can resend",
            delta.packets,
            len(delta.devices),
            error,
        )
        failure = CommitFailed(f"could not commit to Redis: {error}")
        for tracker in trackers:
            tracker.failed(failure)
