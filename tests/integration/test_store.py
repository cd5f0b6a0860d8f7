"""The store against a real Redis: exact merges, idempotent retries, listing."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import pytest
import redis
import zstandard
from redis.client import NEVER_DECODE

from rtmonitor.model import DeviceDelta, FlushDelta, ValueStats
from rtmonitor.pipeline.recovery import Recovery
from rtmonitor.storage import store as store_module
from rtmonitor.storage.committer import RedisCommitter
from rtmonitor.storage.embedded import EmbeddedRedis
from rtmonitor.storage.keys import LAYOUT_VERSION
from rtmonitor.storage.store import LayoutMismatch, RedisStore


def delta(**devices: DeviceDelta) -> FlushDelta:
    d = FlushDelta(devices=dict(devices), rejected=Counter({"empty_device_id": 1}))
    d.packets = sum(x.packets for x in devices.values())
    d.bytes = sum(x.bytes for x in devices.values())
    return d


async def indexed(store: RedisStore) -> dict[str, int]:
    """Each device's packets as its index group's column holds them."""
    return {d: n for d, _, n in await store.recent(0, 1000)}


def dev(packets: int, first: int, last: int, t: ValueStats | None = None) -> DeviceDelta:
    return DeviceDelta(
        packets=packets,
        bytes=packets * 10,
        first_seen=first,
        last_seen=last,
        kinds={"reading": packets},
        values={"t": t} if t else {},
    )


def test_merge_is_exact_and_retries_are_idempotent(redis_server: EmbeddedRedis) -> None:
    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "t") as store:
            one = delta(
                a=dev(
                    3,
                    100,
                    200,
                    ValueStats(count=3, sum=0.1 + 0.2, min=-5.5, max=1e300, last=2.0, last_ts=150),
                )
            )
            two = delta(
                a=dev(
                    2,
                    50,
                    180,
                    ValueStats(count=2, sum=1.0, min=-6.25, max=3.0, last=9.0, last_ts=140),
                ),
                b=dev(1, 300, 300),
            )
            await store.commit(one, "i", 1)
            await store.commit(one, "i", 1)  # a retry after a lost reply: no double count
            await store.commit(two, "i", 2)
            await store.commit(one, "i", 1)  # a late replay of an older flush: skipped too
            a = await store.get_device("a")
            assert a is not None
            assert (a.packets, a.bytes, a.first_seen, a.last_seen) == (5, 50, 50, 200)
            assert a.kinds == {"reading": 5}
            t = a.values["t"]
            assert (t.count, t.min, t.max) == (5, -6.25, 1e300)
            assert t.sum == 0.1 + 0.2 + 1.0
            # the newest device timestamp wins, whatever the commit order
            assert (t.last, t.last_timestamp_ms) == (2.0, 150)
            totals = await store.totals()
            assert (totals.devices, totals.packets, totals.bytes) == (2, 6, 60)
            assert (totals.rejected, totals.rejected_by_reason) == (2, {"empty_device_id": 2})
            assert await store.get_device("missing") is None

    asyncio.run(main())


def test_listing_sort_filter_paginate(redis_server: EmbeddedRedis) -> None:
    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "t", cluster=False) as store:
            store._group_size = 3  # several script calls per flush
            devices = {f"x-{i:02d}": dev(i + 1, 1000 + i, 2000 - i) for i in range(10)}
            devices.update({f"y-{i}": dev(100, 1, 1) for i in range(3)})
            await store.commit(delta(**devices), "i", 1)
            matched, page = await store.list_devices(prefix="x-", limit=4, offset=2)
            assert matched == 10 and [d.device_id for d in page] == [
                "x-02",
                "x-03",
                "x-04",
                "x-05",
            ]
            _, page = await store.list_devices(sort="packets", descending=True, limit=4)
            # ties are ordered by id in the same direction as the sort
            assert [d.device_id for d in page] == ["y-2", "y-1", "y-0", "x-09"]
            _, page = await store.list_devices(prefix="x-", sort="last_seen", limit=2)
            assert [d.device_id for d in page] == ["x-09", "x-08"]
            _, page = await store.list_devices(prefix="x-", sort="bytes", descending=True)
            assert [d.packets for d in page] == list(range(10, 0, -1))
            _, page = await store.list_devices(descending=True, limit=1)
            assert page[0].device_id == "y-2"
            matched, page = await store.list_devices(prefix="zzz")
            assert (matched, page) == (0, [])

    asyncio.run(main())


def test_two_writers_add_up(redis_server: EmbeddedRedis) -> None:
    async def main() -> None:
        stores = [RedisStore.from_url(redis_server.url, "t") for _ in range(2)]
        await asyncio.gather(
            *(
                s.commit(delta(a=dev(1, 10 + n, 10 + n)), f"w{i}{n}", 1)
                for i, s in enumerate(stores)
                for n in range(50)
            )
        )
        a = await stores[0].get_device("a")
        assert a is not None and a.packets == 100 and (a.first_seen, a.last_seen) == (10, 59)
        for s in stores:
            await s.aclose()

    asyncio.run(main())


def test_exactly_once_prepare_finalize_and_conflicts(redis_server: EmbeddedRedis) -> None:
    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "t") as store:
            keys = [store.layout.batch("prod", n) for n in (1, 2)]
            calls = store.plan(delta(a=dev(2, 1, 1)), "i", 1)
            assert await store.prepare("i:1", keys, calls) == {}
            # a retry of the same prepare finds its own claims and succeeds
            assert await store.prepare("i:1", keys, calls) == {}
            # another flush claiming batch 2 and a new batch 3 sees the pending claim
            other = [store.layout.batch("prod", n) for n in (3, 2)]
            assert await store.prepare("j:1", other, calls) == {1: "p:i:1"}
            assert await store.client.exists(store.layout.batch("prod", 3)) == 0
            await store.apply(calls)
            await store.finalize("i:1", keys, 60)
            assert await store.prepare("j:1", other, calls) == {1: "c"}
            assert await store.client.ttl(keys[0]) > 0  # remembered for the dedupe window
            assert await store.client.zcard(store.layout.journals) == 0
            a = await store.get_device("a")
            assert a is not None and a.packets == 2

    asyncio.run(main())


def test_journal_of_a_dead_instance_is_replayed_once(
    redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal goes in chunks (here 2 merge calls each: 4 calls make 2 chunks): kept
    while the journal lives, replayed in order, dropped with it."""
    monkeypatch.setattr(store_module, "JOURNAL_CHUNK", 2)

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "t") as store:
            store._group_size = 2
            big = delta(**{f"d{i}": dev(1, 5, 5) for i in range(5)})
            calls = store.plan(big, "dead", 7)
            keys = [store.layout.batch("prod", 9)]
            await store.heartbeat("dead", 1)
            assert await store.prepare("dead:7", keys, calls) == {}
            chunks = [store.layout.journal_chunk("dead:7", n) for n in range(2)]
            assert len(calls) == 4 and await store.client.exists(*chunks) == 2
            assert [await store.client.ttl(c) for c in chunks] == [-1, -1]  # kept by PREPARE
            # "dead" applied one group, then crashed before the rest and before finalize
            await store.apply(calls[:1])
            assert await store.orphan_journals("me") == []  # its heartbeat is still alive
            await asyncio.sleep(1.2)
            assert await store.orphan_journals("me") == ["dead:7"]
            assert await store.orphan_journals("dead") == []  # never recover one's own
            assert await store.recover("dead:7", "me", 60)
            assert not await store.recover("dead:7", "other", 60)  # claimed once
            assert await store.orphan_journals("me") == []
            assert await store.client.exists(*chunks) == 0  # dropped with the journal
            totals = await store.totals()
            assert (totals.packets, totals.devices) == (5, 5)
            assert await store.prepare("x:1", keys, calls) == {0: "c"}
            # a flush whose ids were taken claims nothing: its chunks only wait to expire
            assert await store.prepare("x:2", keys, calls) == {0: "c"}
            assert 0 < await store.client.ttl(store.layout.journal_chunk("x:2", 0))
            assert await store.client.exists(store.layout.journal("x:2")) == 0

    asyncio.run(main())


