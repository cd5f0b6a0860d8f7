"""The flush's encode step alone, in this process: what `Flusher._encode` does with a
fleet's pending batches (reduce them to one set of columns, `model.reduce_batches`, then
`RedisStore.plan`: the merge calls and their packed deltas). No Redis is needed: the plan
is built, not sent.

The batches are those `rtmonitor send --columnar` sends (the load generator's packet pool:
consecutive entries over N devices, 3 kinds, a reading of 2 values every third packet),
decoded through the real validator, so each batch carries its devices' keys as the
service's do. By default the devices are first seen in these batches, in the batches'
order; with `--shuffled` the validator knows the fleet already, admitted in a random order
(a running service's fleet came in any order), so the devices' keys (their entries'
addresses) are not in the batches' order. Times are CPU seconds of this process
(`time.process_time`), the median of `--runs`; `--sort` numbers the devices with numpy's
sort instead of the compiled pass (rtmonitor/_model.c), for a before/after in one run.

    .venv/bin/python benchmarks/flush_encode.py [--devices 100000] [--batches 50]
        [--batch-size 10000] [--runs 7] [--sort] [--shuffled]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

from rtmonitor import model
from rtmonitor.config import SendSettings
from rtmonitor.ingest.columnar import decode_columns
from rtmonitor.ingest.v1.telemetry_pb2 import Batch
from rtmonitor.ingest.validation import Limits, Validator
from rtmonitor.loadgen.sender import PacketPool
from rtmonitor.model import BatchDelta, FlushDelta, reduce_batches
from rtmonitor.storage.store import RedisStore

RECV_MS = 1_700_000_000_000


def pending(devices: int, batches: int, size: int, shuffled: bool = False) -> list[BatchDelta]:
    """`batches` consecutive columnar batches of `size` packets, as the service holds them;
    `shuffled`: of a fleet the validator admitted before, in a random order."""
    opts = SendSettings(devices=devices, batch_size=size, columnar=True)  # type: ignore[call-arg]
    pool = PacketPool(opts)
    validator = Validator(Limits())
    if shuffled:
        names = pool.names
        pool.names = random.Random(1).sample(names, len(names))
        for start in range(0, devices, size):
            # (uncached: columns_body keeps bodies, and these name the shuffled devices)
            warm = Batch.FromString(pool._columns_body(start, min(size, devices - start)))
            decode_columns(warm.columns, validator, RECV_MS)
        pool.names = names
    parts = []
    for b in range(batches):
        cols = Batch.FromString(pool.columns_body(b * size, size)).columns
        delta, rejected = decode_columns(cols, validator, RECV_MS + b)
        assert not rejected, rejected
        parts.append(delta)
    return parts


async def _store() -> RedisStore:
    return RedisStore.from_url("redis://127.0.0.1:1/0", "rtm")  # (never connected)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--sort", action="store_true", help="numpy's sort numbers the devices")
    ap.add_argument(
        "--shuffled", action="store_true", help="a known fleet, admitted in a random order"
    )
    args = ap.parse_args()
    if args.sort:
        model.C_NUMBERING = False
    parts = pending(args.devices, args.batches, args.batch_size, args.shuffled)
    entries = sum(p.entries for p in parts)
    store = asyncio.run(_store())
    reduce_s, plan_s = [], []
    for _ in range(args.runs):
        started = time.process_time()
        reduced = reduce_batches(parts, keep_keys=False)  # (as Flusher._encode)
        reduced_at = time.process_time()
        delta = FlushDelta()
        delta.add_part(reduced)
        store.plan(delta, "bench", 1)
        reduce_s.append(reduced_at - started)
        plan_s.append(time.process_time() - reduced_at)
    reduce_ms, plan_ms = statistics.median(reduce_s) * 1e3, statistics.median(plan_s) * 1e3
    merges = reduced.entries
    print(
        f"{args.devices:,} devices{' (known, shuffled)' if args.shuffled else ''}, "
        f"{args.batches} batches of {args.batch_size:,}: "
        f"{entries:,} device entries -> {merges:,} device merges; numbering: "
        f"{'compiled' if model.C_NUMBERING else 'numpy sort'}"
    )
    print(
        f"CPU ms, median of {args.runs}: reduce {reduce_ms:.1f}, plan {plan_ms:.1f}, "
        f"encode {reduce_ms + plan_ms:.1f} ({(reduce_ms + plan_ms) * 1e3 / merges:.2f} µs "
        f"per merge)"
    )


if __name__ == "__main__":
    main()
