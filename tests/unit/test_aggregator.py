"""The aggregator folds rows exactly: counts, bytes, kinds, value statistics, trackers."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtmonitor.model import BatchDelta, rate_key
from rtmonitor.pipeline.aggregator import Aggregator
from rtmonitor.pipeline.work import BatchWork, CommitTracker, RowsWork, Work


def test_fold_counts_and_statistics() -> None:
    async def main() -> None:
        agg = Aggregator()
        t1, t2 = CommitTracker(), CommitTracker()
        rows = [("a", "reading", 10, 100, {"t": 5.0}), ("b", "tcp", 3, 100, None)]
        agg.add(RowsWork(rows=rows, recv_ms=1000, tracker=t1))
        rows = [("a", "reading", 2, 50, {"t": 9.0}), ("a", "hb", 0, 200, {"t": -1.0})]
        agg.add(RowsWork(rows=rows, recv_ms=900, tracker=t2))
        agg.add(RowsWork(rows=[("a", "reading", 1, 200, {"t": 7.0})], recv_ms=1100, tracker=t2))
        agg.count_rejected("empty_device_id", 3)
        assert agg.pending_packets == 5
        delta, trackers, batches = agg.swap()
        assert agg.pending_packets == 0 and not agg.swap()[0]
        assert trackers == {t1: 1, t2: 2} and batches == []
        assert delta.packets == 5 and delta.bytes == 16
        assert delta.rejected == {"empty_device_id": 3}
        a = delta.devices["a"]
        assert (a.packets, a.bytes, a.first_seen, a.last_seen) == (4, 13, 900, 1100)
        assert a.kinds == {"reading": 3, "hb": 1}
        t = a.values["t"]
        assert (t.count, t.sum, t.min, t.max) == (4, 20.0, -1.0, 9.0)
        # newest device timestamp wins; on a tie (200) the later arrival wins
        assert (t.last, t.last_ts) == (7.0, 200)
        assert delta.devices["b"].kinds == {"tcp": 1}

    asyncio.run(main())


def test_tracker_resolves_only_when_closed_and_all_committed() -> None:
    async def main() -> None:
        t = CommitTracker()
        t.submitted(2)
        t.close()
        waiter = asyncio.create_task(t.wait())
        t.committed(1)
        await asyncio.sleep(0)
        assert not waiter.done()
        t.committed(1)
        await asyncio.wait_for(waiter, 1)

    asyncio.run(main())


def test_batches_with_ids_are_kept_apart_and_merge_exactly() -> None:
    from rtmonitor.ingest.columnar import decode_rows
    from rtmonitor.ingest.v1.telemetry_pb2 import Packet
    from rtmonitor.ingest.validation import Limits, Validator
    from rtmonitor.model import FlushDelta, merge_batches, merge_into

    def batch(recv_ms: int, *packets: Packet) -> tuple[BatchDelta, ...]:
        return (decode_rows(packets, Validator(Limits()), recv_ms)[0],)

    async def main() -> None:
        agg = Aggregator()
        t = CommitTracker()
        agg.add(RowsWork(rows=[("a", "k", 1, 10, {"v": 1.0})], recv_ms=100, tracker=t))
        p1 = batch(
            200,
            Packet(device_id="a", kind="k", payload=b"xx", timestamp_ms=30, values={"v": 5.0}),
            Packet(device_id="b", kind="k", payload=b"x", timestamp_ms=5),
        )
        p2 = batch(
            50, Packet(device_id="a", kind="j", payload=b"xxx", timestamp_ms=20, values={"v": -2.0})
        )
        agg.add(BatchWork(parts=p1, tracker=t, batch_id=("p", 1)))
        agg.add(BatchWork(parts=p2, tracker=t, batch_id=("p", 2)))
        assert agg.pending_packets == 4 and agg.pending_batches == 2
        main, trackers, batches = agg.swap()
        assert main.packets == 1 and trackers == {t: 1}
        assert [b.batch_id for b in batches] == [("p", 1), ("p", 2)]
        merged = FlushDelta()
        merge_into(merged, main)
        merge_batches(merged, [part for pending in batches for part in pending.parts])
        a = merged.devices["a"]
        assert (a.packets, a.bytes, a.first_seen, a.last_seen) == (3, 6, 50, 200)
        assert a.kinds == {"k": 2, "j": 1}
        v = a.values["v"]
        assert (v.count, v.sum, v.min, v.max, v.last, v.last_ts) == (3, 4.0, -2.0, 5.0, 5.0, 30)
        assert merged.packets == 4 and merged.bytes == 7
        # the sources are untouched: a conflict can rebuild the merge without them
        again = FlushDelta()
        merge_batches(again, batches[0].parts)
        assert again.devices["a"].packets == 1 and main.devices["a"].packets == 1
        agg.carry_over(batches[1:])
        assert agg.pending_batches == 1 and agg.pending_packets == 1

    asyncio.run(main())


def test_rates_use_complete_seconds_only() -> None:
    from rtmonitor.storage.store import rates

    now = 1000
    buckets = {"1000": "99", "999": "10", "999b": "100", "991": "20", "990": "40", "941": "60"}
    r = rates(buckets, now)
    # the current second (1000) is still filling up; 10 s = 990..999, 60 s = 940..999
    assert r.packets_per_s == {10: (10 + 20 + 40) / 10, 60: (10 + 20 + 40 + 60) / 60}
    assert r.bytes_per_s[10] == 100 / 10
    assert r.to_json()["packets_per_s_10s"] == r.packets_per_s[10]


def _rates_by_walking(buckets: dict[str, str], now: int) -> dict[str, float]:
    """The definition: every field of the hash, counted in each window its second is in."""
    sums = {(w, unit): 0 for w in (10, 60) for unit in ("packets", "bytes")}
    for field, value in buckets.items():
        unit = "bytes" if field.endswith("b") else "packets"
        age = now - int(field.removesuffix("b"))
        for w in (10, 60):
            if 1 <= age <= w:
                sums[w, unit] += int(value)
    return {rate_key(unit, w): n / w for (w, unit), n in sums.items()}


@settings(max_examples=300)
@given(
    st.dictionaries(
        st.tuples(st.integers(-70, 5), st.sampled_from(["", "b"])),
        st.integers(0, 10**12),
        max_size=300,
    )
)
def test_rates_look_up_what_walking_the_hash_counts(fields: dict[tuple[int, str], int]) -> None:
    """rates() looks up the seconds it needs; it must sum exactly what a walk over every
    field of the bucket hash sums (fields of the current second, the future, and seconds
    pruned late included)."""
    from rtmonitor.storage.store import rates

    now = 1_700_000_000
    buckets = {f"{now + offset}{unit}": str(n) for (offset, unit), n in fields.items()}
    assert rates(buckets, now).to_json() == _rates_by_walking(buckets, now)


@pytest.mark.parametrize("merge_entries", [3, 5_000])
def test_batches_without_ids_are_merged_in_passes_exactly(
    merge_entries: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches without an id wait in column form and are merged MERGE_ENTRIES at a time
    (and at the swap) in numpy passes: the delta equals folding and merging every item in
    turn, and the pending counts include what waits."""
    from rtmonitor.ingest.columnar import decode_rows
    from rtmonitor.ingest.v1.telemetry_pb2 import Packet
    from rtmonitor.ingest.validation import Limits, Validator
    from rtmonitor.model import FlushDelta, merge_batches
    from rtmonitor.pipeline import aggregator
    from rtmonitor.pipeline.aggregator import fold

    monkeypatch.setattr(aggregator, "MERGE_ENTRIES", merge_entries)
    v = Validator(Limits())

    def batch(recv: int, *spec: tuple[str, str, float, int]) -> tuple[BatchDelta, ...]:
        packets = []
        for device, kind, value, ts in spec:
            p = Packet(device_id=device, kind=kind, payload=b"xy", timestamp_ms=ts)
            p.values["t"] = value
            packets.append(p)
        return (decode_rows(packets, v, recv)[0],)

    async def main() -> None:
        t = CommitTracker()
        items: list[Work] = [
            BatchWork(parts=batch(100, ("a", "k", 1.5, 10), ("b", "j", 2.0, 10)), tracker=t),
            RowsWork(rows=[("a", "k", 4, 30, {"t": 9.0})], recv_ms=110, tracker=t),
            BatchWork(parts=batch(120, ("a", "j", -3.0, 20), ("c", "k", 0.5, 5)), tracker=t),
            BatchWork(parts=batch(130, ("b", "k", 7.0, 10)), tracker=t),  # a tie on b's newest
        ]
        agg = Aggregator()
        agg.add_all(items[:2])
        agg.add_all(items[2:])
        assert agg.pending_packets == 6
        # the folded row's a, and the parts: reduced to one (a, b, c) once they reach
        # MERGE_ENTRIES, else the five per-device entries as they came
        assert agg.pending_entries == (4 if merge_entries == 3 else 6)
        assert len(agg._delta.parts) == (1 if merge_entries == 3 else 3)
        want = FlushDelta()
        for work in items:
            if isinstance(work, RowsWork):
                fold(want, work.rows, work.recv_ms)
            else:
                for part in work.parts:
                    part.merge_into(want)
        got, trackers, _ = agg.swap()
        assert agg.pending_packets == 0 and agg.pending_entries == 0
        assert trackers == {t: 4}
        assert (got.packets, got.bytes) == (want.packets, want.bytes)
        folded = FlushDelta(devices=got.devices)
        merge_batches(folded, got.parts)
        assert folded.devices == want.devices
        b = folded.devices["b"]
        assert (b.packets, b.first_seen, b.last_seen, b.kinds) == (2, 100, 130, {"j": 1, "k": 1})
        assert (b.values["t"].last, b.values["t"].last_ts) == (7.0, 10)  # the later batch wins

    asyncio.run(main())


