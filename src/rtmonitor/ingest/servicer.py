"""The TelemetryIngest gRPC servicer: reads streams, validates, queues, acknowledges."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from rtmonitor.auth import (
    TOKEN_REVOKED,
    AuthError,
    Principal,
    TokenRegistry,
    device_refusal,
)
from rtmonitor.ingest.budget import ByteBudget
from rtmonitor.ingest.columnar import (
    BatchTooLarge,
    ColumnsError,
    ParsedBatch,
    decode_columns,
    decode_rows,
    parse_batch,
)
from rtmonitor.ingest.guard import SURFACE, authorize, peer_host
from rtmonitor.ingest.v1.telemetry_pb2 import Ack, BatchAck, Packet
from rtmonitor.ingest.validation import Reason, Validator
from rtmonitor.model import DEVICE_ID_MAX, ID_ALPHABET, ID_CHARS, BatchDelta, Row
from rtmonitor.pipeline.aggregator import Aggregator
from rtmonitor.pipeline.queue import PacketQueue, QueueClosed
from rtmonitor.pipeline.work import BatchWork, CommitFailed, CommitTracker, StreamRows, Work

logger = logging.getLogger(__name__)

# A batch stream's reader gives the event loop back after this much work. gRPC hands over
# messages it already holds without suspending the reader, so under load one stream could
# decode batch after batch in a single turn of the loop while HTTP requests wait.
_READ_TURN_S = 0.001
# A batch spread over at least this many devices is validated in the decode thread, not on
# the event loop: its cost grows with its devices (a dict lookup, and a few passes, per
# device and batch: ~20 ms for a 10,000-row batch over a fleet), and on the loop every
# read, ack and flush step waited behind it. In a thread, Python hands the GIL over every
# few ms: at 100,000 devices, GET /metrics?limit=100 p99 fell from ~300 to ~120 ms and
# GET /metrics/{id} from ~97 to ~74, for ~8% more CPU per packet (RESULTS.md, tenth pass).
# A batch of a few devices is cheaper to decode than the hand-over.
DECODE_THREAD_DEVICES = 1_000
SHUTDOWN_MESSAGE = "server is shutting down: resend unacknowledged batches (to another instance)"
# StreamPackets messages below this size skip the byte budget (one packet is far smaller):
# a stream holds one message at a time, so they add at most --max-streams of it in all.
_SMALL_MESSAGE = 64 * 1024


class _StreamError(Exception):
    """Ends a StreamBatches stream with a status, once every earlier batch is acknowledged."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True)
class _Pending:
    """A batch whose ack waits for its commit."""

    producer_id: str
    batch_id: int
    accepted: int
    rejected: Counter[str]
    tracker: CommitTracker


# producer ids share the device id alphabet: they become part of Redis keys and logs
_PRODUCER_ID = re.compile(f"[{ID_CHARS}]{{1,{DEVICE_ID_MAX}}}")


