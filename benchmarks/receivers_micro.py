"""The receivers' cost per data point / packet in-process: an OTLP export read and mapped
(`ExportMetricsServiceRequest.FromString` + `OtlpReceiver.gather` + validation and
aggregation), and an HTTP JSON body read (`parse_packets` + the same), best of N rounds.

    .venv/bin/python benchmarks/receivers_micro.py [--rounds 7] [--python]

--python forces OTLP's Python mapping (the one used where the C reader declines a request).
Bodies as `rtmonitor bench` sends them: 1,000 points or packets, 100 devices.
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from rtmonitor.ingest import http_json, otlp
from rtmonitor.ingest.columnar import decode_records
from rtmonitor.ingest.validation import Limits, Validator


def otlp_request(points: int, devices: int, timed: bool, attributes: bool) -> bytes:
    resource_metrics = []
    for d in range(devices):
        data_points: list[dict[str, Any]] = []
        for j in range(points // devices):
            point: dict[str, Any] = {"asDouble": float(j)}
            if timed:
                point["timeUnixNano"] = str(1_767_225_600_000_000_000 + j * 1_000_000)
            if attributes:
                point["attributes"] = [{"key": "core", "value": {"stringValue": str(j % 4)}}]
            data_points.append(point)
        resource_metrics.append(
            {
                "resource": {
                    "attributes": [{"key": "device.id", "value": {"stringValue": f"dev-{d}"}}]
                },
                "scopeMetrics": [
                    {"metrics": [{"name": "temperature", "gauge": {"dataPoints": data_points}}]}
                ],
            }
        )
    from google.protobuf import json_format

    request = json_format.ParseDict(
        {"resourceMetrics": resource_metrics}, ExportMetricsServiceRequest()
    )
    return request.SerializeToString()


def http_body(packets: int, devices: int) -> bytes:
    body = [
        {
            "device_id": f"dev-{e % devices}",
            "kind": "reading",
            "values": {"temperature": float(e % 1000)},
            "payload_size": 64,
        }
        for e in range(packets)
    ]
    return json.dumps(body, separators=(",", ":")).encode()


def best(fn: Any, rounds: int, per: int) -> float:
    """Best µs per item over `rounds` rounds of 20 calls."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        times.append((time.perf_counter() - t0) / 20 / per * 1e6)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--python", action="store_true", help="OTLP's Python mapping only")
    args = parser.parse_args()
    limits = SimpleNamespace(limits=SimpleNamespace(device_attribute="device.id"))
    receiver = otlp.OtlpReceiver(limits)  # type: ignore[arg-type]
    gather = getattr(receiver, "gather_python", receiver.gather) if args.python else receiver.gather
    validator = Validator(Limits())
    now = 1_767_225_700_000
    for label, timed, attrs in (
        ("untimed", False, False),
        ("timed", True, False),
        ("timed+attrs", True, True),
    ):
        raw = otlp_request(1000, 100, timed, attrs)

        def run_otlp(raw: bytes = raw) -> None:
            records, _ = gather(ExportMetricsServiceRequest.FromString(raw))
            decode_records(records, validator, now)

        print(f"otlp {label:12} {best(run_otlp, args.rounds, 1000):6.2f} µs/point")
    body = http_body(1000, 100)

    def run_http() -> None:
        decode_records(http_json.parse_packets(body, 10_000), validator, now)

    print(f"http json            {best(run_http, args.rounds, 1000):6.2f} µs/packet")


if __name__ == "__main__":
    main()
