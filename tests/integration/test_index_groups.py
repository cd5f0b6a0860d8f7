"""Index groups (a Redis Cluster's layout) read exactly like one index: the same data
written with 1 and with 7 groups on one real Redis gives the same pages, counts, totals,
rates, expiry and retries."""

from __future__ import annotations

import asyncio
import itertools
import struct
import time
from collections import Counter
from types import SimpleNamespace

import pytest
import redis.asyncio as aioredis

from rtmonitor.model import DeviceDelta, FlushDelta, ValueStats
from rtmonitor.storage import store as store_module
from rtmonitor.storage.embedded import EmbeddedRedis
from rtmonitor.storage.keys import KeyLayout
from rtmonitor.storage.store import LayoutMismatch, RedisStore, SortTooBroad


def fleet(n: int, seq: int, now_ms: int) -> FlushDelta:
    """`n` devices with packet counts that tie often (so the id breaks ties)."""
    devices = {}
    for i in range(n):
        packets = (i * 7919 + seq) % 13 + 1
        devices[f"d{i % 5}-{i:04d}"] = DeviceDelta(
            packets=packets,
            bytes=packets * (i % 3 + 1),
            first_seen=now_ms - 5000,
            last_seen=now_ms - (i % 50),
            kinds={"reading": packets},
            values={"t": ValueStats(count=1, sum=i, min=i, max=i, last=i, last_ts=now_ms)},
        )
    delta = FlushDelta(devices=devices, rejected=Counter({"empty_device_id": seq}))
    delta.packets = sum(d.packets for d in devices.values())
    delta.bytes = sum(d.bytes for d in devices.values())
    return delta


# each store's Redis URL (figures() reads its columns raw)
REDIS_URL: dict[RedisStore, str] = {}


def store(url: str, prefix: str, groups: int, retention_s: int = 0) -> RedisStore:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    s = RedisStore(client, KeyLayout(prefix, groups=groups), retention_s=retention_s)
    REDIS_URL[s] = url
    return s


async def figures(s: RedisStore, sort: str, ids: list[str]) -> list[int]:
    """What a page in a numeric order is ordered by, per device: a record's field, or for
    `rate` (which records do not keep) its packets in the window the store ranks by, read
    raw from its group's rate column."""
    if sort != "rate":
        return [getattr(r, sort) for r in await s.get_devices(ids)]
    window = await s._ranked(
        ("rate", "last_seen"),
        lambda c: RedisStore._rate_window(c, [g["last_seen"] > 0 for g in c]),
    )
    raw = aioredis.Redis.from_url(REDIS_URL[s])  # (bytes: the column is binary)
    try:
        out = []
        for device_id in ids:
            g = s.layout.group_of(device_id)
            slot = int(await raw.hget(s.layout.slots(g), device_id))
            row = await raw.getrange(s.layout.column("rate", g), 32 * slot, 32 * slot + 31)
            w1, p1, w2, p2 = struct.unpack(">4q", row)
            out.append(p1 if w1 == window else p2 if w2 == window else 0)
        return out
    finally:
        await raw.aclose()


def test_seven_groups_read_like_one(redis_server: EmbeddedRedis) -> None:
    async def main() -> None:
        now_ms = int(time.time() * 1000)
        one, seven = store(redis_server.url, "one", 1), store(redis_server.url, "seven", 7)
        async with one, seven:
            assert seven.layout.layout_version == "5/7" and one.layout.layout_version == "5"
            assert len({seven.layout.tag(g) for g in range(7)}) == 7
            for s in (one, seven):
                await s.check_layout()
                for seq in (1, 2):
                    calls = s.plan(fleet(600, seq, now_ms), "i", seq)
                    await s.apply(calls)
                    await s.apply(calls)  # a retry counts nothing twice
                await s.commit(fleet(100, 3, now_ms), "j", 1)  # a second instance
            used = {s.layout.group_of(f"d{i % 5}-{i:04d}") for i in range(600)}
            assert used == set(range(7)), "the devices spread over every group"
            sorts = ("device_id", "packets", "bytes", "last_seen", "rate")
            for sort, desc, prefix, (offset, limit) in itertools.product(
                sorts, (False, True), ("", "d3", "d3-01", "zz"), ((0, 10), (5, 37), (590, 20))
            ):
                args = {"sort": sort, "descending": desc, "prefix": prefix}
                page = {"offset": offset, "limit": limit, **args}
                expected = await one.list_ids(**page)  # type: ignore[arg-type]
                got = await seven.list_ids(**page)  # type: ignore[arg-type]
                if sort == "device_id":
                    assert got == expected, page
                else:  # ties go by slot, which differs with the groups: the same figures
                    assert got[0] == expected[0] and len(got[1]) == len(expected[1]), page
                    ranked = await figures(seven, sort, got[1])
                    assert ranked == await figures(one, sort, expected[1]), page
                    assert ranked == sorted(ranked, reverse=desc), page
            ids = [f"d{i % 5}-{i:04d}" for i in range(0, 700, 7)]
            counts7 = {d: n for d, _, n in await seven.recent(0, 1000)}
            assert counts7 == {d: n for d, _, n in await one.recent(0, 1000)}
            assert await seven.get_devices(ids) == await one.get_devices(ids)
            since = now_ms - 30
            seen7, seen1 = await seven.recently_seen(since, 50), await one.recently_seen(since, 50)
            assert [ms for _, ms in seen7] == [ms for _, ms in seen1]  # (ties: by slot)
            t1, t7 = await one.totals(), await seven.totals()
            assert (
                t7 == t1 and t7.devices == 600 and t7.rejected_by_reason == {"empty_device_id": 6}
            )
            try:
                await seven.list_ids(prefix="d", sort="packets", max_ranked=599)
            except SortTooBroad as exc:
                assert exc.matched == 600
            else:
                raise AssertionError("600 matches ranked with max_ranked=599")

    asyncio.run(main())


