"""The aggregator folds rows exactly: counts, bytes, kinds, value statistics, trackers."""

from __future__ import annotations

import asyncio

from rtmonitor.pipeline.aggregator import Aggregator
from rtmonitor.pipeline.work import CommitTracker, Work


def test_fold_counts_and_statistics() -> None:
    async def main() -> None:
        agg = Aggregator()
        t1, t2 = CommitTracker(), CommitTracker()
        agg.add(Work([("a", "reading", 10, 100, {"t": 5.0}), ("b", "tcp", 3, 100, None)], 1000, t1))
        agg.add(
            Work([("a", "reading", 2, 50, {"t": 9.0}), ("a", "hb", 0, 200, {"t": -1.0})], 900, t2)
        )
        agg.add(Work([("a", "reading", 1, 200, {"t": 7.0})], 1100, t2))
        agg.count_rejected("empty_device_id", 3)
        assert agg.pending_packets == 5
        delta, trackers = agg.swap()
        assert agg.pending_packets == 0 and not agg.swap()[0]
        assert trackers == {t1: 1, t2: 2}
        assert delta.packets == 5 and delta.bytes == 16
        assert delta.rejected == {"empty_device_id": 3}
        a = delta.devices["a"]
        assert (a.packets, a.bytes, a.first_seen, a.last_seen) == (4, 13, 900, 1100)
        assert a.kinds == {"reading": 3, "hb": 1}
        t = a.values["t"]
        assert (t.count, t.sum, t.min, t.max) == (4, 20.0, -1.0, 9.0)
        # newest device timestamp wins; on a tie (200) the later arrival wins
        assert (t.last, t.last_ts) == (7.0, 200)
        assert delta.devices["b"].kinds == {"tcp": 1}

    asyncio.run(main())


def test_tracker_resolves_only_when_closed_and_all_committed() -> None:
    async def main() -> None:
        t = CommitTracker()
        t.submitted(2)
        t.close()
        waiter = asyncio.create_task(t.wait())
        t.committed(1)
        await asyncio.sleep(0)
        assert not waiter.done()
        t.committed(1)
        await asyncio.wait_for(waiter, 1)

    asyncio.run(main())
