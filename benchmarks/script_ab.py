"""Redis CPU per device merge of the merge script (scripts.MERGE_DEVICES) as it is at
several git revisions, alternated flush by flush on one embedded Redis, so that the
machine's noise falls on every revision alike. Only the device calls run (no index
writes, no module): what differs between the revisions is the script's text.

    .venv/bin/python benchmarks/script_ab.py [--devices 100000] [--flushes 10] REV [REV...]

REV is a git revision (its src/rtmonitor/storage/scripts.py) or "." for the working
tree. Prints, per revision, Redis µs per device merge of each flush and their median over
flushes 2 and later (the first ones create the records).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import tempfile
import time
import types
from pathlib import Path

from store_merge import flush

from rtmonitor.storage import scripts
from rtmonitor.storage.embedded import EmbeddedRedis
from rtmonitor.storage.store import RedisStore

ROOT = Path(__file__).resolve().parent.parent
# device calls per pipeline (what the store had in flight when this was written: two slices of 4)
PIPELINE = 8


def script_at(rev: str) -> str:
    """MERGE_DEVICES at `rev` ("." the working tree's)."""
    if rev == ".":
        return scripts.MERGE_DEVICES
    source = subprocess.run(
        ["git", "show", f"{rev}:src/rtmonitor/storage/scripts.py"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    module = types.ModuleType(f"scripts_{rev}")
    exec(compile(source, f"{rev}:scripts.py", "exec"), module.__dict__)  # noqa: S102
    text: str = module.MERGE_DEVICES
    return text


async def run(url: str, revs: list[str], devices: int, flushes: int) -> None:
    stores = {rev: RedisStore.from_url(url, f"ab{n}", merge_module=False)
              for n, rev in enumerate(revs)}  # fmt: skip
    client = stores[revs[0]].client
    sha = {rev: await client.script_load(script_at(rev)) for rev in revs}
    now = int(time.time() * 1000)
    per_merge: dict[str, list[float]] = {rev: [] for rev in revs}
    try:
        for f in range(flushes):
            for rev in revs[f % len(revs) :] + revs[: f % len(revs)]:  # each goes first in turn
                plan = stores[rev].plan(flush(devices, now + 1000 * f), "bench", f + 1)
                calls = [c for c in plan if c[0] == "devices"]
                before = await client.info("cpu")
                for start in range(0, len(calls), PIPELINE):
                    pipe = client.pipeline(transaction=False)
                    for _, keys, args in calls[start : start + PIPELINE]:
                        pipe.evalsha(sha[rev], len(keys), *keys, *args)
                    await pipe.execute()
                after = await client.info("cpu")
                cpu = sum(after[k] - before[k] for k in ("used_cpu_user", "used_cpu_sys"))
                per_merge[rev].append(cpu / devices * 1e6)
        for rev, figures in per_merge.items():
            each = " ".join(f"{x:.2f}" for x in figures)
            median = statistics.median(figures[1:])
            print(f"{rev}: {each}; median (flushes 2..): {median:.2f} µs/merge")
    finally:
        for store in stores.values():
            await store.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revs", nargs="+", metavar="REV")
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--flushes", type=int, default=10)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rtm-script-ab-") as tmp:
        redis = EmbeddedRedis(Path(tmp) / "redis").start()
        try:
            asyncio.run(run(redis.url, opts.revs, opts.devices, opts.flushes))
        finally:
            redis.stop()


if __name__ == "__main__":
    main()
