"""The OTLP metrics receiver: `MetricsService/Export` on the gRPC port, `POST /v1/metrics`
(protobuf or JSON, gzip accepted) on the HTTP port. The messages are the
`opentelemetry-proto` package's generated ones.

The mapping (README "OTLP metrics"):

- the device id is a resource attribute: --otlp-device-attribute (default `device.id`),
  else `service.instance.id`, else `host.name`; a resource with none of them has its data
  points rejected as `no_device_id`;
- one data point is one packet of kind `otlp`, timestamp the point's time (ms), bytes the
  point's serialized size;
- gauge and sum points: one reading, named after the metric, valued as the point is;
  histogram, exponential histogram and summary points: `<name>.count` and `<name>.sum`
  (a histogram without a sum: `.count` only);
- a point's attributes, when it has any, are appended to the reading's name sorted by key,
  as `/<key>:<value>` each, with characters outside `A-Z a-z 0-9 . _ @ -` replaced by
  `_`; a name longer than 64 characters keeps its first 55 and ends with `@` and 8 hex
  digits of a hash of the whole name. The same series always gets the same name; how many
  a device may have is bounded by --max-value-names-per-device (`too_many_value_names`).

The answer is sent once the points are committed; rejected points are reported in OTLP's
partial success (`rejected_data_points`, `error_message`). A full queue answers UNAVAILABLE
(HTTP 503 with Retry-After) and the SDK's exporter retries: at-least-once, as the
OpenTelemetry Collector is (a retry of an export that was committed after all counts twice).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import compress, repeat
from operator import add, attrgetter, floordiv, methodcaller
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsPartialSuccess,
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric, NumberDataPoint

from rtmonitor.ingest.columnar import (
    IntArray,
    PacketTable,
    Records,
    compact,
    dictionary,
    packed_table,
)
from rtmonitor.ingest.guard import authorize, peer_host
from rtmonitor.ingest.receiver import RETRY_AFTER_S, Receiver, Refused, Sender, decode_body
from rtmonitor.ingest.validation import Reason
from rtmonitor.model import NAME_MAX, HttpReply

try:
    from rtmonitor.ingest._rows import OtlpPoints
    from rtmonitor.ingest._rows import read_otlp as _read_otlp

    C_OTLP = True  # the compiled reader is built (see setup.py)
except ImportError:  # installed without a C compiler: the Python mapping reads every request
    C_OTLP = False

_SERVICE = metrics_service_pb2.DESCRIPTOR.services_by_name["MetricsService"]
SERVICE_NAME: str = _SERVICE.full_name  # opentelemetry.proto.collector.metrics.v1.MetricsService
EXPORT_METHOD: str = _SERVICE.methods_by_name["Export"].name
EXPORT = f"/{SERVICE_NAME}/{EXPORT_METHOD}"

KIND = "otlp"
SURFACE = "otlp"  # auth refusals are counted under this name
FALLBACK_DEVICE_ATTRIBUTES = ("service.instance.id", "host.name")
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._@-]")
_HASHED_PREFIX = NAME_MAX - 9  # "@" and 8 hex digits follow
_MAX_CACHED_NAMES = 65_536
_SINGLE = ("gauge", "sum")  # data kinds with one value per point
_as_double = attrgetter("as_double")
_as_int = attrgetter("as_int")
_time = attrgetter("time_unix_nano")
_count = attrgetter("count")
_sum = attrgetter("sum")
_attributes = attrgetter("attributes")
_byte_size = methodcaller("ByteSize")
_has_sum = methodcaller("HasField", "sum")

# google.rpc.Code of each refusal (OTLP/HTTP error bodies are google.rpc.Status)
_RPC_CODE = {"invalid": 3, "too_large": 8, "unsupported": 3, "unavailable": 14}
_GRPC_STATUS = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unsupported": grpc.StatusCode.INVALID_ARGUMENT,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}
_HTTP_STATUS = {"invalid": 400, "too_large": 413, "unsupported": 415, "unavailable": 503}


def text_of(value: AnyValue) -> str:
    """An attribute value as text: strings as they are, numbers and booleans as JSON writes
    them, anything else (arrays, maps, bytes) as a short hash of its encoding."""
    which = value.WhichOneof("value")
    if which == "string_value":
        return value.string_value
    if which == "bool_value":
        return "true" if value.bool_value else "false"
    if which == "int_value":
        return str(value.int_value)
    if which == "double_value":
        return repr(value.double_value)
    if which is None:
        return ""
    return "h" + hashlib.blake2b(value.SerializeToString(), digest_size=4).hexdigest()


def series_name(name: str, attributes: Iterable[tuple[str, str]]) -> str:
    """A reading's name: the metric's (with its suffix) and its attributes, bounded."""
    parts = [name]
    for key, value in sorted(attributes):
        parts.append(f"/{_UNSAFE.sub('_', key)}:{_UNSAFE.sub('_', value)}")
    full = "".join(parts)
    if len(full) <= NAME_MAX:
        return full
    digest = hashlib.blake2b(full.encode(), digest_size=4).hexdigest()
    return f"{full[:_HASHED_PREFIX]}@{digest}"


def _with_values(
    points: Sequence[Any], values: list[float], rejected: Counter[str]
) -> tuple[list[Any], list[float]]:
    """The points that have a value (and their values); the others counted as no_value."""
    keep = [j for j, v in enumerate(values) if v or points[j].WhichOneof("value") is not None]
    if len(keep) < len(points):
        rejected[Reason.NO_VALUE] += len(points) - len(keep)
    return [points[j] for j in keep], [values[j] for j in keep]


def device_of(attributes: Sequence[KeyValue], keys: Sequence[str]) -> str | None:
    """The device id among a resource's attributes, by the first of `keys` present."""
    found = {kv.key: kv.value for kv in attributes if kv.key in keys}
    for key in keys:
        if key in found and (text := text_of(found[key])):
            return text
    return None


