"""Self-metrics of one ingest process, as typed records: what GET /stats and the Prometheus
self-metrics render, what every ingest process publishes to Redis, and their sum."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rtmonitor.pipeline.flusher import FlushStats
from rtmonitor.pipeline.recovery import RecoveryStats

R = TypeVar("R")


@dataclass(frozen=True, slots=True, kw_only=True)
class IngestStats:
    """The receivers' figures (gRPC streams, message budget, device slots)."""

    active_streams: int = 0
    streams_refused: int = 0
    streams_refused_by_reason: dict[str, int] = field(default_factory=dict)
    messages_refused_by_reason: dict[str, int] = field(default_factory=dict)
    inflight_message_bytes: int = 0
    streams_waiting_for_bytes: int = 0
    inflight_message_waits: int = 0
    streams_idle_closed: int = 0
    devices_known: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueStats:
    packets: int = 0
    items: int = 0
    max_packets: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingStats:
    """Received but not yet committed: in the aggregator, and in the flush under way."""

    packets: int = 0
    devices: int = 0
    batches: int = 0
    inflight_packets: int = 0
    device_entries: int = 0
    inflight_device_entries: int = 0
    max_device_entries: int = 0
    max_pending_packets: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineStats:
    """One ingest process's pipeline (or the sum of several): queue, pending deltas,
    flushes, recovery, packets rejected by reason, and its receivers' figures."""

    ingest: IngestStats = field(default_factory=IngestStats)
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    queue: QueueStats = field(default_factory=QueueStats)
    pending: PendingStats = field(default_factory=PendingStats)
    flush: FlushStats = field(default_factory=FlushStats)
    recovery: RecoveryStats = field(default_factory=RecoveryStats)

    def to_json(self) -> dict[str, Any]:
        """The /stats sections (the shape GET /stats has always had)."""
        return {
            "ingest": {
                **dataclasses.asdict(self.ingest),
                "rejected_by_reason": dict(sorted(self.rejected_by_reason.items())),
            },
            "queue": dataclasses.asdict(self.queue),
            "pending": dataclasses.asdict(self.pending),
            "flush": dataclasses.asdict(self.flush),
            "recovery": dataclasses.asdict(self.recovery),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> PipelineStats:
        """The inverse of to_json(); fields it does not know (a newer replica's) are
        ignored, missing ones take their default (an older replica's)."""
        ingest = dict(doc.get("ingest") or {})
        rejected = ingest.pop("rejected_by_reason", {})
        return cls(
            ingest=_build(IngestStats, ingest),
            rejected_by_reason=dict(rejected),
            queue=_build(QueueStats, doc.get("queue")),
            pending=_build(PendingStats, doc.get("pending")),
            flush=_build(FlushStats, doc.get("flush")),
            recovery=_build(RecoveryStats, doc.get("recovery")),
        )

    @classmethod
    def total(cls, parts: Iterable[PipelineStats]) -> PipelineStats:
        """The sum over several processes: counts and gauges add up (limits too: the
        capacity of all of them); the latest flush's duration, and any Redis error."""
        items = list(parts)
        flushes = [p.flush for p in items]
        latest = max(flushes, key=lambda f: f.last_flush_ms, default=FlushStats())
        flush = _sum(FlushStats, flushes)
        flush.last_flush_ms = latest.last_flush_ms
        flush.last_flush_seconds = latest.last_flush_seconds
        flush.redis_error = next((f.redis_error for f in flushes if f.redis_error), None)
        return cls(
            ingest=_sum(IngestStats, [p.ingest for p in items]),
            rejected_by_reason=_add_counts(p.rejected_by_reason for p in items),
            queue=_sum(QueueStats, [p.queue for p in items]),
            pending=_sum(PendingStats, [p.pending for p in items]),
            flush=flush,
            recovery=_sum(RecoveryStats, [p.recovery for p in items]),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceStats:
    """What an ingest process publishes next to its heartbeat: who it is, and its stats."""

    instance_id: str
    pid: int
    uptime_s: float
    stats: PipelineStats

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "uptime_s": self.uptime_s, **self.stats.to_json()}

    @classmethod
    def from_json(cls, instance_id: str, doc: Mapping[str, Any]) -> InstanceStats:
        return cls(
            instance_id=instance_id,
            pid=int(doc.get("pid") or 0),
            uptime_s=float(doc.get("uptime_s") or 0.0),
            stats=PipelineStats.from_json(doc),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceStats:
    """GET /stats of one process: its readiness, the ingest instances sharing its Redis
    (this process's own, if it ingests, and the published ones) and their sum, and the
    sections of the parts this process runs (HTTP connections, the embedded Redis)."""

    instance_id: str | None  # this process's ingest instance, if it ingests
    uptime_s: float
    ready: bool
    not_ready_reasons: list[str]
    instances: dict[str, InstanceStats]
    total: PipelineStats
    instances_error: str | None = None  # why the published instances could not be read
    http: dict[str, Any] | None = None
    embedded_redis: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "uptime_s": self.uptime_s,
            "ready": self.ready,
            "not_ready_reasons": self.not_ready_reasons,
            # the pipeline sections are the sum over "instances"
            **self.total.to_json(),
            "instances": {i: s.to_json() for i, s in sorted(self.instances.items())},
            "instances_error": self.instances_error,
            "http": self.http,
            "embedded_redis": self.embedded_redis,
        }


def _build(cls: type[R], doc: Mapping[str, Any] | None) -> R:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in (doc or {}).items() if k in names})


def _sum(cls: type[R], items: list[R]) -> R:
    """Field by field: numbers add up, counts by reason add up key by key; other fields
    (text) keep their default."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        column = [getattr(item, f.name) for item in items]
        if f.type in (int, float, "int", "float"):
            values[f.name] = sum(column)
        elif f.type in (dict[str, int], "dict[str, int]"):
            values[f.name] = _add_counts(column)
    return cls(**values)


def _add_counts(counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for c in counts:
        total.update(c)
    return dict(sorted(total.items()))
