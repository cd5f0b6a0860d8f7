"""The load generator's packet pool: a columnar body holds the same packets as the row body
for the same entries, also when it comes from the pool's cache of bodies."""

from __future__ import annotations

import numpy as np
import pytest

from rtmonitor.config import SendSettings
from rtmonitor.ingest.v1.telemetry_pb2 import Batch
from rtmonitor.loadgen import sender


def _rows(body: bytes) -> list[tuple[str, str, int, dict[str, float]]]:
    return [
        (p.device_id, p.kind, len(p.payload), dict(p.values))
        for p in Batch.FromString(body).packets
    ]


def _columns(body: bytes) -> list[tuple[str, str, int, dict[str, float]]]:
    c = Batch.FromString(body).columns
    dev = np.frombuffer(c.device_index, "<u4")
    kind = np.frombuffer(c.kind_index, "<u4")
    size = np.frombuffer(c.payload_size, "<u4")
    values = {v.name: np.frombuffer(v.values, "<f8") for v in c.values}
    return [
        (
            c.device_ids[dev[i]],
            c.kinds[kind[i]],
            int(size[i]),
            {name: float(col[i]) for name, col in values.items() if not np.isnan(col[i])},
        )
        for i in range(c.count)
    ]


def test_a_columnar_body_holds_the_row_bodys_packets_cached_or_not() -> None:
    pool = sender.PacketPool(SendSettings(devices=7, batch_size=5, payload_size=3))
    size = len(pool)
    for start in (0, 3, size - 2, size + 3, 5 * size - 1):
        first = pool.columns_body(start, 5)
        assert _columns(first) == _rows(pool.batch_body(start, 5))
        assert pool.columns_body(start, 5) == first == pool._columns_body(start % size, 5)
    # (size + 3) % size == 3: one cached body serves both
    assert set(pool._bodies) == {(0, 5), (3, 5), (size - 2, 5), (size - 1, 5)}
    assert pool._cached == sum(map(len, pool._bodies.values()))


def test_the_body_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = sender.PacketPool(SendSettings(devices=50, batch_size=20))
    one = len(pool.columns_body(0, 20))
    pool._bodies.clear()
    pool._cached = 0
    monkeypatch.setattr(sender, "_BODY_CACHE_BYTES", one * 2 + 1)
    bodies = [pool.columns_body(start, 20) for start in range(0, 200, 20)]
    assert len(pool._bodies) == 2 and pool._cached <= one * 2 + 1
    assert [pool.columns_body(start, 20) for start in range(0, 200, 20)] == bodies
