"""HTTP JSON bodies read field by field (http_json._columns) against packet by packet
(http_json._packet): on hypothesis-generated bodies, well-formed or not, both give the same
packets, or the same refusal naming the same field."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from rtmonitor.ingest.columnar import Records
from rtmonitor.ingest.http_json import parse_packets
from rtmonitor.ingest.receiver import Refused

_numbers = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False)
)
_odd = st.one_of(
    st.none(), st.booleans(), st.text(max_size=3), st.lists(st.integers(-5, 5), max_size=2)
)


@st.composite
def _packet(draw: st.DrawFn) -> Any:
    """Mostly a good packet; now and then a field missing, of the wrong type, unknown."""
    packet: dict[str, Any] = {"device_id": draw(st.sampled_from(["d-1", "d-2", "bad id"]))}
    if draw(st.booleans()):
        packet["kind"] = draw(st.sampled_from(["", "env", "k"]))
    if draw(st.booleans()):
        packet["ts"] = draw(st.integers(0, 2**40))
    if draw(st.booleans()):
        packet["payload_size"] = draw(st.integers(0, 5000))
    if draw(st.integers(0, 3)):
        names = st.sampled_from(["temp", "hum", "bad name"])
        packet["values"] = draw(st.dictionaries(names, _numbers, max_size=3))
    if draw(st.integers(0, 7)) == 0:  # something off
        field = draw(st.sampled_from(["device_id", "kind", "ts", "payload_size", "values", "x"]))
        packet[field] = draw(st.one_of(_odd, st.integers(-3, -1), st.just({"t": "1"})))
    if draw(st.integers(0, 30)) == 0:
        packet.pop("device_id")
    if draw(st.integers(0, 30)) == 0:
        return draw(_odd)
    return packet


def _read(body: bytes, columns: bool) -> Records | tuple[str, str | None, str]:
    try:
        return parse_packets(body, 10_000, columns=columns)
    except Refused as refusal:
        return str(refusal.reason), refusal.field, refusal.message


@settings(max_examples=300, deadline=None)
@given(st.lists(_packet(), max_size=12))
def test_a_body_read_by_columns_is_read_as_packet_by_packet(body: list[Any]) -> None:
    data = orjson.dumps(body)
    assert _read(data, columns=True) == _read(data, columns=False)


@settings(max_examples=300, deadline=None)
@given(_packet(), st.lists(st.tuples(_packet(), st.booleans()), max_size=8))
def test_a_body_of_one_shape_is_read_as_packet_by_packet(
    first: Any, others: list[tuple[Any, bool]]
) -> None:
    """Packets with the same keys in the same order (read in one transposing pass): the
    others take the first's keys with their own values, or keep their own shape."""
    body = [first]
    for packet, same in others:
        if same and type(first) is dict and type(packet) is dict:
            packet = {k: packet.get(k, v) for k, v in first.items()}
        body.append(packet)
    data = orjson.dumps(body)
    assert _read(data, columns=True) == _read(data, columns=False)


def test_a_good_list_is_read_by_columns() -> None:
    body = [
        {"device_id": "d", "values": {"a": 1, "b": 2.5}},
        {"device_id": "d", "kind": "k", "payload_size": 3},
        {"device_id": "e", "ts": 5, "values": None},
        {"device_id": "e", "values": {"c": -1}},
    ]
    records = parse_packets(orjson.dumps(body), 10)
    assert records == Records(
        device_ids=["d", "d", "e", "e"],
        kinds=["", "k", "", ""],
        sizes=[0, 3, 0, 0],
        ts=[0, 0, 5, 0],
        v_pos=[0, 0, 3],
        v_names=["a", "b", "c"],
        v_vals=[1, 2.5, -1],
    )


_BAD = [None, True, False, "1", -1, 1.5, [1], {"t": "1"}, {"t": True}, {"t": None}, 2**63 - 1]


def test_each_fault_alone_is_refused_as_packet_by_packet() -> None:
    good = {"device_id": "d", "kind": "k", "ts": 1, "payload_size": 2, "values": {"t": 1.0}}
    for field in ["device_id", "kind", "ts", "payload_size", "values", "unknown"]:
        for bad in _BAD:
            body = orjson.dumps([good, {**good, field: bad}, good])
            read = _read(body, columns=True)
            assert read == _read(body, columns=False), (field, bad)
    body = orjson.dumps([good, {k: v for k, v in good.items() if k != "device_id"}])
    assert _read(body, columns=True) == _read(body, columns=False)
    body = orjson.dumps([good, 3])
    assert _read(body, columns=True) == _read(body, columns=False)
