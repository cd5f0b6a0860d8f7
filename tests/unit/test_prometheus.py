"""The exposition format: negotiation, escaping, and what promtool would reject."""

from __future__ import annotations

import json

from rtmonitor.api.deps import ApiStats
from rtmonitor.api.loop import LoopLag
from rtmonitor.api.prometheus import OPENMETRICS, TEXT, escape, exposition, negotiate
from rtmonitor.api.stream import StreamStats
from rtmonitor.model import (
    RATE_WINDOWS_S,
    DeviceRecord,
    FlushStats,
    IngestStats,
    InstanceStats,
    PendingStats,
    PipelineStats,
    Rates,
    ServiceStats,
    Totals,
    ValueRecord,
)

PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def test_negotiation() -> None:
    assert negotiate(PROMETHEUS_ACCEPT, None) == OPENMETRICS
    assert negotiate("text/plain;version=0.0.4;q=0.5,*/*;q=0.1", None) == TEXT
    assert negotiate("*/*", None) is None  # curl
    assert negotiate("text/html,application/xhtml+xml,*/*;q=0.8", None) is None  # a browser
    assert negotiate("application/json", None) is None
    assert negotiate(None, "prometheus") == TEXT
    assert negotiate("*/*", "openmetrics") == OPENMETRICS


