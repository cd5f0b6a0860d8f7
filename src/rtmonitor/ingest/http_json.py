"""The HTTP JSON receiver: `POST /v1/telemetry` with one packet object or a list of them.

    {"device_id": "sensor-1", "kind": "env", "ts": 1767225600000,
     "values": {"temp": 21.5}, "payload_size": 12}

`device_id` is required; `kind` (default "unspecified"), `ts` (ms since the epoch, 0 or
absent: receive time), `values` (name -> number) and `payload_size` (bytes counted, default
0) are optional. A body of the wrong shape (not JSON, a field of the wrong type, an unknown
field) is refused whole: 400 or 422 naming the field. Packets of the right shape that fail
validation (a bad device id, a name outside the alphabet, too many values...) are counted by
reason and reported in the answer, as gRPC acks do.

An `Idempotency-Key` makes the body a batch with an id (receiver.idempotency_batch): a
resend with the same key is counted once (exactly-once, the StreamBatches machinery).
"""

from __future__ import annotations

import re
from collections import Counter
from itertools import chain, repeat
from typing import Any

import numpy as np
import orjson

from rtmonitor.ingest.columnar import Records
from rtmonitor.ingest.receiver import (
    RETRY_AFTER_S,
    Outcome,
    Receiver,
    Refused,
    Sender,
    decode_body,
    idempotency_batch,
)
from rtmonitor.ingest.validation import Reason
from rtmonitor.model import IDEMPOTENCY_KEY_MAX, IDEMPOTENCY_KEY_PATTERN, HttpReply

FIELDS = frozenset({"device_id", "kind", "ts", "values", "payload_size"})
# The producer id of bodies sent with an Idempotency-Key (batch ids are their keys' hashes),
# under the token's name when there is an auth file (Principal.producer_key).
IDEMPOTENCY_PRODUCER = "http"
_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)
SURFACE = "http-json"  # auth refusals are counted under this name
_HTTP_STATUS = {"invalid": 422, "too_large": 413, "unsupported": 415, "unavailable": 503}
# the types a field's values may have (bool is not an int here, as in _integer)
_STR: frozenset[type] = frozenset({str})
_INT: frozenset[type] = frozenset({int})
_NUMBER: frozenset[type] = frozenset({float, int})
_VALUES: frozenset[type] = frozenset({dict, type(None)})
_DICT: frozenset[type] = frozenset({dict})
_EMPTY: dict[str, Any] = {}
_MISSING = object()


def _invalid(field: str, message: str) -> Refused:
    return Refused(Reason.INVALID_BODY, "invalid", f"{field}: {message}", field=field)


def _integer(obj: dict[str, Any], key: str, where: str) -> int:
    value = obj.get(key, 0)
    # JSON Schema's integer: 12 and 12.0 alike (JavaScript writes no other); bool refused
    if type(value) is float and value.is_integer() and 0 <= value < 2**63:
        value = int(value)
    if type(value) is not int or not 0 <= value < 2**63:  # bool is an int: refused too
        raise _invalid(f"{where}.{key}", "must be an integer from 0 to 2^63-1")
    return value


def _packet(obj: Any, where: str, records: Records) -> None:
    """Check one packet object's shape and append it to `records`."""
    if type(obj) is not dict:
        raise _invalid(where, "must be a packet object")
    if not FIELDS.issuperset(obj):
        unknown = sorted(set(obj) - FIELDS)[0]
        raise _invalid(f"{where}.{unknown}", f"unknown field; a packet has {sorted(FIELDS)}")
    device_id = obj.get("device_id")
    if type(device_id) is not str:
        raise _invalid(f"{where}.device_id", "required, a string")
    kind = obj.get("kind", "")
    if type(kind) is not str:
        raise _invalid(f"{where}.kind", "must be a string")
    ts = _integer(obj, "ts", where) if "ts" in obj else 0
    size = _integer(obj, "payload_size", where) if "payload_size" in obj else 0
    i = len(records.device_ids)
    values = obj.get("values")
    if values:
        if type(values) is not dict:
            raise _invalid(f"{where}.values", "must be an object of name: number")
        for name, value in values.items():
            if type(value) is not float and type(value) is not int:
                raise _invalid(f"{where}.values.{name}", "must be a number")
            records.v_pos.append(i)
            records.v_names.append(name)
            records.v_vals.append(value)
    elif values is not None and type(values) is not dict:
        raise _invalid(f"{where}.values", "must be an object of name: number")
    records.device_ids.append(device_id)
    records.kinds.append(kind)
    records.ts.append(ts)
    records.sizes.append(size)


# A packet's fields: (name, default when absent (_MISSING: required), the types allowed).
_FIELDS: tuple[tuple[str, Any, frozenset[type]], ...] = (
    ("device_id", _MISSING, _STR),
    ("kind", "", _STR),
    ("ts", 0, _INT),
    ("payload_size", 0, _INT),
    ("values", None, _VALUES),
)


def _field(packets: list[dict[str, Any]], key: str, default: Any, types: frozenset[type]) -> Any:
    """One field of every packet in C-level passes, and how many packets have it; None if
    one is missing without a `default`, or is not of `types`."""
    column = list(map(dict.get, packets, repeat(key), repeat(_MISSING)))
    missing = column.count(_MISSING)
    if missing:
        if default is _MISSING:
            return None
        n = len(column)
        column = (
            [default] * n if missing == n else [default if x is _MISSING else x for x in column]
        )
    if not set(map(type, column)) <= types:
        return None
    return column, len(column) - missing


