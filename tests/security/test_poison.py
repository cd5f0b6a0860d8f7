"""A device cannot poison the reads: sums that leave the range of a double have a
documented meaning end to end (JSON, Prometheus, the live feed), and sums keep 17
significant digits."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from typing import Any

import httpx
from helpers import (
    ServiceProcess,
    encode_columns,
    get_json,
    packet,
    run,
    self_metrics,
    stream_batches,
    stream_packets,
    wait_for_committed,
)

from rtmonitor.ingest.v1.telemetry_pb2 import Batch, Packet
from rtmonitor.model import RECORD_NAMES_MAX

HUGE = 1.7e308


def _reads_all_answer(service: ServiceProcess, device_id: str) -> dict[str, Any]:
    """Every read that shows the device answers 200; the device's JSON record."""
    one = httpx.get(f"{service.http}/metrics/{device_id}", timeout=10)
    assert one.status_code == 200, one.text
    for sort in ("device_id", "packets", "bytes", "last_seen", "rate"):
        page = httpx.get(f"{service.http}/metrics", params={"sort": sort}, timeout=10)
        assert page.status_code == 200, (sort, page.text)
        assert device_id in {d["device_id"] for d in page.json()["devices"]}
    scrape = httpx.get(f"{service.http}/metrics", headers={"accept": "text/plain"}, timeout=10)
    assert scrape.status_code == 200, scrape.text
    record: dict[str, Any] = one.json()
    return record


def _sample(scrape: str, device_id: str, name: str, stat: str) -> str:
    prefix = f'rtm_device_value{{device="{device_id}",name="{name}",stat="{stat}"}} '
    [line] = [x for x in scrape.splitlines() if x.startswith(prefix)]
    return line[len(prefix) :]


def test_an_overflowing_sum_reads_as_overflow_everywhere(service: ServiceProcess) -> None:
    # two readings in one stream (one flush) and two more in separate flushes
    run(stream_packets(service.target, [packet("hot", t=HUGE), packet("hot", t=HUGE)]))
    run(stream_packets(service.target, [packet("cold", t=-HUGE)]))
    run(stream_packets(service.target, [packet("cold", t=-HUGE)]))
    for device_id, sign in (("hot", "+Inf"), ("cold", "-Inf")):
        stats = _reads_all_answer(service, device_id)["values"]["t"]
        assert stats["count"] == 2
        assert stats["sum"] is None and stats["mean"] is None
        assert stats["overflow"] is True
        assert stats["min"] == stats["max"] == stats["last"] == math.copysign(HUGE, stats["min"])
        scrape = httpx.get(f"{service.http}/metrics", params={"format": "prometheus"}).text
        assert _sample(scrape, device_id, "t", "sum") == sign
    # a later finite reading does not "heal" the sum with a wrong value
    run(stream_packets(service.target, [packet("hot", t=1.0)]))
    stats = get_json(service.http, "/metrics/hot")["values"]["t"]
    assert (stats["count"], stats["sum"], stats["overflow"]) == (3, None, True)
    assert stats["max"] == HUGE and stats["min"] == 1.0


def test_an_overflowing_columnar_batch_reads_as_overflow(service: ServiceProcess) -> None:
    cols = encode_columns([packet("col", t=HUGE), packet("col", t=HUGE), packet("col", u=1.5)])
    [ack] = run(stream_batches(service.target, [Batch(producer_id="p", batch_id=1, columns=cols)]))
    assert ack.accepted == 3
    values = _reads_all_answer(service, "col")["values"]
    assert values["t"]["sum"] is None and values["t"]["overflow"] is True
    assert values["u"] == {**values["u"], "sum": 1.5, "mean": 1.5, "overflow": False}


def test_the_live_feed_keeps_publishing_around_an_overflowed_device(
    service: ServiceProcess,
) -> None:
    async def scenario() -> list[dict[str, Any]]:
        async with (
            httpx.AsyncClient(base_url=service.http, timeout=30) as http,
            http.stream("GET", "/stream") as response,
        ):
            await stream_packets(service.target, [packet("bad", t=HUGE)] * 2)
            await stream_packets(service.target, [packet("good", t=1.0)])
            seen: dict[str, dict[str, Any]] = {}
            deadline = time.monotonic() + 15
            event = None
            async for line in response.aiter_lines():
                assert time.monotonic() < deadline, f"no update with both devices: {seen}"
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event == "update":
                    for d in json.loads(line[5:])["devices"]:
                        seen[d["device_id"]] = d
                    # the two readings may be committed by two flushes: wait for both
                    if "good" in seen and seen.get("bad", {}).get("packets") == 2:
                        return [seen["bad"], seen["good"]]
            raise AssertionError("stream ended")

    bad, good = run(asyncio.wait_for(scenario(), 30))
    assert bad["values"]["t"]["overflow"] is True and bad["values"]["t"]["sum"] is None
    assert good["values"]["t"]["sum"] == 1.0


def test_sums_keep_17_significant_digits(service: ServiceProcess) -> None:
    expected = 0.0
    for _ in range(5):  # one stream each: each is its own flush, added up in Redis
        run(stream_packets(service.target, [packet("tiny", t=3e-18)]))
        expected += 3e-18
    stats = get_json(service.http, "/metrics/tiny")["values"]["t"]
    assert stats["sum"] == expected  # HINCRBYFLOAT kept 17 decimal places: 2e-17
    assert stats["mean"] == expected / 5


def test_a_device_that_outgrows_its_record_cannot_stall_the_others(
    start_service: Callable[..., ServiceProcess],
) -> None:
    """Each instance admits a device's kinds anew (here 3,886 each, the most one record's
    names hold with one value name), so two instances sharing Redis can send it twice as
    many as a record holds. The second instance's flush merges what fits, drops the rest
    (counted), and counts every packet, its other device's included. Before, the merge was
    refused and retried for ever: nothing of any device was committed or acknowledged."""
    limits = ("--max-kinds-per-device", "3886", "--max-value-names-per-device", "1")
    first, second = start_service(*limits), start_service(*limits)
    n = 3886

    async def send(svc: ServiceProcess, packets: list[Packet]) -> Any:
        return await asyncio.wait_for(stream_packets(svc.target, packets), 60)

    ack = run(send(first, [packet("big", f"a{i}", b"x", v=1.0) for i in range(n)]))
    assert (ack.accepted, ack.rejected) == (n, 0)
    late = [packet("big", f"b{i}", b"x", v=2.0) for i in range(n)] + [packet("ok", "k", b"y")]
    ack = run(send(second, late))
    assert (ack.accepted, ack.rejected) == (n + 1, 0)
    big = _reads_all_answer(second, "big")
    assert (big["packets"], big["bytes"]) == (2 * n, 2 * n)
    kept = (RECORD_NAMES_MAX - 7) // 2  # kinds that fit beside the one value name
    assert len(big["kinds"]) == kept and sum(big["kinds"].values()) == kept
    assert big["values"]["v"]["count"] == 2 * n
    assert get_json(second.http, "/metrics/ok")["packets"] == 1
    stats = wait_for_committed(second.http, 2 * n + 1)
    assert stats["flush"]["record_full_drops"] == 2 * n - kept
    assert self_metrics(second.http)["rtm_record_full_drops_total"] == 2 * n - kept
    assert "device records full: " in second.log()
