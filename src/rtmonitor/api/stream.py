"""The live feed behind GET /stream (Server-Sent Events).

One poller per process asks Redis, once per flush interval, which devices received packets
(the last_seen index, so every instance's packets count) and hands the fresh records to the
subscribers. A subscriber keeps only the latest record per device until its client reads
it: a slow or stalled client gets the latest state, never a backlog, and its memory is
bounded by the number of devices, not by time.

实时推送：轮询只有一个，订阅者各自只保留“每个设备的最新状态”，慢客户端不会让内存增长。
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from redis.exceptions import RedisError

from rtmonitor.storage.store import RedisStore

logger = logging.getLogger(__name__)

LOOKBACK_MS = 5000  # a flush commits up to a few intervals after receive: look back this far
MAX_CHANGED = 5000  # devices per poll


class Subscriber:
    """One client: the latest record of each changed device matching its prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.pending: dict[str, dict[str, Any]] = {}
        self.totals: dict[str, Any] | None = None
        self.ready = asyncio.Event()

    def offer(self, records: list[dict[str, Any]], totals: dict[str, Any]) -> None:
        for record in records:
            if record["device_id"].startswith(self.prefix):
                self.pending[record["device_id"]] = record  # newer replaces older
        moved = self.totals is None or any(
            self.totals[k] != totals[k] for k in ("packets", "rejected", "devices")
        )
        self.totals = totals
        if self.pending or moved:  # nothing new: no event (the keep-alive covers silence)
            self.ready.set()

    async def next(self) -> dict[str, Any]:
        await self.ready.wait()
        self.ready.clear()
        devices, self.pending = self.pending, {}
        return {"totals": self.totals, "devices": list(devices.values())}


class ChangeFeed:
    """Polls for changed devices while anyone listens; fans them out."""

    def __init__(self, store: RedisStore, interval: float) -> None:
        self.store = store
        self.interval = interval
        self.subscribers: set[Subscriber] = set()
        self._task: asyncio.Task[None] | None = None
        self._sent: dict[str, int] = {}  # device -> last_seen already published

    def subscribe(self, prefix: str) -> Subscriber:
        sub = Subscriber(prefix)
        self.subscribers.add(sub)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="change-feed")
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def poll_once(self) -> None:
        now = int(time.time() * 1000)
        seen = await self.store.recently_seen(now - LOOKBACK_MS, MAX_CHANGED)
        changed = [d for d, last in seen if self._sent.get(d, -1) < last]
        records = await self.store.get_devices(changed)
        totals = await self.store.totals()
        for d, last in seen:
            self._sent[d] = last
        if len(self._sent) > 4 * MAX_CHANGED:  # forget devices gone quiet
            cutoff = now - 2 * LOOKBACK_MS
            self._sent = {d: t for d, t in self._sent.items() if t >= cutoff}
        for sub in list(self.subscribers):
            sub.offer(records, totals)

    async def _run(self) -> None:
        while self.subscribers:
            try:
                await self.poll_once()
            except (RedisError, OSError) as exc:
                logger.warning("live feed: Redis unavailable (%s); retrying", exc)
            except Exception:  # never die silently
                logger.exception("live feed poll failed")
            await asyncio.sleep(self.interval)
