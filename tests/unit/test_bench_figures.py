"""The bench's figures over the timed load alone, with a first round before it."""

from __future__ import annotations

import os
import time

from rtmonitor.loadgen.bench import _Baseline, _merge_cost, _SchedSampler, _thread_sched


def test_merges_flushes_and_memory_are_the_timed_loads() -> None:
    first_round = _Baseline(
        memory=1_000_000.0, packets=3000, merges=3000, flushes=2,
        steps={"encode": 0.5, "prepare": 0.25, "apply": 2.0, "finalize": 0.0},
    )  # fmt: skip
    flush = {
        "devices_committed": 23_000, "flushes": 12, "packets_committed": 400_000,
        "encode_seconds": 1.5, "prepare_seconds": 0.5, "apply_seconds": 6.0,
        "finalize_seconds": 0.25,
    }  # fmt: skip
    before = {"cpu_s": 10.0, "memory": 3_000_000.0, "forks": 3.0}  # after the first round
    after = {"cpu_s": 10.5, "memory": 3_100_000.0, "forks": 5.0}
    cost = _merge_cost(before, after, flush, 3000, first_round)
    assert cost["device_merges"] == 20_000 and cost["flushes"] == 10
    assert cost["redis_cpu_s"] == 0.5 and cost["redis_us_per_merge"] == 25.0
    assert cost["redis_forks"] == 2  # (AOF rewrites during the timed load)
    steps = {"encode": 1.0, "prepare": 0.25, "apply": 4.0, "finalize": 0.25}
    assert cost["flush_step_s"] == steps
    # the devices' records were written by the first round: memory from before it
    assert cost["redis_bytes_per_device"] == 700


def test_without_a_first_round_everything_is_the_loads() -> None:
    flush = {"devices_committed": 5000, "flushes": 5}
    cost = _merge_cost(
        {"cpu_s": 1.0, "forks": 0.0}, {"cpu_s": 1.1, "memory": 2000.0, "forks": 0.0}, flush, 10,
        _Baseline(0.0),
    )  # fmt: skip
    assert cost["device_merges"] == 5000 and cost["flushes"] == 5
    assert cost["redis_us_per_merge"] == 20.0 and cost["redis_bytes_per_device"] == 200


def test_redis_main_threads_shares_are_the_loads_own_time() -> None:
    """Ran and waited for a CPU over the load's time (first send to commit), not the
    seconds before it while the load generators built their packets."""
    sampler = _SchedSampler(None)
    # (time, ran, waited): idle while the packets are built, then busy from t=115
    sampler.samples = [(100.0, 50.0, 7.0), (110.0, 50.5, 7.1), (115.0, 51.0, 7.2),
                       (125.0, 59.0, 8.4), (135.0, 67.0, 9.6), (140.0, 67.5, 9.7)]  # fmt: skip
    assert sampler.shares(114.9, 135.0) == {"redis_ran_share": 0.8, "redis_waited_share": 0.12}
    assert sampler.shares(100.0, 140.0) == {"redis_ran_share": 0.44, "redis_waited_share": 0.07}
    assert sampler.shares(116.0, 124.0) == {}  # (no two readings inside)


def test_the_main_thread_is_read_from_the_kernels_count() -> None:
    """This very process's main thread, read while it works: it ran, and the count grows."""
    with _SchedSampler(os.getpid(), period=0.02) as sampler:
        start = time.time()
        while time.time() - start < 0.3:
            sum(range(10_000))
    shares = sampler.shares(start, time.time())
    # (a busy machine may queue it: only that it ran, and no more than the wall time)
    assert 0.05 < shares["redis_ran_share"] <= 1.05 and shares["redis_waited_share"] >= 0
    assert _thread_sched(2**22 + 1) is None  # (past any pid_max: no such process)
    with _SchedSampler(None) as nothing:  # (a Redis elsewhere: nothing read)
        pass
    assert nothing.samples == []
