"""The flush's columnar path: deltas as columns (from_devices, reduce_batches) packed by
numpy (storage/packing.py) byte for byte as struct would pack each device, which is what
MERGE_DEVICES reads."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtmonitor.model import BatchDelta, DeviceDelta, FlushDelta, ValueStats, reduce_batches
from rtmonitor.storage import packing
from rtmonitor.storage.packing import pack_deltas

_HEAD = struct.Struct("<ddddHH")
_KIND = struct.Struct("<d")
_VALUE = struct.Struct("<dddddd")


def reference(devices: dict[str, DeviceDelta], order: list[str]) -> bytes:
    """What a device's delta is, written out one struct.pack at a time."""
    out = bytearray()
    for device_id in order:
        dev = devices[device_id]
        out += _HEAD.pack(
            dev.packets, dev.bytes, dev.first_seen, dev.last_seen, len(dev.kinds), len(dev.values)
        )
        for kind, count in dev.kinds.items():
            out += kind.encode() + b"\0" + _KIND.pack(count)
        for name, s in dev.values.items():
            out += name.encode() + b"\0"
            out += _VALUE.pack(s.count, s.sum, s.min, s.max, s.last, s.last_ts)
    return bytes(out)


@contextmanager
def numpy_only() -> Iterator[None]:
    """packing.py as it runs without its C scatter (a build without a compiler)."""
    saved, packing._c_scatter = packing._c_scatter, None
    try:
        yield
    finally:
        packing._c_scatter = saved


names = st.text("abcXYZ._-:/@019", min_size=1, max_size=70)
stats = st.builds(
    ValueStats,
    count=st.integers(1, 2**40),
    sum=st.floats(allow_nan=True, allow_infinity=True),
    min=st.floats(allow_nan=False),
    max=st.floats(allow_nan=False),
    last=st.floats(allow_nan=False),
    last_ts=st.integers(0, 2**45),
)
device = st.builds(
    DeviceDelta,
    packets=st.integers(1, 2**40),
    bytes=st.integers(0, 2**45),
    first_seen=st.integers(0, 2**45),
    last_seen=st.integers(0, 2**45),
    kinds=st.dictionaries(names, st.integers(1, 2**40), max_size=5),
    values=st.dictionaries(names, stats, max_size=5),
)


@settings(max_examples=200, deadline=None)
@given(devices=st.dictionaries(names, device, max_size=12), data=st.data())
def test_packed_as_struct_packs_each_device(
    devices: dict[str, DeviceDelta], data: st.DataObject
) -> None:
    """Any devices, kinds and readings (names of any length, sums that overflowed, empty
    devices), in any order of devices: the same bytes, and each device's offsets."""
    batch = BatchDelta.from_devices(devices)
    ids = list(devices)
    order = data.draw(st.permutations(range(len(ids))))
    blob, offsets = pack_deltas(batch, np.array(order, dtype=np.int64))
    want = reference(devices, [ids[i] for i in order])
    assert blob == want
    with numpy_only():
        assert pack_deltas(batch, np.array(order, dtype=np.int64))[0] == want
    assert offsets[0] == 0 and offsets[-1] == len(want)
    for n, i in enumerate(order):  # each device alone is its slice
        assert blob[offsets[n] : offsets[n + 1]] == reference(devices, [ids[i]])


def test_entries_in_any_order_are_grouped_by_device() -> None:
    """A part whose kinds and readings are not grouped by device (another producer's order)
    packs as if they were, keeping each device's own order."""
    i = lambda *x: np.array(x, dtype=np.int64)  # noqa: E731
    f = lambda *x: np.array(x, dtype=np.float64)  # noqa: E731
    batch = BatchDelta(
        device_ids=["a", "b"], packets=i(1, 2), nbytes=i(10, 20), first_seen=i(5, 6),
        last_seen=i(7, 8), kinds=["k", "j"], kind_dev=i(1, 0, 1), kind_idx=i(1, 0, 0),
        kind_count=i(3, 4, 5), names=["t", "u"], value_dev=i(1, 0, 1), value_name=i(0, 1, 1),
        count=i(1, 2, 3), total=f(1.5, 2.5, 3.5), vmin=f(0, 0, 0), vmax=f(9, 9, 9),
        last=f(1, 2, 3), last_ts=i(11, 12, 13), total_packets=3, total_bytes=30,
    )  # fmt: skip
    blob, _ = pack_deltas(batch, np.array([0, 1], dtype=np.int64))
    a = DeviceDelta(packets=1, bytes=10, first_seen=5, last_seen=7, kinds={"k": 4})
    a.values["u"] = ValueStats(count=2, sum=2.5, min=0, max=9, last=2, last_ts=12)
    b = DeviceDelta(packets=2, bytes=20, first_seen=6, last_seen=8, kinds={"j": 3, "k": 5})
    b.values["t"] = ValueStats(count=1, sum=1.5, min=0, max=9, last=1, last_ts=11)
    b.values["u"] = ValueStats(count=3, sum=3.5, min=0, max=9, last=3, last_ts=13)
    assert blob == reference({"a": a, "b": b}, ["a", "b"])


def test_the_compiled_packer_is_built() -> None:
    """The package is built with its C scatter: without it a fleet's flushes are packed
    by numpy's indexing, about twice as slowly."""
    assert packing.C_PACK, (
        "rtmonitor/storage/_pack.c was not compiled: install a C compiler and Python's "
        "headers (apt-get install gcc python3-dev), then `make clean test`"
    )


