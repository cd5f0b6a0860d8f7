"""Redis CPU per device merge, the store alone: `RedisStore.plan` + `apply` of flushes of N
devices (3 kinds, 2 value names each, every flush a new receive second, so each merge adds
a rate bucket and folds an old one) into an embedded Redis (AOF on, as the service runs
it), with the rtm module or with the Lua script. Redis CPU is `used_cpu_user + sys` from
INFO before and after each apply; the median is over flushes 2 and later (the first ones
create the records and the indexes).

    .venv/bin/python benchmarks/store_merge.py [--devices 100000] [--flushes 5] [--script]
        [--uneven] [--allocator auto|jemalloc|libc|PATH]

Prints per flush: Redis µs per device merge, the apply's wall time, the plan's µs per
device; then the record size and Redis memory per device.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from rtmonitor.model import BatchDelta, FlushDelta
from rtmonitor.storage.embedded import AUTO, EmbeddedRedis
from rtmonitor.storage.store import RedisStore


def flush(n: int, t0: int, rng: np.random.Generator | None = None) -> FlushDelta:
    """Every device with 10 packets, in id order; with `rng`, 1-99 packets each (so the
    devices' totals, the sorted indexes' scores, drift apart) in a shuffled order."""
    rows = np.arange(n, dtype=np.int64)
    order = rng.permutation(n) if rng is not None else rows
    packets = rng.integers(1, 100, n) if rng is not None else np.full(n, 10, np.int64)
    batch = BatchDelta(
        device_ids=[f"dev{i:07d}" for i in order.tolist()],
        packets=packets.astype(np.int64),
        nbytes=packets.astype(np.int64) * 100,
        first_seen=np.full(n, t0, np.int64),
        last_seen=np.full(n, t0, np.int64),
        kinds=["sensor", "heartbeat", "event"],
        kind_dev=np.repeat(rows, 3),
        kind_idx=np.tile(np.array([0, 1, 2], np.int64), n),
        kind_count=np.tile(np.array([5, 3, 2], np.int64), n),
        names=["temp", "humidity"],
        value_dev=np.repeat(rows, 2),
        value_name=np.tile(np.array([0, 1], np.int64), n),
        count=np.full(2 * n, 5, np.int64),
        total=np.full(2 * n, 100.0),
        vmin=np.full(2 * n, 1.0),
        vmax=np.full(2 * n, 30.0),
        last=np.full(2 * n, 20.0),
        last_ts=np.full(2 * n, t0, np.int64),
        total_packets=int(packets.sum()),
        total_bytes=int(packets.sum()) * 100,
    )
    return FlushDelta(parts=[batch], packets=batch.total_packets, bytes=batch.total_bytes)


async def run(url: str, devices: int, flushes: int, module: bool, uneven: bool) -> None:
    store = RedisStore.from_url(url, "b", merge_module=module)
    client = store.client
    now = int(time.time() * 1000)
    rng = np.random.default_rng(1) if uneven else None
    per_merge: list[float] = []
    try:
        for f in range(flushes):
            started = time.perf_counter()
            calls = store.plan(flush(devices, now + 1000 * f, rng), "bench", f + 1)
            plan_s = time.perf_counter() - started
            before = await client.info("cpu")
            started = time.perf_counter()
            await store.apply(calls)
            wall = time.perf_counter() - started
            after = await client.info("cpu")
            cpu = sum(after[k] - before[k] for k in ("used_cpu_user", "used_cpu_sys"))
            per_merge.append(cpu / devices * 1e6)
            print(
                f"flush {f}: Redis {per_merge[-1]:.2f} µs/merge, apply {wall:.2f} s, "
                f"plan {plan_s / devices * 1e6:.2f} µs/device",
                flush=True,
            )
        memory = (await client.info("memory"))["used_memory"]
        record = await client.strlen(store.layout.device("dev0000001"))
        print(f"merge: {'the rtm module' if store.merge_module else 'the Lua script'}")
        print(f"record {record} B; Redis memory {memory / devices:.0f} B per device")
        print(f"median (flushes 2..): {statistics.median(per_merge[1:]):.2f} µs/merge")
    finally:
        await store.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--flushes", type=int, default=5)
    parser.add_argument("--script", action="store_true", help="the Lua script, not the module")
    parser.add_argument(
        "--uneven",
        action="store_true",
        help="1-99 packets per device per flush, devices in a new random order each flush "
        "(a fleet's arrivals; the default sends each 10, in id order, which keeps every "
        "sorted-index update next to the one before)",
    )
    parser.add_argument(
        "--allocator",
        default=AUTO,
        help="the embedded Redis's allocator (serve's --embedded-redis-allocator)",
    )
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rtm-store-merge-") as tmp:
        redis = EmbeddedRedis(Path(tmp) / "redis", allocator=opts.allocator).start()
        print(f"allocator: {redis.allocator}")
        try:
            asyncio.run(run(redis.url, opts.devices, opts.flushes, not opts.script, opts.uneven))
        finally:
            redis.stop()


if __name__ == "__main__":
    main()
