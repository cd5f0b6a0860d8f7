"""Hostile ingest input (issue 13): every dimension of a message is bounded before any
work per element, the messages in flight are bounded in total, and one peer cannot take
every stream slot. Each refusal is fast, counted by reason, and costs no memory worth
mentioning; the good data around it still counts."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
import httpx
import numpy as np
import pytest
from helpers import (
    STREAM_BATCHES,
    STREAM_PACKETS,
    ServiceProcess,
    get_json,
    held_streams,
    packet,
    refused_at_admission,
    run,
    stream_batches,
    stream_packets,
)

from rtmonitor.ingest.v1.telemetry_pb2 import Batch, BatchAck, Columns, ValueColumn
from rtmonitor.loadgen.launch import memory_mb

MB = 1024 * 1024


@contextmanager
def _healthz_probe(base: str) -> Iterator[list[float]]:
    """Poll /healthz in a thread while the block runs; yields the latencies seen (seconds)."""
    latencies: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=30.0) as client:
            # at least one probe, however quickly the block ends (a loaded machine may not
            # have sent the first before it does)
            while True:
                started = time.monotonic()
                client.get(f"{base}/healthz").raise_for_status()
                latencies.append(time.monotonic() - started)
                if done.wait(0.05):
                    break

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    try:
        yield latencies
    finally:
        done.set()
        thread.join(60)


def _refusal(target: str, batch: Batch) -> tuple[grpc.aio.AioRpcError, float]:
    """Send one batch; the status that ended the stream and the seconds it took."""
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        run(stream_batches(target, [batch]))
    return refused.value, time.monotonic() - started


# --- item 2: one columnar message cannot block the event loop ---------------------------

ONE = np.array([1.0]).tobytes()
FIRST = np.zeros(1, "<u4").tobytes()

HOSTILE_COLUMNS = {
    # ~7 MB: 400,000 value columns for one packet (each a name and one float64)
    "value columns": (
        lambda: Columns(
            count=1,
            device_ids=["victim"],
            device_index=FIRST,
            values=[ValueColumn(name=f"v{i}", values=ONE) for i in range(400_000)],
        ),
        "--max-values-per-packet",
    ),
    # ~6 MB: a dictionary of 700,000 device ids that one packet indexes
    "device dictionary": (
        lambda: Columns(count=1, device_ids=[f"d{i}" for i in range(700_000)], device_index=FIRST),
        "device_ids",
    ),
    "kinds dictionary": (
        lambda: Columns(
            count=1,
            device_ids=["victim"],
            device_index=FIRST,
            kinds=[f"k{i}" for i in range(700_000)],
            kind_index=FIRST,
        ),
        "kinds",
    ),
}


@pytest.mark.parametrize("case", HOSTILE_COLUMNS.keys())
def test_a_columnar_batch_is_bounded_before_it_is_decoded(
    case: str, start_service: Callable[..., ServiceProcess]
) -> None:
    # messages up to 8 MiB here, so that the column bounds, not the message limit, refuse
    svc = start_service("--max-message-bytes", str(8 * MB))
    build, limit = HOSTILE_COLUMNS[case]
    hostile = Batch(producer_id="evil", batch_id=1, columns=build())
    hwm_before = memory_mb(svc.proc.pid, "VmHWM")
    with _healthz_probe(svc.http) as latencies:
        err, seconds = _refusal(svc.target, hostile)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert limit in (err.details() or "")
    assert seconds < 2.0, f"refused after {seconds:.1f}s"
    assert max(latencies) < 2.0, f"/healthz waited {max(latencies):.1f}s"
    assert memory_mb(svc.proc.pid, "VmHWM") - hwm_before < 200
    # refused as a message, counted by reason; the next batch is served as usual
    refused = get_json(svc.http, "/stats")["ingest"]["messages_refused_by_reason"]
    assert refused == {"invalid_columns": 1}
    scrape = httpx.get(f"{svc.http}/metrics", params={"format": "prometheus"}).text
    assert 'rtm_refused_messages_total{reason="invalid_columns"} 1' in scrape.splitlines()
    [ack] = run(stream_batches(svc.target, [Batch(packets=[packet("victim", t=1.0)])]))
    assert ack.accepted == 1
    assert get_json(svc.http, "/metrics/victim")["packets"] == 1


# --- item 3: big messages, one and many ---------------------------------------------------


def _row_batch(batch_id: int, nbytes: int) -> Batch:
    """A valid row batch of about `nbytes`: packets with 16,000-byte payloads."""
    packets = [packet(f"big-{batch_id}", payload=b"x" * 16_000) for _ in range(nbytes // 16_011)]
    return Batch(producer_id=f"big-{batch_id}", batch_id=batch_id, packets=packets)


def test_a_message_over_the_default_limit_is_refused(
    start_service: Callable[..., ServiceProcess],
) -> None:
    """The default --max-message-bytes (4 MiB, gRPC's own) is what a batch needs, not
    64 MiB: 40 streams sending a 20 MB batch each are refused by gRPC, and the service holds
    none; a 3 MB batch is served. (The 40 streams come from one address: its stream limit
    is raised so that every one of them reaches the message limit.)"""
    service = start_service("--max-streams-per-peer", "64")
    hwm_before = memory_mb(service.proc.pid, "VmHWM")
    raw = _row_batch(1, 20 * MB).SerializeToString()

    async def one() -> grpc.StatusCode:
        try:
            await stream_batches(service.target, [raw])
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    async def scenario() -> list[grpc.StatusCode]:
        return await asyncio.gather(*(one() for _ in range(40)))

    assert run(scenario()) == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 40
    grown = memory_mb(service.proc.pid, "VmHWM") - hwm_before
    assert grown < 600, f"peak RSS grew {grown:.0f} MiB for 40 refused 20 MB messages"
    [ack] = run(stream_batches(service.target, [_row_batch(2, 3 * MB)]))
    assert ack.accepted == 3 * MB // 16_011


def test_big_messages_in_flight_are_bounded_in_total(
    start_service: Callable[..., ServiceProcess],
) -> None:
    """24 streams send two 7 MB batches each at once, into a pipeline that pushes back (a
    small queue and pending budget), so that streams hold their batch while they wait: past
    --max-inflight-message-bytes the others wait their turn, unread (none is refused), and
    memory stays bounded."""
    svc = start_service(
        "--max-message-bytes",
        str(8 * MB),
        "--max-streams-per-peer",
        "32",
        "--max-inflight-message-bytes",
        str(16 * MB),
        "--queue-max-packets",
        "500",
        "--max-pending-packets",
        "1000",
    )
    streams = 24
    hwm_before = memory_mb(svc.proc.pid, "VmHWM")

    async def scenario() -> list[list[BatchAck]]:
        async def one(i: int) -> list[BatchAck]:
            raws = [_row_batch(2 * i + k, 7 * MB).SerializeToString() for k in range(2)]
            return await stream_batches(svc.target, raws)

        return await asyncio.gather(*(one(i) for i in range(streams)))

    with _healthz_probe(svc.http) as latencies:
        results = run(scenario())
    per_batch = 7 * MB // 16_011
    assert [[a.accepted for a in acks] for acks in results] == [[per_batch] * 2] * streams
    assert get_json(svc.http, "/metrics")["totals"]["packets"] == streams * 2 * per_batch
    grown = memory_mb(svc.proc.pid, "VmHWM") - hwm_before
    assert grown < 600, f"peak RSS grew {grown:.0f} MiB for {streams} x 2 x 7 MB"
    assert max(latencies) < 2.0, f"/healthz waited {max(latencies):.1f}s"
    ingest = get_json(svc.http, "/stats")["ingest"]
    assert ingest["inflight_message_waits"] > 0  # the budget was reached, and held them
    assert (ingest["inflight_message_bytes"], ingest["streams_waiting_for_bytes"]) == (0, 0)


# --- item 9: streams per peer -------------------------------------------------------------


def test_one_peer_cannot_take_every_stream_slot(
    start_service: Callable[..., ServiceProcess],
) -> None:
    svc = start_service("--max-streams", "10", "--max-streams-per-peer", "3")

    async def scenario() -> None:
        async with held_streams(svc.target, 3) as calls:
            for method in (STREAM_PACKETS, STREAM_BATCHES):  # one more than the limit
                code, details = await refused_at_admission(svc.target, method)
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
                assert "--max-streams-per-peer 3" in details
        assert [call.result().accepted for call in calls] == [1, 1, 1]
        # the peer's slots are free again
        assert (await stream_packets(svc.target, [packet("fifth")])).accepted == 1

    run(scenario())
    ingest = get_json(svc.http, "/stats")["ingest"]
    assert ingest["streams_refused_by_reason"] == {"max_streams_per_peer": 2}
    assert ingest["streams_refused"] == 2
    scrape = httpx.get(f"{svc.http}/metrics", params={"format": "prometheus"}).text
    assert 'rtm_refused_streams_total{reason="max_streams_per_peer"} 2' in scrape.splitlines()


def test_the_byte_budget_waits_in_order_and_survives_cancellation() -> None:
    """ByteBudget: one message always fits; past the limit, waiters are served first come
    first served; a cancelled waiter gives back what it was granted, or its place."""
    from rtmonitor.ingest.budget import ByteBudget

    async def scenario() -> None:
        budget = ByteBudget(100)
        await budget.acquire(250)  # alone: fits whatever its size
        order: list[str] = []

        async def take(name: str, n: int) -> None:
            await budget.acquire(n)
            order.append(name)

        first = asyncio.create_task(take("first", 60))
        doomed = asyncio.create_task(take("doomed", 10))
        second = asyncio.create_task(take("second", 30))
        reader = asyncio.create_task(budget.turn())
        await asyncio.sleep(0)
        assert (budget.waiting, budget.waits) == (4, 4)
        doomed.cancel()
        await asyncio.sleep(0)
        assert budget.waiting == 3 and order == []
        budget.release(250)
        await asyncio.gather(first, second, reader)
        assert order == ["first", "second"] and budget.used == 90
        late = asyncio.create_task(take("late", 20))
        await asyncio.sleep(0)
        budget.release(60)  # grants "late", which is cancelled before it resumes
        late.cancel()
        with pytest.raises(asyncio.CancelledError):
            await late
        assert (budget.used, budget.waiting) == (30, 0)

    run(scenario())
