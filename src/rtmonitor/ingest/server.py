"""Builds the gRPC server: TelemetryIngest and OTLP's MetricsService, plus the standard health
and reflection services."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceResponse,
)

from rtmonitor.ingest.guard import authorize
from rtmonitor.ingest.otlp import EXPORT_METHOD, OtlpReceiver
from rtmonitor.ingest.otlp import SERVICE_NAME as OTLP_SERVICE_NAME
from rtmonitor.ingest.rpc import BATCHES_METHOD, PACKETS_METHOD, SERVICE_NAME
from rtmonitor.ingest.servicer import IngestServicer
from rtmonitor.ingest.v1.telemetry_pb2 import Ack, Batch, BatchAck, Packet

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def ingest_handler(
    servicer: IngestServicer, *, noop: bool = False
) -> grpc.GenericRpcHandler[Any, Any]:
    """TelemetryIngest's method table. Requests stay raw bytes (no request_deserializer):
    the servicer parses them, to turn malformed input into a clear answer."""
    packets = _checked_noop_packets(servicer) if noop else servicer.stream_packets
    batches = _checked_noop_batches(servicer) if noop else servicer.stream_batches
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            PACKETS_METHOD: grpc.stream_unary_rpc_method_handler(
                packets, response_serializer=Ack.SerializeToString
            ),
            BATCHES_METHOD: grpc.stream_stream_rpc_method_handler(
                batches, response_serializer=BatchAck.SerializeToString
            ),
        },
    )


# --- the no-op ceiling (`serve --noop`, for `rtmonitor bench`) --------------------------------
# The same transport and the same parsing, none of the work: no validation, queue, counting
# or Redis. What a mode reaches relative to this is the share the pipeline costs.


async def noop_stream_packets(requests: AsyncIterator[bytes], context: object) -> Ack:
    n = 0
    async for raw in requests:
        Packet.FromString(raw)
        n += 1
    return Ack(accepted=n)


async def noop_stream_batches(
    requests: AsyncIterator[bytes], context: object
) -> AsyncIterator[BatchAck]:
    async for raw in requests:
        batch = Batch.FromString(raw)
        n = len(batch.packets) + batch.columns.count
        yield BatchAck(producer_id=batch.producer_id, batch_id=batch.batch_id, accepted=n)


def otlp_handler(otlp: OtlpReceiver) -> grpc.GenericRpcHandler[Any, Any]:
    """OTLP's MetricsService/Export; the request stays raw bytes, as TelemetryIngest's do."""
    return grpc.method_handlers_generic_handler(
        OTLP_SERVICE_NAME,
        {
            EXPORT_METHOD: grpc.unary_unary_rpc_method_handler(
                otlp.export_rpc, response_serializer=ExportMetricsServiceResponse.SerializeToString
            )
        },
    )


def _checked_noop_packets(servicer: IngestServicer) -> Any:
    """The no-op StreamPackets behind the same token check as the real one."""

    async def handler(requests: AsyncIterator[bytes], context: Any) -> Ack:
        await authorize(context, servicer.auth)
        return await noop_stream_packets(requests, context)

    return handler


def _checked_noop_batches(servicer: IngestServicer) -> Any:
    """The no-op StreamBatches behind the same token check as the real one."""

    async def handler(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[BatchAck]:
        await authorize(context, servicer.auth)
        async for ack in noop_stream_batches(requests, context):
            yield ack

    return handler


def build_server(
    servicer: IngestServicer,
    health: health_aio.HealthServicer,
    *,
    otlp: OtlpReceiver | None = None,
    max_message_bytes: int,
    reuse_port: bool = False,
    noop: bool = False,
) -> grpc.aio.Server:
    """A grpc.aio server with ingest, health and reflection registered (ports not yet bound)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            # Let long-lived, quiet streams keep their connection alive through proxies.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
    )
    handlers = [ingest_handler(servicer, noop=noop)]
    services = [SERVICE_NAME]
    if otlp is not None:
        handlers.append(otlp_handler(otlp))
        services.append(OTLP_SERVICE_NAME)
    server.add_generic_rpc_handlers(handlers)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (*services, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    return server