def test_a_dead_instances_two_journals_are_replayed_in_order(
    redis_server: EmbeddedRedis,
) -> None:
    """An instance prepares a flush while the one before it applies: dead, it may leave two
    journals, the first partly applied. They are offered one at a time, oldest first: the
    second replayed before the first (say by another instance at the same time) would set
    the merge markers the first one's calls are checked against, and its unapplied calls
    would be skipped. One recovery pass replays both, and every packet counts once."""

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "t2") as store:
            store._group_size = 2
            devices = {f"d{i}": dev(1, 5, 5) for i in range(4)}
            first = store.plan(delta(**devices), "dead", 7)
            second = store.plan(delta(**devices), "dead", 8)
            await store.heartbeat("dead", 1)
            assert await store.prepare("dead:7", [store.layout.batch("p", 1)], first) == {}
            assert await store.prepare("dead:8", [store.layout.batch("p", 2)], second) == {}
            await store.apply(first[:1])  # one group of the first, then a crash
            await asyncio.sleep(1.2)
            assert await store.orphan_journals("me") == ["dead:7"]
            recovery = Recovery(RedisCommitter(store), "me", 60)
            assert await recovery.run_once() == 2
            assert await store.orphan_journals("me") == []
            records = await store.get_devices(list(devices))
            assert [r.packets for r in records] == [2, 2, 2, 2]
            assert (await store.totals()).packets == 8

    asyncio.run(main())


