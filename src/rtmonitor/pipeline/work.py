"""What flows into the pipeline (validated rows) and how receivers learn of its commit."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TypeAlias

from rtmonitor.storage.model import BatchDelta

# A validated packet: (device_id, kind, payload bytes, device timestamp ms, values or None).
# Produced by ingest/validation.py, consumed by the aggregator.
Row: TypeAlias = tuple[str, str, int, int, dict[str, float] | None]


class CommitFailed(Exception):
    """The packets could not be committed (Redis unreachable past the shutdown deadline)."""


class CommitTracker:
    """Counts work handed to the pipeline; `wait()` returns once all of it is committed.

    端到端确认：接收端只有在 wait() 返回后才回 Ack——此时这些包的计数已经写进 Redis。
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


@dataclass(slots=True)
class Work:
    """One queue item: validated packets received together, and whom to tell on commit."""

    rows: list[Row]
    recv_ms: int
    tracker: CommitTracker
    # (producer_id, batch_id) of a batch to count exactly once; None for StreamPackets
    # packets and for batches without a producer id (those are at-least-once).
    batch_id: tuple[str, int] | None = None
    # A batch arrives already aggregated, in column form (ingest/columnar.py): one part
    # per form it was sent in (rows, columns). `rows` are only StreamPackets' packets.
    parts: tuple[BatchDelta, ...] = ()
