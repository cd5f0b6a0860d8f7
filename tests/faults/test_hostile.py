"""Hostile input: each gets a clear status or reason, the service stays up, memory stays
bounded, and the good data around it is not lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import grpc
import httpx
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

from rtmonitor.ingest.v1.telemetry_pb2 import Ack, Batch, BatchAck
from rtmonitor.loadgen.launch import memory_mb


def test_hostile_device_ids_are_rejected_and_good_ones_counted(service: ServiceProcess) -> None:
    hostile = [
        "{slot}",
        "a}b",
        "*",
        'x"y',
        "it's",
        "new\nline",
        "tab\t",
        "caf\u00e9",
        "\u6e29\u5ea6",
        "sp ace",
        "x" * 129,
        "",
        "a{b",
        "<script>",
        "back\\slash",
        "nul\x00",
    ]
    stream = []
    for i, device_id in enumerate(hostile):
        stream.append(packet(f"good-{i % 4}", payload=b"12345"))
        stream.append(packet(device_id, payload=b"x"))
    ack = run(stream_packets(service.target, stream))
    assert ack.accepted == len(hostile) and ack.rejected == len(hostile)
    assert set(ack.rejected_by_reason) <= {
        "invalid_device_id",
        "device_id_too_long",
        "empty_device_id",
    }
    total = sum(get_json(service.http, f"/metrics/good-{i}")["packets"] for i in range(4))
    assert total == len(hostile)
    # ids that look like keys or patterns cannot reach Redis: nothing but the good devices
    assert get_json(service.http, "/metrics")["totals"]["devices"] == 4


def test_flood_of_devices_hits_the_limit_and_known_devices_keep_working(
    start_service: Callable[..., ServiceProcess],
) -> None:
    svc = start_service("--max-devices", "50")
    batch = Batch(
        producer_id="flood", batch_id=1, packets=[packet(f"f-{i:03d}") for i in range(80)]
    )
    [ack] = run(stream_batches(svc.target, [batch]))
    assert (ack.accepted, ack.rejected) == (50, 30)
    assert dict(ack.rejected_by_reason) == {"too_many_devices": 30}
    again = run(stream_packets(svc.target, [packet("f-000"), packet("f-049"), packet("f-079")]))
    assert (again.accepted, dict(again.rejected_by_reason)) == (2, {"too_many_devices": 1})
    assert get_json(svc.http, "/metrics/f-000")["packets"] == 2
    assert httpx.get(f"{svc.http}/metrics/f-079").status_code == 404
    assert get_json(svc.http, "/stats")["ingest"]["rejected_by_reason"]["too_many_devices"] == 31


def test_idle_streams_are_closed_with_a_clear_status(
    start_service: Callable[..., ServiceProcess],
) -> None:
    svc = start_service("--stream-idle-timeout", "1")

    async def idle(method: str, first: bytes | None) -> grpc.aio.AioRpcError:
        async def gen() -> AsyncIterator[bytes]:
            if first is not None:
                yield first
            await asyncio.sleep(30)

        async with grpc.aio.insecure_channel(svc.target) as channel:
            started = time.monotonic()
            try:
                if method == STREAM_PACKETS:
                    await channel.stream_unary(method, lambda b: b, Ack.FromString)(gen())
                else:
                    async for _ in channel.stream_stream(method, lambda b: b, BatchAck.FromString)(
                        gen()
                    ):
                        pass
            except grpc.aio.AioRpcError as exc:
                assert time.monotonic() - started < 10
                return exc
        raise AssertionError("an idle stream must be closed")

    err = run(idle(STREAM_BATCHES, None))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "--stream-idle-timeout" in (err.details() or "")
    err = run(idle(STREAM_PACKETS, packet("idle-1").SerializeToString()))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "(1 counted)" in (err.details() or "")
    assert get_json(svc.http, "/metrics/idle-1")["packets"] == 1
    assert get_json(svc.http, "/stats")["ingest"]["streams_idle_closed"] == 2


def test_too_many_concurrent_streams(start_service: Callable[..., ServiceProcess]) -> None:
    svc = start_service("--max-streams", "2")

    async def scenario() -> None:
        async with held_streams(svc.target, 2) as calls:
            code, details = await refused_at_admission(svc.target, STREAM_PACKETS)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            assert "--max-streams" in details
        assert [call.result().accepted for call in calls] == [1, 1]
        # with the slots free again, new streams are served
        assert (await stream_packets(svc.target, [packet("fourth")])).accepted == 1

    run(scenario())


def test_client_that_never_reads_acks_is_pushed_back(
    start_service: Callable[..., ServiceProcess],
) -> None:
    """Acks are small, so the server stops only once they fill the client's HTTP/2 window
    (kept at 64 KiB here by turning off BDP probing); then its writes block, its reader
    stops at --max-inflight-batches, and it reads nothing more from that stream."""
    svc = start_service("--max-inflight-batches", "4")
    rss_before = memory_mb(svc.proc.pid)

    async def scenario() -> int:
        options = [("grpc.http2.bdp_probe", 0)]
        async with grpc.aio.insecure_channel(svc.target, options=options) as channel:
            method = channel.stream_stream(STREAM_BATCHES, lambda b: b, BatchAck.FromString)
            call = method()  # type: ignore[call-arg]
            written = 0
            for i in range(50_000):
                message = Batch(
                    producer_id="deaf", batch_id=i, packets=[packet("deaf", payload=b"x" * 10)]
                ).SerializeToString()
                try:
                    await asyncio.wait_for(call.write(message), 2.0)
                except TimeoutError:
                    break
                written += 1
            # meanwhile other clients are served normally
            assert (await stream_packets(svc.target, [packet("other")])).accepted == 1
            call.cancel()
            return written

    written = run(scenario())
    # grpc's client buffers writes on its own side, so its writes rarely block; what
    # matters is that the server stopped reading (seen: ~500 of 50,000 batches read).
    counted = get_json(svc.http, "/metrics/deaf")["packets"]
    assert 0 < counted < 5_000 < written
    assert memory_mb(svc.proc.pid) - rss_before < 100


def test_retention_expires_silent_devices(start_service: Callable[..., ServiceProcess]) -> None:
    svc = start_service("--retention", "2")
    run(stream_packets(svc.target, [packet("brief"), packet("brief")]))
    assert get_json(svc.http, "/metrics/brief")["packets"] == 2
    deadline = time.monotonic() + 15
    while httpx.get(f"{svc.http}/metrics/brief").status_code != 404:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    while get_json(svc.http, "/metrics")["matched"] != 0:  # the index forgets it too
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert get_json(svc.http, "/stats")["recovery"]["devices_expired"] == 1
    # the totals are all-time: they keep counting what expired devices sent
    assert get_json(svc.http, "/metrics")["totals"]["packets"] == 2
