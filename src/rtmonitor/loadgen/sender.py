"""`rtmonitor send`: generated packets over real gRPC streams, with exact bookkeeping.

Packets are built once into a pool of serialized messages (entry e belongs to device
e % devices) and replayed, so the sender spends its time on the wire, not in Python.
Acks arrive in order, so what one stream had acknowledged is always a prefix of what it
sent: the per-device acknowledged counts follow by arithmetic (see `acked_per_device`).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rtmonitor.clients import ClientSecurity
from rtmonitor.config import SendSettings
from rtmonitor.ingest.rpc import STREAM_BATCHES, STREAM_PACKETS
from rtmonitor.ingest.v1.telemetry_pb2 import Ack, Batch, BatchAck, Columns, Packet

KINDS = ("heartbeat", "reading", "tcp")
# Backoff jitter from a generator of our own: a library must not move the process-global
# random state (other code, e.g. property tests, relies on it).
_JITTER = random.Random()
# Calls that end this way are not retried: a resend would be refused the same way.
_FINAL = ("UNAUTHENTICATED", "PERMISSION_DENIED")


def _identity(data: bytes) -> bytes:
    return data


# Columnar bodies kept for reuse, up to this many bytes in all: a run cycles through the
# pool, so one (start, size) comes back every len(pool) / size batches. Building 10,000-packet
# bodies for 100,000 devices took a quarter of a core at ~700,000 packets/s, CPU that the
# service and Redis share on one machine; 0.05 with the cache (benchmarks/RESULTS.md, twelfth
# pass). A million devices: ~40 MB of bodies.
_BODY_CACHE_BYTES = 64 * 1024 * 1024


def device_name(prefix: str, index: int, devices: int) -> str:
    return f"{prefix}{index:0{max(5, len(str(devices - 1)))}d}"


class PacketPool:
    """Serialized packets; entry e is for device e % devices. Its size is a multiple of
    `devices`, so any run of consecutive entries spreads evenly over the devices."""

    def __init__(self, opts: SendSettings) -> None:
        self.devices = opts.devices
        self.names = [device_name(opts.device_prefix, i, opts.devices) for i in range(opts.devices)]
        size = opts.devices * -(-max(opts.batch_size, 1024) // opts.devices)
        rng = random.Random(opts.seed)
        payload = bytes(opts.payload_size)
        self.payload_size = opts.payload_size
        self.packets: list[bytes] = []
        self.framed: list[bytes] = []
        self._bodies: dict[tuple[int, int], bytes] = {}
        self._cached = 0  # bytes in _bodies
        # The same pool as columns, for --columnar (NaN: the packet has no such reading).
        self.temperature = np.full(size, np.nan)
        self.humidity = np.full(size, np.nan)
        for e in range(size):
            kind = KINDS[(e // opts.devices) % len(KINDS)]
            packet = Packet(device_id=self.names[e % opts.devices], kind=kind, payload=payload)
            if kind == "reading":
                packet.values["temperature"] = self.temperature[e] = round(
                    rng.uniform(-20.0, 45.0), 2
                )
                packet.values["humidity"] = self.humidity[e] = round(rng.uniform(0.0, 100.0), 1)
            self.packets.append(packet.SerializeToString())
            # The packet framed as field 3 of Batch: concatenating frames builds a Batch body.
            self.framed.append(Batch(packets=[packet]).SerializeToString())

    def __len__(self) -> int:
        return len(self.packets)

    def columns_body(self, start: int, n: int) -> bytes:
        """Entries start .. start+n-1 (cyclic) as a Columns message framed as field 4 of
        Batch: the same packets as batch_body(), in column form."""
        key = (start % len(self.packets), n)
        body = self._bodies.get(key)
        if body is None:
            body = self._columns_body(*key)
            if self._cached + len(body) <= _BODY_CACHE_BYTES:
                self._bodies[key] = body
                self._cached += len(body)
        return body

    def _columns_body(self, start: int, n: int) -> bytes:
        e = (start + np.arange(n)) % len(self.packets)
        dev = e % self.devices
        uniq, inv = np.unique(dev, return_inverse=True)
        kind = (e // self.devices) % len(KINDS)
        batch = Batch(
            columns=Columns(
                count=n,
                device_ids=[self.names[d] for d in uniq.tolist()],
                kinds=list(KINDS),
                device_index=inv.astype("<u4").tobytes(),
                kind_index=kind.astype("<u4").tobytes(),
                payload_size=np.full(n, self.payload_size, dtype="<u4").tobytes(),
            )
        )
        for name, column in (("temperature", self.temperature), ("humidity", self.humidity)):
            values = column[e]
            if not np.isnan(values).all():
                batch.columns.values.add(name=name, values=values.astype("<f8").tobytes())
        return batch.SerializeToString()

    def batch_body(self, start: int, n: int) -> bytes:
        """The framed packets start .. start+n-1 (cyclic)."""
        size = len(self.framed)
        start %= size
        if start + n <= size:
            return b"".join(self.framed[start : start + n])
        parts = self.framed[start:]
        n -= size - start
        while n > size:
            parts += self.framed
            n -= size
        return b"".join(parts + self.framed[:n])


@dataclass
class StreamResult:
    """What one stream sent and what the service acknowledged."""

    offset: int  # pool entry of the stream's first packet
    sent: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0  # batches the service had already committed (resends)
    resent: int = 0
    reconnects: int = 0
    error: str | None = None
    # StreamBatches: seconds the stream waited for the service's acks (for a window slot,
    # and for the last acks once all was written) of the seconds it ran, and the time from
    # each batch's write to its ack, summed over the batches acked.
    window_wait_s: float = 0.0
    span_s: float = 0.0
    ack_seconds: float = 0.0
    acked_batches: int = 0

    @property
    def processed(self) -> int:
        return self.accepted + self.rejected.total()


@dataclass
class SendReport:
    """The summary of one `send` run."""

    mode: str
    streams: list[StreamResult]
    elapsed: float  # from started_at to the last ack
    devices: int
    payload_size: int
    names: list[str]
    # Protocols whose acks are not a prefix of a pool (MQTT) count per device as they go.
    per_device: dict[str, int] | None = None
    # When the load began (time.time()), once its packets were built: at a million devices
    # building them takes seconds, which are not the service's.
    started_at: float = 0.0

    @property
    def sent(self) -> int:
        return sum(s.sent for s in self.streams)

    @property
    def accepted(self) -> int:
        return sum(s.accepted for s in self.streams)

    @property
    def rejected(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for s in self.streams:
            total.update(s.rejected)
        return total

    @property
    def errors(self) -> list[str]:
        return [s.error for s in self.streams if s.error]

    def acked_per_device(self) -> dict[str, int]:
        """Packets acknowledged per device (every generated packet is valid)."""
        if self.per_device is not None:
            return dict(self.per_device)
        counts = [0] * self.devices
        d = self.devices
        for s in self.streams:
            full, rest = divmod(s.processed, d)
            if full:
                counts = [c + full for c in counts]
            first = s.offset % d
            for j in range(rest):
                counts[(first + j) % d] += 1
        return {self.names[i]: c for i, c in enumerate(counts) if c}

    def as_dict(self) -> dict[str, Any]:
        acked_batches = sum(s.acked_batches for s in self.streams)
        waited = sum(s.window_wait_s for s in self.streams)
        span = sum(s.span_s for s in self.streams)
        return {
            "mode": self.mode,
            "sent": self.sent,
            "accepted": self.accepted,
            "rejected": self.rejected.total(),
            "rejected_by_reason": dict(self.rejected),
            "bytes_accepted": self.accepted * self.payload_size,
            "elapsed_s": round(self.elapsed, 3),
            "packets_per_s": round(self.accepted / self.elapsed) if self.elapsed else 0,
            "duplicate_batches": sum(s.duplicates for s in self.streams),
            "resent_batches": sum(s.resent for s in self.streams),
            "reconnects": sum(s.reconnects for s in self.streams),
            "errors": self.errors,
            # how much of their time the streams waited for acks (1: all of it, the window
            # bounded the rate), and how long an ack took on average
            "window_wait_share": round(waited / span, 3) if span else 0.0,
            "ack_latency_ms": (
                round(1000 * sum(s.ack_seconds for s in self.streams) / acked_batches, 1)
                if acked_batches
                else None
            ),
        }


async def _stream_packets(
    channel: grpc.aio.Channel,
    pool: PacketPool,
    result: StreamResult,
    n: int | None,
    pace: Pacer,
    counter: list[int],
    metadata: tuple[tuple[str, str], ...] | None = None,
) -> None:
    call = channel.stream_unary(STREAM_PACKETS, _identity, Ack.FromString)

    async def packets() -> Any:
        packets_ = pool.packets
        size = len(packets_)
        paced = pace.rate is not None  # unlimited: no await per packet in this hot loop
        i = 0
        while (n is None or i < n) and not pace.expired():
            yield packets_[(result.offset + i) % size]
            i += 1
            result.sent = i
            counter[0] += 1
            if paced:
                await pace.wait(1)

    ack: Ack = await call(packets(), metadata=metadata)
    result.accepted = ack.accepted
    result.rejected.update(dict(ack.rejected_by_reason))
    if ack.truncated:
        result.error = "server stopped reading early (shutdown); resend the rest"


class _BatchStream:
    """One sender stream of batches with one producer id, across reconnects: after a
    broken stream, reconnect with capped backoff and resend every unacknowledged batch
    first (the service skips the ones it had already committed, so each is counted exactly
    once). Acks come in order, so what is acknowledged is always a prefix of what was
    generated."""

    def __init__(
        self,
        pool: PacketPool,
        result: StreamResult,
        n: int | None,
        opts: SendSettings,
        pace: Pacer,
        counter: list[int],
    ) -> None:
        self.pool, self.result, self.n, self.opts = pool, result, n, opts
        self.pace, self.counter = pace, counter
        self.producer = uuid.uuid4().hex
        self.metadata = ClientSecurity.of(opts).metadata
        # (batch id, message, packets, when it was first written)
        self.unacked: deque[tuple[int, bytes, int, float]] = deque()
        self.next_id = 0
        self.pos = result.offset
        self.backoff = 0.05
        self.last_progress = time.monotonic()

    async def run(self, channels: list[grpc.aio.Channel]) -> None:
        started = time.monotonic()
        try:
            await self._run(channels)
        finally:
            self.result.span_s = time.monotonic() - started

    async def _run(self, channels: list[grpc.aio.Channel]) -> None:
        attempt = 0
        while True:
            # Each reconnect moves on to the next target (a dead replica is left behind).
            error = await self._one_call(channels[attempt % len(channels)])
            attempt += 1
            if error is None:
                return
            if error.startswith(_FINAL):
                self.result.error = error  # a resend would be refused the same way
                return
            if time.monotonic() - self.last_progress > self.opts.retry_for:
                self.result.error = (
                    f"{error}; gave up after {self.opts.retry_for:.0f}s without progress"
                )
                return
            self.result.reconnects += 1
            await asyncio.sleep(self.backoff * _JITTER.uniform(0.5, 1.0))
            self.backoff = min(self.backoff * 2, 2.0)

    async def _one_call(self, channel: grpc.aio.Channel) -> str | None:
        """One StreamBatches call: None when everything was sent and acknowledged, else
        how the call ended."""
        method = channel.stream_stream(STREAM_BATCHES, _identity, BatchAck.FromString)
        # grpc.aio allows a call with no request iterator (then write()/done_writing());
        # the type stubs predate that.
        call = method(metadata=self.metadata)  # type: ignore[call-arg]
        window = asyncio.Semaphore(self.opts.inflight)
        reader = asyncio.create_task(self._read_acks(call, window))
        try:
            await self._write(call, window, reader)
            since = time.monotonic()  # (all written: what is left is waiting for the acks)
            if not reader.done():
                await call.done_writing()
            try:
                await reader
            finally:
                self.result.window_wait_s += time.monotonic() - since
            return None if not self.unacked else "the stream ended with batches unacknowledged"
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        except asyncio.InvalidStateError:
            # a write on a call that had just ended: report how the call ended
            return f"{(await call.code()).name}: {await call.details()}"
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _write(
        self, call: Any, window: asyncio.Semaphore, reader: asyncio.Task[None]
    ) -> None:
        """Resend what the last call left unacknowledged, then generate new batches."""
        result, opts, n = self.result, self.opts, self.n
        # (a resent batch's ack latency runs from its resend, not through the outage; no
        # ack of this call can come before its first write)
        now = time.monotonic()
        self.unacked = deque((i, message, m, now) for i, message, m, _ in self.unacked)
        for _, message, _, _ in list(self.unacked):
            await self._slot(window)
            if reader.done():
                return
            await call.write(message)
            result.resent += 1
        while (n is None or result.sent < n) and not self.pace.expired() and not reader.done():
            m = opts.batch_size if n is None else min(opts.batch_size, n - result.sent)
            header = Batch(producer_id=self.producer, batch_id=self.next_id).SerializeToString()
            pool = self.pool
            body = pool.columns_body(self.pos, m) if opts.columnar else pool.batch_body(self.pos, m)
            message = header + body
            await self._slot(window)
            if reader.done():
                return
            # Generated once: from here on it is resent until acknowledged, even if this
            # write fails.
            self.unacked.append((self.next_id, message, m, time.monotonic()))
            self.next_id += 1
            self.pos += m
            result.sent += m
            await call.write(message)
            await self.pace.wait(m)

    async def _slot(self, window: asyncio.Semaphore) -> None:
        """A window slot; the time spent waiting for one (for an ack) is the result's."""
        if not window.locked():
            await window.acquire()
            return
        since = time.monotonic()
        await window.acquire()
        self.result.window_wait_s += time.monotonic() - since

    async def _read_acks(self, call: Any, window: asyncio.Semaphore) -> None:
        result = self.result
        try:
            async for ack in call:
                expected, _, _, written = self.unacked.popleft()
                if ack.batch_id != expected:
                    raise RuntimeError(f"ack for batch {ack.batch_id}, expected {expected}")
                result.ack_seconds += time.monotonic() - written
                result.acked_batches += 1
                result.accepted += ack.accepted
                result.rejected.update(dict(ack.rejected_by_reason))
                result.duplicates += ack.duplicate
                self.counter[0] += ack.accepted + ack.rejected
                self.last_progress = time.monotonic()
                self.backoff = 0.05
                window.release()
        finally:
            # The stream is over: free a writer waiting for a window slot.
            for _ in range(self.opts.inflight):
                window.release()


