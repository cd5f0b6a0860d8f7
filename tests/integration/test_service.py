"""The real service, end to end: gRPC in, Redis, HTTP out — exact counts."""

from __future__ import annotations

import asyncio
import contextlib
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import (
    ServiceProcess,
    get_json,
    packet,
    run,
    self_metrics,
    stream_batches,
    stream_packets,
    wait_for_committed,
)

from rtmonitor.config import SendSettings
from rtmonitor.ingest.v1.telemetry_pb2 import Batch, BatchAck
from rtmonitor.loadgen.sender import SendReport, send
from rtmonitor.storage.embedded import EmbeddedRedis
from rtmonitor.storage.store import RedisStore


def all_devices(base: str, prefix: str = "") -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    offset = 0
    while True:
        page = get_json(base, "/metrics", prefix=prefix, offset=offset, limit=1000)
        out.update({d["device_id"]: d for d in page["devices"]})
        if len(page["devices"]) < 1000:
            return out
        offset += 1000


def assert_counts_match(base: str, report: SendReport, payload: int) -> None:
    expected = report.acked_per_device()
    prefix = report.names[0].rstrip("0123456789")
    seen = all_devices(base, prefix)
    assert {d: v["packets"] for d, v in seen.items()} == expected
    assert {d: v["bytes"] for d, v in seen.items()} == {d: n * payload for d, n in expected.items()}


def opts(target: str, **kw: object) -> SendSettings:
    return SendSettings(target=target, progress=False, **kw)  # type: ignore[arg-type]


def test_per_packet_and_batched_streams_count_exactly(service: ServiceProcess) -> None:
    per_packet = run(
        send(opts(service.target, devices=37, count=3000, streams=3, device_prefix="p-"))
    )
    batched = run(
        send(
            opts(
                service.target,
                devices=250,
                count=120_000,
                batch_size=700,
                streams=4,
                device_prefix="b-",
                payload_size=17,
            )
        )
    )
    assert per_packet.errors == [] and batched.errors == []
    assert per_packet.accepted == 3000 and batched.accepted == 120_000
    assert_counts_match(service.http, per_packet, 64)
    assert_counts_match(service.http, batched, 17)
    totals = get_json(service.http, "/metrics", limit=1)["totals"]
    assert totals["packets"] == 123_000 and totals["devices"] == 287
    assert totals["bytes"] == 3000 * 64 + 120_000 * 17


def test_bad_packets_are_rejected_by_reason_without_costing_good_ones(
    service: ServiceProcess,
) -> None:
    good = [packet(f"mix-{i % 3}", payload=b"x" * i, temp=float(i)) for i in range(30)]
    bad = [
        packet(""),
        packet("a{b}"),
        packet("mix-0", temp=math.nan),
        packet("mix-1", payload=b"x" * 70_000),
        b"\xff\xff\xff\xff",  # not protobuf at all
    ]
    stream = good[:10] + bad[:3] + good[10:20] + bad[3:] + good[20:]
    ack = run(stream_packets(service.target, stream))
    assert (ack.accepted, ack.rejected, ack.truncated) == (30, 5, False)
    assert dict(ack.rejected_by_reason) == {
        "empty_device_id": 1,
        "invalid_device_id": 1,
        "non_finite_value": 1,
        "payload_too_large": 1,
        "malformed_packet": 1,
    }
    # Acknowledged means committed: readable right away, no sleep.
    dev0 = get_json(service.http, "/metrics/mix-0")
    assert dev0["packets"] == 10 and dev0["bytes"] == sum(range(0, 30, 3))
    temp = dev0["values"]["temp"]
    assert (temp["count"], temp["min"], temp["max"], temp["sum"]) == (10, 0.0, 27.0, 135.0)
    assert temp["mean"] == 13.5 and dev0["kinds"] == {"reading": 10}
    totals = get_json(service.http, "/metrics")["totals"]
    assert totals["packets"] == 30 and totals["rejected"] == 5
    assert totals["rejected_by_reason"]["malformed_packet"] == 1

    # In a batch, the ack names the refused packets; the rest is counted.
    acks = run(
        stream_batches(
            service.target,
            [
                Batch(
                    producer_id="p",
                    batch_id=7,
                    packets=[packet("mix-2"), packet(""), packet("mix-2")],
                ),
                Batch(producer_id="p", batch_id=8, packets=[packet("bad id")]),
            ],
        )
    )
    assert [(a.batch_id, a.accepted, a.rejected) for a in acks] == [(7, 2, 1), (8, 0, 1)]
    assert dict(acks[1].rejected_by_reason) == {"invalid_device_id": 1}
    assert get_json(service.http, "/metrics/mix-2")["packets"] == 12


