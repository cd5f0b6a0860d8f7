"""Response models: they are also the contract shown in /docs. They are built from the
records storage reads (rtmonitor.model), which the Prometheus and SSE renderers share."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_serializer

from rtmonitor.model import (
    RATE_WINDOWS_S,
    DeviceRecord,
    PipelineStats,
    Rates,
    ServiceStats,
    rate_key,
)
from rtmonitor.model import Totals as TotalsRecord


class ValueStats(BaseModel):
    """Statistics of one named reading, over every packet of the device."""

    model_config = ConfigDict(from_attributes=True)  # read from a model.ValueRecord

    count: int
    sum: float | None = Field(
        description="Sum of the readings; null once it left the range of a double "
        "(|sum| > 1.8e308, see `overflow`)."
    )
    min: float
    max: float
    mean: float | None = Field(description="sum / count; null when the sum overflowed.")
    overflow: bool = Field(
        description="The sum left the range of a double: `sum` and `mean` are null from "
        "then on (Prometheus shows +Inf, -Inf or NaN)."
    )

    @field_serializer("sum")
    def _finite_or_null(self, value: float | None) -> float | None:
        """JSON has no infinity: an overflowed sum is null (`overflow` says why)."""
        return value if value is not None and math.isfinite(value) else None

    last: float = Field(description="The reading with the newest device timestamp.")
    last_timestamp_ms: int = Field(description="Device timestamp of `last` (ms since epoch).")


def _rate_model() -> type[BaseModel]:
    """The `Rate` schema, with two fields per window of RATE_WINDOWS_S (defined once)."""
    fields: dict[str, Any] = {}
    for window in RATE_WINDOWS_S:
        fields[rate_key("packets", window)] = (float, ...)
        fields[rate_key("bytes", window)] = (float, ...)
    seconds = " and ".join(map(str, RATE_WINDOWS_S))
    return create_model(
        "Rate",
        __doc__=f"Rates over the last {seconds} complete seconds, summed over every instance.",
        __module__=__name__,
        **fields,
    )


if TYPE_CHECKING:
    Rate = BaseModel
else:
    Rate = _rate_model()


class DeviceMetrics(BaseModel):
    """Everything counted for one device, across every instance."""

    device_id: str
    packets: int
    bytes: int = Field(description="Sum of payload lengths.")
    first_seen: int | None = Field(description="Receive time of the first packet, ms since epoch.")
    last_seen: int | None = Field(description="Receive time of the latest packet, ms since epoch.")
    kinds: dict[str, int] = Field(description="Packets per kind.")
    values: dict[str, ValueStats]
    rate: Rate
    online: bool = Field(description="A packet arrived within the offline threshold.")

    model_config = ConfigDict(json_schema_extra=lambda s: s.update(examples=[DEVICE_EXAMPLE]))


class Totals(BaseModel):
    """Totals over all devices."""

    devices: int
    packets: int
    bytes: int
    rejected: int = Field(description="Packets refused by validation, all reasons.")
    rejected_by_reason: dict[str, int]
    rate: Rate

    model_config = ConfigDict(json_schema_extra=lambda s: s.update(examples=[TOTALS_EXAMPLE]))


class MetricsPage(BaseModel):
    """One page of devices, plus the totals."""

    totals: Totals
    matched: int = Field(description="Devices matching the prefix filter.")
    offset: int
    limit: int
    sort: str
    order: Literal["asc", "desc"]
    devices: list[DeviceMetrics]

    model_config = ConfigDict(json_schema_extra=lambda s: s.update(examples=[PAGE_EXAMPLE]))


class Problem(BaseModel):
    """An error: what went wrong and what to do about it."""

    detail: str

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"detail": "unknown device 'dev-9': no packet from it"}]}
    )


class Readiness(BaseModel):
    ready: bool
    reasons: list[str] = Field(description="Why not ready (empty when ready).")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"ready": True, "reasons": []},
                {"ready": False, "reasons": ["Redis is unreachable: Connection refused"]},
            ]
        }
    )


def device_metrics(record: DeviceRecord, online: bool) -> DeviceMetrics:
    """A device's JSON object, from its record."""
    return DeviceMetrics.model_validate(
        {
            "device_id": record.device_id,
            "packets": record.packets,
            "bytes": record.bytes,
            "first_seen": record.first_seen,
            "last_seen": record.last_seen,
            "kinds": record.kinds,
            "values": record.values,
            "rate": rates(record.rate),
            "online": online,
        }
    )


def totals(record: TotalsRecord) -> Totals:
    """The totals' JSON object, from their record."""
    return Totals(
        devices=record.devices,
        packets=record.packets,
        bytes=record.bytes,
        rejected=record.rejected,
        rejected_by_reason=record.rejected_by_reason,
        rate=rates(record.rate),
    )


def rates(record: Rates) -> Rate:
    return Rate.model_validate(record.to_json())


@dataclass(frozen=True, slots=True)
class JsonRender:
    """Records to their JSON objects, the same for GET /metrics pages and GET /stream
    events; `online` is judged against the offline threshold at rendering time."""

    offline_after_s: float

    def device(self, record: DeviceRecord) -> DeviceMetrics:
        online = record.online(time.time() * 1000, self.offline_after_s)
        return device_metrics(record, online)

    def device_json(self, record: DeviceRecord) -> str:
        return self.device(record).model_dump_json()

    def totals_json(self, record: TotalsRecord) -> str:
        return totals(record).model_dump_json()