def test_a_replay_that_redis_interrupts_gives_its_claim_back(
    redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay that Redis interrupts (a connection lost, injected around the real store)
    gives back its claim at once, and only its own: the next attempt, of any instance, does
    not wait for the claim's TTL. One that would fail again (a journal chunk gone) keeps it:
    tried once per claim, not at every recovery pass."""

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "t") as store:
            calls = store.plan(delta(a=dev(2, 5, 5)), "dead", 1)
            await store.heartbeat("dead", 1)
            assert await store.prepare("dead:1", [store.layout.batch("p", 1)], calls) == {}
            claim = store.layout.recovering("dead:1")
            chunk = store.layout.journal_chunk("dead:1", 0)
            saved = await store.client.execute_command("DUMP", chunk, **{NEVER_DECODE: True})
            await store.client.delete(chunk)
            with pytest.raises(LookupError, match="chunk 0 of 1 is gone"):
                await store.recover("dead:1", "me", 60)
            assert str(await store.client.get(claim)).startswith("me:")  # kept
            await store.client.delete(claim)  # (as its TTL would)
            await store.client.restore(chunk, 0, saved)
            real = store.apply

            async def lost(calls: Any) -> int:
                monkeypatch.setattr(store, "apply", real)
                raise redis.exceptions.ConnectionError("injected: connection lost mid-replay")

            monkeypatch.setattr(store, "apply", lost)
            with pytest.raises(redis.exceptions.ConnectionError):
                await store.recover("dead:1", "me", 60)
            assert await store.client.exists(claim) == 0  # given back
            assert await store.recover("dead:1", "other", 60)  # at once, not in 60 s
            assert (await store.totals()).packets == 2
            # a claim another instance holds is not given back by a failed replay of ours
            claim = store.layout.recovering("x:1")
            await store.client.set(claim, "someone")
            assert await store._release(keys=[claim], args=["me"]) == 0
            assert await store.client.get(claim) == "someone"

    asyncio.run(main())


def test_a_journal_written_whole_by_an_earlier_version_is_replayed(
    redis_server: EmbeddedRedis,
) -> None:
    """Before chunks, a journal was one value with its calls inline: an instance that died
    during an upgrade leaves one, and it is replayed the same."""

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "t") as store:
            calls = store.plan(delta(a=dev(3, 5, 5), b=dev(4, 5, 5)), "old", 3)
            keys = [store.layout.batch("prod", 1)]
            whole = {"batches": keys, "calls": old_json(calls)}
            await store.client.set(store.layout.journal("old:3"), json.dumps(whole))
            await store.client.zadd(store.layout.journals, {"old:3": 1})
            await store.client.set(keys[0], "p:old:3")
            assert await store.orphan_journals("me") == ["old:3"]
            assert await store.recover("old:3", "me", 60)
            totals = await store.totals()
            assert (totals.packets, totals.devices) == (7, 2)
            _, page = await store.list_devices(sort="packets", descending=True)
            assert [(d.device_id, d.packets) for d in page] == [("b", 4), ("a", 3)]
            assert await store.client.get(keys[0]) == "c"
            assert await store.orphan_journals("me") == []

    asyncio.run(main())


def test_rates_come_from_second_buckets_summed_over_instances(
    redis_server: EmbeddedRedis,
) -> None:
    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "t") as store:
            now_ms = int(time.time() * 1000)
            five_s_ago = now_ms - 5000
            thirty_s_ago = now_ms - 30_000
            await store.commit(delta(a=dev(50, five_s_ago, five_s_ago)), "i1", 1)
            await store.commit(delta(a=dev(30, five_s_ago, five_s_ago)), "i2", 1)  # another
            await store.commit(delta(a=dev(30, five_s_ago, five_s_ago)), "i2", 1)  # a retry
            await store.commit(delta(a=dev(120, thirty_s_ago, thirty_s_ago)), "i1", 2)
            a = await store.get_device("a")
            assert a is not None
            assert a.rate.packets_per_s == {10: 80 / 10, 60: 200 / 60}
            assert a.rate.bytes_per_s[10] == 800 / 10
            totals = await store.totals()
            assert totals.rate.packets_per_s[60] == 200 / 60
            _, page = await store.list_devices(sort="rate", descending=True)
            assert page[0].device_id == "a" and page[0].rate.packets_per_s[10] == 8

    asyncio.run(main())


def test_one_device_reads_the_same_as_many(redis_server: EmbeddedRedis) -> None:
    """One device is read by a script call, several by a pipeline: the same records."""

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "t") as store:
            now_ms = int(time.time() * 1000) - 2000
            t = ValueStats(count=2, sum=1.5, min=-1.0, max=2.5, last=2.5, last_ts=now_ms)
            await store.commit(delta(a=dev(2, now_ms, now_ms, t), b=dev(1, now_ms, now_ms)), "i", 1)
            for _ in range(3):  # rates move with the clock: compare within one second
                second = int(time.time())
                one = await store.get_devices(["a"])
                many = await store.get_devices(["nope", "a", "b"])
                if int(time.time()) == second:
                    break
            assert one[0].rate.packets_per_s[10] == 0.2
            assert one == many[:1] and [r.device_id for r in many] == ["a", "b"]
            assert await store.get_devices(["nope"]) == []

    asyncio.run(main())


def test_a_plan_applied_in_slices_and_again_counts_once(
    redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big plan goes in several slices; applying part of it, then all of it (a retry
    after a failure between slices), counts every device exactly once."""
    monkeypatch.setattr(store_module, "APPLY_SLICE", 2)

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "t") as store:
            store._group_size = 2
            d = delta(**{f"d{i}": dev(i + 1, 10, 20) for i in range(7)})
            calls = store.plan(d, "i", 1)
            assert len(calls) == 5  # four device calls and the global one: three slices
            await store.apply(calls[:3])  # as if the connection broke after that
            await store.apply(calls)
            await store.client.config_resetstat()
            await store.apply(calls)
            # The scripts are loaded by now: each script call is one EVALSHA, and nothing
            # checks them again (with the rtm module, the global merge is the only script;
            # with the script, four device merges, the global one and four rows writes)
            stats = await store.client.info("commandstats")
            assert not [name for name in stats if name.startswith("cmdstat_script")]
            assert stats["cmdstat_evalsha"]["calls"] == (1 if store.merge_module else 9)
            records = await store.get_devices([f"d{i}" for i in range(7)])
            assert [r.packets for r in records] == list(range(1, 8))
            totals = await store.totals()
            assert (totals.packets, totals.devices) == (28, 7)

    asyncio.run(main())


