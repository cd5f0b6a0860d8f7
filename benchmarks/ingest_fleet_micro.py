"""Validation + aggregation of batches spread over a large fleet, in-process: µs per packet
of `decode_columns` (a parsed Columns message) and of `parse_batch` + `decode_rows` (a
serialized row batch, read by the C reader) for 10,000-packet batches over 100,000 devices
(one packet per distinct device), best of N rounds.

    .venv/bin/python benchmarks/ingest_fleet_micro.py [--rounds 5] [--devices 100000]

Entry e of the fleet is for device e % devices with kind KINDS[(e // devices) % 3], as
`rtmonitor send` builds them ("reading" packets carry temperature and humidity). Phases:

- new: the first pass over the fleet, on a fresh Validator (every device is admitted);
- kinds: passes 2 and 3 (every known device learns a new kind);
- steady: later passes (nothing new: the per-batch check that nothing needs admitting).

Columns batches list all three kinds in their dictionary, as `send --columnar` does, even
when a batch uses one. `--devices 100` gives the per-packet floor (100 distinct devices
per batch) to compare with.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from rtmonitor.ingest.columnar import decode_columns, decode_rows, parse_batch
from rtmonitor.ingest.v1.telemetry_pb2 import Batch, Columns, Packet
from rtmonitor.ingest.validation import Limits, Validator
from rtmonitor.loadgen.sender import KINDS, device_name

NOW = 1_767_225_600_000
BATCH = 10_000


class Fleet:
    """Three passes over the fleet as batches (the fourth pass repeats the first's)."""

    def __init__(self, devices: int) -> None:
        self.devices = devices
        self.names = [device_name("dev-", i, devices) for i in range(devices)]
        self.size = 3 * devices * -(-BATCH // devices)  # whole batches, whole passes
        rng = np.random.default_rng(7)
        self.temperature = np.round(rng.uniform(-20.0, 45.0, self.size), 2)
        self.humidity = np.round(rng.uniform(0.0, 100.0, self.size), 1)

    def entries(self, b: int) -> np.ndarray:
        return (b * BATCH + np.arange(BATCH)) % self.size

    def kind(self, e: np.ndarray) -> np.ndarray:
        return (e // self.devices) % len(KINDS)

    def columns(self, b: int) -> Columns:
        e = self.entries(b)
        uniq, inv = np.unique(e % self.devices, return_inverse=True)
        kind = self.kind(e)
        cols = Columns(
            count=BATCH,
            device_ids=[self.names[d] for d in uniq.tolist()],
            kinds=list(KINDS),
            device_index=inv.astype("<u4").tobytes(),
            kind_index=kind.astype("<u4").tobytes(),
            payload_size=np.full(BATCH, 64, dtype="<u4").tobytes(),
        )
        reading = kind == KINDS.index("reading")
        if reading.any():
            for name, column in (("temperature", self.temperature), ("humidity", self.humidity)):
                values = np.where(reading, column[e], np.nan)
                cols.values.add(name=name, values=values.astype("<f8").tobytes())
        return Columns.FromString(cols.SerializeToString())

    def rows(self, b: int) -> bytes:
        e = self.entries(b)
        payload = bytes(64)
        packets = []
        for x, k in zip(e.tolist(), self.kind(e).tolist(), strict=True):
            p = Packet(device_id=self.names[x % self.devices], kind=KINDS[k], payload=payload)
            if KINDS[k] == "reading":
                p.values["temperature"] = float(self.temperature[x])
                p.values["humidity"] = float(self.humidity[x])
            packets.append(p)
        return Batch(producer_id="bench", batch_id=b, packets=packets).SerializeToString()


def timed(decode: Callable[[Any, Validator], object], batches: list[Any], v: Validator) -> float:
    t0 = time.perf_counter()
    for batch in batches:
        decode(batch, v)
    return time.perf_counter() - t0


def measure(label: str, decode: Callable[[Any, Validator], object], make: Any, f: Fleet,
            rounds: int) -> None:  # fmt: skip
    per_pass = -(-f.devices // BATCH)
    passes = [[make(b) for b in range(p * per_pass, (p + 1) * per_pass)] for p in range(3)]
    new, kinds, steady = [], [], []
    for _ in range(rounds):
        v = Validator(Limits())
        new.append(timed(decode, passes[0], v) / (per_pass * BATCH) * 1e6)
        kinds.append(timed(decode, passes[1] + passes[2], v) / (2 * per_pass * BATCH) * 1e6)
        steady.append(timed(decode, passes[0], v) / (per_pass * BATCH) * 1e6)
    print(
        f"{label:8} devices={f.devices:<7} new {min(new):6.3f}  kinds {min(kinds):6.3f}  "
        f"steady {min(steady):6.3f} µs/packet (best of {rounds})"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--modes", default="columns,rows")
    args = parser.parse_args()
    fleet = Fleet(args.devices)
    modes = args.modes.split(",")
    if "columns" in modes:
        measure(
            "columns",
            lambda c, v: decode_columns(c, v, NOW),
            fleet.columns,
            fleet,
            args.rounds,
        )
    if "rows" in modes:
        measure(
            "rows",
            lambda raw, v: decode_rows(parse_batch(raw, BATCH).rows, v, NOW),
            fleet.rows,
            fleet,
            args.rounds,
        )


if __name__ == "__main__":
    main()