def test_oversized_and_malformed_batches_end_the_stream_with_a_clear_status(
    start_service: Callable[..., ServiceProcess],
) -> None:
    svc = start_service("--max-batch-packets", "5", "--max-message-bytes", "65536")
    ok = Batch(producer_id="p", batch_id=1, packets=[packet("ov-1")] * 5)
    big = Batch(producer_id="p", batch_id=2, packets=[packet("ov-1")] * 6)
    acks: list[BatchAck] = []

    async def collect(batches: list[Batch | bytes]) -> grpc.aio.AioRpcError:
        try:
            await stream_batches(svc.target, batches, acks)
        except grpc.aio.AioRpcError as exc:
            return exc
        raise AssertionError("the stream should have ended with an error")

    err = run(collect([ok, big, ok]))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "6 packets; the limit is 5" in (err.details() or "")
    assert len(acks) == 1  # the good batch before it was acknowledged
    assert get_json(svc.http, "/metrics/ov-1")["packets"] == 5

    ok2 = Batch(producer_id="p", batch_id=4, packets=[packet("ov-1")] * 5)
    err = run(collect([ok2, b"\x0a\xff\xff"]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed Batch" in (err.details() or "")
    assert get_json(svc.http, "/metrics/ov-1")["packets"] == 10

    huge = Batch(producer_id="p", batch_id=3, packets=[packet("ov-2", payload=b"x" * 70_000)])
    err = run(collect([huge]))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # the service is still up and counting
    assert run(stream_packets(svc.target, [packet("ov-3")])).accepted == 1
    # refused as whole messages: each counted once, as a message, not as the packets it
    # claims to carry
    assert get_json(svc.http, "/metrics")["totals"]["rejected_by_reason"] == {}
    refused = get_json(svc.http, "/stats")["ingest"]["messages_refused_by_reason"]
    assert refused == {"batch_too_large": 1, "malformed_batch": 1}
    scrape = httpx.get(f"{svc.http}/metrics", params={"format": "prometheus"}).text.splitlines()
    assert 'rtm_refused_messages_total{reason="batch_too_large"} 1' in scrape
    assert not [line for line in scrape if line.startswith("rtm_rejected_packets_total")]


def test_client_from_the_contract_alone_via_reflection(service: ServiceProcess) -> None:
    """Discovers the service through reflection (no generated code), then checks HTTP."""
    from google.protobuf import descriptor_pool, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(service.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        assert "rtmonitor.v1.TelemetryIngest" in db.get_services()
        pool = descriptor_pool.DescriptorPool(db)
        svc = pool.FindServiceByName("rtmonitor.v1.TelemetryIngest")
        method = svc.methods_by_name["StreamPackets"]
        packet_cls = message_factory.GetMessageClass(method.input_type)
        ack_cls = message_factory.GetMessageClass(method.output_type)
        sent: dict[str, list[int]] = {"refl-a": [], "refl-b": []}
        msgs = []
        for i in range(40):
            device = "refl-a" if i % 3 else "refl-b"
            sent[device].append(i)
            msgs.append(packet_cls(device_id=device, kind="reading", payload=b"p" * i))
            if i % 10 == 0:
                msgs.append(packet_cls(device_id="", payload=b"zzz"))
        call = channel.stream_unary(
            f"/{svc.full_name}/{method.name}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=ack_cls.FromString,
        )
        ack = call(iter(msgs))
        assert (ack.accepted, ack.rejected) == (40, 4)
    for device, sizes in sent.items():
        got = get_json(service.http, f"/metrics/{device}")
        assert (got["packets"], got["bytes"]) == (len(sizes), sum(sizes))


def test_health_readiness_docs_and_errors(service: ServiceProcess) -> None:
    with grpc.insecure_channel(service.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "rtmonitor.v1.TelemetryIngest"):
            status = stub.Check(health_pb2.HealthCheckRequest(service=name)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
    assert get_json(service.http, "/healthz") == {"status": "ok"}
    assert get_json(service.http, "/readyz") == {"ready": True, "reasons": []}
    r = httpx.get(f"{service.http}/metrics/never-seen")
    assert r.status_code == 404 and "unknown device 'never-seen'" in r.json()["detail"]
    r = httpx.get(f"{service.http}/metrics", params={"sort": "colour"})
    assert r.status_code == 422 and "sort" in r.text
    assert httpx.get(f"{service.http}/docs").status_code == 200
    paths = httpx.get(f"{service.http}/openapi.json").json()["paths"]
    assert {"/metrics", "/metrics/{device_id}", "/readyz", "/healthz"} <= set(paths)
    # device ids with '/' and ':' are addressable
    run(stream_packets(service.target, [packet("site/1:eth0")]))
    assert get_json(service.http, "/metrics/site/1:eth0")["packets"] == 1


def test_two_instances_on_one_redis_add_up_exactly(
    start_service: Callable[..., ServiceProcess],
) -> None:
    a, b = start_service(), start_service()

    async def both() -> list[SendReport]:
        return list(
            await asyncio.gather(
                send(opts(a.target, devices=50, count=40_000, batch_size=400, streams=2)),
                send(opts(b.target, devices=50, count=40_000, batch_size=300, streams=2)),
                send(opts(b.target, devices=50, count=900, streams=2)),
            )
        )

    reports = run(both())
    expected: dict[str, int] = {}
    for rep in reports:
        assert rep.errors == []
        for device, n in rep.acked_per_device().items():
            expected[device] = expected.get(device, 0) + n
    for svc in (a, b):  # either instance serves the same shared counts
        assert {d: v["packets"] for d, v in all_devices(svc.http).items()} == expected
        assert get_json(svc.http, "/metrics")["totals"]["packets"] == 80_900


def test_clean_stop_mid_load_loses_no_acknowledged_packet(
    start_service: Callable[..., ServiceProcess], redis_server: EmbeddedRedis
) -> None:
    svc = start_service()

    async def load_then_stop() -> list[SendReport]:
        loads = [
            asyncio.create_task(
                send(
                    opts(
                        svc.target,
                        devices=20,
                        duration=30,
                        batch_size=200,
                        streams=2,
                        retry_for=0,  # no resend here: see tests/faults for that
                    )
                )
            ),
            asyncio.create_task(
                send(opts(svc.target, devices=20, duration=30, streams=2, device_prefix="pp-"))
            ),
        ]
        await asyncio.sleep(1.5)
        await asyncio.to_thread(svc.terminate)
        return list(await asyncio.gather(*loads))

    reports = run(load_then_stop())
    assert svc.proc.returncode == 0, svc.log()
    acked = sum(r.accepted for r in reports)
    assert acked > 1000
    for r in reports:
        assert r.errors, "the streams should have been ended by the shutdown"
    # Batch streams end with UNAVAILABLE "server is shutting down". A client caught writing
    # at that moment may instead see grpc's own INTERNAL ("Internal error from Core") or,
    # once the process has exited, UNAVAILABLE ("Stream removed"): all mean "resend what
    # was not acknowledged". StreamPackets answers with a truncated Ack, or the same races.
    retryable = ("UNAVAILABLE: ", "INTERNAL: ")
    for error in reports[0].errors:
        assert error.startswith(retryable), error
    for error in reports[1].errors:
        assert "stopped reading early" in error or error.startswith(retryable), error

    async def committed() -> int:
        async with RedisStore.from_url(redis_server.url) as store:
            return (await store.totals()).packets

    # Everything acknowledged is in Redis. Redis may hold more than the client saw acked:
    # grpc's client drops acks still in flight when the race above tears the call down.
    # Those batches are at-least-once until batch ids are deduplicated (exactly-once).
    sent = sum(r.sent for r in reports)
    assert acked <= run(committed()) <= sent


def test_redis_outage_keeps_pending_deltas_and_recovers(
    start_service: Callable[..., ServiceProcess], redis_server: EmbeddedRedis
) -> None:
    svc = start_service()
    run(stream_packets(svc.target, [packet("out-1")]))
    redis_server.kill()
    deadline = time.monotonic() + 10
    while httpx.get(f"{svc.http}/readyz").status_code != 503:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    body = httpx.get(f"{svc.http}/readyz").json()
    assert body["ready"] is False and "Redis is unreachable" in body["reasons"][0]

    async def send_during_outage() -> int:
        task = asyncio.create_task(stream_packets(svc.target, [packet("out-1")] * 25))
        await asyncio.sleep(1.0)
        assert not task.done(), "the ack must wait for the commit"
        redis_server.start()  # on the main thread, like the service does
        ack = await asyncio.wait_for(task, 30)
        return int(ack.accepted)

    assert run(send_during_outage()) == 25
    assert get_json(svc.http, "/metrics/out-1")["packets"] == 26
    assert httpx.get(f"{svc.http}/readyz").status_code == 200


def test_starts_before_redis_and_waits_for_it(tmp_path: Path) -> None:
    redis_server = EmbeddedRedis(tmp_path / "r", port=0)
    from rtmonitor.storage.embedded import free_port

    redis_server.port = free_port()
    svc = ServiceProcess(redis_server.url, tmp_path / "svc.log")
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                r = httpx.get(f"{svc.http}/readyz", timeout=1)
                assert r.status_code == 503 and "Redis" in r.json()["reasons"][-1]
                break
            except httpx.HTTPError:
                # HTTP comes up after Redis: nothing listens yet, and the log says why
                assert time.monotonic() < deadline
                time.sleep(0.2)
                if "unreachable" in svc.log():
                    break
        redis_server.start()
        svc.wait_ready()
        assert run(stream_packets(svc.target, [packet("late")])).accepted == 1
    finally:
        svc.kill()
        redis_server.stop()


def test_default_run_uses_embedded_redis_and_send_cli_counts_exactly(tmp_path: Path) -> None:
    """The README's story: serve on the embedded Redis, `rtmonitor send`, read /metrics."""
    svc = ServiceProcess(None, tmp_path / "svc.log", "--data-dir", str(tmp_path / "data"))
    try:
        svc.wait_ready()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "rtmonitor",
                "send",
                "--target",
                svc.target,
                "--devices",
                "100",
                "--count",
                "100000",
                "--streams",
                "4",
                "--json-output",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        assert '"accepted": 100000' in out.stdout, out
        devices = all_devices(svc.http)
        assert len(devices) == 100
        assert all(d["packets"] == 1000 and d["bytes"] == 64_000 for d in devices.values())
        assert svc.terminate() == 0
        assert "embedded Redis" in svc.log() and "stopped" in svc.log()
        assert (tmp_path / "data" / "appendonly.aof").exists()
    finally:
        svc.kill()


def test_sigkill_takes_the_embedded_redis_down_too(tmp_path: Path) -> None:
    import os
    import re

    svc = ServiceProcess(None, tmp_path / "svc.log", "--data-dir", str(tmp_path / "data"))
    try:
        svc.wait_ready()
        match = re.search(r"embedded Redis (\d+) ready", svc.log())
        assert match, svc.log()
        redis_pid = int(match.group(1))
        svc.kill()
        deadline = time.monotonic() + 10
        while True:
            try:
                os.kill(redis_pid, 0)
            except ProcessLookupError:
                break
            with open(f"/proc/{redis_pid}/stat") as f:  # a zombie awaiting its reaper is gone
                if f.read().split(") ")[1].startswith("Z"):
                    break
            assert time.monotonic() < deadline, "embedded Redis outlived the service"
            time.sleep(0.05)
    finally:
        svc.kill()


def test_second_signal_forces_exit(
    start_service: Callable[..., ServiceProcess], redis_server: EmbeddedRedis
) -> None:
    import signal

    svc = start_service("--shutdown-flush-timeout", "120")
    redis_server.kill()  # the final flush will wait for Redis for up to 120 s

    async def pending_then_signals() -> None:
        task = asyncio.ensure_future(stream_packets(svc.target, [packet("stuck")]))
        await asyncio.sleep(0.5)
        svc.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.0)
        assert svc.proc.poll() is None, "the first signal waits for the final flush"
        svc.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await task

    run(pending_then_signals())
    assert svc.proc.wait(10) == 1
    assert "forcing exit" in svc.log()


def test_columnar_batches_count_exactly_like_rows(service: ServiceProcess) -> None:
    common = {"devices": 30, "count": 60_000, "batch_size": 2000, "streams": 2, "payload_size": 9}
    rows = run(send(opts(service.target, device_prefix="r-", **common)))
    cols = run(send(opts(service.target, device_prefix="c-", columnar=True, **common)))
    assert rows.errors == [] and cols.errors == []
    assert cols.accepted == rows.accepted == 60_000
    assert_counts_match(service.http, rows, 9)
    assert_counts_match(service.http, cols, 9)
    # same packets in both forms: identical kinds and value statistics per device
    for i in (0, 17, 29):
        r = get_json(service.http, f"/metrics/r-{i:05d}")
        c = get_json(service.http, f"/metrics/c-{i:05d}")
        assert r["kinds"] == c["kinds"]
        for name in ("temperature", "humidity"):
            for stat in ("count", "min", "max", "sum"):
                assert r["values"][name][stat] == pytest.approx(c["values"][name][stat])


def test_workers_share_the_port_and_count_exactly(
    start_service: Callable[..., ServiceProcess], redis_server: EmbeddedRedis
) -> None:
    svc = start_service("--workers", "2")
    report = run(
        send(opts(svc.target, devices=60, count=200_000, batch_size=500, streams=8, columnar=True))
    )
    assert report.errors == [] and report.accepted == 200_000
    assert_counts_match(svc.http, report, 64)

    async def instances() -> tuple[int, int]:
        async with RedisStore.from_url(redis_server.url) as store:
            alive = await store.client.keys("{rtm}:alive:*")
            wrote = await store.client.keys("{rtm}:m:*")
            return len(alive), len(wrote)

    alive, wrote = run(instances())
    assert alive == 2, "two ingest workers heartbeat"
    assert wrote == 2, "both workers committed part of the load"
    stats = get_json(svc.http, "/readyz")
    assert stats["ready"] is True
    # per-packet streams and row batches too; then the API process reports the workers'
    # pipelines (it has none of its own): their sum, and each of them
    per_packet = run(send(opts(svc.target, devices=20, count=3000, streams=4, device_prefix="p-")))
    rows = run(send(opts(svc.target, devices=20, count=20_000, batch_size=100, streams=4)))
    sent = 200_000 + per_packet.accepted + rows.accepted
    assert per_packet.accepted == 3000 and rows.accepted == 20_000
    stats = wait_for_committed(svc.http, sent)
    assert stats["flush"]["packets_committed"] == sent
    assert stats["flush"]["flushes"] > 0
    assert len(stats["instances"]) == 2
    assert sum(i["flush"]["packets_committed"] for i in stats["instances"].values()) == sent
    assert (
        sum(i["flush"]["flushes"] for i in stats["instances"].values())
        == (stats["flush"]["flushes"])
    )
    assert (
        stats["queue"]["max_packets"] == 2 * stats["instances"].popitem()[1]["queue"]["max_packets"]
    )
    scraped = self_metrics(svc.http)
    assert scraped["rtm_committed_packets_total"] == sent
    assert scraped["rtm_flushes_total"] == stats["flush"]["flushes"]
    assert scraped["rtm_ingest_instances"] == 2
    # 20 devices: the time budget does not bind, each worker keeps --max-pending-devices
    assert stats["pending"]["device_entry_budget"] == 2 * 1_000_000
    assert scraped["rtm_pending_device_entry_budget"] == 2 * 1_000_000
    assert scraped["rtm_pending_device_entries"] == 0
    assert svc.terminate() == 0
    assert svc.log().count("stopped") >= 3  # both workers and the API process stopped in order


def test_inconsistent_columns_refuse_the_batch_without_a_trace(
    start_service: Callable[..., ServiceProcess],
) -> None:
    """A batch whose columns do not fit is refused whole, with a status that says what to
    fix, counted once as a refused message — and its row packets admit no device."""
    from rtmonitor.ingest.v1.telemetry_pb2 import Columns

    svc = start_service("--max-devices", "1")
    bad = Batch(
        producer_id="p",
        batch_id=1,
        packets=[packet("phantom")],
        columns=Columns(count=3, device_ids=["c"], device_index=b"\x00" * 8),  # 2 of 3
    )
    acks: list[BatchAck] = []
    try:
        run(stream_batches(svc.target, [bad], acks))
        raise AssertionError("the stream should have ended with INVALID_ARGUMENT")
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "device_index has 8 bytes; 3 packets need 12" in (exc.details() or "")
    assert acks == []
    # the refused batch's "phantom" device took no place: the one admitted device is "real"
    ack = run(stream_packets(svc.target, [packet("real"), packet("phantom")]))
    assert (ack.accepted, dict(ack.rejected_by_reason)) == (1, {"too_many_devices": 1})
    assert get_json(svc.http, "/metrics/real")["packets"] == 1
    assert httpx.get(f"{svc.http}/metrics/phantom").status_code == 404
    rejected = get_json(svc.http, "/metrics")["totals"]["rejected_by_reason"]
    assert rejected == {"too_many_devices": 1}  # the refused batch is a message, not packets
    refused = get_json(svc.http, "/stats")["ingest"]["messages_refused_by_reason"]
    assert refused == {"invalid_columns": 1}
