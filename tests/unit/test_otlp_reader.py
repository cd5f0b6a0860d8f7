"""OTLP's C reader (`_rows.read_otlp`, OtlpReceiver.gather) against the Python mapping
(OtlpReceiver.gather_python): on hypothesis-generated export requests — devices by each
attribute or none, gauges, sums, histograms, points with and without values, times,
attributes, exemplars, long and odd names — both give the same packets, hence the same
delta and the same refusals by reason; and each point's bytes is its ByteSize()."""

from __future__ import annotations

import dataclasses
from collections import Counter
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    Exemplar,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from rtmonitor.ingest import otlp
from rtmonitor.ingest.columnar import PacketTable, Records, decode_records
from rtmonitor.ingest.validation import Limits, Validator

pytestmark = pytest.mark.skipif(not otlp.C_OTLP, reason="the C reader is not built")

NOW_MS = 1_767_225_700_000


def _receiver(compiled: bool, attribute: str = "device.id") -> otlp.OtlpReceiver:
    receiver = SimpleNamespace(limits=SimpleNamespace(device_attribute=attribute))
    return otlp.OtlpReceiver(receiver, compiled=compiled)  # type: ignore[arg-type]


def _plain(delta: Any) -> dict[str, Any]:
    """The delta's columns (not its keys: identities of each validator's own entries)."""
    return {
        f.name: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v
        for f in dataclasses.fields(delta)
        if f.name != "keys"
        for v in [getattr(delta, f.name)]
    }


def _both(
    request: ExportMetricsServiceRequest, limits: Limits, attribute: str = "device.id"
) -> tuple[Any, Any]:
    """(delta, refusals) by the C reader and by the Python mapping, each on a fresh
    validator."""
    out = []
    for compiled in (True, False):
        rx = _receiver(compiled, attribute)
        records, rejected = rx.gather(request)
        delta, refused = decode_records(records, Validator(limits), NOW_MS)
        out.append((_plain(delta), rejected + refused))
    return out[0], out[1]


# --- strategies ------------------------------------------------------------------------

# mostly valid names and ids (so that most packets are counted), some odd ones
_text = st.one_of(
    st.sampled_from(["temp", "cpu.load", "d-1", "d-2", "a", "x" * 70, "y" * 70]),
    st.sampled_from(["", "bad name", "ü"]),
    st.text(max_size=8),
)
_string_value = st.builds(lambda s: AnyValue(string_value=s), _text)
_any_value = st.one_of(
    _string_value,
    st.builds(lambda i: AnyValue(int_value=i), st.integers(-5, 5)),
    st.builds(lambda b: AnyValue(bool_value=b), st.booleans()),
    st.just(AnyValue()),
)
_device_keys = st.sampled_from(["device.id", "service.instance.id", "host.name", "other"])


def _resource_attrs(odd: bool) -> st.SearchStrategy[list[KeyValue]]:
    values = _any_value if odd else _string_value
    return st.lists(
        st.builds(lambda k, v: KeyValue(key=k, value=v), _device_keys, values),
        min_size=1,
        max_size=3,
    )


_point_attrs = st.lists(
    st.builds(
        lambda k, v: KeyValue(key=k, value=v), st.sampled_from(["core", "route"]), _any_value
    ),
    max_size=2,
)
_times = st.one_of(
    st.just(0),
    st.integers(0, 2**64 - 1),
    st.integers(NOW_MS - 5_000, NOW_MS + 5_000).map(lambda ms: ms * 1_000_000 + 999_999),
)


@st.composite
def _number_point(draw: st.DrawFn, with_attributes: bool) -> NumberDataPoint:
    point = NumberDataPoint(
        time_unix_nano=draw(_times), start_time_unix_nano=draw(st.sampled_from([0, 7]))
    )
    which = draw(st.sampled_from(["double", "int", "none"]))
    if which == "double":
        point.as_double = draw(st.floats(allow_nan=True) | st.sampled_from([0.0, -0.0]))
    elif which == "int":
        point.as_int = draw(st.integers(-(2**63), 2**63 - 1) | st.sampled_from([0, 1]))
    if draw(st.booleans()):
        point.flags = draw(st.integers(0, 300))
    if draw(st.integers(0, 9)) == 0:
        point.exemplars.append(Exemplar(as_double=1.5, time_unix_nano=3))
    if with_attributes:
        point.attributes.extend(draw(_point_attrs))
    return point


