"""The C row reader (ingest/_rows.c) reads exactly what protobuf's parser reads.

protobuf is the oracle: for every message, either the C reader declines it (and protobuf
reads it, or refuses it with its own error), or both give the same packets, field by field.
Messages come from hypothesis (valid batches, then the same bytes mutated: flipped,
dropped, inserted, truncated) and from hand-built wire data for the corners of proto3:
repeated scalars (the last wins; a repeated string field is protobuf's to read), a map key
repeated in one packet, unknown fields of every wire type, fields in any order, missing map
keys and values, negative timestamps.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtmonitor.ingest import columnar
from rtmonitor.ingest.columnar import C_ROWS, BatchTooLarge, parse_batch
from rtmonitor.ingest.v1.telemetry_pb2 import Batch

# Without the reader these tests cannot run; test_columnar.py fails the suite in that case.
pytestmark = pytest.mark.skipif(not C_ROWS, reason="the C row reader is not built")
NO_LIMIT = 2**40


# --- the packets a batch carries, as plain tuples ---------------------------------------


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)  # compares NaN, -0.0 and infinities exactly


def packets_of(raw: bytes, compiled: bool) -> tuple[str, int, list[tuple[Any, ...]]] | None:
    """(producer, batch id, one tuple per packet) as read by one reader; None if it declines."""
    if compiled:
        read = columnar._read_rows(raw)
        if read is None:
            return None
        assert isinstance(read, columnar._WireRows)
        t = columnar._table_from_wire(read)
        producer, batch_id = read.producer_id, read.batch_id
        size = t.size.tolist() if t.size is not None else [0] * t.n
        ts = t.ts.tolist() if t.ts is not None else [0] * t.n
        readings: list[dict[str, bytes]] = [{} for _ in range(t.n)]
        cols = (t.v_pos.tolist(), t.v_name.tolist(), t.v_val.tolist())
        for pos, name, val in zip(*cols, strict=True):
            assert t.names[name] not in readings[pos], "a name read twice for one packet"
            readings[pos][t.names[name]] = _bits(val)
        rows = [
            (t.device_ids[d], t.kinds[k], size[i], ts[i], readings[i])
            for i, (d, k) in enumerate(zip(t.dev_idx.tolist(), t.kind_idx.tolist(), strict=True))
        ]
        return producer, batch_id, rows
    batch = Batch.FromString(raw)
    rows = [
        (
            p.device_id,
            p.kind or "unspecified",
            len(p.payload),
            p.timestamp_ms,
            {k: _bits(v) for k, v in p.values.items()},
        )
        for p in batch.packets
    ]
    return batch.producer_id, batch.batch_id, rows


def assert_same_as_protobuf(raw: bytes, must_read: bool = False) -> None:
    try:
        expected = packets_of(raw, compiled=False)
        parsed_ok = not Batch.FromString(raw).HasField("columns")
    except DecodeError:
        assert columnar._read_rows(raw) is None, "C read a message protobuf refuses"
        with pytest.raises(DecodeError):
            parse_batch(raw, NO_LIMIT)
        return
    got = packets_of(raw, compiled=True)
    if got is None:
        assert not must_read, "C declined a plain row batch"
        return
    assert parsed_ok, "C read a batch that has columns"
    assert got == expected


# --- hypothesis: valid batches and their mutations -------------------------------------

names = st.sampled_from(["", "a", "b", "dev-1", "站点/7", "unspecified", "reading", "x" * 40])
floats = st.floats(width=64, allow_nan=True, allow_infinity=True)


@st.composite
def batches(draw: st.DrawFn) -> bytes:
    batch = Batch(producer_id=draw(names), batch_id=draw(st.integers(0, 2**64 - 1)))
    for _ in range(draw(st.integers(0, 12))):
        p = batch.packets.add(
            device_id=draw(names),
            kind=draw(names),
            payload=b"\x00" * draw(st.integers(0, 300)),
            timestamp_ms=draw(st.integers(-(2**63), 2**63 - 1)),
        )
        for key, value in draw(st.dictionaries(names, floats, max_size=4)).items():
            p.values[key] = value
    return batch.SerializeToString()


SETTINGS = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)


@SETTINGS
@given(batches())
def test_valid_batches_read_the_same(raw: bytes) -> None:
    assert_same_as_protobuf(raw, must_read=True)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(batches()))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "drop", "insert", "truncate"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "drop" and at < len(data):
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "truncate":
            del data[at:]
    return bytes(data)


@settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
@given(mutated())
def test_mutated_bytes_read_the_same_or_go_to_protobuf(raw: bytes) -> None:
    assert_same_as_protobuf(raw)


# --- hand-built wire data ----------------------------------------------------------------


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def overlong(n: int, width: int) -> bytes:
    """n as a varint padded to `width` bytes (continuation bits on zero groups)."""
    groups = [(n >> (7 * i)) & 0x7F for i in range(width)]
    return bytes(g | 0x80 for g in groups[:-1]) + bytes(groups[-1:])


def field(number: int, wire: int, body: bytes | int) -> bytes:
    tag = varint(number << 3 | wire)
    if wire == 0:
        assert isinstance(body, int)
        return tag + varint(body)
    assert isinstance(body, bytes)
    return tag + (varint(len(body)) + body if wire == 2 else body)


def s(number: int, text: str | bytes) -> bytes:
    return field(number, 2, text.encode() if isinstance(text, str) else text)


def entry(key: str | None, value: float | None, extra: bytes = b"") -> bytes:
    body = extra
    if key is not None:
        body += s(1, key)
    if value is not None:
        body += field(2, 1, struct.pack("<d", value))
    return s(5, body)


def batch(*packets: bytes, head: bytes = b"") -> bytes:
    return head + b"".join(s(3, p) for p in packets)


UNKNOWN = (
    field(15, 0, 2**63)
    + field(16, 1, b"\x01" * 8)
    + field(17, 5, b"\x02" * 4)
    + s(2047, b"\xff\xfe junk")
)

CASES = {
    "repeated scalars: the last wins": batch(
        s(1, "a") + field(2, 0, 5) + s(3, "tcp") + field(2, 0, 7) + s(4, b"xy") + s(4, b"xyz"),
        head=s(1, "p1") + field(2, 0, 3) + field(2, 0, 9),
    ),
    "a map key repeated in one packet keeps its last value": batch(
        s(1, "a") + entry("t", 1.0) + entry("h", 2.0) + entry("t", 3.0),
        s(1, "a") + entry("t", 4.0),
    ),
    "unknown fields of every wire type are skipped": batch(
        UNKNOWN + s(1, "a") + UNKNOWN + entry("t", 1.0) + UNKNOWN,
        head=UNKNOWN,
    ),
    "fields in any order": batch(entry("t", 1.0) + s(4, b"p") + s(3, "tcp") + s(1, "z")),
    "a map entry without key or value": batch(
        s(1, "a") + entry(None, 2.5) + entry("t", None) + s(5, b"")
    ),
    "negative and huge timestamps": batch(
        *(s(1, "a") + field(2, 0, ts) for ts in (-1, -(2**63), 2**63 - 1, 2**64 - 1))
    ),
    "empty packets and an empty batch": batch(b"", b"", s(1, "")),
    "empty strings and unspecified share one kind": batch(
        s(1, "a") + s(3, ""), s(1, "a") + s(3, "unspecified"), s(1, "a")
    ),
    "many devices": batch(*(s(1, f"d{i % 997}") + entry("v", float(i)) for i in range(5000))),
    "non-ASCII strings": batch(s(1, "温度计-1") + s(3, "读数") + entry("湿度", 0.5)),
    "5-byte tags and lengths (the longest protobuf reads)": batch(
        overlong(1 << 3 | 2, 5) + overlong(1, 5) + b"a" + overlong(2 << 3, 5) + varint(7),
        head=overlong(2 << 3, 5) + overlong(9, 10),
    ),
}


@pytest.mark.parametrize("raw", CASES.values(), ids=CASES.keys())
def test_wire_corners_read_the_same(raw: bytes) -> None:
    assert_same_as_protobuf(raw, must_read=True)


DECLINED = {
    "a Columns field": batch(s(1, "a"), head=s(4, b"")),
    "a known field with another wire type": batch(field(1, 0, 5)),
    "a group": batch(s(1, "a") + varint(20 << 3 | 3) + varint(20 << 3 | 4)),
    "a truncated packet": batch(s(1, "a"))[:-1],
    "a length past the end": s(3, s(1, "a"))[:-2],
    "an 11-byte varint": batch(s(1, "a") + varint(2 << 3) + b"\xff" * 10 + b"\x01"),
    "field number 0": b"\x00\x01",
    # protobuf reads a tag or a length as at most 5 bytes (32 bits), padded or not
    **{
        f"a {k}-byte tag": batch(s(1, "a"), head=overlong(1 << 3 | 2, k) + varint(1) + b"p")
        for k in range(6, 11)
    },
    **{f"a {k}-byte length": s(1, "a")[:1] + overlong(1, k) + b"a" for k in range(6, 11)},
    "a 10-byte tag with bits past 64": batch(
        s(1, "a"), head=b"\x8a" + b"\x80" * 8 + b"\x7e" + varint(1) + b"p"
    ),
    "a 6-byte packet length": b"\x1a" + overlong(3, 6) + s(1, "a"),
    "a 6-byte map entry length": batch(s(1, "a") + b"\x2a" + overlong(0, 6)),
    "a 6-byte unknown field's length": batch(s(1, "a"), head=b"\x7a" + overlong(1, 6) + b"p"),
    "a map entry with an unknown field (protobuf keeps it out of the map)": batch(
        s(1, "a") + entry("t", 1.0, extra=field(3, 0, 1))
    ),
    "invalid UTF-8 in a device id": batch(s(1, b"\xff\xfe")),
    "invalid UTF-8 in a value name": batch(s(1, "a") + s(5, s(1, b"\xc3"))),
    "invalid UTF-8 in the producer id": batch(s(1, "a"), head=s(1, b"\x80")),
    # protobuf checks every occurrence of a string field; the C reader would check only the
    # last one (which wins), so a repeated string field is protobuf's to read or refuse.
    "a repeated producer id": batch(s(1, "a"), head=s(1, "p1") + s(1, "p2")),
    "a repeated device id": batch(s(1, "a") + s(1, "b")),
    "a repeated kind": batch(s(1, "a") + s(3, "tcp") + s(3, "reading")),
    "a map key repeated in one entry": batch(s(1, "a") + s(5, s(1, "t") + s(1, "h"))),
    "invalid UTF-8 in an overwritten producer id": batch(
        s(1, "a"), head=s(1, b"\x82\xb9") + s(1, "p")
    ),
    "invalid UTF-8 in an overwritten device id": batch(s(1, b"\xff") + s(1, "a")),
}


@pytest.mark.parametrize("raw", DECLINED.values(), ids=DECLINED.keys())
def test_unusual_messages_go_to_protobuf(raw: bytes) -> None:
    assert columnar._read_rows(raw) is None
    assert_same_as_protobuf(raw)


@pytest.mark.parametrize(
    "case", ["invalid UTF-8 in a device id", "invalid UTF-8 in an overwritten producer id"]
)
def test_invalid_utf8_is_refused_as_protobuf_refuses_it(case: str) -> None:
    with pytest.raises(DecodeError):
        parse_batch(DECLINED[case], NO_LIMIT)


def test_nan_readings_keep_their_bits() -> None:
    raw = batch(s(1, "a") + entry("t", math.nan) + entry("h", -0.0) + entry("p", math.inf))
    assert_same_as_protobuf(raw, must_read=True)


@pytest.mark.parametrize("compiled", [True, False])
def test_a_batch_over_the_limit_is_refused_before_it_is_built(compiled: bool) -> None:
    """Both readers refuse a batch past --max-batch-packets with its id and size; the C
    reader counts the packets in its first pass and builds nothing (a 64 MB message of
    tiny packets would otherwise make gigabytes of columns)."""
    raw = batch(*(s(1, f"d{i}") for i in range(1001)), head=field(2, 0, 77))
    with pytest.raises(BatchTooLarge) as refused:
        parse_batch(raw, 1000, compiled=compiled)
    assert (refused.value.batch_id, refused.value.packets) == (77, 1001)
    assert parse_batch(raw, 1001, compiled=compiled).count == 1001
    if compiled:
        refused = columnar._read_rows(raw, 1000)
        assert isinstance(refused, columnar._WireTooLarge)
        assert (refused.batch_id, refused.packets) == (77, 1001)
        read = columnar._read_rows(raw, 1001)
        assert isinstance(read, columnar._WireRows) and len(read.device_ids) == 1001