class Pacer:
    """Spaces one stream's sends to its share of --rate, and ends a --duration run."""

    def __init__(self, rate: float | None, duration: float | None) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.end = self.start + duration if duration else None
        self.sent = 0

    def expired(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end

    async def wait(self, packets: int) -> None:
        self.sent += packets
        if self.rate is None:
            return
        delay = self.start + self.sent / self.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


def _shares(total: int | None, streams: int) -> list[int | None]:
    """Each stream's part of `total` packets (None: until the duration ends)."""
    if total is None:
        return [None] * streams
    return [total // streams + (1 if s < total % streams else 0) for s in range(streams)]


async def _grpc_stream(
    opts: SendSettings,
    pool: PacketPool,
    result: StreamResult,
    n: int | None,
    pace: Pacer,
    counter: list[int],
    order: list[str],
) -> None:
    """One TelemetryIngest stream; `order`: its targets, the first first."""
    # One connection per stream (its own subchannel pool: grpc would otherwise share one
    # TCP connection between identical channels), so that several ingest workers or a
    # connection-level load balancer spread the streams.
    options = [
        ("grpc.max_send_message_length", 256 * 1024 * 1024),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    security = ClientSecurity.of(opts)
    channels = [security.channel(t, options) for t in order]
    try:
        if opts.batch_size == 1:
            await _stream_packets(channels[0], pool, result, n, pace, counter, security.metadata)
        else:
            await _BatchStream(pool, result, n, opts, pace, counter).run(channels)
    except grpc.aio.AioRpcError as exc:
        result.error = f"{exc.code().name}: {exc.details()}"
    finally:
        for channel in channels:
            await channel.close(None)


def _grpc_mode(opts: SendSettings) -> str:
    if opts.batch_size == 1:
        return "StreamPackets"
    return "StreamBatches (columns)" if opts.columnar else "StreamBatches (rows)"


async def send(opts: SendSettings, progress: Progress | None = None) -> SendReport:
    """Run the load as `opts` says and report what was acknowledged."""
    if opts.protocol == "mqtt":  # its own publishers (loadgen/mqtt.py)
        return await _other_protocol(opts, progress)
    pool = PacketPool(opts)
    total = opts.total
    per_stream_rate = opts.rate / opts.streams if opts.rate else None
    shares = _shares(total, opts.streams)
    stride = max(1, len(pool) // opts.streams)
    results = [StreamResult(offset=s * stride) for s in range(opts.streams)]
    counter = [0]
    # The other receivers (loadgen/protocols.py); imported here: they use this module's pool.
    from rtmonitor.loadgen.protocols import PROTOCOLS, drive

    protocol = PROTOCOLS.get(opts.protocol)
    mode = protocol.mode if protocol is not None else _grpc_mode(opts)
    task_id = None
    if progress is not None:
        task_id = progress.add_task(
            f"{mode} -> {opts.target}", total=total if total is not None else None
        )
    started, started_at = time.monotonic(), time.time()
    targets = [t.strip() for t in opts.target.split(",") if t.strip()]

    async def one(s: int) -> None:
        pace = Pacer(per_stream_rate, opts.duration)
        # stream s starts at target s (mod n), then rotates through the rest on reconnects
        order = targets[s % len(targets) :] + targets[: s % len(targets)]
        if protocol is not None:
            await drive(opts, protocol, pool, results[s], shares[s], pace, counter, order[0])
        else:
            await _grpc_stream(opts, pool, results[s], shares[s], pace, counter, order)

    tasks = [asyncio.create_task(one(s)) for s in range(opts.streams)]
    try:
        while not all(t.done() for t in tasks):
            await asyncio.wait(tasks, timeout=0.2)
            if progress is not None and task_id is not None:
                progress.update(task_id, completed=counter[0])
    finally:
        # cancel-safe: a cancelled send() takes its streams down with it
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in tasks:
        t.result()
    if progress is not None and task_id is not None:
        progress.update(task_id, completed=counter[0])
    return SendReport(
        mode=mode,
        streams=results,
        elapsed=time.monotonic() - started,
        devices=opts.devices,
        payload_size=opts.payload_size,
        names=pool.names,
        started_at=started_at,
    )


async def _other_protocol(opts: SendSettings, progress: Progress | None) -> SendReport:
    """MQTT's publishers (imported on use: paho)."""
    from rtmonitor.loadgen.mqtt import send_mqtt

    return await send_mqtt(opts, progress)


_T = TypeVar("_T")


def run_loop(main: Coroutine[Any, Any, _T]) -> _T:
    """Run a load generator on uvloop where it is installed (a dependency, except on
    Windows). The generator shares the machine with the service it measures, and every
    cycle it spends is one the service does not get; uvloop spends fewer per packet sent.
    The service itself stays on asyncio's loop (benchmarks/RESULTS.md has both figures)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


async def run_send(opts: SendSettings) -> int:
    """The `send` command: run, print a summary; exit status 1 if any stream failed."""
    console = Console(stderr=True)
    show = opts.progress and console.is_terminal and not opts.json_output
    if show:
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("acked"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            report = await send(opts, progress)
    else:
        report = await send(opts)
    summary = report.as_dict()
    if opts.json_output:
        print(json.dumps(summary))
    else:
        table = Table(title=f"rtmonitor send: {report.mode}, {opts.streams} stream(s)")
        table.add_column("what")
        table.add_column("value", justify="right")
        table.add_row("sent", f"{summary['sent']:,}")
        # MQTT devices hear from the broker; the service acknowledges to the broker
        acked_by = "by the broker" if opts.protocol == "mqtt" else "(counted)"
        table.add_row(f"acknowledged {acked_by}", f"{summary['accepted']:,}")
        table.add_row("rejected", f"{summary['rejected']:,}")
        for reason, count in sorted(summary["rejected_by_reason"].items()):
            table.add_row(f"  {reason}", f"{count:,}")
        if summary["reconnects"]:
            table.add_row("reconnects", f"{summary['reconnects']:,}")
            table.add_row("batches resent", f"{summary['resent_batches']:,}")
            table.add_row("  of them already committed", f"{summary['duplicate_batches']:,}")
        table.add_row("elapsed", f"{summary['elapsed_s']:.2f} s")
        table.add_row("acknowledged packets/s", f"{summary['packets_per_s']:,}")
        Console().print(table)
        for error in report.errors:
            console.print(f"[red]stream error:[/red] {error}")
    return 1 if report.errors else 0
