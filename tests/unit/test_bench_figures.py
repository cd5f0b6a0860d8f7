"""The bench's figures over the timed load alone, with a first round before it."""

from __future__ import annotations

import os

from rtmonitor.loadgen.bench import _Baseline, _merge_cost, _thread_sched


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
    assert "redis_ran_share" not in cost  # (no main thread's times: a Redis elsewhere)


def test_redis_main_threads_shares_of_the_load() -> None:
    """Ran and waited for a CPU over the same wall time as the load's Redis CPU."""
    before = {"cpu_s": 1.0, "forks": 0.0, "at": 100.0, "ran_s": 50.0, "waited_s": 7.0}
    after = {"cpu_s": 17.0, "memory": 0.0, "forks": 0.0, "at": 120.0, "ran_s": 66.0,
             "waited_s": 9.5}  # fmt: skip
    cost = _merge_cost(before, after, {"devices_committed": 4_000_000}, 1, _Baseline(0.0))
    assert cost["redis_ran_share"] == 0.8 and cost["redis_waited_share"] == 0.12
    assert cost["redis_us_per_merge"] == 4.0


def test_the_main_thread_is_read_from_the_kernels_count() -> None:
    """This very process's main thread: it has run, and the count only grows."""
    first = _thread_sched(os.getpid())
    assert first is not None and first[0] > 0 and first[1] >= 0
    sum(range(2_000_000))  # (some CPU)
    second = _thread_sched(os.getpid())
    assert second is not None and second[0] > first[0] and second[1] >= first[1]
    assert _thread_sched(2**22 + 1) is None  # (past pid_max: no such process)


def test_without_a_first_round_everything_is_the_loads() -> None:
    flush = {"devices_committed": 5000, "flushes": 5}
    cost = _merge_cost(
        {"cpu_s": 1.0, "forks": 0.0}, {"cpu_s": 1.1, "memory": 2000.0, "forks": 0.0}, flush, 10,
        _Baseline(0.0),
    )  # fmt: skip
    assert cost["device_merges"] == 5000 and cost["flushes"] == 5
    assert cost["redis_us_per_merge"] == 20.0 and cost["redis_bytes_per_device"] == 200
