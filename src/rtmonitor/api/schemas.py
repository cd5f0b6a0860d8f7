"""Response models: they are also the contract shown in /docs."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field, field_serializer


class ValueStats(BaseModel):
    """Statistics of one named reading, over every packet of the device."""

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


class Rate(BaseModel):
    """Rates over the last 10 and 60 complete seconds, summed over every instance."""

    packets_per_s_10s: float
    bytes_per_s_10s: float
    packets_per_s_60s: float
    bytes_per_s_60s: float


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


class Totals(BaseModel):
    """Totals over all devices."""

    devices: int
    packets: int
    bytes: int
    rejected: int = Field(description="Packets refused by validation, all reasons.")
    rejected_by_reason: dict[str, int]
    rate: Rate


class MetricsPage(BaseModel):
    """One page of devices, plus the totals."""

    totals: Totals
    matched: int = Field(description="Devices matching the prefix filter.")
    offset: int
    limit: int
    sort: str
    order: Literal["asc", "desc"]
    devices: list[DeviceMetrics]


class Problem(BaseModel):
    """An error: what went wrong and what to do about it."""

    detail: str


class Readiness(BaseModel):
    ready: bool
    reasons: list[str] = Field(description="Why not ready (empty when ready).")