class _Stream:
    """One open stream's reader, watched for idleness and for its token's removal."""

    __slots__ = ("task", "last_activity", "busy", "idle", "principal", "revoked")

    def __init__(self, principal: Principal) -> None:
        self.task: asyncio.Task[None] | None = None
        self.last_activity = time.monotonic()
        self.busy = False  # processing a message (maybe waiting on backpressure): not idle
        self.idle = False  # ended by the idle timeout
        self.principal = principal
        self.revoked = False  # ended because its token left the auth file


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class IngestServicer:
    """Receivers for both RPCs. Requests arrive as raw bytes and are parsed here, so that a
    malformed message becomes a counted rejection or INVALID_ARGUMENT with a clear message
    rather than gRPC's generic deserialization error."""

    def __init__(
        self,
        validator: Validator,
        queue: PacketQueue[Work],
        aggregator: Aggregator,
        *,
        max_batch_packets: int,
        max_inflight_batches: int,
        max_streams: int = 1024,
        max_streams_per_peer: int = 64,
        max_inflight_message_bytes: int = 128 * 1024 * 1024,
        idle_timeout: float = 300.0,
        auth: TokenRegistry | None = None,
    ) -> None:
        self.validator = validator
        self.auth = auth if auth is not None else TokenRegistry(None)
        self.queue = queue
        self.aggregator = aggregator
        self.max_batch_packets = max_batch_packets
        self.max_inflight_batches = max_inflight_batches
        self.max_streams = max_streams
        self.max_streams_per_peer = max_streams_per_peer
        self.idle_timeout = idle_timeout
        self.budget = ByteBudget(max_inflight_message_bytes)
        self._streams: set[_Stream] = set()
        self._per_peer: Counter[str] = Counter()
        self._stopping = False
        self.active_streams = 0
        self.streams_idle_closed = 0
        # Refusals of whole streams and whole messages, by reason (GET /stats). Refused
        # packets are counted by the aggregator, which also commits them to Redis.
        self.streams_refused_by_reason: Counter[str] = Counter()
        self.messages_refused_by_reason: Counter[str] = Counter()
        # One thread validates the batches of many devices, one after another (the
        # validator's lock would serialise them anyway): see DECODE_THREAD_DEVICES.
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="rtm-decode")

    @property
    def streams_refused(self) -> int:
        """Streams refused at their start, for any reason."""
        return self.streams_refused_by_reason.total()

    def stop_reading(self) -> None:
        """Shutdown step 1: stop reading every open stream; acks of what was read still go out."""
        self._stopping = True
        for stream in list(self._streams):
            if stream.task is not None:
                stream.task.cancel()

    async def watch_idle(self) -> None:
        """Close streams that sent nothing for `idle_timeout` seconds, and those whose token
        left the auth file (one loop for all: nothing is added per message but two
        attribute writes)."""
        period = min(1.0, self.idle_timeout / 4)
        is_current = self.auth.is_current
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for stream in list(self._streams):
                if stream.task is None or stream.revoked:
                    continue
                if not is_current(stream.principal):
                    stream.revoked = True
                    stream.task.cancel()
                    continue
                idle_for = now - stream.last_activity
                if not stream.busy and idle_for > self.idle_timeout:
                    stream.idle = True
                    self.streams_idle_closed += 1
                    stream.task.cancel()

    async def _end_revoked(
        self, context: grpc.aio.ServicerContext[Any, Any], stream: _Stream, done: str
    ) -> None:
        """End a stream whose token was removed: UNAUTHENTICATED, after its acks."""
        name = stream.principal.name
        error = AuthError(
            "unauthenticated",
            TOKEN_REVOKED,
            f"token {name!r} is no longer in the auth file (removed or changed): stream closed; "
            f"{done}",
            name,
        )
        self.auth.refuse(SURFACE, peer_host(context.peer() or ""), error)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, error.message)

    def _spawn(self, stream: _Stream, reader: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = stream.task = asyncio.create_task(reader)
        self._streams.add(stream)
        task.add_done_callback(lambda _: self._streams.discard(stream))
        if self._stopping:
            task.cancel()
        return task

    async def _admit(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """Take a stream slot for this call's peer (its host), or end the call; pair with
        _leave(peer)."""
        peer = peer_host(context.peer() or "")
        if self.active_streams >= self.max_streams:
            self.streams_refused_by_reason["max_streams"] += 1
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many concurrent streams ({self.active_streams}, --max-streams "
                f"{self.max_streams}): send more per stream (batches), or retry later",
            )
        if self._per_peer[peer] >= self.max_streams_per_peer:
            self.streams_refused_by_reason["max_streams_per_peer"] += 1
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many concurrent streams from {peer} ({self._per_peer[peer]}, "
                f"--max-streams-per-peer {self.max_streams_per_peer}): send more per stream "
                "(batches), or close idle streams",
            )
        self.active_streams += 1
        self._per_peer[peer] += 1
        return peer

    def _leave(self, peer: str) -> None:
        self.active_streams -= 1
        self._per_peer[peer] -= 1
        if not self._per_peer[peer]:
            del self._per_peer[peer]

    def _idle_message(self, what: str) -> str:
        return (
            f"no message for {self.idle_timeout:g}s (--stream-idle-timeout): stream closed; "
            f"{what}open a new stream when there is data to send"
        )

    # --- StreamPackets: one packet per message, one Ack at the end ------------------------

    async def stream_packets(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, Ack]
    ) -> Ack:
        principal = await authorize(context, self.auth)
        tracker = CommitTracker()
        rejected: Counter[str] = Counter()
        accepted = 0

        stream = _Stream(principal)
        monotonic = time.monotonic

        async def read() -> None:
            nonlocal accepted
            check = self._packet_check(principal, context)
            rows = StreamRows(self.queue, tracker)
            append = rows.append
            count_rejected = self.aggregator.count_rejected
            budget = self.budget
            async for raw in requests:
                stream.last_activity = monotonic()
                recv_ms = _now_ms()
                # Only a big message takes the byte budget (and waits its turn with the
                # other streams); a single packet goes straight through.
                held = len(raw)
                if held >= _SMALL_MESSAGE:
                    stream.busy = True
                    await budget.acquire(held)
                    stream.busy = False
                else:
                    held = 0
                try:
                    result = check(raw, recv_ms)
                finally:
                    if held:
                        budget.release(held)
                if held and budget.waiting:  # others wait for bytes: stop reading, as they do
                    stream.busy = True
                    await budget.turn()
                    stream.busy = False
                if not isinstance(result, tuple):
                    rejected[str(result)] += 1
                    count_rejected(str(result))
                    continue
                if not append(result, recv_ms):
                    stream.busy = True
                    await rows.put(result, recv_ms)
                    stream.busy = False
                accepted += 1

        peer = await self._admit(context)
        try:
            truncated = await self._run_reader(stream, read())
            tracker.close()
            try:
                await tracker.wait()
            except CommitFailed as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc}; resend this stream")
            done = (
                f"its first {accepted + rejected.total()} packets were processed "
                f"({accepted} counted); "
            )
            if stream.revoked:
                await self._end_revoked(context, stream, done + "use a valid token")
            if stream.idle:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, self._idle_message(done))
        finally:
            self._leave(peer)
        return Ack(
            accepted=accepted,
            rejected=rejected.total(),
            rejected_by_reason=rejected,
            truncated=truncated,
        )

    def _packet_check(
        self, principal: Principal, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Callable[[bytes, int], Row | Reason]:
        """StreamPackets' per-packet step: parse, the token's device prefix, validate."""
        check = self.validator.check
        parse = Packet.FromString
        prefix = principal.device_prefix
        if prefix is not None:
            # The stream's peer and refusal, built once: not again for every denied packet.
            refuse = self.auth.refuse
            peer = peer_host(context.peer() or "")
            refusal = device_refusal(principal)

        lock = self.validator.lock

        def checked(raw: bytes, recv_ms: int) -> Row | Reason:
            try:
                packet = parse(raw)
            except DecodeError:
                return Reason.MALFORMED
            if prefix is not None and not packet.device_id.startswith(prefix):
                refuse(SURFACE, peer, refusal)
                return Reason.DEVICE_NOT_PERMITTED  # never reaches the validator
            with lock:
                return check(packet, recv_ms)

        return checked

    async def _run_reader(self, stream: _Stream, coro: Coroutine[Any, Any, None]) -> bool:
        """Run a stream's reader; True if shutdown cut it short. Cancels it if we are cancelled."""
        reader = self._spawn(stream, coro)
        try:
            await asyncio.wait({reader})
        finally:
            reader.cancel()
        if reader.cancelled():
            return True
        exc = reader.exception()
        if isinstance(exc, QueueClosed):
            return True
        if exc is not None:
            raise exc
        return False

    # --- StreamBatches: batches in, one BatchAck per batch out (after its commit) ---------

    async def stream_batches(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, BatchAck]
    ) -> AsyncIterator[BatchAck]:
        principal = await authorize(context, self.auth)
        pending: asyncio.Queue[_Pending | _StreamError | None] = asyncio.Queue()
        # At most this many batches wait for their ack: a client that never reads its acks
        # stops our writes, then this reader, then (flow control) its own sends.
        window = asyncio.Semaphore(self.max_inflight_batches)
        stream = _Stream(principal)

        async def read() -> None:
            turn_started = time.perf_counter()
            budget = self.budget
            try:
                await window.acquire()
                async for raw in requests:
                    stream.busy = True
                    size = len(raw)
                    await budget.acquire(size)
                    try:
                        item = await self._accept_batch(raw, principal, context)
                    finally:
                        budget.release(size)
                    pending.put_nowait(item)
                    if isinstance(item, _StreamError):
                        return
                    stream.last_activity = time.monotonic()
                    # The next message is read only with an ack slot free and the process's
                    # byte budget not exhausted: until then gRPC holds no message for us.
                    await window.acquire()
                    await budget.turn()
                    stream.busy = False
                    if time.perf_counter() - turn_started > _READ_TURN_S:
                        await asyncio.sleep(0)  # let HTTP requests and other streams in
                        turn_started = time.perf_counter()
            finally:
                pending.put_nowait(None)

        peer = await self._admit(context)
        reader = self._spawn(stream, read())
        try:
            while (item := await pending.get()) is not None:
                if isinstance(item, _StreamError):
                    await context.abort(item.code, item.message)
                try:
                    await item.tracker.wait()
                except CommitFailed as exc:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc}; resend")
                yield BatchAck(
                    producer_id=item.producer_id,
                    batch_id=item.batch_id,
                    accepted=item.accepted,
                    rejected=item.rejected.total(),
                    rejected_by_reason=item.rejected,
                    duplicate=item.tracker.duplicate,
                )
                window.release()
            await asyncio.wait({reader})
            if stream.revoked:
                await self._end_revoked(
                    context, stream, "every batch acknowledged before was counted"
                )
            if stream.idle:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, self._idle_message(""))
            if reader.cancelled() or isinstance(reader.exception(), QueueClosed):
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTDOWN_MESSAGE)
            if (error := reader.exception()) is not None:
                raise error
        finally:
            reader.cancel()
            self._leave(peer)

    def _decode(
        self, batch: ParsedBatch, prefix: str | None
    ) -> tuple[list[BatchDelta], Counter[str]]:
        """Validate and aggregate a batch's columns, then its rows (both forms may be in one
        batch): their deltas and the refused packets by reason. Raises ColumnsError, before
        any packet of the batch is admitted to the validator's vocabulary, if its columns
        are inconsistent (the whole batch is refused)."""
        recv_ms = _now_ms()
        parts = []
        rejected: Counter[str] = Counter()
        # (each decode holds the validator's lock while it reads and grows its table)
        if batch.columns is not None:
            col_delta, rejected = decode_columns(batch.columns, self.validator, recv_ms, prefix)
            parts.append(col_delta)
        # Rows go through the same column code (ingest/columnar.py): no per-packet loop.
        row_delta, row_rejected = decode_rows(batch.rows, self.validator, recv_ms, prefix)
        parts.append(row_delta)
        rejected.update(row_rejected)
        return parts, rejected

    def _denied(
        self, context: grpc.aio.ServicerContext[Any, Any], principal: Principal, count: int
    ) -> None:
        """Count packets outside the token's device prefix (by the aggregator too: they
        are rejected packets like any other)."""
        self.auth.refuse(SURFACE, peer_host(context.peer() or ""), device_refusal(principal), count)

    async def _accept_batch(
        self, raw: bytes, principal: Principal, context: grpc.aio.ServicerContext[Any, Any]
    ) -> _Pending | _StreamError:
        """Validate one batch and queue its good packets; an error ends the stream."""
        try:
            batch = parse_batch(raw, self.max_batch_packets)
        except DecodeError as exc:
            self.messages_refused_by_reason[Reason.MALFORMED_BATCH] += 1
            return _StreamError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"malformed Batch message ({exc}): send a rtmonitor.v1.Batch "
                "serialized with protobuf",
            )
        except BatchTooLarge as big:
            self.messages_refused_by_reason[Reason.BATCH_TOO_LARGE] += 1
            return _StreamError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{big}; the limit is {self.max_batch_packets} "
                "(--max-batch-packets): split it into smaller batches",
            )
        producer = batch.producer_id
        if producer and not _PRODUCER_ID.fullmatch(producer):
            self.messages_refused_by_reason[Reason.INVALID_PRODUCER_ID] += 1
            return _StreamError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"batch {batch.batch_id}: producer_id must be 1-{DEVICE_ID_MAX} characters "
                f"of {ID_ALPHABET} (or empty, which turns off deduplication)",
            )
        try:
            if batch.device_entries >= DECODE_THREAD_DEVICES:
                loop = asyncio.get_running_loop()
                decoded = await loop.run_in_executor(
                    self._decoder, self._decode, batch, principal.device_prefix
                )
            else:
                decoded = self._decode(batch, principal.device_prefix)
        except ColumnsError as exc:
            self.messages_refused_by_reason[Reason.INVALID_COLUMNS] += 1
            return _StreamError(grpc.StatusCode.INVALID_ARGUMENT, f"batch {batch.batch_id}: {exc}")
        parts, rejected = decoded
        for reason, count in rejected.items():
            self.aggregator.count_rejected(reason, count)
        if denied := rejected.get(Reason.DEVICE_NOT_PERMITTED):
            self._denied(context, principal, denied)
        parts = [p for p in parts if p.total_packets]
        accepted = sum(p.total_packets for p in parts)
        tracker = CommitTracker()
        if accepted:
            # With a producer id the batch is counted exactly once, even if resent; the id
            # is the token's own (`<token>/<producer>`): no token can claim another's.
            batch_key = (principal.producer_key(producer), batch.batch_id) if producer else None
            work = BatchWork(parts=tuple(parts), tracker=tracker, batch_id=batch_key)
            await self.queue.put(work, accepted)
            tracker.submitted()
        tracker.close()
        return _Pending(batch.producer_id, batch.batch_id, accepted, rejected, tracker)