def test_label_values_are_escaped() -> None:
    assert escape('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


NO_RATES = Rates(
    packets_per_s=dict.fromkeys(RATE_WINDOWS_S, 0.0), bytes_per_s=dict.fromkeys(RATE_WINDOWS_S, 0.0)
)


def _value(x: float) -> ValueRecord:
    return ValueRecord(count=1, sum=x, min=x, max=x, last=x, last_timestamp_ms=0)


def _device(device_id: str, **fields: object) -> DeviceRecord:
    record = {"packets": 1, "bytes": 0, "first_seen": 0, "last_seen": 0, "kinds": {},
              "values": {}, "rate": NO_RATES, **fields}  # fmt: skip
    return DeviceRecord(device_id=device_id, **record)  # type: ignore[arg-type]


def _totals(**fields: object) -> Totals:
    record = {"packets": 0, "bytes": 0, "devices": 0, "rejected_by_reason": {},
              "rate": NO_RATES, **fields}  # fmt: skip
    return Totals(**record)  # type: ignore[arg-type]


def _render(openmetrics: bool) -> str:
    rate = Rates(packets_per_s={10: 0.3, 60: 0.05}, bytes_per_s={10: 3.0, 60: 0.5})
    device = _device(
        'we"ird\\id',
        packets=3,
        bytes=30,
        kinds={"reading": 3},
        values={"t": ValueRecord(count=3, sum=1.5, min=-1.0, max=2.0, last=0.5,
                                 last_timestamp_ms=0)},
        rate=rate,
    )  # fmt: skip
    totals = _totals(
        packets=3, bytes=30, devices=1, rejected_by_reason={"empty_device_id": 2}, rate=rate
    )
    stats = _stats(PipelineStats(ingest=IngestStats(active_streams=1), flush=FlushStats(flushes=4)))
    return exposition(
        totals, [device], stats, ApiStats(), offline_after_s=30, openmetrics=openmetrics
    )


def _stats(*instances: PipelineStats) -> ServiceStats:
    """The self-metrics of a process reporting these ingest instances."""
    records = {
        f"i{n}": InstanceStats(instance_id=f"i{n}", pid=n, uptime_s=1.0, stats=s)
        for n, s in enumerate(instances)
    }
    return ServiceStats(
        instance_id=None,
        uptime_s=1.0,
        ready=True,
        not_ready_reasons=[],
        instances=records,
        total=PipelineStats.total(instances),
    )


def test_self_metrics_are_the_sum_of_the_instances() -> None:
    a = PipelineStats(
        rejected_by_reason={"empty_device_id": 1},
        flush=FlushStats(
            flushes=2, packets_committed=10, last_flush_ms=5, last_flush_seconds=0.5,
            encode_seconds=0.25, apply_seconds=1.5,
        ),
    )  # fmt: skip
    b = PipelineStats(
        rejected_by_reason={"empty_device_id": 2, "too_many_devices": 1},
        flush=FlushStats(
            flushes=3, packets_committed=7, last_flush_ms=9, last_flush_seconds=0.1,
            apply_seconds=2.0,
        ),
    )  # fmt: skip
    stats = _stats(a, b)
    text = exposition(_totals(), [], stats, ApiStats(), offline_after_s=30, openmetrics=False)
    assert "rtm_flushes_total 5" in text
    assert "rtm_committed_packets_total 17" in text
    assert "rtm_last_flush_seconds 0.1" in text  # the latest flush's
    # the time in each step adds up over the instances
    assert 'rtm_flush_step_seconds_total{step="apply"} 3.5' in text
    assert 'rtm_flush_step_seconds_total{step="encode"} 0.25' in text
    assert 'rtm_flush_step_seconds_total{step="finalize"} 0.0' in text
    assert 'rtm_instance_rejected_packets_total{reason="empty_device_id"} 3' in text
    assert "rtm_ingest_instances 2" in text
    # /stats: the sum at the top, and each instance
    doc = stats.to_json()
    assert doc["flush"]["packets_committed"] == 17
    assert doc["ingest"]["rejected_by_reason"] == {"empty_device_id": 3, "too_many_devices": 1}
    assert doc["instances"]["i1"]["flush"]["flushes"] == 3
    # what an instance publishes reads back as it was
    published = InstanceStats.from_json("i1", json.loads(json.dumps(doc["instances"]["i1"])))
    assert published == stats.instances["i1"]


def test_the_pending_budgets_are_summed_and_an_older_replicas_is_its_memory_budget() -> None:
    a = PipelineStats(
        pending=PendingStats(
            device_entries=5,
            inflight_device_entries=7,
            max_device_entries=10,
            device_entry_budget=4,
        )
    )
    older = PipelineStats.to_json(PipelineStats(pending=PendingStats(max_device_entries=10)))
    del older["pending"]["device_entry_budget"]  # published before the time budget
    b = PipelineStats.from_json(older)
    assert b.pending.device_entry_budget == 10
    stats = _stats(a, b)
    text = exposition(_totals(), [], stats, ApiStats(), offline_after_s=30, openmetrics=False)
    assert "rtm_pending_device_entries 12" in text.splitlines()
    assert "rtm_pending_device_entry_budget 14" in text.splitlines()


def test_text_format() -> None:
    text = _render(False)
    assert "# TYPE rtm_device_packets_total counter" in text
    assert 'rtm_device_packets_total{device="we\\"ird\\\\id"} 3' in text
    assert 'rtm_rejected_packets_total{reason="empty_device_id"} 2' in text
    assert 'rtm_device_value{device="we\\"ird\\\\id",name="t",stat="max"} 2.0' in text
    assert "rtm_device_online" in text and not text.rstrip().endswith("# EOF")


def test_the_event_loops_lag_is_a_histogram_in_seconds() -> None:
    lag = LoopLag()
    for ms in (0.5, 3.0, 250.0):
        lag.record(ms)
    api = ApiStats(event_loop=lag.stats())
    lines = exposition(
        _totals(), [], _stats(), api, offline_after_s=30, openmetrics=True
    ).splitlines()
    assert "# TYPE rtm_event_loop_lag_seconds histogram" in lines
    assert 'rtm_event_loop_lag_seconds_bucket{le="0.001"} 1' in lines
    assert 'rtm_event_loop_lag_seconds_bucket{le="0.005"} 2' in lines
    assert 'rtm_event_loop_lag_seconds_bucket{le="0.2"} 2' in lines
    assert 'rtm_event_loop_lag_seconds_bucket{le="0.5"} 3' in lines
    assert 'rtm_event_loop_lag_seconds_bucket{le="+Inf"} 3' in lines
    assert "rtm_event_loop_lag_seconds_sum 0.2535" in lines
    assert "rtm_event_loop_lag_seconds_count 3" in lines


def test_openmetrics_format() -> None:
    text = _render(True)
    assert "# TYPE rtm_device_packets counter" in text  # the family, without _total
    assert 'rtm_device_packets_total{device="we\\"ird\\\\id"} 3' in text
    assert text.endswith("# EOF\n")


def test_every_series_the_grafana_dashboard_queries_is_exported() -> None:
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    dashboard = json.loads((root / "deploy/grafana/dashboards/rtmonitor.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\brtm_[a-z_]+", target["expr"])
    }
    queried |= set(re.findall(r"\brtm_[a-z_]+", json.dumps(dashboard["templating"])))
    exported = {line.split("{")[0].split(" ")[0] for line in _render(False).splitlines()
                if line and not line.startswith("#")}  # fmt: skip
    assert queried and queried <= exported, queried - exported


def test_device_series_counts_what_a_device_adds_and_omitted_devices_are_reported() -> None:
    from rtmonitor.api.prometheus import device_series

    stats = _stats(PipelineStats())
    api = ApiStats(refused_by_reason={"stream_subscribers": 2}, stream=StreamStats(subscribers=1))
    device = _device(
        "fat",
        kinds={f"k{i}": 1 for i in range(3)},
        values={f"v{i}": _value(1.0) for i in range(2)},
    )
    totals = _totals(packets=1, devices=5)

    def device_lines(devices: list) -> tuple[list[str], str]:
        text = exposition(totals, devices, stats, api, offline_after_s=30, openmetrics=False,
                          omitted={"max_devices": 3, "max_series": 1})  # fmt: skip
        return [line for line in text.splitlines() if line.startswith("rtm_device_")], text

    lines, text = device_lines([device])
    assert device_series(device) == len(lines) == 8 + 3 + 2 * 5
    assert f"rtm_scrape_series {len(lines)}" in text
    assert 'rtm_scrape_devices_omitted{reason="max_series"} 1' in text
    assert 'rtm_http_refused_total{reason="stream_subscribers"} 2' in text
    assert "rtm_stream_subscribers 1" in text
