"""`send --protocol otlp|http`: the other receivers driven with the same pool, bookkeeping
and pacing as the gRPC streams (loadgen/sender.py).

Each protocol is one entry of PROTOCOLS: how to encode `m` consecutive pool entries as one
request body, and how to post it and read what was accepted. Everything else — a stream's
concurrent requests, retries with capped backoff, the counts — is shared (`_drive`). Pool
entry e is for device e % devices, as in gRPC modes, so `SendReport.acked_per_device`
holds as long as every request of a stream is eventually acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    Gauge,
    Metric,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from rtmonitor.clients import ClientSecurity
from rtmonitor.config import SendSettings
from rtmonitor.ingest.otlp import EXPORT

if TYPE_CHECKING:
    from rtmonitor.loadgen.sender import Pacer, PacketPool, StreamResult

# Concurrent requests of one stream, at most (each waits for its commit, about a flush
# interval). HTTP/1.1 takes a connection per request in flight: few enough that a bench's
# streams stay far below the service's --http-max-connections (at most 1/8 of its open-file
# limit), where the probes' connections would be evicted.
MAX_CONCURRENCY = 64
MAX_HTTP_CONCURRENCY = 16
_MAX_CACHED_BODIES = 256
_BACKOFF_MAX_S = 2.0


class Transient(Exception):
    """A refusal worth retrying (UNAVAILABLE, 503): the same body is sent again."""


# (accepted, rejected by reason) of one request
Outcome = tuple[int, Counter[str]]
# posts one body of m packets, the stream's seq-th (its Idempotency-Key over HTTP)
Post = Callable[[bytes, int, int], Awaitable[Outcome]]


def _values(pool: PacketPool, start: int, m: int) -> list[tuple[str, float]]:
    """Pool entries start .. start+m-1 (cyclic) as (device, value)."""
    size, devices = len(pool), pool.devices
    return [
        (pool.names[e % devices], float(e % 1000)) for e in ((start + j) % size for j in range(m))
    ]


def otlp_body(pool: PacketPool, start: int, m: int) -> bytes:
    """m gauge data points (metric `temperature`), one resource per device of the chunk."""
    by_device: dict[str, list[NumberDataPoint]] = {}
    for device, value in _values(pool, start, m):
        by_device.setdefault(device, []).append(NumberDataPoint(as_double=value))
    request = ExportMetricsServiceRequest(
        resource_metrics=[
            ResourceMetrics(
                resource=Resource(
                    attributes=[KeyValue(key="device.id", value=AnyValue(string_value=device))]
                ),
                scope_metrics=[
                    ScopeMetrics(
                        metrics=[Metric(name="temperature", gauge=Gauge(data_points=points))]
                    )
                ],
            )
            for device, points in by_device.items()
        ]
    )
    return request.SerializeToString()


def http_body(pool: PacketPool, start: int, m: int) -> bytes:
    """m JSON packets (kind `reading`, a `temperature` value, the pool's payload size)."""
    size = pool.payload_size
    packets = [
        {"device_id": d, "kind": "reading", "values": {"temperature": v}, "payload_size": size}
        for d, v in _values(pool, start, m)
    ]
    return json.dumps(packets, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Protocol:
    """One receiver as `send` drives it."""

    mode: str  # as the report names it
    body: Callable[[PacketPool, int, int], bytes]
    connect: Callable[[SendSettings, str], Any]  # an async context manager yielding Post
    max_concurrency: int = MAX_CONCURRENCY


class _OtlpClient:
    """OTLP/gRPC exports over one channel (TLS and the token as `send`'s gRPC streams)."""

    def __init__(self, opts: SendSettings, target: str) -> None:
        security = ClientSecurity.of(opts)
        self.metadata = security.metadata
        self.channel = security.channel(
            target, [("grpc.max_send_message_length", 256 * 1024 * 1024)]
        )
        self.export = self.channel.unary_unary(
            EXPORT,
            request_serializer=lambda b: b,
            response_deserializer=ExportMetricsServiceResponse.FromString,
        )

    async def __aenter__(self) -> Post:
        return self.post

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close(None)

    async def post(self, body: bytes, m: int, seq: int) -> Outcome:
        del seq  # OTLP has no request id: at-least-once
        try:
            response = await self.export(body, timeout=60, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Transient(f"{exc.code().name}: {exc.details()}") from None
            raise
        rejected = int(response.partial_success.rejected_data_points)
        return m - rejected, Counter({"partial_success": rejected} if rejected else {})


class _HttpClient:
    """POST /v1/telemetry over kept-alive HTTP/1.1 connections, one request at a time each,
    with an Idempotency-Key per body (a resend counts once).

    A few lines of asyncio streams rather than httpx: the generator shares the machine
    with the service it measures, and httpx spent more CPU per request than the service
    (its connection pool re-tries a failing `import sniffio` on every request)."""

    def __init__(self, opts: SendSettings, target: str) -> None:
        del target
        url = urlsplit(opts.http_target)
        security = ClientSecurity.of(opts)
        self.tls = security.ssl_context() if url.scheme == "https" else None
        self.host = url.hostname or "localhost"
        self.port = url.port or (443 if url.scheme == "https" else 80)
        auth = "".join(f"{k}: {v}\r\n" for k, v in security.headers.items())
        self.head = (
            f"POST /v1/telemetry HTTP/1.1\r\nHost: {url.netloc}\r\n{auth}"
            "Content-Type: application/json\r\n"
        ).encode()
        self.producer = uuid.uuid4().hex
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def __aenter__(self) -> Post:
        return self.post

    async def __aexit__(self, *exc: object) -> None:
        for _, writer in self.idle:
            writer.close()

    async def _exchange(
        self, request: bytes, *, reuse: bool
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int, Any]:
        if reuse and self.idle:
            reader, writer = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.tls)
        try:
            writer.write(request)
            status, answer = await _response(reader)
        except BaseException:
            writer.close()
            raise
        return reader, writer, status, answer

    async def post(self, body: bytes, m: int, seq: int) -> Outcome:
        del m
        key = f"{self.producer}-{seq}"  # the same for every resend of this body
        request = (
            self.head
            + f"Idempotency-Key: {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        try:
            try:
                reader, writer, status, answer = await self._exchange(request, reuse=True)
            except (OSError, asyncio.IncompleteReadError):
                # a kept-alive connection the server had closed (idle): once more, afresh
                reader, writer, status, answer = await self._exchange(request, reuse=False)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            raise Transient(f"{type(exc).__name__}: {exc}") from None
        self.idle.append((reader, writer))
        if status == 503:
            raise Transient(f"503: {answer.get('detail')}")
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {answer}")
        return int(answer["accepted"]), Counter(answer["rejected"])


async def _response(reader: asyncio.StreamReader) -> tuple[int, Any]:
    """One HTTP/1.1 response with a Content-Length: its status and JSON body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return status, json.loads(await reader.readexactly(length)) if length else {}


PROTOCOLS: dict[str, Protocol] = {
    "otlp": Protocol("OTLP/gRPC Export", otlp_body, _OtlpClient),
    "http": Protocol("HTTP JSON POST /v1/telemetry", http_body, _HttpClient, MAX_HTTP_CONCURRENCY),
}


async def drive(
    opts: SendSettings,
    protocol: Protocol,
    pool: PacketPool,
    result: StreamResult,
    n: int | None,
    pace: Pacer,
    counter: list[int],
    target: str,
) -> None:
    """One stream of `protocol` requests: up to its max_concurrency (and --inflight) at once,
    each of --batch-size packets, until `n` are sent or the pace's duration ends."""
    bodies: dict[int, bytes] = {}

    def body_for(pos: int, m: int) -> bytes:
        key = pos % len(pool)
        if m != opts.batch_size:  # the last, short one
            return protocol.body(pool, pos, m)
        if (found := bodies.get(key)) is None:
            if len(bodies) >= _MAX_CACHED_BODIES:
                bodies.clear()
            found = bodies[key] = protocol.body(pool, pos, m)
        return found

    state = {"pos": result.offset, "seq": 0}

    async def worker(post: Post) -> None:
        while (n is None or result.sent < n) and not pace.expired() and result.error is None:
            m = opts.batch_size if n is None else min(opts.batch_size, n - result.sent)
            pos, seq = state["pos"], state["seq"]
            state["pos"] += m
            state["seq"] += 1
            result.sent += m
            try:
                outcome = await _with_retries(post, body_for(pos, m), m, seq, opts, result)
            except Exception as exc:  # the stream fails; the report says how
                result.error = result.error or f"{type(exc).__name__}: {exc}"
                return
            accepted, rejected = outcome
            result.accepted += accepted
            result.rejected.update(rejected)
            counter[0] += accepted + rejected.total()
            await pace.wait(m)

    async with protocol.connect(opts, target) as post:
        concurrency = max(1, min(opts.inflight, protocol.max_concurrency))
        workers = [asyncio.create_task(worker(post)) for _ in range(concurrency)]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()


async def _with_retries(
    post: Post, body: bytes, m: int, seq: int, opts: SendSettings, result: StreamResult
) -> Outcome:
    """Post until accepted; transient refusals are retried with capped backoff for up to
    --retry-for seconds."""
    backoff = 0.05
    started = time.monotonic()
    while True:
        try:
            return await post(body, m, seq)
        except Transient as exc:
            if time.monotonic() - started > opts.retry_for:
                raise RuntimeError(f"{exc}; gave up after {opts.retry_for:.0f}s") from None
            result.resent += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX_S)
