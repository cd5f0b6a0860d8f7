"""The OTLP and HTTP JSON receivers with an auth file, against a real service: each needs
an `ingest` token exactly as TelemetryIngest does (OTLP/gRPC: `authorization` metadata;
HTTP: `Authorization: Bearer`), a prefix-bound token's other devices are refused per data
point / packet as `device_not_permitted`, and Idempotency-Keys are scoped by token."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from helpers import ServiceProcess, run
from helpers.security import INGEST_TOKENS, Tokens, secured_service
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    Gauge,
    Metric,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as ResourcePb
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from rtmonitor.ingest.otlp import EXPORT

TOKENS = INGEST_TOKENS


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, Tokens]]:
    tmp = tmp_path_factory.mktemp("auth-receivers")
    svc, tokens = secured_service(tmp, TOKENS)
    try:
        yield svc.wait_ready(), tokens
    finally:
        svc.kill()


def packets_of(svc: ServiceProcess, tokens: Tokens, device_id: str) -> int:
    r = httpx.get(f"{svc.http}/metrics/{device_id}", headers=tokens.header("reader"), timeout=10)
    return 0 if r.status_code == 404 else int(r.json()["packets"])


def gauge_request(*devices: str) -> ExportMetricsServiceRequest:
    point = NumberDataPoint(as_double=1.0)
    return ExportMetricsServiceRequest(
        resource_metrics=[
            ResourceMetrics(
                resource=ResourcePb(
                    attributes=[KeyValue(key="device.id", value=AnyValue(string_value=d))]
                ),
                scope_metrics=[
                    ScopeMetrics(metrics=[Metric(name="up", gauge=Gauge(data_points=[point]))])
                ],
            )
            for d in devices
        ]
    )


def export(svc: ServiceProcess, request: ExportMetricsServiceRequest, metadata: Any) -> Any:
    async def call() -> Any:
        async with grpc.aio.insecure_channel(svc.target) as channel:
            method = channel.unary_unary(
                EXPORT,
                request_serializer=ExportMetricsServiceRequest.SerializeToString,
                response_deserializer=ExportMetricsServiceResponse.FromString,
            )
            try:
                return await method(request, metadata=metadata, timeout=10)
            except grpc.aio.AioRpcError as exc:
                return exc.code()

    return run(call())


def test_otlp_grpc_needs_an_ingest_token(secured: tuple[ServiceProcess, Tokens]) -> None:
    svc, tokens = secured
    request = gauge_request("otlp-1")
    assert export(svc, request, None) == grpc.StatusCode.UNAUTHENTICATED
    assert export(svc, request, tokens.client("reader").metadata) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert packets_of(svc, tokens, "otlp-1") == 0
    response = export(svc, request, tokens.client("writer").metadata)
    assert isinstance(response, ExportMetricsServiceResponse)
    assert packets_of(svc, tokens, "otlp-1") == 1
    # a prefix-bound token: its own devices count, the others are refused per data point
    response = export(
        svc, gauge_request("fleet-a/1", "fleet-b/1", "fleet-a/2"), tokens.client("fleet-a").metadata
    )
    assert response.partial_success.rejected_data_points == 1
    assert "device_not_permitted: 1" in response.partial_success.error_message
    assert packets_of(svc, tokens, "fleet-a/1") == 1
    assert packets_of(svc, tokens, "fleet-b/1") == 0


def test_official_exporter_with_a_token(secured: tuple[ServiceProcess, Tokens]) -> None:
    svc, tokens = secured
    exporter = OTLPMetricExporter(
        endpoint=f"127.0.0.1:{svc.grpc_port}",
        insecure=True,
        headers={"authorization": f"Bearer {tokens.secrets['writer']}"},
    )
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(
        resource=Resource.create({"device.id": "sdk-secured"}), metric_readers=[reader]
    )
    provider.get_meter("t").create_counter("c").add(1)
    assert provider.force_flush(10_000)
    provider.shutdown()
    assert packets_of(svc, tokens, "sdk-secured") == 2  # force_flush and shutdown


def test_http_routes_need_an_ingest_token(secured: tuple[ServiceProcess, Tokens]) -> None:
    svc, tokens = secured
    body = gauge_request("otlp-http").SerializeToString()
    proto = {"content-type": "application/x-protobuf"}
    for path, content, headers in (
        ("/v1/metrics", body, proto),
        ("/v1/telemetry", b'{"device_id": "json-1"}', {}),
    ):
        r = httpx.post(f"{svc.http}{path}", content=content, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = httpx.post(
            f"{svc.http}{path}", content=content, headers={**headers, **tokens.header("reader")}
        )
        assert r.status_code == 403 and "ingest" in r.json()["detail"]
        r = httpx.post(
            f"{svc.http}{path}", content=content, headers={**headers, **tokens.header("writer")}
        )
        assert r.status_code == 200, r.text
    assert packets_of(svc, tokens, "otlp-http") == 1
    assert packets_of(svc, tokens, "json-1") == 1


def test_http_json_device_prefix_and_keys_scoped_by_token(
    secured: tuple[ServiceProcess, Tokens],
) -> None:
    svc, tokens = secured
    url = f"{svc.http}/v1/telemetry"
    body = b'[{"device_id": "fleet-a/9"}, {"device_id": "fleet-b/9"}]'
    r = httpx.post(url, content=body, headers=tokens.header("fleet-a"))
    assert r.json() == {"accepted": 1, "rejected": {"device_not_permitted": 1}, "duplicate": False}
    # the same Idempotency-Key from two tokens: two bodies, both counted
    for name in ("twin-1", "twin-2", "twin-1"):
        headers = {**tokens.header(name), "idempotency-key": "same-key"}
        r = httpx.post(url, content=b'{"device_id": "twins"}', headers=headers)
        assert r.status_code == 200
    assert r.json()["duplicate"] is True  # twin-1's resend
    assert packets_of(svc, tokens, "twins") == 2
    deadline = time.monotonic() + 10
    while True:  # refusals by surface, reason and token (published each second)
        stats = httpx.get(f"{svc.http}/stats", headers=tokens.header("boss"), timeout=10).json()
        refused = stats["auth"]["refused"]
        # each surface's counts are published once a second: wait for all three
        wanted = [
            ("http-json", "device_not_permitted:fleet-a"),
            ("http-json", "missing_token:-"),
            ("otlp", "missing_token:-"),
        ]
        if all(key in refused.get(surface, {}) for surface, key in wanted):
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert refused["http-json"]["device_not_permitted:fleet-a"] == 1
    assert refused["http-json"]["missing_token:-"] == 1
    assert refused["otlp"]["missing_token:-"] >= 1
