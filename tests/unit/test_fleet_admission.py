"""Batch admission at fleet scale: the grouped, vectorised admission gives exactly what
admit() one device at a time gives (reasons, counts, the validator's memory), limits hit."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest
from helpers import encode_columns
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtmonitor.ingest import columnar
from rtmonitor.ingest.columnar import ColumnsError, decode_columns, decode_rows, parse_batch
from rtmonitor.ingest.v1.telemetry_pb2 import Batch, Packet
from rtmonitor.ingest.validation import Limits, Reason, Validator, device_ids_ok
from rtmonitor.model import number_keys

NOW = 1_700_000_000_000
_CODE = {reason: i + 1 for i, reason in enumerate(Reason)}
_BAD_INDEX = _CODE[Reason.INVALID_COLUMN_INDEX]


def reference_device_codes(
    device_ids: list[str], vocabs: Any, validator: Validator, prefix: str | None
) -> np.ndarray:
    """_device_codes as it was: Validator.device_reason for every distinct device."""
    deny = _CODE[Reason.DEVICE_NOT_PERMITTED]
    codes = [
        deny
        if prefix is not None and not d.startswith(prefix)
        else _CODE[r]
        if (r := validator.device_reason(d))
        else 0
        for d in device_ids
    ]
    return np.array([*codes, _BAD_INDEX], dtype=np.uint8)


def reference_admit(t: Any, validator: Validator, vocabs: Any, code: Any, ok: Any) -> None:
    """_admit as it was: admit() for every device of the batch in order of first appearance,
    with the kinds and value names of its packets that passed so far."""
    n_dev, n_kind, n_names = len(t.device_ids), len(t.kinds), len(t.names)
    positions = np.flatnonzero(ok)
    d_ok = t.dev_idx[positions]
    first = np.full(n_dev, t.n, dtype=np.int64)
    np.minimum.at(first, d_ok, positions)
    order = np.flatnonzero(first < t.n)
    order = order[np.argsort(first[order], kind="stable")]
    kinds_of: dict[int, list[str]] = {}
    for key in number_keys(d_ok * n_kind + t.kind_idx[positions], n_dev * n_kind)[0].tolist():
        kinds_of.setdefault(key // n_kind, []).append(t.kinds[key % n_kind])
    names_of: dict[int, list[str]] = {}
    if len(t.v_pos):
        v_ok = ok[t.v_pos]
        v_dev = t.dev_idx[t.v_pos[v_ok]]
        for key in number_keys(v_dev * n_names + t.v_name[v_ok], n_dev * n_names)[0].tolist():
            names_of.setdefault(key // n_names, []).append(t.names[key % n_names])
    for d in order.tolist():
        reason, refused_kinds, refused_names = validator.admit(
            t.device_ids[d], kinds_of.get(d, ()), names_of.get(d, ())
        )
        mine = ok & (t.dev_idx == d)
        if reason is not None:
            code[mine] = _CODE[reason]
            continue
        for kind in refused_kinds:
            code[mine & (t.kind_idx == t.kinds.index(kind))] = _CODE[Reason.TOO_MANY_KINDS]
        for name in refused_names:
            j = t.names.index(name)
            hit = np.zeros(t.n, dtype=np.bool_)
            hit[t.v_pos[t.v_name == j]] = True
            code[mine & hit & (code == 0)] = _CODE[Reason.TOO_MANY_VALUE_NAMES]


def memory(v: Validator) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the validator remembers, per generation: each device's kinds and names."""
    return tuple(  # type: ignore[return-value]
        {d: (x.vocab.kinds, x.vocab.names) for d, x in generation.items()}
        for generation in (v._devices, v._previous)
    )


def mostly(good: list[Any], bad: list[Any]) -> st.SearchStrategy[Any]:
    """Good values, and now and then a bad one (so that limits are reached often)."""
    return st.sampled_from(good * 4 + bad)


device_ids = mostly(["a1", "a2", "a3", "b1"], ["", "bad id", "a" * 129])
kinds = mostly(["", "k1", "k2", "k3"], ["bad kind"])
names = mostly(["t", "h", "p"], ["bad name"])


@st.composite
def packets(draw: st.DrawFn) -> Packet:
    p = Packet(
        device_id=draw(device_ids),
        kind=draw(kinds),
        payload=b"x" * draw(mostly([0, 5], [200])),
        timestamp_ms=draw(mostly([0, NOW - 10], [-1])),
    )
    for name in draw(st.lists(names, max_size=3, unique=True)):
        p.values[name] = draw(mostly([1.0, 2.5], [float("inf")]))
    return p


