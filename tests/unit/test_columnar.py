"""Columnar batches: the same packets give the same counts as rows and single packets."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np
import pytest
from helpers import encode_columns
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtmonitor import model
from rtmonitor.ingest import columnar, validation
from rtmonitor.ingest.columnar import ColumnsError, decode_columns, decode_rows, parse_batch
from rtmonitor.ingest.v1.telemetry_pb2 import Batch, Columns, Packet, ValueColumn
from rtmonitor.ingest.validation import Limits, Validator
from rtmonitor.model import FlushDelta, merge_batches, merge_into
from rtmonitor.pipeline.aggregator import fold

NOW = 1_700_000_000_000
LIMITS = Limits(max_payload_bytes=100, max_values_per_packet=3)

device_ids = st.sampled_from(["a", "b", "c-1", "site/9:x", "", "bad id", "{x}"])
kinds = st.sampled_from(["", "reading", "tcp", "bad kind"])
value_names = st.sampled_from(["t", "h", "p", "bad name"])
finite = st.floats(allow_nan=False, allow_infinity=False, width=64, min_value=-1e6, max_value=1e6)
values = st.one_of(finite, finite, finite, st.sampled_from([math.inf, -math.inf]))
timestamps = st.sampled_from([0, NOW - 5000, NOW - 10, NOW, NOW + 1000, -1, NOW + 10**10])


@st.composite
def packets(draw: st.DrawFn) -> Packet:
    p = Packet(
        device_id=draw(device_ids),
        kind=draw(kinds),
        payload=b"x" * draw(st.integers(0, 120)),
        timestamp_ms=draw(timestamps),
    )
    for name, value in draw(st.dictionaries(value_names, values, max_size=4)).items():
        p.values[name] = value
    return p


def one_by_one(batch: list[Packet], limits: Limits = LIMITS) -> tuple[FlushDelta, int]:
    v = Validator(limits)
    delta = FlushDelta()
    rejected = 0
    for p in batch:
        row = v.check(p, NOW)
        if isinstance(row, tuple):
            fold(delta, [row], NOW)
        else:
            rejected += 1
    return delta, rejected


def as_rows(batch: list[Packet]) -> tuple[FlushDelta, int]:
    """The batch serialized, read by the C reader and by protobuf: both give this result."""
    raw = Batch(packets=batch).SerializeToString()
    results = []
    for compiled in (True, False):
        parsed = parse_batch(raw, len(batch), compiled=compiled)
        assert isinstance(parsed.rows, Sequence) != compiled  # which reader read it
        delta, rejected = decode_rows(parsed.rows, Validator(LIMITS), NOW)
        results.append((delta.to_flush_delta(), rejected.total()))
    assert results[0] == results[1]
    return results[0]


def as_columns(batch: list[Packet]) -> tuple[FlushDelta, int]:
    delta, rejected = decode_columns(encode_columns(batch), Validator(LIMITS), NOW)
    return delta.to_flush_delta(), rejected.total()


def test_the_compiled_row_reader_is_built() -> None:
    """The package is built with its C row reader: without it every row batch takes
    protobuf's slower path, and tests/unit/test_rows_wire.py is skipped."""
    assert columnar.C_ROWS, (
        "rtmonitor/ingest/_rows.c was not compiled: install a C compiler and Python's "
        "headers (apt-get install gcc python3-dev), then `make clean test`"
    )


# too_slow: generation time on a loaded shared CI machine says nothing about correctness.
# print_blob: a failure prints a blob that reproduces it exactly (@reproduce_failure).
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
@given(st.lists(packets(), max_size=60), st.booleans())
def test_per_packet_rows_and_columns_agree(drawn: list[Packet], receive_time: bool) -> None:
    batch = []
    for p in drawn:  # copies: never mutate what hypothesis drew
        copy = Packet()
        copy.CopyFrom(p)
        if receive_time:  # every packet at receive time: the columnar fast path for "last"
            copy.timestamp_ms = 0
        batch.append(copy)
    expected = one_by_one(batch)
    assert as_rows(batch) == expected
    if len(encode_columns(batch).values) > len(batch) * LIMITS.max_values_per_packet:
        with pytest.raises(ColumnsError, match="--max-values-per-packet"):
            as_columns(batch)  # more value columns than readings allowed: refused whole
    else:
        assert as_columns(batch) == expected


