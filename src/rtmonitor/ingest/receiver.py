"""What the OTLP and HTTP JSON receivers share: a request's packets in, an answer sent only
once their counts are committed, every refusal counted by reason.

A request's packets become one BatchWork, as a StreamBatches batch does: the same
validation and aggregation (ingest/columnar.py), the same bounded queue, the same exact
Redis merge, and with a batch id (HTTP JSON's Idempotency-Key) the same exactly-once.
Unlike a gRPC stream, a request cannot be pushed back for long: a full queue or a commit
that does not come within its timeout answers "unavailable, retry" instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from rtmonitor.auth import ANONYMOUS, Principal, TokenRegistry, device_refusal
from rtmonitor.ingest.columnar import PacketTable, Records, decode_records
from rtmonitor.ingest.validation import Reason, Validator
from rtmonitor.model import BatchId
from rtmonitor.pipeline.aggregator import Aggregator
from rtmonitor.pipeline.queue import PacketQueue, QueueClosed
from rtmonitor.pipeline.work import BatchWork, CommitFailed, CommitTracker, Work

logger = logging.getLogger(__name__)

# How soon a refused client should try again (HTTP Retry-After, seconds).
RETRY_AFTER_S = 1

RefusalKind = Literal["invalid", "too_large", "unsupported", "unavailable"]


class Refused(Exception):
    """A whole request refused, with what to tell the client; `kind` picks the status
    (invalid: 400/422 / INVALID_ARGUMENT, too_large: 413 / RESOURCE_EXHAUSTED,
    unsupported: 415, unavailable: 503 + Retry-After / UNAVAILABLE)."""

    def __init__(
        self, reason: Reason, kind: RefusalKind, message: str, *, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.kind = kind
        self.message = message
        self.field = field  # for a 422: the bad field, as a path into the body


@dataclass(frozen=True, slots=True)
class Sender:
    """Who sent a request: its token (checked for the `ingest` scope before the request
    reaches a receiver), its address and the receiver's name, for refusal counts and logs."""

    principal: Principal = ANONYMOUS
    peer: str = ""
    surface: str = "otlp"


@dataclass(slots=True, kw_only=True)
class Outcome:
    """What became of a request's packets (once committed)."""

    accepted: int
    rejected: Counter[str]
    duplicate: bool = False  # its batch id was committed already: not counted again


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiverLimits:
    """The receivers' settings (from Settings)."""

    max_body_bytes: int
    max_packets: int  # packets in one HTTP JSON body
    queue_timeout_s: float
    commit_timeout_s: float
    device_attribute: str = "device.id"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def gunzip(body: bytes, limit: int) -> bytes:
    """A gzip body decompressed, refused past `limit` bytes before more is inflated (a
    small body can inflate a thousandfold)."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise Refused(
            Reason.MALFORMED_BODY, "invalid", f"Content-Encoding gzip, but the body is not: {exc}"
        ) from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise Refused(
            Reason.BODY_TOO_LARGE,
            "too_large",
            f"the body inflates past {limit} bytes (--http-ingest-max-bytes): send less per "
            "request",
        )
    if not inflater.eof:
        raise Refused(Reason.MALFORMED_BODY, "invalid", "the gzip body is truncated")
    return out


def decode_body(body: bytes, encoding: str, limit: int) -> bytes:
    """The body as sent (identity) or gunzipped; other encodings refused."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip"):
        return gunzip(body, limit)
    raise Refused(
        Reason.UNSUPPORTED_MEDIA_TYPE,
        "unsupported",
        f"Content-Encoding {encoding!r} is not supported: send gzip or no encoding",
    )


