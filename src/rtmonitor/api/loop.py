"""How late this process's event loop runs what is due: what a request arriving then waits
before its code runs, whatever Redis does (one sample per timer: a long hold counts once).

A timer every PROBE_INTERVAL_S: how much later than due it fires is the loop's lag at that
moment (callbacks queued before it, or the loop's thread waiting for the GIL or a core).
Under a fleet's load, reads' tails come from here as often as from Redis
(benchmarks/RESULTS.md, eighteenth pass): GET /stats says which (`api.event_loop`, beside
the bench's `redis_stalls`). Kept as a histogram since the start (LAG_BUCKETS_MS, counts
only grow: a reader diffs two readings for a window) and the longest since the start.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from dataclasses import dataclass
from typing import Any

PROBE_INTERVAL_S = 0.05
# Upper bounds, ms (the last bucket holds every longer lag).
LAG_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


@dataclass(frozen=True, slots=True)
class LoopLagStats:
    """The `event_loop` section of GET /stats' `api`."""

    probes: int
    lag_ms_sum: float
    lag_ms_max: float
    # probes whose lag was at most each bound ("le", cumulative, as Prometheus' buckets)
    lag_ms_buckets: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "probe_interval_ms": round(PROBE_INTERVAL_S * 1000),
            "probes": self.probes,
            "lag_ms_sum": round(self.lag_ms_sum, 1),
            "lag_ms_max": round(self.lag_ms_max, 1),
            "lag_ms_buckets": self.lag_ms_buckets,
        }


class LoopLag:
    """The probe: start() on the loop to watch, stats() any time, stop() (twice harmless)."""

    def __init__(self) -> None:
        self._counts = [0] * (len(LAG_BUCKETS_MS) + 1)
        self._sum_ms = 0.0
        self._max_ms = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._probe(), name="loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def record(self, lag_ms: float) -> None:
        self._counts[bisect.bisect_left(LAG_BUCKETS_MS, lag_ms)] += 1
        self._sum_ms += lag_ms
        self._max_ms = max(self._max_ms, lag_ms)

    def stats(self) -> LoopLagStats:
        buckets: dict[str, int] = {}
        total = 0
        for bound, count in zip((*map(str, LAG_BUCKETS_MS), "+Inf"), self._counts, strict=True):
            total += count
            buckets[bound] = total
        return LoopLagStats(
            probes=total, lag_ms_sum=self._sum_ms, lag_ms_max=self._max_ms, lag_ms_buckets=buckets
        )

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + PROBE_INTERVAL_S
            await asyncio.sleep(PROBE_INTERVAL_S)
            self.record(max(0.0, (loop.time() - due) * 1000))


def lag_ms_quantile(before: dict[str, int], after: dict[str, int], q: float) -> float | None:
    """The bound of the bucket holding the q-quantile of the probes between two readings of
    `lag_ms_buckets` (None without a probe; infinity past the last bound)."""
    total = after["+Inf"] - before.get("+Inf", 0)
    if total <= 0:
        return None
    for bound, count in after.items():
        if count - before.get(bound, 0) >= q * total:
            return float(bound) if bound != "+Inf" else float("inf")
    return float("inf")