@st.composite
def valid_packets(draw: st.DrawFn) -> Packet:
    """Packets that all pass validation: the aggregation itself, densely exercised."""
    p = Packet(
        device_id=draw(st.sampled_from(["a", "b", "c"])),
        kind=draw(st.sampled_from(["", "reading", "tcp"])),
        payload=b"x" * draw(st.integers(0, 20)),
        timestamp_ms=draw(st.sampled_from([0, NOW - 5000, NOW - 10, NOW])),
    )
    for name, value in draw(st.dictionaries(st.sampled_from(["t", "h"]), finite)).items():
        p.values[name] = value
    return p


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
@given(st.lists(valid_packets(), min_size=1, max_size=40), st.booleans())
def test_aggregation_agrees_on_valid_packets(drawn: list[Packet], receive_time: bool) -> None:
    batch = []
    for p in drawn:
        copy = Packet()
        copy.CopyFrom(p)
        if receive_time:
            copy.timestamp_ms = 0
        batch.append(copy)
    expected = one_by_one(batch)
    assert expected[1] == 0 and expected[0].packets == len(batch)
    assert as_rows(batch) == expected
    assert as_columns(batch) == expected


def test_reasons_match_for_each_kind_of_bad_packet() -> None:
    batch = [
        Packet(device_id=""),
        Packet(device_id="x" * 129),
        Packet(device_id="a b"),
        Packet(device_id="a", payload=b"x" * 101),
        Packet(device_id="a", timestamp_ms=-1),
        Packet(device_id="a", kind="no way"),
        Packet(device_id="a", values={"t": math.inf}),
        Packet(device_id="a", values={"bad name": 1.0}),
        Packet(device_id="a", values={"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}),
        Packet(device_id="ok"),
    ]
    one_reasons = Counter(
        str(r) for p in batch if not isinstance(r := Validator(LIMITS).check(p, NOW), tuple)
    )
    row_delta, by_reason = decode_rows(batch, Validator(LIMITS), NOW)
    delta, col_reasons = decode_columns(encode_columns(batch), Validator(LIMITS), NOW)
    assert col_reasons == by_reason == one_reasons and len(by_reason) == 9
    assert delta.device_ids == row_delta.device_ids == ["ok"]


def test_stateful_limits_apply_per_batch() -> None:
    v = Validator(Limits(max_devices=2, max_kinds_per_device=1))
    batch = [
        Packet(device_id=d, kind=k) for d, k in [("a", "x"), ("b", "x"), ("c", "x"), ("a", "y")]
    ]
    compact, rejected = decode_columns(encode_columns(batch), v, NOW)
    delta = compact.to_flush_delta()
    assert rejected == {"too_many_devices": 1, "too_many_kinds": 1}
    assert {d: x.kinds for d, x in delta.devices.items()} == {"a": {"x": 1}, "b": {"x": 1}}


def test_known_devices_skip_admission_only_when_nothing_is_new(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The steady state (every device known, no new kind or name) skips the per-device
    admission; anything new in a later batch still meets the limits."""
    v = Validator(Limits(max_devices=3, max_kinds_per_device=1, max_value_names_per_device=1))
    extended: list[tuple[object, ...]] = []
    extend = v.extend
    monkeypatch.setattr(v, "extend", lambda *a: extended.append(a) or extend(*a))

    def packet(device: str, kind: str, name: str) -> Packet:
        p = Packet(device_id=device, kind=kind)
        p.values[name] = 1.0
        return p

    steady = [packet("a", "x", "t"), packet("b", "x", "t")]
    assert decode_rows(steady, v, NOW)[1] == {} and len(extended) == 1  # a and b: one group
    extended.clear()
    assert decode_rows(steady, v, NOW)[0].total_packets == 2
    assert decode_columns(encode_columns(steady), v, NOW)[0].total_packets == 2
    assert extended == []  # nothing new: nothing admitted
    later = [packet("b", "y", "t"), packet("a", "x", "h"), packet("c", "x", "t")]
    delta, rejected = decode_rows(later, v, NOW)
    assert rejected == {"too_many_kinds": 1, "too_many_value_names": 1}
    assert delta.device_ids == ["c"]
    assert len(extended) == 3  # each device with something new, and only those
    assert decode_rows([packet("d", "x", "t")], v, NOW)[1] == {"too_many_devices": 1}


def test_inconsistent_columns_are_refused_with_what_to_fix() -> None:
    v = Validator(Limits())
    short = Columns(count=3, device_ids=["a"], device_index=np.zeros(2, "<u4").tobytes())
    with pytest.raises(ColumnsError, match="device_index has 8 bytes; 3 packets need 12"):
        decode_columns(short, v, NOW)
    with pytest.raises(ColumnsError, match="device_index is required"):
        decode_columns(Columns(count=1, device_ids=["a"]), v, NOW)
    out_of_range = Columns(
        count=2, device_ids=["a"], device_index=np.array([0, 5], "<u4").tobytes()
    )
    compact, rejected = decode_columns(out_of_range, v, NOW)
    delta = compact.to_flush_delta()
    assert rejected == {"invalid_column_index": 1} and delta.devices["a"].packets == 1


def test_every_dimension_is_bounded_before_it_is_decoded() -> None:
    """Value columns at most --max-values-per-packet, each dictionary at most one entry per
    packet: one more than either refuses the whole batch, naming the bound."""
    v = Validator(Limits(max_values_per_packet=3))
    index = np.zeros(2, "<u4").tobytes()
    ones = np.ones(2).tobytes()

    def cols(values: int = 0, devices: int = 1, kinds: int = 0, count: int = 2) -> Columns:
        return Columns(
            count=count,
            device_ids=[f"d{i}" for i in range(devices)],
            device_index=index if count else b"",
            kinds=[f"k{i}" for i in range(kinds)],
            kind_index=index if kinds and count else b"",
            values=[ValueColumn(name=f"v{i}", values=ones) for i in range(values)],
        )

    delta, rejected = decode_columns(cols(values=3, devices=2, kinds=2), v, NOW)
    assert delta.total_packets == 2 and not rejected
    assert decode_columns(cols(values=6), v, NOW)[1] == {"too_many_values": 2}
    with pytest.raises(ColumnsError, match=r"7 value columns for 2 packets.*\(2 x 3\)"):
        decode_columns(cols(values=7), v, NOW)
    with pytest.raises(ColumnsError, match=r"device_ids has 3 entries for 2 packets"):
        decode_columns(cols(devices=3), v, NOW)
    with pytest.raises(ColumnsError, match=r"kinds has 3 entries for 2 packets"):
        decode_columns(cols(kinds=3), v, NOW)
    assert decode_columns(cols(devices=0, count=0), v, NOW)[0].total_packets == 0
    with pytest.raises(ColumnsError, match=r"device_ids has 1 entries for 0 packets"):
        decode_columns(cols(count=0), v, NOW)
    with pytest.raises(ColumnsError, match="count is 0"):
        decode_columns(Columns(count=0, timestamp_ms=b"\x00" * 8), v, NOW)


def test_a_claimed_count_over_the_limit_is_refused_before_anything_is_built() -> None:
    """A columnar count over --max-batch-packets is refused from the claim alone (the
    servicer counts it as one refused message, never as the packets it claims)."""
    claim = Batch(batch_id=7, columns=Columns(count=2**32 - 1, device_ids=["a"]))
    with pytest.raises(columnar.BatchTooLarge) as refused:
        parse_batch(claim.SerializeToString(), 10_000)
    assert (refused.value.batch_id, refused.value.packets) == (7, 2**32 - 1)
    carried = Columns(count=20_000, device_index=np.zeros(12_000, "<u4").tobytes())
    with pytest.raises(columnar.BatchTooLarge) as refused:
        parse_batch(Batch(packets=[Packet()], columns=carried).SerializeToString(), 10_000)
    assert refused.value.packets == 20_001


def test_payload_size_is_a_claim_bounded_per_packet() -> None:
    """Columns carry no payload, only each packet's declared size: it is counted as
    declared up to --max-payload-bytes, and a packet declaring more is refused as
    payload_too_large, as a row packet with that payload is."""
    sizes = np.array([100, 101, 0, 100], "<u4").tobytes()
    batch = Columns(
        count=4, device_ids=["a"], device_index=np.zeros(4, "<u4").tobytes(), payload_size=sizes
    )
    compact, rejected = decode_columns(batch, Validator(LIMITS), NOW)
    assert rejected == {"payload_too_large": 1}
    assert (compact.total_packets, compact.total_bytes) == (3, 200)


def test_last_is_the_last_packet_when_all_arrive_at_receive_time() -> None:
    batch = [Packet(device_id="a", values={"t": float(v)}) for v in (3, 9, -1, 4)]
    compact, _ = decode_columns(encode_columns(batch), Validator(Limits()), NOW)
    t = compact.to_flush_delta().devices["a"].values["t"]
    assert (t.count, t.min, t.max, t.last, t.last_ts) == (4, -1.0, 9.0, 4.0, NOW)


def test_rows_count_reasons() -> None:
    compact, rejected = decode_rows(
        [
            Packet(device_id="a"),
            Packet(),
            Packet(device_id="b", values={"t": math.nan}),
            Packet(device_id=""),
        ],
        Validator(Limits()),
        NOW,
    )
    assert compact.device_ids == ["a"] and compact.total_packets == 1
    assert rejected == {"empty_device_id": 2, "non_finite_value": 1}


@pytest.mark.parametrize("compiled", [True, False])
def test_repeated_dictionary_entries_do_not_split_counts(
    compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client may repeat a device id or kind in its dictionaries (or send both "" and
    "unspecified"): the counts of one device or kind must still add up in one place. With
    the compiled device table, encoder and keys (_devices.c), and without."""
    monkeypatch.setattr(columnar, "C_KEYS", compiled and columnar.C_KEYS)
    monkeypatch.setattr(validation, "C_DEVICES", compiled and validation.C_DEVICES)
    cols = Columns(
        count=4,
        device_ids=["a", "b", "a"],
        kinds=["", "x", "unspecified", "x"],
        device_index=np.array([0, 2, 1, 2], "<u4").tobytes(),
        kind_index=np.array([0, 2, 1, 3], "<u4").tobytes(),
    )
    v = Validator(Limits())
    # Twice: new devices are told apart by their ids, known ones by their entries.
    for _ in range(2):
        compact, rejected = decode_columns(cols, v, NOW)
        assert sorted(compact.device_ids) == ["a", "b"]
        delta = compact.to_flush_delta()
        assert not rejected and delta.packets == 4
        assert delta.devices["a"].packets == 3 and delta.devices["b"].packets == 1
        assert delta.devices["a"].kinds == {"unspecified": 2, "x": 1}
        assert compact.keys is not None
        assert compact.keys.ids.tolist() == list(map(id, compact.keys.holders))
    # An index past the dictionary is refused by its own reason, after deduplication too.
    cols.device_index = np.array([0, 2, 3, 2], "<u4").tobytes()
    compact, rejected = decode_columns(cols, v, NOW)
    assert rejected == {"invalid_column_index": 1}
    assert compact.to_flush_delta().devices["a"].packets == 3
    rows = [Packet(device_id="a", kind=k) for k in ("", "unspecified", "x")]
    row_delta = decode_rows(rows, Validator(Limits()), NOW)[0].to_flush_delta()
    assert row_delta.devices["a"].kinds == {"unspecified": 2, "x": 1}


def test_many_devices_and_names_stay_sparse() -> None:
    """Thousands of devices times thousands of value names in one batch must not allocate
    the dense product (hostile input): the sparse path gives the same result."""
    batch = [
        Packet(device_id=f"d{i}", kind=f"k{i}", values={f"n{i}": float(i)}) for i in range(3000)
    ]
    compact, rejected = decode_rows(batch, Validator(Limits(max_devices=10_000)), NOW)
    delta = compact.to_flush_delta()
    assert not rejected and len(delta.devices) == 3000
    assert delta.devices["d2999"].values["n2999"].last == 2999.0
    assert delta == one_by_one(batch, Limits(max_devices=10_000))[0]


def _same_but_float_sums(got: FlushDelta, want: FlushDelta) -> None:
    """Equal, except float sums, which may differ by the rounding of another order."""
    assert got.devices.keys() == want.devices.keys()
    for device_id, dev in got.devices.items():
        for name, stats in dev.values.items():
            expected = want.devices[device_id].values[name]
            assert math.isclose(stats.sum, expected.sum, rel_tol=1e-9, abs_tol=1e-6)
            stats.sum = expected.sum
    assert got == want


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
@given(st.lists(valid_packets(), min_size=2, max_size=40), st.integers(1, 39), st.booleans())
def test_batches_merged_at_the_flush_equal_one_by_one(
    drawn: list[Packet], cut: int, as_cols: bool
) -> None:
    """Pending batches stay compact (BatchDelta) and are merged into one FlushDelta at the
    flush: two batches merged there count what the packets one by one count."""
    cut = min(cut, len(drawn) - 1)
    v = Validator(LIMITS)
    merged = FlushDelta()
    for part in (drawn[:cut], drawn[cut:]):
        decoded = (
            decode_columns(encode_columns(part), v, NOW) if as_cols else decode_rows(part, v, NOW)
        )[0]
        decoded.merge_into(merged)
    # Float sums are added per batch, then batch to batch: exact up to the rounding of a
    # different addition order; every other field is exact.
    _same_but_float_sums(merged, one_by_one(drawn)[0])


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
@given(
    st.lists(st.lists(valid_packets(), min_size=1, max_size=15), min_size=2, max_size=6),
    st.lists(st.booleans(), min_size=6, max_size=6),
    st.booleans(),
    st.lists(valid_packets(), max_size=5),
    st.sampled_from([1, 2, 16_384]),
    st.lists(st.sampled_from(["kept", "forgotten", "unkeyed"]), min_size=6, max_size=6),
)
def test_merging_many_batches_at_once_equals_one_by_one(
    parts: list[list[Packet]],
    as_cols: list[bool],
    same_recv: bool,
    earlier: list[Packet],
    unify_slice: int,
    after: list[str],
) -> None:
    """The flush merges its pending batches in one numpy pass (merge_batches): the same
    result as merging them in turn, into a delta that already holds other packets; with
    equal receive times, "last" ties go to the later batch as in the one-by-one merge.
    Devices are numbered by the batches' keys, or by their ids (slices of 1 and 2 cut
    every part) when a part has none or when the validator forgot its devices between two
    batches (two keys for one device)."""
    with _unify_slice(unify_slice):
        _merging_many_batches_at_once_equals_one_by_one(parts, as_cols, same_recv, earlier, after)


@contextlib.contextmanager
def _unify_slice(size: int) -> Iterator[None]:
    saved = model._UNIFY_SLICE
    model._UNIFY_SLICE = size
    try:
        yield
    finally:
        model._UNIFY_SLICE = saved


def _merging_many_batches_at_once_equals_one_by_one(
    parts: list[list[Packet]],
    as_cols: list[bool],
    same_recv: bool,
    earlier: list[Packet],
    after: list[str],
) -> None:
    v = Validator(LIMITS)
    decoded = []
    for i, (p, cols, then) in enumerate(zip(parts, as_cols, after, strict=False)):
        t = NOW if same_recv else NOW + 7 * i
        d = (decode_columns(encode_columns(p), v, t) if cols else decode_rows(p, v, t))[0]
        assert d.keys is not None and len(d.keys.ids) == d.entries
        if then == "forgotten":  # two rotations: the next batch's devices are new again
            v.rotate()
            v.rotate()
        if then == "unkeyed":
            d = dataclasses.replace(d, keys=None)
        decoded.append(d)
    base = one_by_one(earlier)[0]
    want, got = FlushDelta(), FlushDelta()
    merge_into(want, base)
    merge_into(got, base)
    for d in decoded:
        d.merge_into(want)
    merge_batches(got, decoded)
    _same_but_float_sums(got, want)


@pytest.mark.parametrize("compiled", [True, False])
def test_a_flush_numbers_devices_by_their_keys_as_by_their_ids(
    compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The validator's entries name each device across batches, so the flush numbers a
    fleet's devices over integers (model._keyed) exactly as over their ids (_unified):
    the same table in the same order, the same numbers; with the C numbering and without.
    Two keys for one id (a device forgotten and admitted again between batches) or a part
    without keys: the ids decide."""
    monkeypatch.setattr(model, "C_NUMBERING", compiled and model.C_NUMBERING)
    v = Validator(LIMITS)
    batches = [["a", "b", "c"], ["c", "d"], ["b", "e", "a"], ["f"]]
    parts = [
        decode_rows([Packet(device_id=d, kind="k", values={"t": 1.0}) for d in ids], v, NOW)[0]
        for ids in batches
    ]
    kind_dev = [p.kind_dev for p in parts]
    value_dev = [p.value_dev for p in parts]
    keyed = model._keyed(parts, kind_dev, value_dev)
    by_id = model._unified([p.device_ids for p in parts], kind_dev, value_dev)
    assert keyed is not None
    assert keyed[0] == by_id[0] == ["a", "b", "c", "d", "e", "f"]
    assert keyed[1].tolist() == by_id[1].tolist() == [0, 1, 2, 2, 3, 1, 4, 0, 5]
    assert [x.tolist() for x in keyed[2]] == [x.tolist() for x in by_id[2]]
    # A reduced batch keeps its devices' keys: reduced again (the aggregator's loose
    # batches), it is numbered by key as well, the same way.
    reduced = [model.reduce_batches(parts[:2]), *parts[2:]]
    kind_dev = [p.kind_dev for p in reduced]
    value_dev = [p.value_dev for p in reduced]
    again = model._keyed(reduced, kind_dev, value_dev)
    by_id = model._unified([p.device_ids for p in reduced], kind_dev, value_dev)
    assert again is not None and again[0] == by_id[0]
    assert again[1].tolist() == by_id[1].tolist()
    assert [x.tolist() for x in again[2]] == [x.tolist() for x in by_id[2]]
    assert again[3] is not None
    assert again[3].ids.tolist() == [id(h) for h in again[3].holders]
    # A flush's write is reduced once, without the keys (Flusher._encode): the same
    # numbering and the same reduction, holding no device's entry.
    lean = model._keyed(reduced, kind_dev, value_dev, keep=False)
    assert lean is not None and lean[3] is None
    assert lean[0] == again[0] and lean[1].tolist() == again[1].tolist()
    assert [x.tolist() for x in lean[2]] == [x.tolist() for x in again[2]]
    with_keys, without = model.reduce_batches(parts), model.reduce_batches(parts, keep_keys=False)
    assert with_keys.keys is not None and without.keys is None
    for f in dataclasses.fields(model.BatchDelta):
        if f.name != "keys":
            mine, theirs = getattr(without, f.name), getattr(with_keys, f.name)
            assert np.array_equal(mine, theirs) if isinstance(mine, np.ndarray) else mine == theirs
    assert model._keyed([parts[0], dataclasses.replace(parts[1], keys=None)]) is None
    v.rotate()
    v.rotate()  # "a" is forgotten: admitted again, it has a new entry
    again = decode_rows([Packet(device_id="a", kind="k")], v, NOW)[0]
    assert again.keys is not None and parts[0].keys is not None
    assert again.keys.ids[0] != parts[0].keys.ids[0]
    assert model._keyed([parts[0], again]) is None
