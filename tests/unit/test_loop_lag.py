"""The event loop's lag probe (api/loop.py): what it records and what readers make of it."""

from __future__ import annotations

import asyncio
import time

import pytest

from rtmonitor.api.loop import LAG_BUCKETS_MS, LoopLag, lag_ms_quantile


def test_lags_fall_in_cumulative_buckets_with_their_sum_and_longest() -> None:
    lag = LoopLag()
    for ms in (0.2, 1.0, 1.5, 30.0, 30.0, 99.0, 7_000.0):
        lag.record(ms)
    stats = lag.stats()
    assert stats.probes == 7 and stats.lag_ms_max == 7_000.0
    assert stats.lag_ms_sum == pytest.approx(7_161.7)
    buckets = stats.lag_ms_buckets
    assert list(buckets) == [*map(str, LAG_BUCKETS_MS), "+Inf"]
    # "le": at most the bound (1.0 is in the 1 ms bucket), cumulative, all in +Inf
    assert buckets["1"] == 2 and buckets["2"] == 3 and buckets["20"] == 3
    assert buckets["50"] == 5 and buckets["100"] == 6 and buckets["5000"] == 6
    assert buckets["+Inf"] == 7


def test_a_quantile_between_two_readings_counts_only_the_probes_between() -> None:
    lag = LoopLag()
    for _ in range(100):
        lag.record(300.0)  # (before: a first round, say)
    before = lag.stats().lag_ms_buckets
    for _ in range(98):
        lag.record(3.0)
    lag.record(40.0)
    lag.record(40.0)
    after = lag.stats().lag_ms_buckets
    assert lag_ms_quantile(before, after, 0.5) == 5.0
    assert lag_ms_quantile(before, after, 0.99) == 50.0
    assert lag_ms_quantile(after, after, 0.99) is None
    lag.record(60_000.0)
    assert lag_ms_quantile(after, lag.stats().lag_ms_buckets, 0.99) == float("inf")


def test_the_probe_sees_the_loop_held_and_stops_twice_harmlessly() -> None:
    async def scenario() -> LoopLag:
        lag = LoopLag()
        lag.start()
        await asyncio.sleep(0.2)
        time.sleep(0.3)  # the loop held: whatever is due waits
        await asyncio.sleep(0.1)
        await lag.stop()
        await lag.stop()
        return lag

    lag = asyncio.run(scenario())
    stats = lag.stats()
    assert stats.lag_ms_max >= 200  # (0.3 s held, less the probe's interval)
    assert stats.lag_ms_buckets["100"] < stats.probes  # one probe past 100 ms
    assert stats.probes >= 4
    assert lag._task is None