def test_a_failed_slice_stops_the_plan_and_the_retry_counts_once(
    redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slices go APPLY_AHEAD ahead of their replies; one that fails fails the apply with
    Redis' own error (what the committer maps to "retry"), stops the slices not yet sent,
    and the retried plan counts every device exactly once."""
    monkeypatch.setattr(store_module, "APPLY_SLICE", 1)
    monkeypatch.setattr(store_module, "APPLY_AHEAD", 3)

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "t", merge_module=True) as store:
            store._group_size = 2
            d = delta(**{f"d{i:02}": dev(i + 1, 10, 20) for i in range(40)})
            calls = store.plan(d, "i", 1)
            assert len(calls) == 21  # twenty device calls of two devices, and the global one
            # A device key of another type: the module refuses that call, writing nothing.
            broken = calls[7][1][1]
            await store.client.rpush(broken, "not a record")
            with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE|wrong kind"):
                await store.apply(calls)
            await store.client.delete(broken)
            records = await store.get_devices([f"d{i:02}" for i in range(40)])
            applied = sum(r is not None for r in records)
            assert applied < 38, "the slices after the failure were not all run"
            await store.apply(calls)
            assert store.merge_module is True, "a refusal by the module is not its absence"
            await store.apply(calls)  # and once more: nothing changes
            records = await store.get_devices([f"d{i:02}" for i in range(40)])
            assert [r.packets if r else 0 for r in records] == list(range(1, 41))
            totals = await store.totals()
            assert (totals.packets, totals.devices) == (820, 40)

    asyncio.run(main())


def test_failed_applies_give_their_connections_back(
    redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing apply (a Redis that refuses writes, retried every few seconds) leaves
    replies unread on its connection: every connection goes back to the pool, or the
    process would end up without Redis (MaxConnectionsError)."""
    monkeypatch.setattr(store_module, "APPLY_SLICE", 1)
    monkeypatch.setattr(store_module, "APPLY_AHEAD", 3)

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "t", merge_module=False) as store:
            store._group_size = 2
            d = delta(**{f"d{i:02}": dev(1, 10, 20) for i in range(40)})
            pool = store.client.connection_pool
            for n in range(30):
                calls = store.plan(d, "i", n + 1)
                broken = calls[1 + n % 20][1][1]
                await store.client.delete(broken)
                await store.client.rpush(broken, "not a record")
                with pytest.raises(redis.exceptions.ResponseError):
                    await store.apply(calls)
                # the pool gives back the connection released last: the failed apply's,
                # which must not answer with a reply left unread
                assert await store.client.echo(f"after {n}") == f"after {n}"
                await store.client.delete(broken)
            assert not pool._in_use_connections, "connections leaked"

    asyncio.run(main())


