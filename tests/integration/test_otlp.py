"""The OTLP metrics receiver against a real service: the official OpenTelemetry SDK with both
official exporters (gRPC, HTTP with gzip), and hand-built requests that pin the mapping
(names, histograms, bytes, timestamps, device id attributes, partial success)."""

from __future__ import annotations

import gzip
import time
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import ServiceProcess, get_json, run
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
    OTLPMetricExporter as GrpcExporter,
)
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    OTLPMetricExporter as HttpExporter,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    ExponentialHistogram,
    ExponentialHistogramDataPoint,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
    Summary,
    SummaryDataPoint,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as ResourcePb
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from rtmonitor.ingest.otlp import EXPORT, SERVICE_NAME
from rtmonitor.storage.embedded import EmbeddedRedis

FLUSHES = 3


def device(base: str, device_id: str) -> dict[str, Any]:
    got: dict[str, Any] = get_json(base, f"/metrics/{device_id}")
    return got


def wait_for_packets(base: str, device_id: str, packets: int, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{base}/metrics/{device_id}", timeout=5)
        if r.status_code == 200 and r.json()["packets"] >= packets:
            return r.json()
        assert time.monotonic() < deadline, f"{device_id}: {r.status_code} {r.text}"
        time.sleep(0.05)


def export_with_sdk(exporter: MetricExporter, device_id: str) -> None:
    """A MeterProvider with a device.id resource: a counter with two attribute sets, a gauge
    and a histogram, exported FLUSHES times by force_flush and once more at shutdown."""
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(
        resource=Resource.create({"device.id": device_id, "service.name": "test"}),
        metric_readers=[reader],
    )
    meter = provider.get_meter("tests")
    requests = meter.create_counter("http.requests")
    temperature = meter.create_gauge("temperature")
    latency = meter.create_histogram("latency", unit="ms")
    for i in range(FLUSHES):
        requests.add(1, {"method": "GET"})
        requests.add(2, {"method": "POST"})
        temperature.set(20 + i)
        latency.record(10.0)
        latency.record(30.0)
        assert provider.force_flush(10_000)
    provider.shutdown()


def test_official_sdk_exporters_count_exactly_per_the_mapping(service: ServiceProcess) -> None:
    """4 points per export (two counter series, a gauge, a histogram) x (FLUSHES + the export
    at shutdown): every point one packet, the histogram as .count and .sum readings."""
    exporters = {
        "sdk-grpc": GrpcExporter(endpoint=f"127.0.0.1:{service.grpc_port}", insecure=True),
        "sdk-http": HttpExporter(endpoint=f"{service.http}/v1/metrics"),
        "sdk-http-gzip": HttpExporter(
            endpoint=f"{service.http}/v1/metrics", compression=Compression.Gzip
        ),
    }
    exports = FLUSHES + 1
    for device_id, exporter in exporters.items():
        export_with_sdk(exporter, device_id)
        got = wait_for_packets(service.http, device_id, 4 * exports)
        assert got["packets"] == 4 * exports, device_id
        assert got["kinds"] == {"otlp": 4 * exports}
        values = got["values"]
        assert set(values) == {
            "http.requests/method:GET",
            "http.requests/method:POST",
            "temperature",
            "latency.count",
            "latency.sum",
        }
        for name in values:
            assert values[name]["count"] == exports, (device_id, name)
        # cumulative sums: the last export holds the totals
        assert values["http.requests/method:GET"]["last"] == FLUSHES
        assert values["http.requests/method:POST"]["last"] == 2 * FLUSHES
        assert values["latency.count"]["last"] == 2 * FLUSHES
        assert values["latency.sum"]["last"] == 40.0 * FLUSHES
        assert values["temperature"]["last"] == 20 + FLUSHES - 1
        assert got["bytes"] > 0
    assert get_json(service.http, "/stats")["ingest"]["rejected_by_reason"] == {}


# --- hand-built requests: the mapping, exactly ------------------------------------------------


def attrs(**kv: Any) -> list[KeyValue]:
    out = []
    for k, v in kv.items():
        if isinstance(v, bool):
            out.append(KeyValue(key=k, value=AnyValue(bool_value=v)))
        elif isinstance(v, int):
            out.append(KeyValue(key=k, value=AnyValue(int_value=v)))
        else:
            out.append(KeyValue(key=k, value=AnyValue(string_value=str(v))))
    return out


Resources = list[tuple[list[KeyValue], list[Metric]]]


def request_for(resources: Resources) -> ExportMetricsServiceRequest:
    return ExportMetricsServiceRequest(
        resource_metrics=[
            ResourceMetrics(
                resource=ResourcePb(attributes=resource), scope_metrics=[ScopeMetrics(metrics=ms)]
            )
            for resource, ms in resources
        ]
    )


def sample(device_id: str, now_ns: int) -> tuple[ExportMetricsServiceRequest, list[Any]]:
    """One resource of every data kind; returns the request and its points (for bytes)."""
    gauge_points = [
        NumberDataPoint(time_unix_nano=now_ns, as_double=1.5),
        NumberDataPoint(time_unix_nano=now_ns, as_int=7, attributes=attrs(zone="b", rack=3)),
    ]
    sum_points = [NumberDataPoint(time_unix_nano=now_ns, as_int=10, attributes=attrs(ok=True))]
    hist_points = [
        HistogramDataPoint(time_unix_nano=now_ns, count=4, sum=12.0, bucket_counts=[1, 3]),
        HistogramDataPoint(time_unix_nano=now_ns, count=2),  # no sum: .count only
    ]
    exp_points = [ExponentialHistogramDataPoint(time_unix_nano=now_ns, count=5, sum=2.5)]
    summary_points = [SummaryDataPoint(time_unix_nano=now_ns, count=3, sum=9.0)]
    metrics = [
        Metric(name="g", gauge=Gauge(data_points=gauge_points)),
        Metric(name="s", sum=Sum(data_points=sum_points, is_monotonic=True)),
        Metric(name="h", histogram=Histogram(data_points=hist_points)),
        Metric(name="e", exponential_histogram=ExponentialHistogram(data_points=exp_points)),
        Metric(name="q", summary=Summary(data_points=summary_points)),
    ]
    request = request_for([(attrs(**{"device.id": device_id}), metrics)])
    return request, gauge_points + sum_points + hist_points + exp_points + summary_points


def check_sample(base: str, device_id: str, points: list[Any], now_ns: int) -> None:
    got = wait_for_packets(base, device_id, 7)
    assert got["packets"] == 7
    assert got["bytes"] == sum(p.ByteSize() for p in points)
    values = got["values"]
    assert {name: v["sum"] for name, v in values.items()} == {
        "g": 1.5,
        "g/rack:3/zone:b": 7.0,
        "s/ok:true": 10.0,
        "h.count": 6.0,
        "h.sum": 12.0,
        "e.count": 5.0,
        "e.sum": 2.5,
        "q.count": 3.0,
        "q.sum": 9.0,
    }
    assert values["h.count"]["count"] == 2 and values["h.sum"]["count"] == 1
    assert values["g"]["last_timestamp_ms"] == now_ns // 1_000_000


def test_mapping_over_grpc_http_protobuf_gzip_and_json(service: ServiceProcess) -> None:
    now_ns = time.time_ns() - 5_000_000_000
    # gRPC
    request, points = sample("hand-grpc", now_ns)

    async def over_grpc() -> ExportMetricsServiceResponse:
        async with grpc.aio.insecure_channel(service.target) as channel:
            export = channel.unary_unary(
                EXPORT,
                request_serializer=ExportMetricsServiceRequest.SerializeToString,
                response_deserializer=ExportMetricsServiceResponse.FromString,
            )
            response: ExportMetricsServiceResponse = await export(request, timeout=10)
            return response

    response = run(over_grpc())
    assert not response.HasField("partial_success")
    check_sample(service.http, "hand-grpc", points, now_ns)
    # HTTP protobuf, gzip
    request, points = sample("hand-gzip", now_ns)
    r = httpx.post(
        f"{service.http}/v1/metrics",
        content=gzip.compress(request.SerializeToString()),
        headers={"content-type": "application/x-protobuf", "content-encoding": "gzip"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-protobuf"
    assert not ExportMetricsServiceResponse.FromString(r.content).HasField("partial_success")
    check_sample(service.http, "hand-gzip", points, now_ns)
    # HTTP JSON (OTLP's JSON encoding: camelCase, 64-bit integers as strings)
    request, points = sample("hand-json", now_ns)
    r = httpx.post(
        f"{service.http}/v1/metrics",
        content=json_format.MessageToJson(request),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 200 and r.json() == {}
    check_sample(service.http, "hand-json", points, now_ns)


def test_device_attribute_fallbacks_and_partial_success(service: ServiceProcess) -> None:
    point = NumberDataPoint(as_double=1.0)
    gauge = Metric(name="up", gauge=Gauge(data_points=[point, point]))
    request = request_for(
        [
            (attrs(**{"host.name": "by-host"}), [gauge]),
            (attrs(**{"service.instance.id": "by-instance", "host.name": "x"}), [gauge]),
            (attrs(**{"service.name": "nobody"}), [gauge]),  # no device id: 2 rejected
            (attrs(**{"device.id": "bad id!"}), [gauge]),  # invalid device id: 2 rejected
            (
                attrs(**{"device.id": "no-value"}),
                [Metric(name="n", gauge=Gauge(data_points=[NumberDataPoint()]))],
            ),  # fmt: skip
        ]
    )
    r = httpx.post(
        f"{service.http}/v1/metrics",
        content=json_format.MessageToJson(request),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 200
    partial = r.json()["partialSuccess"]
    assert partial["rejectedDataPoints"] == "5"
    assert "no_device_id: 2" in partial["errorMessage"]
    assert "invalid_device_id: 2" in partial["errorMessage"]
    assert "no_value: 1" in partial["errorMessage"]
    assert wait_for_packets(service.http, "by-host", 2)["packets"] == 2
    assert wait_for_packets(service.http, "by-instance", 2)["packets"] == 2
    deadline = time.monotonic() + 10
    while True:  # every refusal by reason, in /stats and Prometheus
        rejected = get_json(service.http, "/stats")["ingest"]["rejected_by_reason"]
        if rejected.get("no_device_id") == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert rejected["no_device_id"] == 2 and rejected["no_value"] == 1
    scrape = httpx.get(f"{service.http}/metrics", params={"format": "prometheus"}).text
    assert 'rtm_rejected_packets_total{reason="no_device_id"} 2' in scrape


def test_device_attribute_is_configurable(
    start_service: Callable[..., ServiceProcess],
) -> None:
    svc = start_service("--otlp-device-attribute", "serial")
    gauge = Metric(name="up", gauge=Gauge(data_points=[NumberDataPoint(as_double=1.0)]))
    request = request_for([(attrs(serial="SN-1", **{"device.id": "ignored"}), [gauge])])
    r = httpx.post(
        f"{svc.http}/v1/metrics",
        content=request.SerializeToString(),
        headers={"content-type": "application/x-protobuf"},
    )
    assert r.status_code == 200
    assert wait_for_packets(svc.http, "SN-1", 1)["packets"] == 1


def test_refusals_are_clear_and_counted(
    start_service: Callable[..., ServiceProcess],
) -> None:
    svc = start_service("--http-ingest-max-bytes", "16384")
    url = f"{svc.http}/v1/metrics"
    proto = {"content-type": "application/x-protobuf"}
    r = httpx.post(url, content=b"{}", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/x-protobuf" in r.json()["message"]
    r = httpx.post(url, content=b"\xff\xff\xff", headers=proto)
    assert r.status_code == 400
    r = httpx.post(url, content=b"x" * 20_000, headers=proto)
    assert r.status_code == 413
    bomb = gzip.compress(b"\0" * 10_000_000)  # 10 KB that inflate to 10 MB
    assert len(bomb) < 16384
    r = httpx.post(url, content=bomb, headers={**proto, "content-encoding": "gzip"})
    assert r.status_code == 413 and "inflates" in r.content.decode(errors="replace")
    r = httpx.post(url, content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == 3

    async def malformed_grpc() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(svc.target) as channel:
            export = channel.unary_unary(EXPORT)
            try:
                await export(b"\xff\xff\xff", timeout=10)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        raise AssertionError("a malformed request was accepted")

    assert run(malformed_grpc()) == grpc.StatusCode.INVALID_ARGUMENT
    stats = get_json(svc.http, "/stats")
    refused = stats["ingest"]["messages_refused_by_reason"]
    assert refused == {
        "unsupported_media_type": 1,
        "malformed_body": 3,
        "body_too_large": 1,  # the inflating one; the 20,000-byte body is refused by the route
    }
    assert stats["api"]["refused_by_reason"]["body_too_large"] == 1


def test_reflection_lists_the_metrics_service(service: ServiceProcess) -> None:
    async def services() -> list[str]:
        async with grpc.aio.insecure_channel(service.target) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            async for answer in stub.ServerReflectionInfo(iter([request])):
                return [s.name for s in answer.list_services_response.service]
        return []

    assert SERVICE_NAME in run(services())


@pytest.mark.parametrize(
    ("body", "media"),
    [(b"", "application/x-protobuf"), (b'{"resourceMetrics": []}', "application/json")],
)
def test_empty_exports_are_fine(service: ServiceProcess, body: bytes, media: str) -> None:
    r = httpx.post(f"{service.http}/v1/metrics", content=body, headers={"content-type": media})
    assert r.status_code == 200


def test_redis_away_answers_unavailable_and_503(
    start_service: Callable[..., ServiceProcess], redis_server: EmbeddedRedis
) -> None:
    """The exporters retry UNAVAILABLE and 503 (with Retry-After): at-least-once."""
    svc = start_service("--receiver-commit-timeout", "1")
    request = request_for(
        [
            (
                attrs(**{"device.id": "outage"}),
                [Metric(name="up", gauge=Gauge(data_points=[NumberDataPoint(as_double=1)]))],
            )
        ]
    )

    async def over_grpc() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(svc.target) as channel:
            export = channel.unary_unary(
                EXPORT,
                request_serializer=ExportMetricsServiceRequest.SerializeToString,
                response_deserializer=ExportMetricsServiceResponse.FromString,
            )
            try:
                await export(request, timeout=30)
            except grpc.aio.AioRpcError as exc:
                trailers = dict(exc.trailing_metadata() or ())
                retry = RetryInfo.FromString(trailers["google.rpc.retryinfo-bin"])
                assert retry.retry_delay.seconds == 1  # what the official exporter waits
                status = Status.FromString(trailers["grpc-status-details-bin"])
                assert status.details[0].Is(RetryInfo.DESCRIPTOR)
                return exc.code()
        return grpc.StatusCode.OK

    redis_server.stop()
    try:
        assert run(over_grpc()) == grpc.StatusCode.UNAVAILABLE
        r = httpx.post(
            f"{svc.http}/v1/metrics",
            content=request.SerializeToString(),
            headers={"content-type": "application/x-protobuf"},
            timeout=30,
        )
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert Status.FromString(r.content).code == 14  # google.rpc.Status, UNAVAILABLE
    finally:
        redis_server.start()
    # the first export was queued and is committed once Redis is back (a retry would count
    # it again: at-least-once); the second was refused before queueing, or queued as well
    assert wait_for_packets(svc.http, "outage", 1, timeout=30)["packets"] in (1, 2)