def test_the_scatter_writes_nothing_outside_its_buffer() -> None:
    """Every row is checked before any is written: a bad one raises and leaves the buffer
    as it was."""
    scatter = packing._c_scatter
    assert scatter is not None
    buf = np.zeros(16, dtype=np.uint8)
    rows = np.arange(1, 9, dtype=np.uint8).reshape(2, 4)
    at = lambda *x: np.array(x, dtype=np.int64)  # noqa: E731
    scatter(buf, at(0, 12), rows, 4)
    assert buf.tolist() == [1, 2, 3, 4] + [0] * 8 + [5, 6, 7, 8]
    scatter(buf, at(4, 8), rows, 4, at(1, 3))  # the first lengths[i] bytes of each row
    assert buf[4:12].tolist() == [1, 0, 0, 0, 5, 6, 7, 0]
    before = buf.copy()
    for bad_at, lengths in [((0, 13), None), ((-1, 0), None), ((0, 2**62), None),
                            ((0, 0), at(1, 5)), ((0, 0), at(1, -1))]:  # fmt: skip
        with pytest.raises(ValueError, match="outside the buffer"):
            scatter(buf, at(*bad_at), rows, 4, lengths)
    with pytest.raises(ValueError, match="rows must be"):
        scatter(buf, at(0), rows, 4)  # two rows, one offset
    with pytest.raises(ValueError, match="rows must be"):
        scatter(buf, at(0, 4), rows, 4, at(1))
    with pytest.raises(TypeError, match="int64"):
        scatter(buf, np.array([0, 4], dtype=np.int32), rows, 4)
    with pytest.raises(BufferError, match="not writable"):
        scatter(bytes(16), at(0, 4), rows, 4)
    assert buf.tolist() == before.tolist()


def test_nothing_to_pack() -> None:
    blob, offsets = pack_deltas(BatchDelta.empty(), np.zeros(0, dtype=np.int64))
    assert blob == b"" and offsets.tolist() == [0]


@settings(max_examples=100, deadline=None)
@given(parts=st.lists(st.dictionaries(names, device, max_size=6), max_size=5))
def test_a_flush_delta_reduced_to_columns_is_the_same_delta(
    parts: list[dict[str, DeviceDelta]],
) -> None:
    """FlushDelta.batches() reduced (the store's input) adds what folding every part into
    one FlushDelta adds: folded rows and column parts together."""
    delta = FlushDelta()
    want = FlushDelta()
    for n, devices in enumerate(parts):
        part = BatchDelta.from_devices(devices)
        part.merge_into(want)
        if n == 0:  # the first as folded rows, the others as columns
            part.merge_into(delta)
        else:
            delta.add_part(part)
    assert (delta.packets, delta.bytes) == (want.packets, want.bytes)
    got = reduce_batches(delta.batches()).to_flush_delta()
    assert got.devices.keys() == want.devices.keys()
    for device_id, dev in want.devices.items():
        mine = got.devices[device_id]
        assert (mine.packets, mine.bytes, mine.first_seen, mine.last_seen) == (
            dev.packets,
            dev.bytes,
            dev.first_seen,
            dev.last_seen,
        )
        assert mine.kinds == dev.kinds
        assert mine.values.keys() == dev.values.keys()
        for name, s in dev.values.items():
            m = mine.values[name]
            assert (m.count, m.min, m.max, m.last, m.last_ts) == (
                s.count,
                s.min,
                s.max,
                s.last,
                s.last_ts,
            )
            assert np.isclose(m.sum, s.sum, equal_nan=True) or m.sum == s.sum


def test_a_store_without_the_compiled_packer_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from redis import asyncio as aioredis

    from rtmonitor.storage import store
    from rtmonitor.storage.keys import KeyLayout

    client = aioredis.Redis(port=1)  # (never connected)
    store.RedisStore(client, KeyLayout())
    assert "_pack.c" not in caplog.text
    monkeypatch.setattr(store, "C_PACK", False)
    store.RedisStore(client, KeyLayout())
    assert "rtmonitor/storage/_pack.c) is not built" in caplog.text


def test_a_plans_calls_name_each_device_by_its_key() -> None:
    """A flush's merge calls name their devices' keys (KeyLayout.device, built a call at a
    time by device_keys) in the order their deltas are packed, in calls of GROUP_SIZE."""
    from redis import asyncio as aioredis

    from rtmonitor.storage.keys import KeyLayout
    from rtmonitor.storage.store import RedisStore

    layout = KeyLayout(prefix="p")
    store = RedisStore(aioredis.Redis(port=1), layout, group_size=3)  # (never connected)
    ids = [f"dev-{i}" for i in range(7)]
    delta = FlushDelta()
    for i, device_id in enumerate(ids):
        delta.devices[device_id] = DeviceDelta(packets=i + 1, bytes=0, first_seen=1, last_seen=2)
    calls = [(keys, args) for name, keys, args in store.plan(delta, "inst", 4) if name == "devices"]
    assert [keys[0] for keys, _ in calls] == [layout.group_marker("g", "inst", n) for n in range(3)]
    named = [key for keys, _ in calls for key in keys[1:]]
    assert named == [layout.device(d) for d in ids] == [f"p:d:{{{d}}}" for d in ids]
    packed = b"".join(args[-1] for _, args in calls)
    assert packed == reference(delta.devices, ids)
