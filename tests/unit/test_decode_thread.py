"""StreamBatches validates a fleet's batches in its decode thread, under the validator's
lock, and a few devices' batches on the event loop (under the lock too)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from helpers import encode_columns

from rtmonitor.auth import ANONYMOUS
from rtmonitor.ingest.servicer import DECODE_THREAD_DEVICES, IngestServicer
from rtmonitor.ingest.v1.telemetry_pb2 import Batch, Packet
from rtmonitor.ingest.validation import Known, Limits, Validator
from rtmonitor.pipeline.aggregator import Aggregator
from rtmonitor.pipeline.queue import PacketQueue
from rtmonitor.pipeline.work import BatchWork, Work


class Watched(Validator):
    """Records, for each batch looked up, the thread and whether the lock was held."""

    def __init__(self, limits: Limits) -> None:
        super().__init__(limits)
        self.seen: list[tuple[str, bool, int]] = []

    def entries(self, device_ids: list[str]) -> list[Known]:
        self.seen.append((threading.current_thread().name, self.lock.locked(), len(device_ids)))
        return super().entries(device_ids)


def _batch(devices: int, batch_id: int) -> bytes:
    packets = [Packet(device_id=f"d{i}", kind="k", values={"t": 1.0}) for i in range(devices)]
    return Batch(
        producer_id="p", batch_id=batch_id, columns=encode_columns(packets)
    ).SerializeToString()


def test_a_fleets_batch_is_validated_off_the_event_loop_under_the_lock() -> None:
    validator = Watched(Limits())
    queue: PacketQueue[Work] = PacketQueue(1_000_000)
    servicer = IngestServicer(
        validator, queue, Aggregator(), max_batch_packets=10_000, max_inflight_batches=8
    )
    context: Any = None  # read only for refusals by device prefix (none here)

    async def main() -> tuple[list[int], list[Work]]:
        accepted = []
        for devices, batch_id in ((DECODE_THREAD_DEVICES, 1), (10, 2)):
            item = await servicer._accept_batch(_batch(devices, batch_id), ANONYMOUS, context)
            accepted.append(getattr(item, "accepted", -1))
        return accepted, await queue.get_all()

    accepted, works = asyncio.run(main())
    assert accepted == [DECODE_THREAD_DEVICES, 10]
    (big_thread, big_locked, big_n), (small_thread, small_locked, small_n) = validator.seen
    assert big_thread.startswith("rtm-decode") and big_locked and big_n == DECODE_THREAD_DEVICES
    assert small_thread == threading.main_thread().name and small_locked and small_n == 10
    assert not validator.lock.locked()
    assert [w.batch_id for w in works if isinstance(w, BatchWork)] == [("p", 1), ("p", 2)]