@pytest.mark.parametrize("groups", [1, 7])
def test_numeric_listings_rank_the_same_through_the_module_and_the_columns(
    redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch, groups: int
) -> None:
    """A listing sorted by rate, packets or bytes ranks what the rtm module reads
    (RTM.WINDOW: one window's packets per slot; RTM.LIVE: a column's figures, free slots
    marked) exactly as the columns read whole rank: the same counts, pages and order (ties
    included); by rate, the last complete window and, before any device sent in it, the
    current one. A Redis without the commands sends the store to the columns for good."""
    now = time.time()
    now_ms = int(now * 1000)
    monkeypatch.setattr(store_module, "time", SimpleNamespace(time=lambda: now))

    async def main() -> None:
        pages = [
            {"sort": sort, "descending": desc, "prefix": prefix, "offset": o, "limit": n}
            for sort, desc, prefix, (o, n) in itertools.product(
                ("rate", "packets", "bytes"),
                (False, True),
                ("", "d3", "zz"),
                ((0, 10), (5, 37), (290, 20)),
            )
        ]
        # (prefix, the flushes' times, the devices that sent in the window rate ranks by):
        # only the current window has packets, then the last complete one has some
        for prefix, times, ranked in (("a", [now_ms], 300), ("b", [now_ms - 10_000, now_ms], 119)):
            module, columns = (
                store(redis_server.url, prefix, groups),
                store(redis_server.url, prefix, groups),
            )
            columns.read_module = False
            async with module, columns:
                await module.check_layout()
                for seq, at in enumerate(times, 1):
                    await module.commit(fleet(300 if at == now_ms else 120, seq, at), "i", seq)
                # a device that sent no bytes (0 is a figure, not a free slot), and a
                # device's slot freed as retention frees it (its row zeroed)
                zero = DeviceDelta(
                    packets=1, bytes=0, first_seen=now_ms, last_seen=now_ms, kinds={"k": 1}
                )
                await module.commit(FlushDelta(devices={"d0-zero": zero}, packets=1), "j", 1)
                g = module.layout.group_of("d1-0001")
                slot = await module.client.hget(module.layout.slots(g), "d1-0001")
                freed = await module._free_slots(
                    keys=module.layout.group_keys(g), args=[now_ms + 1, slot, "d1-0001"]
                )
                assert freed == 1
                assert (await module.list_ids(sort="rate", limit=1000))[0] == ranked
                assert (await module.list_ids(sort="bytes", limit=1000))[0] == 300
                for page in pages:
                    got = await module.list_ids(**page)  # type: ignore[arg-type]
                    assert got == await columns.list_ids(**page), page  # type: ignore[arg-type]
                assert module.read_module is True
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            # (and the module did read them: Redis counted its calls)
            stats = await raw.info("commandstats")
            assert stats["cmdstat_rtm.window"]["calls"] >= len(pages) // 3 * 2
            assert stats["cmdstat_rtm.live"]["calls"] >= len(pages) // 3 * 2 * groups
            # a user whose ACL denies the module's reads: the columns too
            await raw.acl_setuser(
                "reader", enabled=True, passwords=["+pw"], keys=["*"],
                commands=["+@all", "-rtm.window", "-rtm.live"],
            )  # fmt: skip
        finally:
            await raw.aclose()
        host, port = redis_server.host, redis_server.port
        denied = store(f"redis://reader:pw@{host}:{port}/0", "b", groups)
        reference = store(redis_server.url, "b", groups)
        async with denied, reference:
            for sort in ("rate", "packets", "bytes"):
                page = {"sort": sort, "descending": True, "limit": 50}
                got = await denied.list_ids(**page)  # type: ignore[arg-type]
                assert got == await reference.list_ids(**page)  # type: ignore[arg-type]
            assert reference.read_module is True
            assert denied.read_module is False
        plain = EmbeddedRedis(redis_server.data_dir.parent / "plain")
        plain.merge_module = None
        plain.start()
        try:
            other = store(plain.url, "w", groups)
            async with other:
                await other.check_layout()
                await other.commit(fleet(50, 1, now_ms), "i", 1)
                for sort in ("rate", "packets", "bytes"):
                    assert (await other.list_ids(sort=sort, limit=100))[0] == 50  # type: ignore[arg-type]
                assert other.read_module is False
        finally:
            plain.stop()

    asyncio.run(main())