@st.composite
def steps(draw: st.DrawFn) -> tuple[str, list[Packet], list[str]]:
    """A batch sent as rows (read by protobuf or by the C reader) or columns (these with
    unused kinds in their dictionary, and maybe their device dictionary reversed), or a
    rotation of the device generations."""
    how = draw(st.sampled_from(["rows", "wire", "columns", "reversed", "rotate"]))
    batch = [] if how == "rotate" else draw(st.lists(packets(), min_size=1, max_size=30))
    return how, batch, draw(st.lists(st.sampled_from(["k1", "k4", "k5"]), max_size=2))


def run(
    limits: Limits, prefix: str | None, script: list[tuple[str, list[Packet], list[str]]]
) -> tuple[list[Any], tuple[dict[str, Any], dict[str, Any]]]:
    v = Validator(limits)
    results: list[Any] = []
    for how, batch, extra_kinds in script:
        if how == "rotate":
            results.append(v.rotate())
            continue
        if how == "rows":  # protobuf's packets
            delta, rejected = decode_rows(batch, v, NOW, prefix)
        elif how == "wire":  # the C reader's table
            rows = parse_batch(Batch(packets=batch).SerializeToString(), len(batch)).rows
            delta, rejected = decode_rows(rows, v, NOW, prefix)
        else:
            cols = encode_columns(batch)
            if how == "reversed":  # the device dictionary not in order of first appearance
                last = len(cols.device_ids) - 1
                index = last - np.frombuffer(cols.device_index, "<u4")
                cols.device_ids.reverse()
                cols.device_index = index.astype("<u4").tobytes()
            room = len(batch) - len(cols.kinds)  # a dictionary has at most one entry a packet
            cols.kinds.extend(extra_kinds[:room])  # listed, used by no packet
            try:
                delta, rejected = decode_columns(cols, v, NOW, prefix)
            except ColumnsError as e:  # more value columns than readings allowed
                results.append(str(e))
                continue
        results.append((delta.to_flush_delta(), rejected))
    return results, memory(v)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
@given(
    st.builds(
        Limits,
        max_payload_bytes=st.just(100),
        max_values_per_packet=st.just(2),
        max_kinds_per_device=st.integers(1, 3),
        max_value_names_per_device=st.integers(1, 3),
        max_devices=st.integers(1, 5),
    ),
    st.sampled_from([None, "a"]),
    st.lists(steps(), min_size=1, max_size=6),
    st.booleans(),
)
def test_grouped_admission_equals_admit_one_device_at_a_time(
    limits: Limits, prefix: str | None, script: Any, one_by_one: bool
) -> None:
    fast = run(limits, prefix, script) if not one_by_one else None
    saved = columnar._admit, columnar._device_codes, columnar._MASK_BITS
    try:
        if one_by_one:  # the fast path's own fallback: admit() per device
            columnar._MASK_BITS = 0
            fast = run(limits, prefix, script)
        columnar._admit, columnar._device_codes = reference_admit, reference_device_codes
        expected = run(limits, prefix, script)
    finally:
        columnar._admit, columnar._device_codes, columnar._MASK_BITS = saved
    assert fast == expected


def test_a_large_fleet_batch_is_admitted_once_then_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """10,000 distinct devices in a batch: admitted by a handful of extend() calls (one per
    group), and a second batch of the same devices admits nothing."""
    v = Validator(Limits(max_devices=9_000, max_kinds_per_device=1))
    extended: list[object] = []
    extend = v.extend
    monkeypatch.setattr(v, "extend", lambda *a: extended.append(a) or extend(*a))
    batch = [Packet(device_id=f"d{i:05d}", kind=("x", "y")[i // 5_000]) for i in range(10_000)]
    batch += [Packet(device_id="d00001", kind="y")]  # a second kind: over the limit
    delta, rejected = decode_rows(batch, v, NOW)
    assert rejected == Counter({"too_many_devices": 1_000, "too_many_kinds": 1})
    assert delta.total_packets == 9_000 and v.device_count == 9_000
    assert len(extended) == 3  # x alone, y alone, x and y
    extended.clear()
    delta, rejected = decode_rows(batch[:9_000], v, NOW)
    assert (delta.total_packets, rejected, extended) == (9_000, Counter(), [])


def test_device_ids_ok_is_device_id_reason_for_all() -> None:
    assert device_ids_ok([]) and device_ids_ok(["a", "b:c/d", "x" * 128])
    for bad in (["a", ""], ["a", "x" * 129], ["a b"], ["ok", "{x}"]):
        assert not device_ids_ok(bad)