@pytest.mark.parametrize("module", [True, False], ids=["module", "script"])
def test_an_apply_cancelled_mid_stream_gives_its_connection_back_and_counts_once(
    redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch, module: bool
) -> None:
    """An apply cancelled while its slices stream (a flush cancelled at shutdown) leaves
    replies unread: its connection is closed and given back, the next command on the pool
    is answered as itself, and the plan applied again counts every device once."""
    monkeypatch.setattr(store_module, "APPLY_SLICE", 1)
    monkeypatch.setattr(store_module, "APPLY_AHEAD", 2)
    n = 1200

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "t", merge_module=module) as store:
            store._group_size = 2
            d = delta(**{f"d{i:04}": dev(i + 1, 10, 20) for i in range(n)})
            calls = store.plan(d, "i", 1)
            pool = store.client.connection_pool
            # Cancelled once the stream has packed its tenth slice (the apply is then
            # mid-stream for sure: it packs each slice just before writing it)
            packed = store._packed
            tenth = asyncio.Event()
            count = 0

            def counting(*args: Any) -> list[bytes]:
                nonlocal count
                count += 1
                if count == 10:
                    tenth.set()
                return packed(*args)

            monkeypatch.setattr(store, "_packed", counting)
            task = asyncio.create_task(store.apply(calls))
            waiter = asyncio.create_task(tenth.wait())
            await asyncio.wait([task, waiter], timeout=30, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            assert tenth.is_set() and not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not pool._in_use_connections, "connections leaked"
            last = calls[-2][1][-1]  # (the last call is the global one)
            assert not await store.client.exists(last), "the slices after the cancel ran"
            # the pool gives back the connection released last: the cancelled stream's,
            # which must not answer with a reply left unread
            assert await store.client.echo("mine") == "mine"
            await store.apply(calls)
            records = await store.get_devices([f"d{i:04}" for i in range(n)])
            assert [r.packets if r else 0 for r in records] == list(range(1, n + 1))
            totals = await store.totals()
            assert (totals.packets, totals.devices) == (n * (n + 1) // 2, n)

    asyncio.run(main())


def test_scripts_flushed_from_redis_are_loaded_again(redis_server: EmbeddedRedis) -> None:
    """Scripts go as EVALSHA: a Redis that lost them (restarted, SCRIPT FLUSH) answers
    NOSCRIPT, and the apply loads them and runs the plan again, counting once."""

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "t", merge_module=False) as store:
            store._group_size = 2
            names = [f"d{i}" for i in range(9)]
            for seq in (1, 2):
                await store.client.script_flush()
                d = delta(**{name: dev(1, 10, 20) for name in names})
                await store.apply(store.plan(d, "i", seq))
            records = await store.get_devices(names)
            assert [r.packets if r else 0 for r in records] == [2] * 9
            shas = [script.sha for script in store._scripts.values()]
            assert await store.client.script_exists(*shas) == [True] * 3

    asyncio.run(main())


def old_json(calls: list[store_module.Call]) -> list[store_module.Call]:
    """Calls as versions before the binary chunks journaled them: JSON, deltas in base64."""
    return [
        (n, k, [*a[:4], base64.b64encode(a[4]).decode()] if n == "devices" else a)
        for n, k, a in calls
    ]


def test_a_journal_chunk_reads_back_as_its_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """A journal chunk holds its calls' keys and packed deltas raw (no JSON, no base64),
    compressed; recovery reads it back exactly, reads an earlier version's chunks (binary
    uncompressed, or JSON) too, and refuses a chunk cut short, with bytes past its end, or
    inflating past the bound, rather than replaying part of it."""
    calls: list[store_module.Call] = [
        ("devices", ["t:d:{g}:a", "t:d:{g}:b.c/d@e"], [86400, 3, 0, 170, b"\x00\xff\n\n"]),
        ("global", ["t:m", "t:tot"], [86400, 3, 12, 340, 170, 1, "empty_device_id", 1]),
        ("devices", ["t:m:{g}:i:3"], [86400, 3, 0, 170, b""]),
    ]
    chunk = store_module._journal_chunk(calls)
    magic = store_module.JOURNAL_MAGIC
    assert chunk.startswith(magic)
    binary = store_module._inflate(chunk[len(magic) :])  # what version 2 stored as is
    assert binary.startswith(store_module.JOURNAL_MAGIC_RAW)
    assert b"\x00\xff\n\n" in binary  # raw
    for form in (chunk, binary):
        assert store_module._read_chunk(form) == calls
    assert store_module._read_chunk(store_module._journal_chunk([])) == []
    earlier = json.dumps(old_json(calls), separators=(",", ":")).encode()
    assert store_module._read_chunk(earlier) == calls
    for form in (chunk, binary):
        for cut in (len(form) - 1, len(form) - 5, len(magic) + 3):
            with pytest.raises(ValueError):
                store_module._read_chunk(form[:cut])
        with pytest.raises(ValueError):
            store_module._read_chunk(form + b"x")
    with pytest.raises(ValueError):  # compressed, but not a chunk
        store_module._read_chunk(magic + zstandard.ZstdCompressor().compress(b"[]"))
    for head in (b"[5]", b'[["devices",[],1]]', b'[{"a":1}]', b"{}"):  # JSON of other shapes
        with pytest.raises(ValueError):
            store_module._read_chunk(store_module.JOURNAL_MAGIC_RAW + head + b"\n")
    frame = zstandard.get_frame_parameters(chunk[len(magic) :])
    assert frame.has_checksum and frame.content_size == len(binary)
    with pytest.raises(ValueError, match="not one whole zstd frame"):  # a bit flipped
        flipped = bytearray(chunk)
        flipped[len(chunk) // 2] ^= 0x10
        store_module._read_chunk(bytes(flipped))
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(binary)
    with pytest.raises(ValueError, match="states no size"):  # (not written so)
        store_module._read_chunk(magic + unsized)
    monkeypatch.setattr(store_module, "JOURNAL_CHUNK_MAX_BYTES", len(binary) - 1)
    with pytest.raises(ValueError, match="inflates past"):
        store_module._read_chunk(chunk)
    with pytest.raises(ValueError, match="more than one may hold"):
        store_module._journal_chunk(calls)


def test_a_fleets_journal_chunk_is_compressed(redis_server: EmbeddedRedis) -> None:
    """A full chunk of a fleet's device calls (keys sharing the layout's prefix, deltas of
    the same kinds and value names) is stored at a small fraction of its binary form, and
    reads back as its calls."""

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "t") as store:
            ms = 1_764_000_000_000
            devices = {
                f"sensor-{n:07d}": dev(1 + n % 3, ms + n, ms + n + 5, ValueStats(
                    count=1, sum=20.5 + n % 7, min=20.5, max=27.5, last=21.0, last_ts=ms))
                for n in range(store_module.GROUP_SIZE * store_module.JOURNAL_CHUNK)
            }  # fmt: skip
            calls = [c for c in store.plan(delta(**devices), "i", 1) if c[0] == "devices"]
            part = calls[: store_module.JOURNAL_CHUNK]
            chunk = store_module._journal_chunk(part)
            binary = store_module._inflate(chunk[len(store_module.JOURNAL_MAGIC) :])
            assert len(binary) > 1_000_000
            assert len(chunk) < len(binary) / 5, (len(chunk), len(binary))
            assert store_module._read_chunk(chunk) == part

    asyncio.run(main())


def test_a_journal_of_json_chunks_is_replayed(redis_server: EmbeddedRedis) -> None:
    """An instance of the previous version that died between PREPARE and FINALIZE left its
    chunks in JSON: they are replayed the same."""

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "t") as store:
            calls = store.plan(delta(a=dev(3, 5, 5), b=dev(4, 5, 5)), "old", 4)
            keys = [store.layout.batch("prod", 2)]
            chunk = json.dumps(old_json(calls), separators=(",", ":"))
            await store.client.set(store.layout.journal_chunk("old:4", 0), chunk)
            head = json.dumps({"batches": keys, "chunks": 1})
            await store.client.set(store.layout.journal("old:4"), head)
            await store.client.zadd(store.layout.journals, {"old:4": 1})
            await store.client.set(keys[0], "p:old:4")
            assert await store.recover("old:4", "me", 60)
            records = await store.get_devices(["a", "b"])
            assert [r.packets for r in records if r] == [3, 4]
            assert await store.client.get(keys[0]) == "c"
            assert await store.orphan_journals("me") == []

    asyncio.run(main())


