"""What the pipeline needs from storage: a committer (implemented by storage/committer.py).

The flusher and recovery depend on these protocols only, as opentelemetry's
BatchProcessor depends on an Exporter: the key layout, the scripts and the client stay in
storage. Every step may fail with `model.CommitUnavailable` and is then tried again with
the same flush (instance, seq): each step is idempotent, so a retry never counts twice.

Exactly-once for batches with an id, one flush at a time:
  1. prepare: claim the batch ids and journal the flush's writes, atomically; an id
     already claimed is reported back (and nothing is written);
  2. apply: write the deltas;
  3. finalize: mark the ids committed (for the dedupe window) and drop the journal.
An instance that dies between 1 and 3 leaves its journal, which a live instance replays
(recover) once the dead one's heartbeat has expired.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from rtmonitor.model import BatchId, Claim, FlushDelta


class FlushWrite(Protocol):
    """One flush encoded for storage, with the ids of the batches it counts."""

    async def prepare(self) -> dict[int, Claim]:
        """Step 1: claim the batch ids and journal the writes. Returns the ids another flush
        holds, by position in the batch ids; when there are any, nothing was written."""
        ...

    async def apply(self) -> int:
        """Step 2: write the deltas (what a failed attempt wrote is not written again).
        Returns how many new kinds, value names and rate buckets the device records had no
        room for (model.RECORD_NAMES_MAX: their packets are counted, the names are not)."""
        ...

    async def finalize(self, dedupe_window_s: int) -> None:
        """Step 3: mark the batch ids committed for `dedupe_window_s`; drop the journal."""
        ...


class Committer(Protocol):
    """Commits flushes, replays dead instances' journals, and keeps this one alive."""

    def encode(
        self, delta: FlushDelta, batch_ids: Sequence[BatchId], instance: str, seq: int
    ) -> FlushWrite:
        """Flush number `seq` of `instance`, ready to commit. Called in a worker thread
        (it is CPU work on a whole flush): it may not touch the event loop."""
        ...

    async def heartbeat(self, instance: str, ttl_s: int) -> None:
        """Announce `instance` as alive for `ttl_s` (before it prepares any journal)."""
        ...

    async def orphans(self, instance: str) -> list[str]:
        """The oldest flush (id) of each instance other than `instance` that it prepared
        and never finalized, once its heartbeat has expired (an instance's flushes are
        replayed one at a time, in order)."""
        ...

    async def recover(self, flush_id: str, instance: str, dedupe_window_s: int) -> bool:
        """Replay and finalize a dead instance's flush; False if another instance has
        claimed it (or it is gone)."""
        ...

    @property
    def retention_s(self) -> int:
        """How long a silent device is kept (0: for ever)."""
        ...

    async def expire_silent_devices(self, now_ms: int) -> int:
        """Drop devices silent for longer than the retention; the number dropped."""
        ...