# --- what /docs and /openapi.json show: examples and the responses every route shares ----


def _rate_example(packets_per_s: float, bytes_per_s: float) -> dict[str, float]:
    example: dict[str, float] = {}
    for window in RATE_WINDOWS_S:
        example[rate_key("packets", window)] = packets_per_s
        example[rate_key("bytes", window)] = bytes_per_s
    return example


DEVICE_EXAMPLE: dict[str, Any] = {
    "device_id": "dev-00042",
    "packets": 1000,
    "bytes": 64000,
    "first_seen": 1767225600000,
    "last_seen": 1767225660000,
    "kinds": {"reading": 900, "heartbeat": 100},
    "values": {
        "temp": {
            "count": 900,
            "sum": 19350.0,
            "min": 18.5,
            "max": 24.0,
            "mean": 21.5,
            "overflow": False,
            "last": 21.0,
            "last_timestamp_ms": 1767225659990,
        }
    },
    "rate": _rate_example(16.7, 1066.7),
    "online": True,
}
TOTALS_EXAMPLE: dict[str, Any] = {
    "devices": 100,
    "packets": 100000,
    "bytes": 6400000,
    "rejected": 2,
    "rejected_by_reason": {"invalid_device_id": 2},
    "rate": _rate_example(1666.7, 106666.7),
}
PAGE_EXAMPLE: dict[str, Any] = {
    "totals": TOTALS_EXAMPLE,
    "matched": 100,
    "offset": 0,
    "limit": 1,
    "sort": "device_id",
    "order": "asc",
    "devices": [DEVICE_EXAMPLE],
}
SCRAPE_EXAMPLE = (
    "# HELP rtm_packets_total Packets counted, all devices.\n"
    "# TYPE rtm_packets_total counter\n"
    "rtm_packets_total 100000\n"
    'rtm_device_packets_total{device_id="dev-00042"} 1000\n'
)
STREAM_EXAMPLE = "event: update\ndata: {}\n\n".format(
    json.dumps(
        {"totals": TOTALS_EXAMPLE, "pending": 0, "lagged": False, "devices": [DEVICE_EXAMPLE]},
        separators=(",", ":"),
    )
)

# GET /stats of a fresh single process (its pipeline sections are all zero)
STATS_EXAMPLE = ServiceStats(
    instance_id="5f0c9a1e",
    uptime_s=12.5,
    ready=True,
    not_ready_reasons=[],
    instances={},
    total=PipelineStats(),
).to_json()

# A Redis outage: every read that needs Redis answers this (app.py:redis_unavailable).
UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {
        "model": Problem,
        "description": "Redis is unavailable: retry after the number of seconds in Retry-After.",
        "headers": {
            "Retry-After": {
                "description": "Seconds to wait before retrying.",
                "schema": {"type": "integer", "example": 1},
            }
        },
        "content": {
            "application/json": {
                "example": {"detail": "Redis is unavailable (ConnectionError); retry shortly"}
            }
        },
    }
}

# GET /stream: each event's `data` is one JSON object (OpenAPI 3.1 describes an event
# stream one event at a time; contentSchema describes what `data` holds).
STREAM_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"const": "update"},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {
                "type": "object",
                "required": ["totals", "pending", "lagged", "devices"],
                "properties": {
                    "totals": {
                        "anyOf": [{"$ref": "#/components/schemas/Totals"}, {"type": "null"}]
                    },
                    "pending": {
                        "type": "integer",
                        "description": "Changed devices that did not fit in this event; "
                        "they follow at once.",
                    },
                    "lagged": {
                        "type": "boolean",
                        "description": "Some changes could not be kept: re-read GET /metrics.",
                    },
                    "devices": {
                        "type": "array",
                        "items": {"$ref": "#/components/schemas/DeviceMetrics"},
                    },
                },
            },
        },
    },
}


# --- the HTTP receivers (POST /v1/telemetry): documentation of what ingest/http_json.py reads


class TelemetryPacket(BaseModel):
    """One packet of POST /v1/telemetry (the body is one of these or a list of them)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "device_id": "sensor-1",
                "kind": "env",
                "ts": 1767225600000,
                "values": {"temp": 21.5, "humidity": 40},
                "payload_size": 12,
            }
        },
    )

    device_id: str = Field(description="1-128 characters of A-Z a-z 0-9 . _ : @ / -")
    kind: str = Field("unspecified", description="1-64 characters of the same alphabet.")
    ts: int = Field(0, ge=0, description="Device time, ms since the epoch; 0: receive time.")
    values: dict[str, float] = Field(
        default_factory=dict, description="Named readings (finite numbers)."
    )
    payload_size: int = Field(0, ge=0, description="Bytes counted for this packet.")


class TelemetryAnswer(BaseModel):
    """What became of a body's packets, once the accepted ones are committed."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"accepted": 2, "rejected": {"invalid_device_id": 1}, "duplicate": False}]
        }
    )

    accepted: int
    rejected: dict[str, int] = Field(description="Packets refused by validation, by reason.")
    duplicate: bool = Field(
        description="The Idempotency-Key was committed already: not counted again."
    )


class IngestRefusal(BaseModel):
    """A body refused whole."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "detail": "body[0].ts: must be a non-negative integer",
                    "reason": "invalid_body",
                    "field": "body[0].ts",
                }
            ]
        }
    )

    detail: str
    reason: str
    field: str | None = Field(None, description="The bad field (422), as a path into the body.")