def idempotency_batch(producer: str, key: str) -> BatchId:
    """The batch id of an Idempotency-Key: the key hashed to 63 bits, under `producer` (a
    producer id scoped by token, Principal.producer_key: two tokens' keys never collide).
    A resend with the same key within --dedupe-window seconds is counted once."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return producer, int.from_bytes(digest, "big") >> 1


class Receiver:
    """Hands a request's packets to the pipeline and waits for their commit."""

    def __init__(
        self,
        validator: Validator,
        queue: PacketQueue[Work],
        aggregator: Aggregator,
        limits: ReceiverLimits,
        redis_error: Callable[[], str | None] = lambda: None,
        auth: TokenRegistry | None = None,
    ) -> None:
        self.validator = validator
        self.queue = queue
        self.aggregator = aggregator
        self.limits = limits
        self.redis_error = redis_error
        self.auth = auth if auth is not None else TokenRegistry(None)
        # Whole requests refused, by reason (GET /stats ingest.messages_refused_by_reason).
        self.refused: Counter[str] = Counter()

    def refuse(self, refusal: Refused) -> Refused:
        """Count a refusal; returns it, to raise."""
        self.refused[refusal.reason] += 1
        return refusal

    def _unavailable(self, reason: Reason, message: str) -> Refused:
        return self.refuse(Refused(reason, "unavailable", message))

    async def submit(
        self,
        records: Records | PacketTable,
        rejected: Counter[str],
        sender: Sender,
        *,
        batch_id: BatchId | None = None,
    ) -> Outcome:
        """Validate `records`, queue the good ones and wait for their commit. `rejected`:
        packets the receiver refused already (e.g. OTLP's no_device_id); they are counted
        with the validator's refusals, and packets outside the sender's device prefix as
        `device_not_permitted`. Raises Refused (unavailable) when the packets cannot be
        taken or committed in time: nothing of a request refused before it was queued is
        counted."""
        if self.queue.closed:
            raise self._unavailable(Reason.SHUTTING_DOWN, "the service is shutting down")
        if (error := self.redis_error()) is not None:
            raise self._unavailable(
                Reason.REDIS_UNAVAILABLE, f"commits to Redis fail ({error}): retry shortly"
            )
        prefix = sender.principal.device_prefix
        delta, refused = decode_records(records, self.validator, now_ms(), prefix)
        rejected = rejected + refused
        accepted = delta.total_packets
        tracker = CommitTracker()
        if accepted:
            work = BatchWork(parts=(delta,), tracker=tracker, batch_id=batch_id)
            try:
                await asyncio.wait_for(self.queue.put(work, accepted), self.limits.queue_timeout_s)
            except TimeoutError:
                raise self._unavailable(
                    Reason.QUEUE_FULL,
                    f"the ingest queue stayed full for {self.limits.queue_timeout_s:g}s: "
                    "retry shortly",
                ) from None
            except QueueClosed:
                raise self._unavailable(
                    Reason.SHUTTING_DOWN, "the service is shutting down"
                ) from None
            tracker.submitted()
            del work
        # The columns are the pipeline's now: a prepared flush lets them go (and stops
        # counting them against --max-pending-devices) while this request waits.
        del delta
        tracker.close()
        for reason, count in rejected.items():
            self.aggregator.count_rejected(reason, count)
        if denied := rejected.get(Reason.DEVICE_NOT_PERMITTED, 0):
            refusal = device_refusal(sender.principal)
            self.auth.refuse(sender.surface, sender.peer, refusal, denied)
        try:
            await asyncio.wait_for(tracker.wait(), self.limits.commit_timeout_s)
        except TimeoutError:
            raise self._unavailable(
                Reason.COMMIT_TIMEOUT,
                f"not committed within {self.limits.commit_timeout_s:g}s (Redis slow or "
                "away): retry; the packets may still be counted, so resend with the same "
                "Idempotency-Key to count them once",
            ) from None
        except CommitFailed as exc:
            raise self._unavailable(Reason.REDIS_UNAVAILABLE, f"{exc}; retry") from None
        return Outcome(accepted=accepted, rejected=rejected, duplicate=tracker.duplicate)
