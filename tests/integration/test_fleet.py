"""A fleet: 20,000 devices through the real service in one flush, every one read back exactly."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
from helpers import ServiceProcess, encode_columns, get_json, packet, run, stream_batches

from rtmonitor.ingest.v1.telemetry_pb2 import Batch, Packet

DEVICES = 20_000
PER_BATCH = 10_000  # --max-batch-packets' default


def _packets(round_: int) -> list[Packet]:
    """One packet per device: its own kind, payload size and readings (exact in binary)."""
    out = []
    for i in range(DEVICES):
        p = packet(f"fleet-{i:05d}", kind=f"k{i % 3}", payload=b"x" * (i % 7), t=i / 4 + round_)
        if i % 2:
            p.values["u"] = -float(i) * (round_ + 1)
        out.append(p)
    return out


def _expected(i: int) -> dict[str, object]:
    """Device i's record after the two rounds of _packets."""
    values: dict[str, dict[str, object]] = {
        "t": {"count": 2, "sum": i / 2 + 1, "min": i / 4, "max": i / 4 + 1, "last": i / 4 + 1}
    }
    if i % 2:
        values["u"] = {"count": 2, "sum": -3.0 * i, "min": -2.0 * i, "max": -float(i)}
    return {"packets": 2, "bytes": 2 * (i % 7), "kinds": {f"k{i % 3}": 2}, "values": values}


def test_twenty_thousand_devices_in_one_flush_read_back_exactly(
    start_service: Callable[..., ServiceProcess],
) -> None:
    # A long interval: each round (two batches) is committed by one flush of 20,000 devices.
    svc = start_service("--flush-interval", "2")
    started = time.monotonic()
    for round_ in range(2):
        packets = _packets(round_)
        batches = [
            Batch(
                producer_id="fleet",
                batch_id=2 * round_ + n,
                columns=encode_columns(packets[n * PER_BATCH : (n + 1) * PER_BATCH]),
            )
            for n in range(DEVICES // PER_BATCH)
        ]
        acks = run(stream_batches(svc.target, batches))  # acked once committed
        assert [a.accepted for a in acks] == [PER_BATCH] * len(batches)
    stats = get_json(svc.http, "/stats")["flush"]
    assert stats["devices_committed"] == 2 * DEVICES
    seen = 0
    with httpx.Client(base_url=svc.http, timeout=30) as http:
        for offset in range(0, DEVICES, 1000):
            page = http.get("/metrics", params={"offset": offset, "limit": 1000}).json()
            assert page["matched"] == DEVICES
            for n, record in enumerate(page["devices"]):
                i = offset + n
                assert record["device_id"] == f"fleet-{i:05d}"
                expected = _expected(i)
                assert {k: record[k] for k in ("packets", "bytes", "kinds")} == {
                    k: expected[k] for k in ("packets", "bytes", "kinds")
                }
                values = expected["values"]
                assert isinstance(values, dict) and record["values"].keys() == values.keys()
                for name, stats_ in values.items():
                    got = record["values"][name]
                    assert {k: got[k] for k in stats_} == stats_, (i, name)
                seen += 1
        assert seen == DEVICES
        # the sorted indexes hold every device, with its total
        top = http.get("/metrics", params={"sort": "bytes", "order": "desc", "limit": 100})
        assert {d["bytes"] for d in top.json()["devices"]} == {12}
        by_packets = http.get("/metrics", params={"sort": "packets", "limit": 1}).json()
        assert by_packets["matched"] == DEVICES
        assert by_packets["totals"]["devices"] == DEVICES
        assert by_packets["totals"]["packets"] == 2 * DEVICES
        by_rate = http.get("/metrics", params={"sort": "rate", "limit": 1}).json()
        assert by_rate["matched"] == DEVICES
    assert time.monotonic() - started < 60