def test_a_redis_of_another_key_layout_is_refused(redis_server: EmbeddedRedis) -> None:
    """This layout claims a fresh prefix; a prefix written by layout 1 (hashes per device,
    no version key) or by another version (layout 2: records with up to 61 rate seconds)
    is refused, by name."""

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "new") as store:
            await store.check_layout()
            await store.check_layout()  # again (a restart): the same layout goes on
            assert await store.client.get("{new}:layout") == LAYOUT_VERSION
            await store.commit(delta(a=dev(1, 1, 1)), "i", 1)
            await store.check_layout()
        async with RedisStore.from_url(redis_server.url, "old") as store:
            # what layout 1 left: a device hash and the totals, no version key
            await store.client.hset("old:d:{a}", mapping={"packets": 1, "bytes": 0})
            await store.client.hset("{old}:totals", mapping={"packets": 1, "bytes": 0})
            with pytest.raises(LayoutMismatch, match=r"'old' in key layout 1.*--key-prefix"):
                await store.check_layout()
            assert await store.client.exists("{old}:layout") == 0  # nothing written
        async with RedisStore.from_url(redis_server.url, "future") as store:
            await store.client.set("{future}:layout", "2")
            with pytest.raises(LayoutMismatch, match="key layout 2, and this version writes"):
                await store.check_layout()

    asyncio.run(main())


