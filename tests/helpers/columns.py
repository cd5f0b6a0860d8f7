"""Encode packets as a columnar batch (rtmonitor.v1.Columns), the plain way: the tests' reference
encoder, independent of the load generator's fast path (loadgen/sender.py)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rtmonitor.ingest.v1.telemetry_pb2 import Columns, Packet

UNSPECIFIED_KIND = "unspecified"


def encode_columns(packets: Sequence[Packet]) -> Columns:
    """The same packets as columns: dictionaries for ids and kinds, packed arrays, one
    float64 column per value name (NaN where a packet has no such reading)."""
    n = len(packets)
    device_ids: dict[str, int] = {}
    kinds: dict[str, int] = {}
    dev = np.empty(n, dtype="<u4")
    kind = np.empty(n, dtype="<u4")
    size = np.empty(n, dtype="<u4")
    ts = np.empty(n, dtype="<i8")
    names: dict[str, np.ndarray] = {}
    for i, p in enumerate(packets):
        dev[i] = device_ids.setdefault(p.device_id, len(device_ids))
        kind[i] = kinds.setdefault(p.kind or UNSPECIFIED_KIND, len(kinds))
        size[i] = len(p.payload)
        ts[i] = p.timestamp_ms
        for name, value in p.values.items():
            column = names.get(name)
            if column is None:
                column = names[name] = np.full(n, np.nan, dtype="<f8")
            column[i] = value
    cols = Columns(
        count=n,
        device_ids=list(device_ids),
        kinds=list(kinds),
        device_index=dev.tobytes(),
        kind_index=kind.tobytes(),
        payload_size=size.tobytes(),
        timestamp_ms=ts.tobytes() if ts.any() else b"",
    )
    for name, column in names.items():
        cols.values.add(name=name, values=column.tobytes())
    return cols
