"""Recovery: every instance heartbeats, and replays the journals of instances that died."""

from __future__ import annotations

import asyncio
import logging
import time

from rtmonitor.model import CommitUnavailable, RecoveryStats
from rtmonitor.pipeline.commit import Committer

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 2.0
# An instance whose heartbeat is older than this is dead: its unfinished flushes are replayed.
HEARTBEAT_TTL_S = 10


# How often retention drops silent devices from the indexes.
RETENTION_INTERVAL_S = 30.0


class Recovery:
    """A background loop: heartbeat, finish any flush a dead instance left prepared, and
    (every RETENTION_INTERVAL_S) drop silent devices from the indexes.

    An instance that dies between claiming its batch ids (journal written) and marking them
    committed leaves its journal in Redis. Once its heartbeat expires, any live instance
    replays the journal's merge calls (idempotent) and commits, so the client's resends of
    those batches are then acknowledged as duplicates: each is counted exactly once.
    """

    def __init__(self, committer: Committer, instance_id: str, dedupe_window_s: int) -> None:
        self.committer = committer
        self.instance_id = instance_id
        self.dedupe_window_s = dedupe_window_s
        self.stats = RecoveryStats()
        self._stop = asyncio.Event()
        self._next_retention = 0.0

    async def heartbeat(self) -> None:
        """Announce this instance as alive (before it prepares any journal)."""
        await self.committer.heartbeat(self.instance_id, HEARTBEAT_TTL_S)

    async def run_once(self) -> int:
        """Heartbeat and recover what can be; the number of journals recovered."""
        await self.heartbeat()
        recovered = 0
        committer = self.committer
        progress = True
        while progress:  # (a dead instance's next journal shows once its last is replayed)
            progress = False
            for flush_id in await committer.orphans(self.instance_id):
                if await committer.recover(flush_id, self.instance_id, self.dedupe_window_s):
                    progress = True
                    recovered += 1
                    self.stats.journals_recovered += 1
                    logger.warning(
                        "recovered flush %s of a dead instance from its journal", flush_id
                    )
        if time.monotonic() >= self._next_retention:
            # a short retention (tests, demos) is enforced more often
            interval = min(RETENTION_INTERVAL_S, max(1.0, committer.retention_s / 4))
            self._next_retention = time.monotonic() + interval
            expired = await committer.expire_silent_devices(int(time.time() * 1000))
            self.stats.devices_expired += expired
            if expired:
                logger.info("retention: dropped %d silent devices", expired)
        return recovered

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.run_once()
            except CommitUnavailable as exc:
                self.stats.errors += 1
                logger.debug("recovery pass failed: %s", exc)
            except Exception:  # never die silently
                self.stats.errors += 1
                logger.exception("recovery pass failed unexpectedly")
            try:
                await asyncio.wait_for(self._stop.wait(), HEARTBEAT_INTERVAL_S)
            except TimeoutError:
                pass

    def stop(self) -> None:
        self._stop.set()
