"""Live views: GET /stream (Server-Sent Events) and rates/online in the JSON API."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
from helpers import ServiceProcess, get_json, packet, run, stream_packets


async def read_events(response: httpx.Response, until: Any, timeout: float = 15) -> list[Any]:
    """Parse SSE `update` events until `until(events)` is true."""
    events: list[Any] = []
    event = None
    deadline = time.monotonic() + timeout
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and event == "update":
            events.append(json.loads(line[5:]))
            if until(events):
                return events
        assert time.monotonic() < deadline, f"timed out; got {events[-3:]}"
    return events


def test_stream_pushes_changes_filtered_by_prefix(service: ServiceProcess) -> None:
    async def scenario() -> list[Any]:
        async with (
            httpx.AsyncClient(base_url=service.http, timeout=30) as http,
            http.stream("GET", "/stream", params={"prefix": "live-"}) as response,
        ):
            assert response.headers["content-type"].startswith("text/event-stream")
            await stream_packets(service.target, [packet("live-1"), packet("other-1")] * 5)

            def done(events: list[Any]) -> bool:
                return any(
                    d["device_id"] == "live-1" and d["packets"] == 5
                    for e in events
                    for d in e["devices"]
                )

            return await read_events(response, done)

    events = run(scenario())
    devices = {d["device_id"] for e in events for d in e["devices"]}
    assert devices == {"live-1"}, "the prefix filter keeps other devices out"
    last = next(d for e in events for d in e["devices"] if d["packets"] == 5)
    assert last["online"] is True and "rate" in last
    assert events[-1]["totals"]["packets"] == 10


def test_events_carry_only_changes_and_end_at_the_latest_state(service: ServiceProcess) -> None:
    async def scenario() -> list[Any]:
        async with (
            httpx.AsyncClient(base_url=service.http, timeout=30) as http,
            http.stream("GET", "/stream", params={"prefix": "slow-"}) as response,
        ):
            for _ in range(10):  # ten separate updates while the client reads nothing
                await stream_packets(service.target, [packet("slow-1")])
                await asyncio.sleep(0.25)

            def done(events: list[Any]) -> bool:
                return any(d["packets"] == 10 for e in events for d in e["devices"])

            return await read_events(response, done)

    events = run(scenario())
    # No event from an idle poll: each one after the first (the snapshot) carries a changed
    # device or moved totals. (A poll can fall between a flush's device call and its totals
    # call, so one flush may show as a device event and then a totals-only event.)
    counters = ("packets", "rejected", "devices")
    for before, event in zip(events, events[1:], strict=False):
        moved = any(event["totals"][k] != before["totals"][k] for k in counters)
        assert event["devices"] or moved, [len(e["devices"]) for e in events]
    # at most one device event per change, ending at the latest state
    assert sum(1 for e in events if e["devices"]) <= 10, [len(e["devices"]) for e in events]
    assert events[-1]["devices"][0]["packets"] == 10


def test_a_stalled_subscriber_holds_the_latest_state_not_a_backlog() -> None:
    from rtmonitor.api.schemas import JsonRender
    from rtmonitor.api.stream import Shared, Subscriber
    from rtmonitor.model import RATE_WINDOWS_S, DeviceRecord, Rates, Totals

    rate = Rates(packets_per_s=dict.fromkeys(RATE_WINDOWS_S, 1.0), bytes_per_s={10: 2.0, 60: 3.0})

    def device(device_id: str, packets: int) -> DeviceRecord:
        return DeviceRecord(device_id=device_id, packets=packets, bytes=0, first_seen=1,
                            last_seen=1, kinds={}, values={}, rate=rate)  # fmt: skip

    async def scenario() -> dict[str, Any]:
        sub = Subscriber("d")
        for n in range(1, 1001):  # 1000 updates, never read
            totals = Totals(devices=4, packets=n, bytes=0, rejected_by_reason={}, rate=rate)
            sub.offer([Shared(device(f"d{n % 3}", n)), Shared(device("x", n))], Shared(totals))
        assert len(sub.pending) == 3  # bounded by devices, not by updates
        await asyncio.wait_for(sub.ready.wait(), 1)
        event = sub.take(JsonRender(offline_after_s=30))
        return dict(json.loads(event.split("data: ", 1)[1]))

    update = run(scenario())
    assert sorted(d["packets"] for d in update["devices"]) == [998, 999, 1000]
    assert update["totals"]["packets"] == 1000
    assert (update["pending"], update["lagged"]) == (0, False)
    # the objects of GET /metrics, rates by window as the JSON names them
    assert update["totals"]["rate"] == {
        "packets_per_s_10s": 1.0,
        "bytes_per_s_10s": 2.0,
        "packets_per_s_60s": 1.0,
        "bytes_per_s_60s": 3.0,
    }
    assert update["devices"][0]["online"] is False


def test_rates_and_online_status(start_service: Any) -> None:
    svc: ServiceProcess = start_service("--offline-after", "1")
    run(stream_packets(svc.target, [packet("rate-1")] * 40))
    time.sleep(1.2)  # into the next complete second, and past the offline threshold
    device = get_json(svc.http, "/metrics/rate-1")
    assert device["rate"]["packets_per_s_10s"] == 4.0
    assert device["rate"]["packets_per_s_60s"] == 40 / 60
    assert device["online"] is False
    run(stream_packets(svc.target, [packet("rate-2")]))
    assert get_json(svc.http, "/metrics/rate-2")["online"] is True
    page = get_json(svc.http, "/metrics", sort="rate", order="desc")
    assert [d["device_id"] for d in page["devices"]][0] == "rate-1"
    assert page["totals"]["rate"]["packets_per_s_60s"] >= 40 / 60


def test_top_shows_the_busiest_devices(service: ServiceProcess) -> None:
    import subprocess
    import sys

    run(stream_packets(service.target, [packet("top-busy")] * 30 + [packet("top-quiet")]))
    time.sleep(1.1)  # into the next complete second: the rates are non-zero
    out = subprocess.run(
        [sys.executable, "-m", "rtmonitor", "top", "--url", service.http, "--once"],
        capture_output=True, text=True, timeout=30, check=True,
        env={"COLUMNS": "120", "PATH": "/usr/bin:/bin"},
    ).stdout  # fmt: skip
    assert "rtmonitor top" in out and "packets 31" in out
    busy, quiet = out.index("top-busy"), out.index("top-quiet")
    assert busy < quiet, "sorted by rate, busiest first"
    assert "3.0" in out.splitlines()[[i for i, line in enumerate(out.splitlines())
                                      if "top-busy" in line][0]]  # fmt: skip


def test_a_poll_renders_each_device_once_for_every_subscriber() -> None:
    """A hundred clients of the same fat device and totals cost one rendering of each."""
    from rtmonitor.api.schemas import JsonRender
    from rtmonitor.api.stream import Shared, Subscriber
    from rtmonitor.model import RATE_WINDOWS_S, DeviceRecord, Rates, Totals

    rate = Rates(packets_per_s=dict.fromkeys(RATE_WINDOWS_S, 0.0),
                 bytes_per_s=dict.fromkeys(RATE_WINDOWS_S, 0.0))  # fmt: skip
    record = DeviceRecord(device_id="fat", packets=1, bytes=0, first_seen=1, last_seen=1,
                          kinds={}, values={}, rate=rate)  # fmt: skip
    totals = Totals(devices=1, packets=1, bytes=0, rejected_by_reason={}, rate=rate)

    class Counting(JsonRender):
        calls = 0

        def device_json(self, record: DeviceRecord) -> str:
            Counting.calls += 1
            return super().device_json(record)

    class CountingTotals(Counting):
        totals_calls = 0

        def totals_json(self, record: Totals) -> str:
            CountingTotals.totals_calls += 1
            return super().totals_json(record)

    render = CountingTotals(offline_after_s=30)
    shared, shared_totals = [Shared(record)], Shared(totals)
    subscribers = [Subscriber("") for _ in range(100)]
    for sub in subscribers:
        sub.offer(shared, shared_totals)
    events = {sub.take(render) for sub in subscribers}
    assert Counting.calls == 1 and CountingTotals.totals_calls == 1 and len(events) == 1
