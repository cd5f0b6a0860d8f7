"""The OTLP and HTTP JSON receivers' pure parts: series names, bodies (gzip bombs), the JSON
packet reader, and a full queue answered "unavailable" (a real PacketQueue, held full)."""

from __future__ import annotations

import asyncio
import gc
import gzip
import json
import weakref
from collections import Counter

import pytest

from rtmonitor.ingest.columnar import Records, decode_records
from rtmonitor.ingest.http_json import JsonReceiver, parse_packets
from rtmonitor.ingest.otlp import series_name
from rtmonitor.ingest.receiver import Receiver, ReceiverLimits, Refused, Sender, gunzip
from rtmonitor.ingest.validation import Limits, Reason, Validator, name_ok
from rtmonitor.model import NAME_MAX
from rtmonitor.pipeline.aggregator import Aggregator
from rtmonitor.pipeline.queue import PacketQueue
from rtmonitor.pipeline.work import BatchWork, Work


def test_series_names_are_deterministic_bounded_and_valid() -> None:
    a = series_name("http.requests", [("method", "GET"), ("code", "200")])
    assert a == series_name("http.requests", [("code", "200"), ("method", "GET")])
    assert a == "http.requests/code:200/method:GET"
    assert series_name("x", [("route", "/api/v1"), ("ok", "a b")]) == "x/ok:a_b/route:_api_v1"
    long = series_name("m", [("k", "v" * 200)])
    assert len(long) == NAME_MAX and name_ok(long)
    assert long == series_name("m", [("k", "v" * 200)])
    assert long != series_name("m", [("k", "v" * 199)])  # the hash keeps them apart
    assert name_ok(series_name("m", [("ü!", "日本")]))


def test_gunzip_is_bounded() -> None:
    assert gunzip(gzip.compress(b"x" * 1000), 1000) == b"x" * 1000
    with pytest.raises(Refused) as big:
        gunzip(gzip.compress(b"\0" * 50_000_000), 1_000_000)  # ~50 KB inflating to 50 MB
    assert big.value.reason == Reason.BODY_TOO_LARGE
    with pytest.raises(Refused) as bad:
        gunzip(b"not gzip", 1000)
    assert bad.value.reason == Reason.MALFORMED_BODY
    with pytest.raises(Refused):
        gunzip(gzip.compress(b"x" * 1000)[:-10], 1000)  # truncated


def test_json_packets_become_the_same_delta_as_a_batch() -> None:
    body = [
        {"device_id": "d", "values": {"a": 1, "b": 2.5}},
        {"device_id": "d", "kind": "k", "payload_size": 3},
        {"device_id": "e", "ts": 5, "values": {"bad name": 1}},
    ]
    records = parse_packets(json.dumps(body).encode(), 10)
    assert records.v_pos == [0, 0, 2] and records.sizes == [0, 3, 0]
    delta, rejected = decode_records(records, Validator(Limits()), 1_000)
    assert rejected == Counter({"invalid_value_name": 1})
    assert delta.device_ids == ["d"] and delta.packets.tolist() == [2]
    assert delta.nbytes.tolist() == [3]


def test_empty_records_decode_to_nothing() -> None:
    delta, rejected = decode_records(Records.new(), Validator(Limits()), 1)
    assert delta.total_packets == 0 and not rejected


def receiver(queue: PacketQueue[Work]) -> Receiver:
    limits = ReceiverLimits(
        max_body_bytes=1 << 20, max_packets=100, queue_timeout_s=0.1, commit_timeout_s=1.0
    )
    return Receiver(Validator(Limits()), queue, Aggregator(), limits)


def test_a_full_queue_answers_unavailable_and_counts_nothing() -> None:
    async def scenario() -> None:
        queue: PacketQueue[Work] = PacketQueue(10)
        await queue.put(object(), 10)  # type: ignore[arg-type]  # held full, never taken
        rx = receiver(queue)
        reply = await JsonReceiver(rx).telemetry(
            b'[{"device_id": "x"}, {"device_id": "?"}]', "", None, Sender()
        )
        assert reply.status == 503 and reply.headers["Retry-After"] == "1"
        assert json.loads(reply.body)["reason"] == "queue_full"
        assert rx.refused == Counter({"queue_full": 1})
        assert rx.aggregator.rejected_total == Counter()  # the retry will count them
        assert queue.packets == 10

    asyncio.run(scenario())


def test_a_closed_queue_answers_shutting_down() -> None:
    async def scenario() -> None:
        queue: PacketQueue[Work] = PacketQueue(10)
        queue.close()
        rx = receiver(queue)
        reply = await JsonReceiver(rx).telemetry(b'{"device_id": "x"}', "", None, Sender())
        assert reply.status == 503 and json.loads(reply.body)["reason"] == "shutting_down"

    asyncio.run(scenario())


def test_a_waiting_request_does_not_hold_its_columns() -> None:
    """While an HTTP/OTLP request waits for its commit, only the pipeline holds its columns:
    a prepared flush lets them go (and stops counting them against --max-pending-devices),
    which frees nothing if the waiting request still holds them."""

    async def scenario() -> None:
        queue: PacketQueue[Work] = PacketQueue(1000)
        rx = receiver(queue)
        body = b'[{"device_id": "a", "values": {"t": 1}}, {"device_id": "b"}]'
        request = asyncio.create_task(JsonReceiver(rx).telemetry(body, "", None, Sender()))
        (work,) = await queue.get_all()
        assert isinstance(work, BatchWork)
        columns = weakref.ref(work.parts[0].packets)
        tracker = work.tracker
        del work  # what the flusher does once the flush is prepared
        await asyncio.sleep(0.01)
        gc.collect()
        assert not request.done()
        assert columns() is None, gc.get_referrers(columns())
        tracker.committed(1)
        reply = await request
        assert reply.status == 200 and json.loads(reply.body)["accepted"] == 2

    asyncio.run(scenario())
