"""What a page in a numeric order costs to read with key layout 5: the `GET` of one column
(8 bytes per device) from an embedded Redis, and ranking it (storage/ranking.py's `page`,
the first 100 by packets, descending), for N devices in G index groups. Medians of 10.

    .venv/bin/python benchmarks/column_reads.py [--devices 100000 1000000] [--groups 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import cast

import numpy as np
import redis

from rtmonitor.storage import ranking
from rtmonitor.storage.embedded import EmbeddedRedis


def measure(url: str, devices: int, groups: int) -> None:
    client = redis.Redis.from_url(url)
    rng = np.random.default_rng(1)
    for g in range(groups):
        packets = rng.integers(1, 10**6, devices // groups).astype(">i8")
        client.set(f"c:{g}", packets.tobytes())
    redis_cpu, fetch, rank = [], [], []
    for _ in range(10):
        info = client.info("cpu")
        started = time.perf_counter()
        blobs = [cast(bytes | None, client.get(f"c:{g}")) for g in range(groups)]
        fetched = time.perf_counter()
        after = client.info("cpu")
        scores = [ranking.column(b, "packets", len(b or b"") // 8) for b in blobs]
        live = [s > 0 for s in scores]
        ranking.page(scores, live, 0, 100, True)
        ranked = time.perf_counter()
        redis_cpu.append(sum(after[k] - info[k] for k in ("used_cpu_user", "used_cpu_sys")))
        fetch.append(fetched - started)
        rank.append(ranked - fetched)
    client.close()
    print(
        f"{devices:>9,} devices, {groups} group(s): GET {statistics.median(fetch) * 1e3:.1f} ms "
        f"(Redis CPU {statistics.median(redis_cpu) * 1e3:.1f} ms), "
        f"rank {statistics.median(rank) * 1e3:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--groups", type=int, default=1)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rtm-column-reads-") as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis").start()
        try:
            for devices in opts.devices:
                measure(server.url, devices, opts.groups)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