@pytest.mark.parametrize("with_ids", [True, False])
def test_enough_pending_batches_ask_for_a_flush(with_ids: bool) -> None:
    """Senders wait for acks: a few small batches must trigger a flush long before the
    packet or device thresholds would (with or without batch ids)."""
    from rtmonitor.ingest.columnar import decode_rows
    from rtmonitor.ingest.v1.telemetry_pb2 import Packet
    from rtmonitor.ingest.validation import Limits, Validator
    from rtmonitor.pipeline.queue import PacketQueue

    async def main() -> None:
        agg, queue, asked = Aggregator(), PacketQueue[Work](1000), []
        parts = (decode_rows([Packet(device_id="a", kind="k")], Validator(Limits()), 1)[0],)
        consumer = asyncio.create_task(
            agg.consume(
                queue,
                10**9,
                lambda: 10**9,
                3,
                lambda: asked.append(agg.pending_batches),
                lambda: 10**9,
            )
        )
        for n in range(5):
            batch_id = ("p", n) if with_ids else None
            await queue.put(BatchWork(parts=parts, tracker=CommitTracker(), batch_id=batch_id), 1)
            await asyncio.sleep(0.01)
        queue.close()
        await consumer
        assert asked == [3, 4, 5] and agg.pending_packets == 5
        agg.swap()
        assert agg.pending_batches == 0

    asyncio.run(main())


