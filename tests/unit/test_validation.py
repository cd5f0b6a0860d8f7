"""Validation: every refusal has its reason, and refused packets leave no trace."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtmonitor.ingest.v1.telemetry_pb2 import Packet
from rtmonitor.ingest.validation import UNKNOWN, Limits, Reason, Validator

NOW = 1_700_000_000_000


def make(device_id: str = "dev-1", **kw: object) -> Packet:
    values = kw.pop("values", {})
    p = Packet(device_id=device_id, **kw)  # type: ignore[arg-type]
    for k, v in values.items():  # type: ignore[attr-defined]
        p.values[k] = v
    return p


def test_good_packet_becomes_a_row() -> None:
    row = Validator(Limits()).check(
        make(kind="reading", payload=b"abc", timestamp_ms=NOW - 5, values={"t": 1.5}), NOW
    )
    assert row == ("dev-1", "reading", 3, NOW - 5, {"t": 1.5})


def test_zero_timestamp_means_receive_time_and_empty_kind_is_unspecified() -> None:
    row = Validator(Limits()).check(make(), NOW)
    assert row == ("dev-1", "unspecified", 0, NOW, None)


@pytest.mark.parametrize(
    ("device_id", "reason"),
    [
        ("", Reason.EMPTY_DEVICE_ID),
        ("x" * 129, Reason.DEVICE_ID_TOO_LONG),
        ("a{b}", Reason.INVALID_DEVICE_ID),
        ("a b", Reason.INVALID_DEVICE_ID),
        ("a\nb", Reason.INVALID_DEVICE_ID),
        ("dev\n", Reason.INVALID_DEVICE_ID),
        ('a"b', Reason.INVALID_DEVICE_ID),
        ("a*", Reason.INVALID_DEVICE_ID),
        ("caf\u00e9", Reason.INVALID_DEVICE_ID),
    ],
)
def test_bad_device_ids(device_id: str, reason: Reason) -> None:
    assert Validator(Limits()).check(make(device_id), NOW) is reason


def test_device_id_edges_accepted() -> None:
    v = Validator(Limits())
    for device_id in ("x" * 128, "a", "site-1/probe:eth0@rack.7_b"):
        assert isinstance(v.check(make(device_id), NOW), tuple)


def test_payload_limit() -> None:
    v = Validator(Limits(max_payload_bytes=10))
    assert isinstance(v.check(make(payload=b"x" * 10), NOW), tuple)
    assert v.check(make(payload=b"x" * 11), NOW) is Reason.PAYLOAD_TOO_LARGE


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values(value: float) -> None:
    assert Validator(Limits()).check(make(values={"t": value}), NOW) is Reason.NON_FINITE_VALUE


def test_bad_timestamps() -> None:
    v = Validator(Limits())
    assert v.check(make(timestamp_ms=-1), NOW) is Reason.BAD_TIMESTAMP
    assert v.check(make(timestamp_ms=NOW + 2 * 86_400_000), NOW) is Reason.BAD_TIMESTAMP
    assert isinstance(v.check(make(timestamp_ms=NOW + 60_000), NOW), tuple)


def test_bad_names() -> None:
    v = Validator(Limits())
    assert v.check(make(kind="a b"), NOW) is Reason.INVALID_KIND
    assert v.check(make(kind="k" * 65), NOW) is Reason.INVALID_KIND
    assert v.check(make(values={"bad name": 1.0}), NOW) is Reason.INVALID_VALUE_NAME
    assert v.check(make(values={"": 1.0}), NOW) is Reason.INVALID_VALUE_NAME


def test_too_many_values_in_one_packet() -> None:
    v = Validator(Limits(max_values_per_packet=2))
    assert v.check(make(values={"a": 1, "b": 2, "c": 3}), NOW) is Reason.TOO_MANY_VALUES


def test_kind_and_name_limits_per_device_leave_no_trace_when_refused() -> None:
    v = Validator(Limits(max_kinds_per_device=2, max_value_names_per_device=2))
    assert isinstance(v.check(make(kind="a", values={"x": 1}), NOW), tuple)
    assert isinstance(v.check(make(kind="b", values={"y": 1}), NOW), tuple)
    assert v.check(make(kind="c"), NOW) is Reason.TOO_MANY_KINDS
    # refused for its value name: its new kind must not be admitted either
    v2 = Validator(Limits(max_kinds_per_device=2, max_value_names_per_device=1))
    assert isinstance(v2.check(make(kind="a", values={"x": 1}), NOW), tuple)
    assert v2.check(make(kind="b", values={"y": 1}), NOW) is Reason.TOO_MANY_VALUE_NAMES
    assert isinstance(v2.check(make(kind="b", values={"x": 2}), NOW), tuple)
    assert v2.check(make(kind="c"), NOW) is Reason.TOO_MANY_KINDS
    # known kinds and names keep working, and other devices have their own budget
    assert isinstance(v.check(make(kind="a", values={"x": 1, "y": 2}), NOW), tuple)
    assert isinstance(v.check(make("other", kind="c"), NOW), tuple)


def test_device_limit_admits_known_devices() -> None:
    v = Validator(Limits(max_devices=2))
    assert isinstance(v.check(make("a"), NOW), tuple)
    assert v.check(make("", kind="x"), NOW) is Reason.EMPTY_DEVICE_ID  # no phantom device
    assert isinstance(v.check(make("b"), NOW), tuple)
    assert v.check(make("c"), NOW) is Reason.TOO_MANY_DEVICES
    assert isinstance(v.check(make("a"), NOW), tuple)
    assert v.device_count == 2


@settings(suppress_health_check=[HealthCheck.too_slow], print_blob=True)
@given(
    device_id=st.text(max_size=200),
    kind=st.text(max_size=80),
    payload=st.binary(max_size=300),
    timestamp=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    values=st.dictionaries(st.text(max_size=70), st.floats(), max_size=5),
)
def test_fuzz_validator_never_raises_and_rows_are_safe(
    device_id: str, kind: str, payload: bytes, timestamp: int, values: dict[str, float]
) -> None:
    v = Validator(Limits(max_payload_bytes=256, max_values_per_packet=4))
    p = Packet(device_id=device_id, kind=kind, payload=payload, timestamp_ms=timestamp)
    for k, val in values.items():
        p.values[k] = val
    result = v.check(p, NOW)
    if isinstance(result, tuple):
        dev, k, n, ts, vals = result
        assert 1 <= len(dev) <= 128 and "{" not in dev and "}" not in dev and dev.isascii()
        assert n <= 256 and 0 <= ts <= NOW + 86_400_000
        assert all(math.isfinite(x) for x in (vals or {}).values())
    else:
        assert isinstance(result, Reason)


def test_devices_share_vocabularies_without_affecting_each_other() -> None:
    """Vocabularies are interned: devices using the same kinds and names share one, and a
    device adding a kind changes only its own (limits stay per device)."""
    v = Validator(Limits(max_kinds_per_device=2))
    for d in ("a", "b", "c"):
        assert isinstance(v.check(make(d, kind="x", values={"t": 1.0}), NOW), tuple)
    assert len(v._vocabularies) == 1
    assert isinstance(v.check(make("a", kind="y"), NOW), tuple)  # a: {x, y}, full
    assert v.check(make("a", kind="z"), NOW) is Reason.TOO_MANY_KINDS
    assert isinstance(v.check(make("b", kind="z"), NOW), tuple)  # b still had room
    reason, refused, _ = v.admit("c", ["w", "v"], ["t"])
    assert reason is None and refused == {"v"}  # c: {x, w}
    assert v.check(make("c", kind="v"), NOW) is Reason.TOO_MANY_KINDS
    assert isinstance(v.check(make("c", kind="w"), NOW), tuple)


def test_silent_devices_lose_their_slot_after_a_full_rotation() -> None:
    """Two generations: a device silent through two rotations frees its slot and its
    kinds budget; one seen in between (by row or by columnar batch) keeps both."""
    v = Validator(Limits(max_devices=3, max_kinds_per_device=1))
    for d in ("a", "b", "c"):
        assert isinstance(v.check(make(d, kind="k1"), NOW), tuple)
    assert v.check(make("d"), NOW) is Reason.TOO_MANY_DEVICES
    assert v.rotate() == 0
    # the limit counts both generations: still full
    assert v.device_count == 3 and v.check(make("d"), NOW) is Reason.TOO_MANY_DEVICES
    assert v.device_reason("c") is None  # still a known device
    assert isinstance(v.check(make("a", kind="k1"), NOW), tuple)  # a moves up
    assert v.entries(["a", "b"])[1] is UNKNOWN  # b is in the previous generation only
    assert v.admit("b", ["k1"], []) == (None, frozenset(), frozenset())  # b moves up
    assert UNKNOWN not in v.entries(["a", "b"])
    assert v.check(make("a", kind="k2"), NOW) is Reason.TOO_MANY_KINDS  # budget kept
    assert v.rotate() == 1  # c was silent through a whole period
    assert v.device_count == 2
    assert isinstance(v.check(make("d"), NOW), tuple)
    assert v.check(make("e"), NOW) is Reason.TOO_MANY_DEVICES
    assert v.rotate() == 2 and v.rotate() == 1  # a and b, then d
    assert v.device_count == 0
    # a returning device starts with a fresh kinds budget (Redis expired its old kinds)
    assert isinstance(v.check(make("a", kind="k2"), NOW), tuple)


@pytest.mark.parametrize("new", [0, 1, 3, 20])
def test_settle_and_known_keep_each_known_devices_entry(new: int) -> None:
    """settle() gives a known device its vocabulary in the entry it has (the entry's
    identity names the device to a flush) and a new one an entry of its own; known()
    finds both after admission, one by one (a few new devices) or as a batch (many)."""
    v = Validator(Limits())
    old = [f"old-{i}" for i in range(20 - new)]
    v.settle(old, v.extend(None, ["k1"], [])[0])
    before = v.entries(old)
    ids = [f"new-{i}" for i in range(new)] + old
    entries = v.entries(ids)
    assert entries.count(UNKNOWN) == new
    grown = v.extend(before[0].vocab if old else None, ["k1", "k2"], ["t"])[0]
    v.settle(ids, grown)
    after = v.known(ids, entries)
    assert UNKNOWN not in after and len({id(e) for e in after}) == len(ids)
    assert all(e.vocab is grown for e in after)
    assert after[new:] == before  # the same objects, grown in place
    assert v.entries(ids) == after and v.device_count == len(ids)
