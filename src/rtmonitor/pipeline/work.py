"""What flows into the pipeline (queue items of rows or batches) and how receivers learn of
its commit."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TypeAlias

from rtmonitor.model import BatchDelta, BatchId, Row
from rtmonitor.pipeline.queue import PacketQueue


class CommitFailed(Exception):
    """The packets could not be committed (Redis unreachable past the shutdown deadline)."""


class CommitTracker:
    """Counts work handed to the pipeline; `wait()` returns once all of it is committed.

    A receiver acknowledges only after `wait()` returns: by then the counts are in Redis.
    One tracker per batch, or one per StreamPackets stream (fed one packet at a time).
    """

    __slots__ = ("_outstanding", "_closed", "_done", "duplicate")

    def __init__(self) -> None:
        # Set when a batch turned out to be committed already (a resend): not counted again.
        self.duplicate = False
        self._outstanding = 0
        self._closed = False
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def submitted(self, items: int = 1) -> None:
        """`items` work items were queued under this tracker."""
        self._outstanding += items

    def committed(self, items: int) -> None:
        """`items` work items of this tracker were committed to Redis."""
        self._outstanding -= items
        self._maybe_done()

    def failed(self, exc: BaseException) -> None:
        """The work of this tracker cannot be committed."""
        if not self._done.done():
            self._done.set_exception(exc)
            # Mark retrieved: a receiver that has already gone away must not log noise.
            self._done.exception()

    def close(self) -> None:
        """No more work will be submitted under this tracker."""
        self._closed = True
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._closed and self._outstanding == 0 and not self._done.done():
            self._done.set_result(None)

    async def wait(self) -> None:
        """Return once everything submitted is committed; raise CommitFailed otherwise."""
        await asyncio.shield(self._done)


@dataclass(slots=True, kw_only=True)
class RowsWork:
    """A queue item of StreamPackets' validated packets, received in the same millisecond
    (at-least-once: a stream's packets carry no id)."""

    rows: list[Row]
    recv_ms: int
    tracker: CommitTracker


@dataclass(slots=True, kw_only=True)
class BatchWork:
    """A queue item of one StreamBatches batch, already aggregated in column form
    (ingest/columnar.py): one part per form it was sent in (rows, columns)."""

    parts: tuple[BatchDelta, ...]
    tracker: CommitTracker
    # Counted exactly once when it has an id; None for a batch without a producer id
    # (at-least-once).
    batch_id: BatchId | None = None


# One queue item: told apart by type (isinstance / match), never by which field is empty.
Work: TypeAlias = RowsWork | BatchWork


class StreamRows:
    """A StreamPackets stream's way into the queue, one validated packet at a time.

    Packets received in the same millisecond join the stream's last queue item while it
    still waits for the aggregator (its rows share one receive time): one queue item and
    one wake-up of the aggregator per few packets, not per packet. The tracker counts
    queue items, so it is told of each new item, not of each packet.
    """

    __slots__ = ("_queue", "_tracker", "_work", "_ticket")

    def __init__(self, queue: PacketQueue[Work], tracker: CommitTracker) -> None:
        self._queue = queue
        self._tracker = tracker
        self._work: RowsWork | None = None
        self._ticket = -1

    def append(self, row: Row, recv_ms: int) -> bool:
        """Add `row` to the stream's queued item, if it can join it (no waiting)."""
        work = self._work
        if work is not None and work.recv_ms == recv_ms and self._queue.grow(self._ticket, 1):
            work.rows.append(row)
            return True
        return False

    async def put(self, row: Row, recv_ms: int) -> None:
        """Queue `row` as a new item, waiting while the queue is full (backpressure)."""
        work = self._work = RowsWork(rows=[row], recv_ms=recv_ms, tracker=self._tracker)
        self._ticket = await self._queue.put(work, 1)
        self._tracker.submitted()
