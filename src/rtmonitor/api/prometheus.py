"""Prometheus exposition of the counts, rates and the pipeline's self-metrics.

GET /metrics answers in the Prometheus text format (0.0.4) or OpenMetrics when the scraper
asks for it in Accept — which is what a default Prometheus scrape config does — and JSON to
everyone else. Per-device series are limited to the busiest devices (by packets), so that
a flood of devices cannot flood Prometheus, and to the series that fit in
--prometheus-max-series, so that fat devices (many kinds and value names) cannot either.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

from rtmonitor.api.deps import ApiStats
from rtmonitor.api.loop import PROBE_INTERVAL_S
from rtmonitor.model import (
    RATE_WINDOWS_S,
    DeviceRecord,
    PendingStats,
    ServiceStats,
    Totals,
    flush_steps,
)

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
TEXT = "text/plain; version=0.0.4; charset=utf-8"
STATS = ("sum", "min", "max", "last")
# Series of every device: packets, bytes, packets/s and bytes/s per rate window, online,
# last_seen.
DEVICE_BASE_SERIES = 4 + 2 * len(RATE_WINDOWS_S)


def device_series(device: DeviceRecord) -> int:
    """The series `device` adds to a scrape: DEVICE_BASE_SERIES, one per kind, and per value
    name its readings and STATS."""
    return DEVICE_BASE_SERIES + len(device.kinds) + (1 + len(STATS)) * len(device.values)


def negotiate(accept: str | None, explicit: str | None) -> str | None:
    """The exposition content type to answer with, or None for JSON."""
    if explicit == "openmetrics":
        return OPENMETRICS
    if explicit == "prometheus":
        return TEXT
    if not accept:
        return None
    best: tuple[float, str | None] = (0.0, None)
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        kind = {
            "application/openmetrics-text": OPENMETRICS,
            "text/plain": TEXT,
            "application/json": None,
        }.get(media, "other")
        if kind != "other" and q > best[0]:
            best = (q, kind)
    return best[1]


def escape(value: str) -> str:
    """A label value: backslash, double quote and newline escaped (both formats)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Writer:
    def __init__(self, openmetrics: bool) -> None:
        self.openmetrics = openmetrics
        self.lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[tuple[dict[str, str], float]],
    ) -> None:
        """One metric family; counters get the `_total` suffix on their samples."""
        sample_name = f"{name}_total" if kind == "counter" else name
        self._head(name if self.openmetrics else sample_name, kind, help_text)
        for labels, value in samples:
            self._sample(sample_name, labels, value)

    def histogram(
        self, name: str, help_text: str, buckets: dict[str, int], total: float, count: int
    ) -> None:
        """One histogram family: `buckets` by upper bound (cumulative, the last "+Inf")."""
        self._head(name, "histogram", help_text)
        for le, n in buckets.items():
            self._sample(f"{name}_bucket", {"le": le}, n)
        self._sample(f"{name}_sum", {}, total)
        self._sample(f"{name}_count", {}, count)

    def _head(self, family: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {family} {help_text}")
        self.lines.append(f"# TYPE {family} {kind}")

    def _sample(self, name: str, labels: dict[str, str], value: float) -> None:
        label_text = ",".join(f'{k}="{escape(v)}"' for k, v in labels.items())
        braces = f"{{{label_text}}}" if label_text else ""
        self.lines.append(f"{name}{braces} {_number(value)}")

    def render(self) -> str:
        if self.openmetrics:
            self.lines.append("# EOF")
        return "\n".join(self.lines) + "\n"


def exposition(
    totals: Totals,
    devices: list[DeviceRecord],
    stats: ServiceStats,
    api: ApiStats,
    *,
    offline_after_s: float,
    openmetrics: bool,
    omitted: dict[str, int] | None = None,
) -> str:
    """Render the exposition for `devices` (already limited) and the totals; `omitted`:
    devices left out of this scrape, by the limit that left them out."""
    w = _Writer(openmetrics)
    _total_metrics(w, totals)
    _device_metrics(w, devices, offline_after_s)
    _value_metrics(w, devices)
    w.family(
        "rtm_scrape_series",
        "gauge",
        "Per-device series in this scrape (at most --prometheus-max-series).",
        [({}, sum(device_series(d) for d in devices))],
    )
    w.family(
        "rtm_scrape_devices_omitted",
        "gauge",
        "Devices without series of their own in this scrape, by the limit that left them out "
        "(--prometheus-max-devices or --prometheus-max-series).",
        [({"reason": r}, n) for r, n in (omitted or {}).items()],
    )
    _self_metrics(w, stats)
    _process_metrics(w, stats, api)
    _auth_metrics(w, stats)
    return w.render()


def _total_metrics(w: _Writer, totals: Totals) -> None:
    """All devices and instances together, as Redis has them."""
    w.family("rtm_packets", "counter", "Packets counted, all devices and instances.",
             [({}, totals.packets)])  # fmt: skip
    w.family("rtm_bytes", "counter", "Payload bytes counted, all devices and instances.",
             [({}, totals.bytes)])  # fmt: skip
    w.family("rtm_devices", "gauge", "Devices known to Redis.", [({}, totals.devices)])
    w.family(
        "rtm_rejected_packets",
        "counter",
        "Packets refused by validation, by reason.",
        [({"reason": r}, n) for r, n in totals.rejected_by_reason.items()],
    )
    w.family(
        "rtm_packets_per_second",
        "gauge",
        "Packets per second over a trailing window, all devices and instances.",
        [({"window": f"{s}s"}, totals.rate.packets_per_s[s]) for s in RATE_WINDOWS_S],
    )


def _device_metrics(w: _Writer, devices: list[DeviceRecord], offline_after_s: float) -> None:
    """Each device's counts, rates and status."""
    now_ms = time.time() * 1000
    dev = [({"device": d.device_id}, d) for d in devices]
    w.family("rtm_device_packets", "counter", "Packets counted per device.",
             [(lab, d.packets) for lab, d in dev])  # fmt: skip
    w.family("rtm_device_bytes", "counter", "Payload bytes counted per device.",
             [(lab, d.bytes) for lab, d in dev])  # fmt: skip
    w.family(
        "rtm_device_kind_packets",
        "counter",
        "Packets per device and kind.",
        [({**lab, "kind": k}, n) for lab, d in dev for k, n in d.kinds.items()],
    )
    _rate_family(w, "packets", "Packets", [(lab, d.rate.packets_per_s) for lab, d in dev])
    _rate_family(w, "bytes", "Payload bytes", [(lab, d.rate.bytes_per_s) for lab, d in dev])
    w.family(
        "rtm_device_online",
        "gauge",
        f"1 if the device sent a packet in the last {offline_after_s:g} s.",
        [(lab, int(d.online(now_ms, offline_after_s))) for lab, d in dev],
    )
    w.family(
        "rtm_device_last_seen_seconds",
        "gauge",
        "Receive time of the device's latest packet (Unix seconds).",
        [(lab, (d.last_seen or 0) / 1000) for lab, d in dev],
    )


def _value_metrics(w: _Writer, devices: list[DeviceRecord]) -> None:
    """Each device's readings, by value name."""
    values = [({"device": d.device_id, "name": n}, v) for d in devices for n, v in d.values.items()]
    w.family("rtm_device_value_readings", "counter", "Readings per device and value name.",
             [(lab, v.count) for lab, v in values])  # fmt: skip
    w.family(
        "rtm_device_value",
        "gauge",
        "Statistics of the readings: stat = sum, min, max, or last (newest device timestamp).",
        [({**lab, "stat": stat}, getattr(v, stat)) for lab, v in values for stat in STATS],
    )


def _rate_family(
    w: _Writer, what: str, unit: str, per_device: list[tuple[dict[str, str], dict[int, float]]]
) -> None:
    """Per device, a rate by window (RATE_WINDOWS_S)."""
    w.family(
        f"rtm_device_{what}_per_second",
        "gauge",
        f"{unit} per second per device over a trailing window.",
        [({**lab, "window": f"{s}s"}, per_s[s])
         for lab, per_s in per_device for s in RATE_WINDOWS_S],
    )  # fmt: skip


def _pending_families(w: _Writer, pending: PendingStats) -> None:
    """What the pipelines hold uncommitted, and their per-device budget."""
    w.family("rtm_pending_packets", "gauge", "Received but uncommitted packets.",
             [({}, pending.packets + pending.inflight_packets)])  # fmt: skip
    w.family("rtm_pending_device_entries", "gauge",
             "Uncommitted per-device deltas (one per device per pending batch).",
             [({}, pending.device_entries + pending.inflight_device_entries)])  # fmt: skip
    w.family("rtm_pending_device_entry_budget", "gauge",
             "The per-device deltas the pipelines may hold before receivers are pushed back: "
             "--max-pending-devices, or fewer by --max-pending-seconds.",
             [({}, pending.device_entry_budget)])  # fmt: skip


def _self_metrics(w: _Writer, stats: ServiceStats) -> None:
    """The ingest instances' pipelines, summed (every process on one Redis reports the
    same sum: aggregate replicas' scrapes with max, not sum)."""
    total = stats.total
    flush, ingest = total.flush, total.ingest
    w.family("rtm_up", "gauge", "1 if this instance is ready.", [({}, int(stats.ready))])
    w.family("rtm_ingest_instances", "gauge",
             "Ingest processes that published their figures (every --workers worker, every "
             "replica on this Redis).", [({}, len(stats.instances))])  # fmt: skip
    w.family("rtm_queue_packets", "gauge", "Packets waiting in the ingest queues.",
             [({}, total.queue.packets)])  # fmt: skip
    _pending_families(w, total.pending)
    w.family("rtm_active_streams", "gauge", "Open gRPC streams.",
             [({}, ingest.active_streams)])  # fmt: skip
    w.family(
        "rtm_instance_rejected_packets",
        "counter",
        "Packets refused by the running ingest instances since they started, by reason.",
        [({"reason": r}, n) for r, n in total.rejected_by_reason.items()],
    )
    w.family(
        "rtm_refused_streams",
        "counter",
        "gRPC streams refused by a limit, by reason.",
        [({"reason": r}, n) for r, n in ingest.streams_refused_by_reason.items()],
    )
    w.family(
        "rtm_refused_messages",
        "counter",
        "Whole messages refused (gRPC batches, OTLP and HTTP JSON requests; not counted "
        "as packets), by reason.",
        [({"reason": r}, n) for r, n in ingest.messages_refused_by_reason.items()],
    )
    w.family("rtm_inflight_message_bytes", "gauge",
             "Bytes of received gRPC messages not yet processed (--max-inflight-message-bytes).",
             [({}, ingest.inflight_message_bytes)])  # fmt: skip
    w.family("rtm_inflight_message_waits", "counter",
             "Times a stream waited for --max-inflight-message-bytes to free up.",
             [({}, ingest.inflight_message_waits)])  # fmt: skip
    w.family("rtm_mqtt_connected", "gauge",
             "MQTT bridges connected and subscribed to their broker (--mqtt-url).",
             [({}, ingest.mqtt_connected)])  # fmt: skip
    w.family("rtm_mqtt_messages", "counter", "MQTT messages received by the bridges.",
             [({}, ingest.mqtt_messages)])  # fmt: skip
    w.family("rtm_mqtt_messages_acked", "counter",
             "MQTT messages acknowledged (PUBACK, sent after their commit).",
             [({}, ingest.mqtt_messages_acked)])  # fmt: skip
    w.family("rtm_mqtt_messages_unacked", "gauge",
             "MQTT messages received and not yet acknowledged.",
             [({}, ingest.mqtt_messages_unacked)])  # fmt: skip
    for name, value, help_text in (
        ("rtm_flushes", flush.flushes, "Flushes committed to Redis."),
        ("rtm_committed_packets", flush.packets_committed, "Packets committed to Redis."),
        ("rtm_redis_errors", flush.commit_errors, "Failed attempts to reach Redis."),
        ("rtm_redis_recoveries", flush.redis_recoveries, "Times Redis came back after failing."),
        (
            "rtm_duplicate_batches",
            flush.duplicate_batches,
            "Resent batches skipped (exactly-once).",
        ),
        ("rtm_abandoned_packets", flush.packets_abandoned, "Packets not committed by shutdown."),
        (
            "rtm_record_full_drops",
            flush.record_full_drops,
            "New kinds, value names and rate buckets full device records could not take.",
        ),
    ):
        w.family(name, "counter", help_text, [({}, value)])
    w.family("rtm_last_flush_seconds", "gauge", "Duration of the latest flush.",
             [({}, flush.last_flush_seconds)])  # fmt: skip
    w.family(
        "rtm_flush_step_seconds",
        "counter",
        "Seconds flushes spent in each step: encode (this process), prepare (batch ids and "
        "journal), apply (the merges) and finalize; retries included.",
        [({"step": step}, seconds) for step, seconds in flush_steps(flush).items()],
    )
    w.family("rtm_journals_recovered", "counter", "Dead instances' flushes replayed.",
             [({}, total.recovery.journals_recovered)])  # fmt: skip


def _process_metrics(w: _Writer, stats: ServiceStats, api: ApiStats) -> None:
    """This process's own parts: the embedded Redis, GET /stream, HTTP connections."""
    if (embedded := stats.embedded_redis) is not None:
        w.family("rtm_embedded_redis_restarts", "counter",
                 "Times the embedded Redis died and was restarted.",
                 [({}, embedded["restarts"])])  # fmt: skip
        w.family("rtm_embedded_redis_up", "gauge", "1 if the embedded Redis is running.",
                 [({}, int(embedded["up"]))])  # fmt: skip
    w.family("rtm_stream_subscribers", "gauge", "Open GET /stream clients on this instance.",
             [({}, api.stream.subscribers)])  # fmt: skip
    w.family(
        "rtm_stream_disconnected_slow",
        "counter",
        "GET /stream clients closed because a write stayed blocked (--stream-send-timeout).",
        [({}, api.stream.disconnected_slow)],
    )
    if (lag := api.event_loop) is not None:
        w.histogram(
            "rtm_event_loop_lag_seconds",
            "How late this process's event loop ran a timer due every "
            f"{PROBE_INTERVAL_S:g} s: what a request arriving then waits before its code runs.",
            {le if le == "+Inf" else _number(float(le) / 1000): n
             for le, n in lag.lag_ms_buckets.items()},
            lag.lag_ms_sum / 1000,
            lag.probes,
        )  # fmt: skip
    http = stats.http or {}
    refused = dict(api.refused_by_reason)
    if http:
        refused["max_connections"] = http.get("refused", 0)
    w.family(
        "rtm_http_refused",
        "counter",
        "HTTP requests refused by a limit on this instance, by reason.",
        [({"reason": r}, n) for r, n in sorted(refused.items())],
    )
    if http:
        w.family("rtm_http_connections", "gauge", "Open HTTP connections on this instance.",
                 [({}, http.get("connections", 0))])  # fmt: skip
        w.family(
            "rtm_http_closed_connections",
            "counter",
            "HTTP connections closed by the service: idle past --http-idle-timeout, the "
            "longest-idle one evicted at --http-max-connections, or reset for not reading "
            "past --http-max-unsent-bytes.",
            [({"reason": "idle"}, http.get("idle_closed", 0)),
             ({"reason": "evicted"}, http.get("evicted", 0)),
             ({"reason": "stalled"}, http.get("stalled_reset", 0))],
        )  # fmt: skip


def _auth_metrics(w: _Writer, stats: ServiceStats) -> None:
    """Refused tokens and out-of-prefix packets, by surface, reason and token name: the
    ingest side summed over the instances, the HTTP side this process's."""
    samples: list[tuple[dict[str, str], float]] = []
    auth = stats.auth or {}
    sides = [("ingest", stats.total.ingest.auth_refused)]
    sides.append(("http", auth.get("refused", {}).get("http", {})))
    for surface, counts in sides:
        for key, n in sorted(counts.items()):
            reason, _, token = key.partition(":")
            samples.append(({"surface": surface, "reason": reason, "token": token}, n))
    w.family(
        "rtm_auth_refused",
        "counter",
        "Requests, streams and packets refused by authentication or authorization, by "
        "surface, reason and token name (`-`: no known token); device_not_permitted counts "
        "packets.",
        samples,
    )
    if auth.get("enabled"):
        w.family("rtm_auth_tokens", "gauge", "Tokens in force (the auth file).",
                 [({}, len(auth.get("tokens", ())))])  # fmt: skip
        w.family("rtm_auth_reload_errors", "counter",
                 "Auth file reloads refused (the previous tokens stayed in force).",
                 [({}, auth.get("reload_errors", 0))])  # fmt: skip