def test_a_trickle_of_packets_is_taken_in_few_wake_ups() -> None:
    """Single packets one loop turn apart, as a StreamPackets receiver hands them over
    (StreamRows), are taken together (the aggregator lingers after a small take), and the
    packets that joined a queued item count once, with their receive time."""
    from rtmonitor.pipeline.queue import PacketQueue
    from rtmonitor.pipeline.work import StreamRows

    async def main() -> None:
        agg, queue = Aggregator(), PacketQueue[Work](1000)
        consumer = asyncio.create_task(
            agg.consume(queue, 10**9, lambda: 10**9, 10**9, lambda: None, lambda: 10**9)
        )
        tracker = CommitTracker()
        rows = StreamRows(queue, tracker)
        row = ("a", "k", 1, 5, None)
        joined = 0
        for _ in range(41):
            if rows.append(row, 7):
                joined += 1
            else:
                await rows.put(row, 7)
            await asyncio.sleep(0)  # one loop turn: without the linger, one take per put
        assert queue.takes <= 20, queue.takes
        assert joined >= 20, "most packets joined a queued item"
        await rows.put(row, 7)  # a fresh item, still queued: only the same millisecond joins
        assert not rows.append(row, 8), "another receive time never joins an item"
        assert rows.append(row, 7)
        await asyncio.sleep(0.01)
        queue.close()
        await consumer
        delta, trackers, _ = agg.swap()
        assert delta.packets == 43 and delta.devices["a"].packets == 43
        assert delta.devices["a"].first_seen == delta.devices["a"].last_seen == 7
        assert trackers == {tracker: 41 - joined + 1}, "one commit unit per queue item"

    asyncio.run(main())
