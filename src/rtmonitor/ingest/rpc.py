"""TelemetryIngest's names on the wire, read from the contract itself (the descriptor
compiled from proto/rtmonitor/v1/telemetry.proto): the service name the server registers
and reports in health and reflection, and the method paths clients call. A method renamed
in the .proto fails here, at import, not as UNIMPLEMENTED at run time."""

from __future__ import annotations

from rtmonitor.ingest.v1 import telemetry_pb2

_SERVICE = telemetry_pb2.DESCRIPTOR.services_by_name["TelemetryIngest"]

SERVICE_NAME: str = _SERVICE.full_name  # rtmonitor.v1.TelemetryIngest
# Method names, as the server's method table keys them.
PACKETS_METHOD: str = _SERVICE.methods_by_name["StreamPackets"].name
BATCHES_METHOD: str = _SERVICE.methods_by_name["StreamBatches"].name
# Method paths, as a client calls them (channel.stream_unary(STREAM_PACKETS, ...)).
STREAM_PACKETS = f"/{SERVICE_NAME}/{PACKETS_METHOD}"
STREAM_BATCHES = f"/{SERVICE_NAME}/{BATCHES_METHOD}"