def _uniform(doc: list[dict[str, Any]], shape: tuple[str, ...]) -> list[list[Any]] | None:
    """The fields of packets that all have the same keys in the same order (`shape`, as a
    generator's body has): transposed in one pass, or None if a field is missing, unknown
    or mistyped."""
    if not FIELDS.issuperset(shape):
        return None
    given = dict(zip(shape, map(list, zip(*map(dict.values, doc), strict=True)), strict=True))
    n = len(doc)
    columns = []
    for key, default, types in _FIELDS:
        column = given.get(key)
        if column is None:
            if default is _MISSING:
                return None
            column = [default] * n
        if not set(map(type, column)) <= types:
            return None
        columns.append(column)
    return columns


def _fields(doc: list[dict[str, Any]]) -> list[list[Any]] | None:
    """The fields of packets with different keys, a field at a time."""
    read = [_field(doc, key, default, types) for key, default, types in _FIELDS]
    if None in read or sum(map(len, doc)) != sum(present for _, present in read):
        return None  # a field missing or of the wrong type, or an unknown field
    return [column for column, _ in read]


def _columns(doc: list[Any]) -> Records | None:
    """A list body's packets read a field at a time (C-level passes, no Python statement per
    packet), or None as soon as anything is off: then `_packet` reads them one by one and
    words the error (the same checks; tests/unit/test_http_columns.py compares both)."""
    if not doc or not set(map(type, doc)) <= _DICT:
        return None
    shapes = set(map(tuple, doc))
    columns = _uniform(doc, shapes.pop()) if len(shapes) == 1 else _fields(doc)
    if columns is None:
        return None
    device_ids, kinds, ts, sizes, values = columns
    # int64 both (numpy's columns); anything else is worded by _packet
    if ts and not (0 <= min(ts) and max(ts) < 2**63):
        return None
    if sizes and not (0 <= min(sizes) and max(sizes) < 2**63):
        return None
    if None in values:
        values = [v if v is not None else _EMPTY for v in values]
    per_packet = list(map(len, values))
    v_vals = list(chain.from_iterable(map(dict.values, values)))
    if not set(map(type, v_vals)) <= _NUMBER:
        return None
    return Records(
        device_ids=device_ids,
        kinds=kinds,
        sizes=sizes,
        ts=ts,
        v_pos=np.repeat(np.arange(len(doc)), per_packet).tolist(),
        v_names=list(chain.from_iterable(values)),
        v_vals=v_vals,
    )


def parse_packets(data: bytes, max_packets: int, columns: bool = True) -> Records:
    """A body's packets, or Refused naming what is wrong with it. `columns`: a list is read
    field by field first (`_columns`), packet by packet only if that finds a fault."""
    try:
        doc = orjson.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Refused(Reason.MALFORMED_BODY, "invalid", f"the body is not JSON: {exc}") from None
    records = Records.new()
    if type(doc) is list:
        if len(doc) > max_packets:
            raise Refused(
                Reason.BODY_TOO_LARGE,
                "too_large",
                f"{len(doc)} packets in one body; at most {max_packets} "
                "(--max-batch-packets): split it",
            )
        if columns and (read := _columns(doc)) is not None:
            return read
        for i, obj in enumerate(doc):
            _packet(obj, f"body[{i}]", records)
    else:
        _packet(doc, "body", records)
    return records


def answer(outcome: Outcome) -> dict[str, Any]:
    """The 200 answer's body."""
    return {
        "accepted": outcome.accepted,
        "rejected": dict(sorted(outcome.rejected.items())),
        "duplicate": outcome.duplicate,
    }


class JsonReceiver:
    """POST /v1/telemetry: a body in, its packets committed, the answer out."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    async def telemetry(
        self, body: bytes, encoding: str, idempotency_key: str | None, sender: Sender
    ) -> HttpReply:
        """Count a body's packets; an Idempotency-Key is scoped by the sender's token."""
        receiver = self.receiver
        try:
            batch_id = None
            if idempotency_key is not None:
                producer = sender.principal.producer_key(IDEMPOTENCY_PRODUCER)
                batch_id = self._batch_id(idempotency_key, producer)
            data = decode_body(body, encoding, receiver.limits.max_body_bytes)
            records = parse_packets(data, receiver.limits.max_packets)
        except Refused as refusal:
            return _refusal(receiver.refuse(refusal))
        try:
            outcome = await receiver.submit(records, Counter(), sender, batch_id=batch_id)
        except Refused as refusal:  # counted by submit
            return _refusal(refusal)
        return HttpReply(status=200, body=orjson.dumps(answer(outcome)))

    @staticmethod
    def _batch_id(key: str, producer: str) -> tuple[str, int]:
        if len(key) > IDEMPOTENCY_KEY_MAX or not _KEY.match(key):
            raise Refused(
                Reason.INVALID_BODY,
                "invalid",
                f"Idempotency-Key: 1-{IDEMPOTENCY_KEY_MAX} visible ASCII characters (single "
                "spaces inside)",
                field="Idempotency-Key",
            )
        return idempotency_batch(producer, key)


def _refusal(refusal: Refused) -> HttpReply:
    status = _HTTP_STATUS[refusal.kind]
    if refusal.reason == Reason.MALFORMED_BODY:
        status = 400
    body: dict[str, Any] = {"detail": refusal.message, "reason": str(refusal.reason)}
    if refusal.field is not None:
        body["field"] = refusal.field
    headers = {"Retry-After": str(RETRY_AFTER_S)} if refusal.kind == "unavailable" else {}
    return HttpReply(status=status, body=orjson.dumps(body), headers=headers)