class OtlpReceiver:
    """Maps OTLP metrics to packets and hands them to the pipeline (receiver.Receiver)."""

    def __init__(self, receiver: Receiver, compiled: bool = C_OTLP) -> None:
        self.receiver = receiver
        attribute = receiver.limits.device_attribute
        self.device_keys = (attribute,) + tuple(
            k for k in FALLBACK_DEVICE_ATTRIBUTES if k != attribute
        )
        self._device_keys_utf8 = tuple(k.encode() for k in self.device_keys)
        self._names: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
        # (metric name, a point's attribute bytes as the C reader hands them) -> reading name
        self._wire_names: dict[tuple[str, bytes], str] = {}
        self.compiled = compiled

    def _series(self, name: str, attributes: Sequence[KeyValue]) -> str:
        if not attributes and len(name) <= NAME_MAX:
            return name
        key = (name, tuple((kv.key, text_of(kv.value)) for kv in attributes))
        found = self._names.get(key)
        if found is None:
            if len(self._names) >= _MAX_CACHED_NAMES:
                self._names.clear()
            found = self._names[key] = series_name(name, key[1])
        return found

    def gather(
        self, request: ExportMetricsServiceRequest
    ) -> tuple[Records | PacketTable, Counter[str]]:
        """The request's data points as packets, and those refused here by reason: read by
        the C reader (gauges and sums, the common export) from the
        request's canonical serialization, else by the Python mapping; both give the same
        packets (tests/unit/test_otlp_reader.py)."""
        if self.compiled:
            read = _read_otlp(request.SerializeToString(), self._device_keys_utf8)
            if read is not None:
                return self._table(read)
        return self.gather_python(request)

    def _table(self, read: OtlpPoints) -> tuple[PacketTable, Counter[str]]:
        """The C reader's columns as packets: points without a device or a value refused,
        as the Python mapping refuses them, and the rest in request order."""
        dev = np.frombuffer(read.dev_idx, np.int64)
        name_idx = np.frombuffer(read.name_idx, np.int64)
        size = np.frombuffer(read.size, np.int64)
        ts = np.frombuffer(read.ts, np.int64)
        val = np.frombuffer(read.val, np.float64)
        has_value = np.frombuffer(read.has_val, np.bool_)
        attr_idx = np.frombuffer(read.attr_idx, np.int64)
        device_ids, names = read.device_ids, read.names
        rejected: Counter[str] = Counter()
        no_device = dev < 0
        keep = has_value & ~no_device
        if not keep.all():
            if n := int(np.count_nonzero(no_device)):
                rejected[Reason.NO_DEVICE_ID] += n
            if n := int(np.count_nonzero(~has_value & ~no_device)):
                rejected[Reason.NO_VALUE] += n
            kept = np.flatnonzero(keep)
            dev, name_idx, size, ts = dev[kept], name_idx[kept], size[kept], ts[kept]
            val, attr_idx = val[kept], attr_idx[kept]
            device_ids, dev = compact(device_ids, dev)
            names, name_idx = compact(names, name_idx)
        names, name_idx = self._wire_series(names, name_idx, read.attrs, attr_idx)
        k = len(dev)
        one_kind = np.zeros(k, dtype=np.int64)
        points = np.arange(k, dtype=np.int64)  # one reading per point
        table = packed_table(
            k, device_ids, dev, [KIND], one_kind, size, ts, names, points, name_idx, val
        )
        return table, rejected

    def _wire_series(
        self, names: list[str], name_idx: IntArray, attrs: list[bytes], attr_idx: IntArray
    ) -> tuple[list[str], IntArray]:
        """The reading names of the C reader's points, one per distinct (metric, attribute
        set), in order of first appearance, and each point's index into them."""
        if not attrs:
            # a long metric name is hashed (series_name): two may meet in one entry
            return dictionary([self._series(name, ()) for name in names], name_idx)
        width = len(attrs) + 1
        pairs, first, inverse = np.unique(
            name_idx * width + attr_idx + 1, return_index=True, return_inverse=True
        )
        order = np.argsort(first, kind="stable")
        rank = np.zeros(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order), dtype=np.int64)
        series = [
            self._attributed(names[pair // width], attrs[pair % width - 1] if pair % width else b"")
            for pair in pairs[order].tolist()
        ]
        return dictionary(series, rank[inverse.reshape(-1)])

    def _attributed(self, name: str, attrs: bytes) -> str:
        """A reading name from a metric's name and a point's attribute bytes (cached)."""
        key = (name, attrs)
        found = self._wire_names.get(key)
        if found is None:
            if len(self._wire_names) >= _MAX_CACHED_NAMES:
                self._wire_names.clear()
            attributes = NumberDataPoint.FromString(attrs).attributes if attrs else ()
            found = self._wire_names[key] = self._series(name, attributes)
        return found

    def gather_python(self, request: ExportMetricsServiceRequest) -> tuple[Records, Counter[str]]:
        """The request's data points as packets, and those refused here by reason (the
        Python mapping: every kind of metric, attributes and all)."""
        records = Records.new()
        rejected: Counter[str] = Counter()
        for resource_metrics in request.resource_metrics:
            device = device_of(resource_metrics.resource.attributes, self.device_keys)
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    self._gather_metric(metric, device, records, rejected)
        return records, rejected

    def _gather_metric(
        self, metric: Metric, device: str | None, records: Records, rejected: Counter[str]
    ) -> None:
        """One metric's data points as packets, in C-level passes over protobuf's objects
        (map, attrgetter): no Python statement per point on the common path."""
        which = metric.WhichOneof("data")
        if which is None:
            return
        points: Sequence[Any] = getattr(metric, which).data_points
        if device is None:
            rejected[Reason.NO_DEVICE_ID] += len(points)
            return
        single = which in _SINGLE
        if single:
            # value is a oneof: the field not set reads 0, so the sum is the point's value
            values = list(map(add, map(_as_double, points), map(_as_int, points)))
            if 0 in values:  # maybe a point without a value (rare): look closer
                points, values = _with_values(points, values, rejected)
        k = len(points)
        first = len(records.device_ids)
        records.device_ids.extend(repeat(device, k))
        records.kinds.extend(repeat(KIND, k))
        records.sizes.extend(map(_byte_size, points))
        records.ts.extend(map(floordiv, map(_time, points), repeat(1_000_000, k)))
        positions = range(first, first + k)
        name = metric.name
        if single:
            self._readings(records, positions, self._reading_names(name, points), values)
            return
        counts = map(float, map(_count, points))
        self._readings(records, positions, self._reading_names(name + ".count", points), counts)
        sums: Sequence[Any] = points
        sum_positions: Sequence[int] = positions
        if which != "summary":  # a histogram's sum is optional
            with_sum = list(map(_has_sum, points))
            if not all(with_sum):
                sums = list(compress(points, with_sum))
                sum_positions = list(compress(positions, with_sum))
        self._readings(
            records, sum_positions, self._reading_names(name + ".sum", sums), map(_sum, sums)
        )

    @staticmethod
    def _readings(
        records: Records, positions: Iterable[int], names: Iterable[str], values: Iterable[float]
    ) -> None:
        records.v_pos.extend(positions)
        records.v_names.extend(names)
        records.v_vals.extend(values)

    def _reading_names(self, name: str, points: Sequence[Any]) -> Iterable[str]:
        """The reading name of each point: the metric's, with its attributes if it has any."""
        if not any(map(len, map(_attributes, points))):
            return repeat(self._series(name, ()), len(points))
        return [self._series(name, p.attributes) for p in points]

    async def export(
        self, request: ExportMetricsServiceRequest, sender: Sender
    ) -> ExportMetricsServiceResponse:
        """Count a request's data points; the answer once they are committed. Raises
        Refused when they cannot be taken now."""
        records, rejected = self.gather(request)
        outcome = await self.receiver.submit(records, rejected, sender)
        if not outcome.rejected:
            return ExportMetricsServiceResponse()
        total = outcome.rejected.total()
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(outcome.rejected.items()))
        return ExportMetricsServiceResponse(
            partial_success=ExportMetricsPartialSuccess(
                rejected_data_points=total,
                error_message=f"{total} data points rejected ({reasons}); see the README's "
                "OTLP mapping and GET /stats",
            )
        )

    # --- gRPC ---------------------------------------------------------------------------

    async def export_rpc(
        self, raw: bytes, context: grpc.aio.ServicerContext[bytes, ExportMetricsServiceResponse]
    ) -> ExportMetricsServiceResponse:
        """MetricsService/Export: the token (`authorization` metadata) needs the `ingest`
        scope, as TelemetryIngest's; the request arrives as bytes, to answer a malformed one
        clearly."""
        principal = await authorize(context, self.receiver.auth, "ingest", surface=SURFACE)
        sender = Sender(principal, peer_host(context.peer() or ""), SURFACE)
        try:
            request = ExportMetricsServiceRequest.FromString(raw)
        except DecodeError as exc:
            self.receiver.refuse(
                refusal := Refused(
                    Reason.MALFORMED_BODY,
                    "invalid",
                    f"malformed ExportMetricsServiceRequest ({exc})",
                )
            )
            await context.abort(_GRPC_STATUS[refusal.kind], refusal.message)
        try:
            return await self.export(request, sender)
        except Refused as refusal:
            trailers = _RETRY_TRAILERS if refusal.kind == "unavailable" else ()
            await context.abort(_GRPC_STATUS[refusal.kind], refusal.message, trailers)

    # --- HTTP ---------------------------------------------------------------------------

    async def export_http(
        self, body: bytes, content_type: str, encoding: str, sender: Sender
    ) -> HttpReply:
        """POST /v1/metrics (OTLP/HTTP): protobuf or JSON, answered in the same encoding."""
        media = content_type.split(";", 1)[0].strip().lower()
        try:
            if media not in (PROTOBUF, JSON):
                raise self.receiver.refuse(
                    Refused(
                        Reason.UNSUPPORTED_MEDIA_TYPE,
                        "unsupported",
                        f"Content-Type {media or '(none)'!r}: send {PROTOBUF} or {JSON}",
                    )
                )
            data = self._decode_body(body, encoding)
            request = self._parse(data, media)
            response = await self.export(request, sender)
        except Refused as refusal:
            return _http_refusal(refusal, media)
        if media == JSON:
            payload = json_format.MessageToJson(response, indent=None).encode()
        else:
            payload = response.SerializeToString()
        return HttpReply(status=200, body=payload, media_type=media)

    def _decode_body(self, body: bytes, encoding: str) -> bytes:
        try:
            return decode_body(body, encoding, self.receiver.limits.max_body_bytes)
        except Refused as refusal:
            raise self.receiver.refuse(refusal) from None

    def _parse(self, data: bytes, media: str) -> ExportMetricsServiceRequest:
        try:
            if media == PROTOBUF:
                return ExportMetricsServiceRequest.FromString(data)
            request = ExportMetricsServiceRequest()
            return json_format.Parse(data, request, ignore_unknown_fields=True)
        except (DecodeError, json_format.ParseError, UnicodeDecodeError) as exc:
            raise self.receiver.refuse(
                Refused(
                    Reason.MALFORMED_BODY,
                    "invalid",
                    f"the body is not an OTLP ExportMetricsServiceRequest in {media}: {exc}",
                )
            ) from None


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _status_bytes(code: int, message: str, details: bytes = b"") -> bytes:
    """A google.rpc.Status (code = 1, message = 2, details = 3) in protobuf's encoding."""
    out = b"\x08" + _varint(code) + _field(2, message.encode())
    return out + (_field(3, details) if details else b"")


# google.rpc.RetryInfo{retry_delay: Duration{seconds: RETRY_AFTER_S}}, hand-encoded (its
# generated module is not a dependency), and as a google.protobuf.Any for Status.details.
_RETRY_INFO = _field(1, b"\x08" + bytes([RETRY_AFTER_S]))
_RETRY_ANY = _field(1, b"type.googleapis.com/google.rpc.RetryInfo") + _field(2, _RETRY_INFO)
# What an UNAVAILABLE answer carries: the official exporters read RetryInfo from
# `google.rpc.retryinfo-bin` (and others from the status details) and wait that long.
_RETRY_TRAILERS: tuple[tuple[str, str | bytes], ...] = (
    ("google.rpc.retryinfo-bin", _RETRY_INFO),
    ("grpc-status-details-bin", _status_bytes(14, "retry shortly", _RETRY_ANY)),
)


def _http_refusal(refusal: Refused, media: str) -> HttpReply:
    code = _RPC_CODE[refusal.kind]
    headers = {"Retry-After": str(RETRY_AFTER_S)} if refusal.kind == "unavailable" else {}
    if media == PROTOBUF:
        details = _RETRY_ANY if refusal.kind == "unavailable" else b""
        body = _status_bytes(code, refusal.message, details)
    else:
        media = JSON
        body = json.dumps({"code": code, "message": refusal.message}).encode()
    return HttpReply(
        status=_HTTP_STATUS[refusal.kind], body=body, media_type=media, headers=headers
    )
