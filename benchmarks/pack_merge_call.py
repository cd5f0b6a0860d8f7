"""Packing one device merge call in the Redis protocol, in this process: what the apply
does on the event loop for each call of a flush (RTM.MERGE6 with a marker, the index
group's 8 keys, 256 device keys, 4 numbers, the packed deltas and the id offset).

`c`: storage/wire.py's packer as the store uses it (storage/_pack.c's resp()); `hiredis`:
the path such a call took before (wire._with_large_values: hiredis' packer between the
large values, and the copies around it). Both give the same bytes (checked here). Times
are the median of --runs, each over --calls calls.

    .venv/bin/python benchmarks/pack_merge_call.py [--devices 256] [--calls 2000] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from rtmonitor.storage import wire
from rtmonitor.storage.keys import KeyLayout
from rtmonitor.storage.store import MERGE_COMMAND, RedisStore


def merge_call(devices: int) -> tuple[Any, ...]:
    """A flush's merge call as the store sends it (RedisStore._module_call; bench's ids and
    prefix)."""
    layout = KeyLayout("bench1796298045columns")
    store = RedisStore(aioredis.Redis(), layout)  # (never connects: it only builds the call)
    keys = [layout.group_marker(layout.tag(0), "instance-1", 3)]
    keys += layout.device_keys(f"s0-{i:07d}" for i in range(devices))
    deltas = os.urandom(100 * devices)  # (~100 bytes of packed delta per device)
    args = [86400, 12345, 7 * 86400 * 1000, 1796298, deltas]
    return (MERGE_COMMAND, *store._module_call(keys, args))


def timed(pack: Callable[[], list[bytes]], calls: int, runs: int) -> float:
    """Median seconds per call."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            pack()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=256)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    opts = parser.parse_args()
    call = merge_call(opts.devices)
    lean = wire.LeanConnection()
    packers: dict[str, Callable[[], list[bytes]]] = {
        "c": lambda: lean.pack_command(*call),
        "hiredis": lambda: wire._with_large_values(call),
    }
    assert b"".join(packers["c"]()) == b"".join(packers["hiredis"]())
    for name, pack in packers.items():
        seconds = timed(pack, opts.calls, opts.runs)
        print(
            f"{name:8s} {seconds * 1e6:8.1f} µs per call, "
            f"{seconds * 1e9 / opts.devices:6.0f} ns per device"
        )


if __name__ == "__main__":
    main()