def test_the_service_refuses_an_old_layout_at_startup(redis_server: EmbeddedRedis) -> None:
    """`serve` against a layout-1 Redis exits with status 2 and says what to do."""
    client = redis.Redis.from_url(redis_server.url)
    client.hset("{rtm}:totals", mapping={"packets": 1, "bytes": 0})
    proc = subprocess.run(
        [sys.executable, "-m", "rtmonitor", "serve", "--grpc-port", "0", "--http-port", "0"],
        env={**os.environ, "RTM_REDIS_URL": redis_server.url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "key layout 1" in proc.stderr and "--key-prefix" in proc.stderr


def test_indexes_follow_the_records_through_replays_and_expiry(
    redis_server: EmbeddedRedis,
) -> None:
    """The index columns are written from the merge replies: a replay rewrites the same
    figures, a record expired since a flush is left out, and a device back after its record
    expired (retention) replaces its stale figures instead of keeping the highest."""

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "t", retention_s=60) as store:
            await store.check_layout()
            calls = store.plan(delta(a=dev(3, 10, 20), b=dev(4, 10, 30)), "i", 1)
            await store.apply(calls)
            await store.client.delete(store.layout.device("b"))  # b's record expired
            await store.apply(calls)  # a replay: b has no record to index
            assert await indexed(store) == {"a": 3, "b": 4}
            # b is back after its expiry (a retention, 60 s, of silence), before the janitor
            # freed its slot: its new record's 1 packet replaces the old figures
            await store.commit(delta(b=dev(1, 60_040, 60_050)), "i", 2)
            assert await indexed(store) == {"a": 3, "b": 1}
            _, page = await store.list_devices(sort="packets", descending=True)
            assert [(r.device_id, r.packets) for r in page] == [("a", 3), ("b", 1)]
            assert dict(await store.recently_seen(0, 10))["b"] == 60_050

    asyncio.run(main())


def test_a_device_with_hundreds_of_kinds_and_readings_reads_back(
    redis_server: EmbeddedRedis,
) -> None:
    """The record's counts are 16-bit: past 255 kinds or readings nothing is confused."""

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "t") as store:
            for seq in (1, 2):
                d = dev(2, 10, 20)
                d.kinds = {f"k{i}": 1 for i in range(300)}
                d.values = {
                    f"v{i}": ValueStats(count=1, sum=i, min=i, max=i, last=i, last_ts=seq)
                    for i in range(260)
                }
                await store.commit(delta(a=d, b=dev(1, 10, 20)), "i", seq)
            a, b = await store.get_devices(["a", "b"])
            assert a.kinds == {f"k{i}": 2 for i in sorted(range(300), key=lambda i: f"k{i}")}
            assert len(a.values) == 260 and a.values["v259"].count == 2
            assert a.values["v259"].sum == 518 and a.values["v7"].last_timestamp_ms == 2
            assert (b.packets, b.kinds) == (2, {"reading": 2})

    asyncio.run(main())


def test_an_older_reply_never_lowers_a_row(redis_server: EmbeddedRedis) -> None:
    """Two instances merge into a device's new record; the second's reply (more packets) may
    reach the index group first: the first's, although it created the record, lowers
    nothing. A row is replaced only by a record whose first packet came after the row's
    last one (its predecessor expired), however soon after."""

    async def main() -> None:
        async with RedisStore.from_url(redis_server.url, "o", retention_s=60) as store:
            keys = store.layout.group_keys(0)
            rows = store._scripts["rows"]

            async def write(packets: int, first: int, last: int, created: int) -> None:
                args = [1, "x", packets, packets, last, packets, created, first]
                await rows(keys=keys, args=args)

            await write(7, 900, 1_000, 0)  # instance B: its merge went second, its reply first
            await write(3, 900, 900, 1)  # instance A: created the record
            assert await indexed(store) == {"x": 7}
            await write(2, 1_200, 1_300, 1)  # a new record, its first packet after the row's last
            assert await indexed(store) == {"x": 2}
            await write(1, 1_200, 1_250, 0)  # an older reply of that record: nothing lowered
            assert await indexed(store) == {"x": 2}

    asyncio.run(main())