@st.composite
def _metric(draw: st.DrawFn, odd: bool) -> Metric:
    with_attributes = draw(st.booleans())
    metric = Metric(name=draw(_text), unit=draw(st.sampled_from(["", "C"])))
    kinds = ["gauge", "sum", "histogram", "none"] if odd else ["gauge", "sum"]
    kind = draw(st.sampled_from(kinds))
    points = draw(st.lists(_number_point(with_attributes), min_size=1, max_size=6))
    if kind == "gauge":
        metric.gauge.CopyFrom(Gauge(data_points=points))
    elif kind == "sum":
        metric.sum.CopyFrom(Sum(data_points=points, aggregation_temporality=2, is_monotonic=True))
    elif kind == "histogram":
        metric.histogram.CopyFrom(
            Histogram(data_points=[HistogramDataPoint(count=3, sum=1.0, time_unix_nano=5)])
        )
    return metric


@st.composite
def _request(draw: st.DrawFn) -> ExportMetricsServiceRequest:
    # mostly requests the C reader reads; "odd" ones may hold what it leaves to Python
    odd = draw(st.integers(0, 3)) == 0
    resources = []
    for _ in range(draw(st.integers(0 if odd else 1, 4))):
        rm = ResourceMetrics()
        if draw(st.integers(0, 5)):
            rm.resource.CopyFrom(Resource(attributes=draw(_resource_attrs(odd))))
        for _ in range(draw(st.integers(0 if odd else 1, 2))):
            rm.scope_metrics.append(
                ScopeMetrics(metrics=draw(st.lists(_metric(odd), min_size=1, max_size=3)))
            )
        resources.append(rm)
    return ExportMetricsServiceRequest(resource_metrics=resources)


_limits = st.sampled_from(
    [Limits(), Limits(max_devices=2, max_value_names_per_device=2, max_payload_bytes=20)]
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_request(), _limits, st.sampled_from(["device.id", "host.name"]))
def test_the_c_reader_maps_requests_as_the_python_mapping(
    request: ExportMetricsServiceRequest, limits: Limits, attribute: str
) -> None:
    compiled, python = _both(request, limits, attribute)
    assert compiled == python


# --- the C reader's own cases ----------------------------------------------------------


def _gauge_request(
    points: list[NumberDataPoint], device: str = "d-1"
) -> ExportMetricsServiceRequest:
    attrs = [KeyValue(key="device.id", value=AnyValue(string_value=device))]
    return ExportMetricsServiceRequest(
        resource_metrics=[
            ResourceMetrics(
                resource=Resource(attributes=attrs),
                scope_metrics=[
                    ScopeMetrics(metrics=[Metric(name="temp", gauge=Gauge(data_points=points))])
                ],
            )
        ]
    )


def test_gauges_are_read_by_the_c_reader_with_each_points_byte_size() -> None:
    points = [
        NumberDataPoint(as_double=1.5),
        NumberDataPoint(as_int=7, time_unix_nano=NOW_MS * 1_000_000, flags=1),
        NumberDataPoint(as_double=2.0, exemplars=[Exemplar(as_int=1)]),
        NumberDataPoint(),  # no value: refused
    ]
    records, rejected = _receiver(True).gather(_gauge_request(points))
    assert isinstance(records, PacketTable)
    assert rejected == Counter({"no_value": 1})
    assert records.size is not None
    assert records.size.tolist() == [p.ByteSize() for p in points[:3]]
    assert records.v_val.tolist() == [1.5, 7.0, 2.0]
    assert records.ts is not None and records.ts.tolist() == [0, NOW_MS, 0]
    assert records.device_ids == ["d-1"] and records.names == ["temp"]


def test_points_with_attributes_are_named_once_per_series() -> None:
    rx = _receiver(True)

    def point(core: str, route: str) -> NumberDataPoint:
        attributes = [
            KeyValue(key="route", value=AnyValue(string_value=route)),
            KeyValue(key="core", value=AnyValue(string_value=core)),
        ]
        return NumberDataPoint(as_double=1.0, attributes=attributes)

    points = [point("0", "/a"), point("1", "/a"), point("0", "/a"), NumberDataPoint(as_int=2)]
    records, _ = rx.gather(_gauge_request(points))
    assert isinstance(records, PacketTable)
    assert records.names == ["temp/core:0/route:_a", "temp/core:1/route:_a", "temp"]
    assert records.v_name.tolist() == [0, 1, 0, 2]


def test_the_c_reader_declines_what_the_python_mapping_reads() -> None:
    rx = _receiver(True)
    request = _gauge_request([NumberDataPoint(as_double=1.0)])
    request.resource_metrics[0].resource.attributes[0].value.CopyFrom(AnyValue(int_value=3))
    assert isinstance(rx.gather(request)[0], Records)  # a device id that is not a string
    request = _gauge_request([])
    metric = request.resource_metrics[0].scope_metrics[0].metrics[0]
    metric.histogram.CopyFrom(Histogram(data_points=[HistogramDataPoint(count=1)]))
    assert isinstance(rx.gather(request)[0], Records)