def test_groups_expire_silent_devices(redis_server: EmbeddedRedis) -> None:
    async def main() -> None:
        now_ms = int(time.time() * 1000)
        async with store(redis_server.url, "r", 5, retention_s=1) as s:
            await s.commit(fleet(200, 1, now_ms), "i", 1)
            for i in range(200):
                await s.client.delete(s.layout.device(f"d{i % 5}-{i:04d}"))
            assert await s.expire_silent_devices(now_ms + 60_000) == 200
            assert (await s.totals()).devices == 0
            assert await s.list_ids(sort="packets") == (0, [])

    asyncio.run(main())


def test_a_one_group_prefix_is_refused_with_groups(redis_server: EmbeddedRedis) -> None:
    """A prefix written with one group (layout 5) is not mixed with a grouped layout, nor
    the other way round."""

    async def main() -> None:
        async with store(redis_server.url, "p", 1) as one, store(redis_server.url, "p", 16) as many:
            await one.check_layout()
            with pytest.raises(
                LayoutMismatch, match="key layout 5, and this version writes layout 5/16"
            ):
                await many.check_layout()
        async with store(redis_server.url, "q", 16) as many, store(redis_server.url, "q", 1) as one:
            await many.check_layout()
            with pytest.raises(LayoutMismatch, match="key layout 5/16"):
                await one.check_layout()

    asyncio.run(main())


def test_retention_frees_slots_and_new_devices_take_them(redis_server: EmbeddedRedis) -> None:
    """A device silent past the retention gives its slot back once its record has expired;
    the next new device takes that slot, and listings see the fleet as it is. A slot whose
    device sent again after the cutoff is kept, whoever asks to free it."""

    def one(device_id: str, packets: int, last_ms: int) -> FlushDelta:
        d = DeviceDelta(packets=packets, bytes=packets, first_seen=last_ms, last_seen=last_ms)
        return FlushDelta(devices={device_id: d}, packets=packets, bytes=packets)

    async def main() -> None:
        now_ms = int(time.time() * 1000)
        async with store(redis_server.url, "slots", 1, retention_s=60) as s:
            await s.check_layout()
            for seq, (device_id, packets) in enumerate((("a", 5), ("b", 7), ("c", 3)), 1):
                await s.commit(one(device_id, packets, now_ms - 120_000), "i", seq)
            slots = await s.client.hgetall(s.layout.slots())
            assert slots == {"a": "0", "b": "1", "c": "2"}
            await s.client.delete(s.layout.device("a"), s.layout.device("c"))  # expired
            # b sent again: its record lives on, and its last_seen is past the cutoff
            await s.commit(one("b", 1, now_ms), "i", 4)
            assert await s.expire_silent_devices(now_ms) == 2
            assert await s.client.hgetall(s.layout.slots()) == {"b": "1"}
            assert await s.client.lrange(s.layout.free_slots(), 0, -1) == ["0", "2"]
            assert await s.list_ids(sort="packets") == (1, ["b"])
            # the script refuses to free a slot whose device was seen after the cutoff
            keys = s.layout.group_keys()
            assert await s._free_slots(keys=keys, args=[now_ms - 60_000, 1, "b"]) == 0
            assert await s._free_slots(keys=keys, args=[now_ms, 0, "b"]) == 0  # not b's slot
            await s.commit(one("d", 2, now_ms), "i", 5)
            assert await s.client.hget(s.layout.slots(), "d") == "0"  # a freed slot, first
            assert await s.list_ids(sort="packets", descending=True) == (2, ["b", "d"])
            # (both at now_ms: the tie goes by slot, d took slot 0)
            assert [d for d, _ in await s.recently_seen(now_ms - 1, 10)] == ["d", "b"]
            assert {d: n for d, _, n in await s.recent(0, 10)} == {"b": 8, "d": 2}
            assert (await s.totals()).devices == 2

    asyncio.run(main())
