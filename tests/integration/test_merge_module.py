"""The rtm Redis module's device merge (storage/_merge.c, RTM.MERGE6) against the Lua script
it stands in for (scripts.MERGE_DEVICES), on a real Redis with the module loaded: the same
replies and the same record bytes and TTLs for any flushes (kinds and readings old and new,
sums that overflowed, receive seconds folded into spans and dropped, windows, retries,
retention); malformed input refused before anything is written; what replicas and the AOF
replay (RTM.APPLY6) leaving the same keys; a store that goes back to the script when Redis
loses the module."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from rtmonitor.model import (
    RECORD_NAMES_MAX,
    RECORD_VALUES_MAX,
    BatchDelta,
    DeviceDelta,
    FlushDelta,
    ValueStats,
)
from rtmonitor.storage import ranking
from rtmonitor.storage.embedded import EmbeddedRedis, EmbeddedRedisError, merge_module_path
from rtmonitor.storage.keys import COLUMNS
from rtmonitor.storage.packing import pack_deltas
from rtmonitor.storage.store import MERGE_COMMAND, RedisStore

T0 = 1_764_000_000_000  # ms


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    assert merge_module_path() is not None, "the rtm module was not built (setup.py)"
    embedded = EmbeddedRedis(tmp_path_factory.mktemp("merge-module") / "redis").start()
    try:
        yield embedded
    finally:
        embedded.stop()


@pytest.fixture(scope="module")
def replica(server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a replica of `server` (with the module): it replays what the module's
    calls replicate (RTM.APPLY6), as a restart replays the AOF."""
    embedded = EmbeddedRedis(
        tmp_path_factory.mktemp("merge-module-replica") / "redis",
        extra_config={"replicaof": f"{server.host} {server.port}", "masterauth": server.password},
    ).start()
    try:
        yield embedded.url
    finally:
        embedded.stop()


stats = st.builds(
    ValueStats,
    count=st.integers(1, 2**40),
    sum=st.floats(allow_nan=True, allow_infinity=True),
    min=st.floats(allow_nan=True, allow_infinity=True),
    max=st.floats(allow_nan=True, allow_infinity=True),
    last=st.floats(allow_nan=True, allow_infinity=True),
    last_ts=st.integers(0, 2**45) | st.sampled_from([0, 7, T0]),  # ties: the later wins
)
# few names, so that flushes meet the same ones again
kinds = st.dictionaries(
    st.sampled_from(["sensor", "heartbeat", "event", "k" * 40]), st.integers(1, 2**40), max_size=4
)
values = st.dictionaries(st.sampled_from(["temp", "hum", "v", "w" * 50]), stats, max_size=4)
device_ids = st.sampled_from(["d1", "d2", "x" * 60])
# seconds between flushes: the same second, the next, within the 10 s of seconds kept one
# by one, past them (folded into spans), around a span's 61 s (dropped), and backwards
steps = st.sampled_from([0, 1, 1, 2, 9, 10, 11, 300]) | st.integers(-15, 75)


@st.composite
def flushes(draw: st.DrawFn) -> list[tuple[int, FlushDelta, list[str]]]:
    out = []
    second = T0 // 1000
    for _ in range(draw(st.integers(1, 20))):
        second += draw(steps)
        devices = {}
        for device_id in draw(st.lists(device_ids, min_size=1, max_size=5, unique=True)):
            last = second * 1000 + draw(st.integers(0, 999))
            devices[device_id] = DeviceDelta(
                packets=draw(st.integers(1, 2**40)),
                bytes=draw(st.integers(0, 2**45)),
                first_seen=last - draw(st.integers(0, 5000)),
                last_seen=last,
                kinds=draw(kinds),
                values=draw(values),
            )
        flush = FlushDelta(
            devices=devices,
            packets=sum(d.packets for d in devices.values()),
            bytes=sum(d.bytes for d in devices.values()),
        )
        # 2: applied twice; and records that expired before it (their index entries stay)
        expired = draw(st.lists(device_ids, max_size=2, unique=True))
        out.append((draw(st.sampled_from([1, 1, 1, 2])), flush, expired))
    return out


_prefixes = itertools.count()


async def _value(raw: redis.asyncio.Redis, key: bytes) -> Any:
    """A key's value, whatever its type (strings as bytes)."""
    kind = await raw.type(key)
    if kind == b"zset":
        return await raw.zrange(key, 0, -1, withscores=True)
    if kind == b"hash":
        return await raw.hgetall(key)
    if kind == b"list":
        return await raw.lrange(key, 0, -1)
    return await raw.get(key)


async def _indexes(raw: redis.asyncio.Redis, prefix: str) -> dict[str, Any]:
    """Every key of a prefix's index group (by name without the prefix): the devices set,
    the slots, the free list and the columns' bytes, and whether it expires."""
    out: dict[str, Any] = {}
    async for key in raw.scan_iter(match=f"{{{prefix}}}:*", count=1000):
        name = key.decode().split(":", 1)[1]
        if name in ("totals", "rejected", "rate") or name.startswith(("m:", "layout")):
            continue
        out[name] = (await _value(raw, key), await raw.ttl(key) > 0)
    assert set(out) <= {"devices", "slot", "id", "free", *(f"c:{c}" for c in COLUMNS)}, out
    return out


async def _both(
    url: str, plan: list[tuple[int, FlushDelta, list[str]]], retention_s: int, replica: str
) -> None:
    n = next(_prefixes)
    script = RedisStore.from_url(url, f"s{n}", retention_s=retention_s, merge_module=False)
    module = RedisStore.from_url(url, f"m{n}", retention_s=retention_s)
    raw = redis.asyncio.Redis.from_url(url)  # records are bytes
    try:
        for seq, (times, flush, expired) in enumerate(plan, start=1):
            for store in (script, module):
                for device_id in expired:  # (as if --retention had passed)
                    await raw.delete(store.layout.device(device_id))
            for _ in range(times):
                await script.apply(script.plan(flush, "i", seq))
                await module.apply(module.plan(flush, "i", seq))
        assert module.merge_module is True and script.merge_module is False
        ids = sorted({d for _, flush, _ in plan for d in flush.devices})
        for device_id in ids:
            a, b = script.layout.device(device_id), module.layout.device(device_id)
            assert await raw.get(b) == await raw.get(a), device_id
            ttl_a, ttl_b = await raw.pttl(a), await raw.pttl(b)
            assert (ttl_a > 0) == (ttl_b > 0) and (ttl_a == -1) == (ttl_b == -1)
        assert await _indexes(raw, f"m{n}") == await _indexes(raw, f"s{n}")
        async with redis.asyncio.Redis.from_url(replica) as copy:  # (what it replicated)
            await _caught_up(raw, copy)
            _same(await _snapshot(copy, f"m{n}"), await _snapshot(raw, f"m{n}"))
    finally:
        await raw.aclose()
        await script.aclose()
        await module.aclose()


@settings(max_examples=200, deadline=None)
@given(plan=flushes(), retention_s=st.sampled_from([0, 0, 3600]))
def test_the_module_merges_as_the_script_does(
    server: EmbeddedRedis,
    replica: str,
    plan: list[tuple[int, FlushDelta, list[str]]],
    retention_s: int,
) -> None:
    """And a replica that replays the module's calls holds the same keys."""
    asyncio.run(_both(server.url, plan, retention_s, replica))


def _record(kinds: int = 0, spans: int = 0) -> bytes:
    """A packed record (scripts.py) written by hand: kinds k0, k1, ... counted once each,
    `spans` 10-second spans of one packet; 1 packet and 10 bytes in all."""
    head = struct.pack("<ddddddHHHH", 1, 10, T0, T0, 0, 0, kinds, 0, 0, spans)
    body = b"".join(b"k%d\x00" % i + struct.pack("<d", 1) for i in range(kinds))
    return head + body + b"".join(struct.pack("<Idd", 10 * i, 1, 1) for i in range(spans))


# A record of 7,900 values (3,950 kinds): more than a merge takes (room for no bucket).
TOO_BIG = _record(kinds=3950)


def _delta_bytes(device_id: str) -> bytes:
    batch = BatchDelta.from_devices(
        {device_id: DeviceDelta(packets=3, bytes=30, first_seen=T0, last_seen=T0, kinds={"k": 3})}
    )
    blob, _ = pack_deltas(batch, np.arange(1, dtype=np.int64))
    return blob


def test_malformed_calls_are_refused_before_anything_is_written(server: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(server.url)
    indexes = _group("bad")
    try:
        good = _delta_bytes("a")
        keys = ["bad:m", *indexes, "bad:{a}", "bad:{b}"]
        cases: list[tuple[list[Any], str]] = [
            ([*keys, 60, 1, 0, 5, good, 5], "cut short"),  # 2 devices, 1 delta
            ([*keys, 60, 1, 0, 5, good + good[:-3], 5], "cut short"),
            ([*keys, 60, 1, 0, 5, good + b"\xff" * 36, 5], "too many kinds or values"),  # 65535
            ([*keys, 60, 1, 0, 5, (good[:-9] + b"x" * 9) * 2, 5], "cut short|too many"),  # misread
            ([*keys, "x", 1, 0, 5, good * 2, 5], "must be numbers"),
            ([*keys, 60, 1, -5, 5, good * 2, 5], "must be numbers"),
            ([*keys, 60, 1, 0, 5, good * 2, 9], "shorter than id-offset"),
        ]
        for args, why in cases:
            with pytest.raises(redis.ResponseError, match=why):
                client.execute_command(MERGE_COMMAND, 11, *args)
            assert client.exists(*keys) == 0
        for numkeys in (12, 5, 1):  # one key too many; too few index keys; none
            with pytest.raises(redis.ResponseError, match="wrong number of arguments"):
                client.execute_command(MERGE_COMMAND, numkeys, *keys, 60, 1, 0, 5, good, 5)
        client.hset("bad:{h}", "f", "v")  # a key of another type
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            client.execute_command(
                MERGE_COMMAND, 10, "bad:m2", *indexes, "bad:{h}", 60, 1, 0, 5, good, 5
            )
        client.set("bad:{r}", b"\x00" * 20)  # a record cut short
        with pytest.raises(redis.ResponseError, match="record is cut short"):
            client.execute_command(
                MERGE_COMMAND, 10, "bad:m3", *indexes, "bad:{r}", 60, 1, 0, 5, good, 5
            )
        for wrong in (indexes[0], indexes[1], indexes[3], indexes[4]):  # another type
            client.delete(*indexes)
            if wrong == indexes[0]:
                client.set(wrong, "x")
            else:
                client.zadd(wrong, {"x": 1})
            with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
                client.execute_command(
                    MERGE_COMMAND, 10, "bad:m4", *indexes, "bad:{c}", 60, 1, 0, 5, good, 5
                )
            assert client.exists("bad:m4", "bad:{c}") == 0
        assert client.ping()
        assert client.execute_command(
            MERGE_COMMAND,
            10,
            "ok:m",
            *[f"ok{k}" for k in indexes],
            "ok:{a}",
            60,
            1,
            0,
            5,
            good,
            4,
        ) == [1, 0]
        assert client.zrange("okbad:ix:devices", 0, -1) == [b"a"]
    finally:
        client.close()


def _group(prefix: str) -> list[str]:
    """An index group's 8 keys, as RTM.MERGE6 takes them (KeyLayout.group_keys)."""
    names = ("devices", "slot", "id", "free", "packets", "bytes", "last", "rate")
    return [f"{prefix}:ix:{name}" for name in names]


INDEXES = _group("k")


def test_a_call_naming_a_device_twice_merges_it_twice(server: EmbeddedRedis) -> None:
    """A call holds each device's key open from its check to its merge; one that names a
    device twice (the service never does, a Redis client may) merges it twice, as the
    script would, rather than writing it through two handles that do not see each other."""
    client = redis.Redis.from_url(server.url)
    indexes = _group("twice")
    try:
        good = _delta_bytes("a")
        for retention in (0, 60_000):
            client.delete("twice:{a}", *indexes)
            keys = [f"twice:m{retention}", *indexes, "twice:{a}", "twice:{b}", "twice:{a}"]
            assert client.execute_command(
                MERGE_COMMAND, 12, *keys, 60, 1, retention, 5, good * 3, 7
            ) == [3, 0]
            record = client.get("twice:{a}")
            assert record is not None and struct.unpack_from("<dd", record) == (6, 60)
            assert (client.pttl("twice:{a}") > 0) == (retention > 0)
            assert client.zrange(indexes[0], 0, -1) == [b"a", b"b"]
            assert client.hgetall(indexes[1]) == {b"a": b"0", b"b": b"1"}
            assert struct.unpack(">q", client.getrange(indexes[4], 0, 7)) == (6,)
    finally:
        client.close()


def test_key_positions_acl_and_aliased_keys_never_crash_redis(server: EmbeddedRedis) -> None:
    """Redis asks a module for a command's keys without a client (COMMAND GETKEYS, ACL key
    patterns, a cluster): answered for any arguments, the service's argument-less probe
    included. Keys that would be written through two handles at once are refused."""
    client = redis.Redis.from_url(server.url)
    good = _delta_bytes("a")
    call = [MERGE_COMMAND, 10, "k:m", *INDEXES, "k:{a}", 60, 1, 0, 5, good, 3]
    try:
        assert [
            str(k, "utf-8") if isinstance(k, bytes) else k for k in client.command_getkeys(*call)
        ] == ["k:m", *INDEXES, "k:{a}"]
        for malformed in ([MERGE_COMMAND, "x"], [MERGE_COMMAND, 99, "a"], [MERGE_COMMAND]):
            with pytest.raises(redis.ResponseError):
                client.command_getkeys(*malformed)
        client.acl_setuser("svc", enabled=True, passwords=["+pw"], keys=["k:*"], commands=["+@all"])
        user = redis.Redis(host=server.host, port=server.port, username="svc", password="pw")
        try:
            with pytest.raises(redis.ResponseError, match="wrong number of arguments"):
                user.execute_command(MERGE_COMMAND)  # (RedisStore._has_merge_module)
            assert user.execute_command(*call) == [1, 0]
            with pytest.raises(redis.exceptions.NoPermissionError):
                user.execute_command(*[x if x != "k:{a}" else "other:{a}" for x in call])
        finally:
            user.close()
        aliased = [
            ["k:m2", "k:m2", *INDEXES[1:], "k:{b}"],  # the marker is an index
            ["k:m2", *INDEXES[:7], INDEXES[0], "k:{b}"],  # two indexes are one
            ["k:m2", *INDEXES, INDEXES[7]],  # a device key is an index (absent yet)
            ["k:m2", *INDEXES, "k:m2"],  # a device key is the marker
        ]
        for keys in aliased:
            with pytest.raises(redis.ResponseError, match="must differ|is the marker or an index"):
                client.execute_command(MERGE_COMMAND, 10, *keys, 60, 1, 0, 5, good, 3)
        assert client.ping() and client.exists("k:m2", "k:{b}") == 0
    finally:
        client.close()


def test_a_refused_call_writes_nothing(server: EmbeddedRedis) -> None:
    """A device the call cannot merge (a key of another type, a record cut short, a record
    larger than any merge leaves: all written by something else) refuses the whole call
    before its marker or any device is written: a retry merges every device once the cause
    is gone."""
    client = redis.Redis.from_url(server.url)
    try:
        good = _delta_bytes("a")
        keys = ["w:m", *_group("w"), "w:{a}", "w:{h}", "w:{b}"]
        client.hset("w:{h}", "f", "v")
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            client.execute_command(MERGE_COMMAND, 12, *keys, 60, 1, 0, 5, good * 3, 3)
        assert client.exists("w:m", "w:{a}", "w:{b}", *keys[1:9]) == 0
        client.delete("w:{h}")
        assert client.execute_command(MERGE_COMMAND, 12, *keys, 60, 1, 0, 5, good * 3, 3) == [3, 0]
        assert client.exists("w:{a}", "w:{h}", "w:{b}") == 3
        # a delta of 1,200 value names: more than the script could unpack
        names = b"".join(b"v%d\x00" % i + b"\x00" * 48 for i in range(1200))
        big = struct.pack("<ddddHH", 1, 1, T0, T0, 0, 1200) + names
        with pytest.raises(redis.ResponseError, match="too many kinds or values"):
            client.execute_command(
                MERGE_COMMAND, 10, "w:m2", *keys[1:9], "w:{c}", 60, 1, 0, 5, big, 3
            )
        assert client.exists("w:m2", "w:{c}") == 0
        client.set("w:{d}", TOO_BIG)
        with pytest.raises(redis.ResponseError, match="more kinds and values than a merge takes"):
            client.execute_command(
                MERGE_COMMAND, 10, "w:m3", *keys[1:9], "w:{d}", 60, 1, 0, 5, good, 3
            )
        assert client.exists("w:m3") == 0
    finally:
        client.close()


def test_the_rate_column_keeps_the_newest_two_windows(server: EmbeddedRedis) -> None:
    """A device's rate row holds the packets of the newest window it sent in and of one
    before: a retry changes nothing, a newer window moves the newest to second place, and a
    flush late for an older window than its record's adds nothing."""
    client = redis.Redis.from_url(server.url)
    try:
        good = _delta_bytes("a")  # 3 packets
        group = _group("t")
        w = T0 // 10_000

        def merge(seq: int, window: int) -> None:
            keys = [f"t:m{seq}", *group, "t:{a}"]
            args = [60, 1, 0, window, good, 3]
            assert client.execute_command(MERGE_COMMAND, 10, *keys, *args) == [1, 0]

        def row() -> tuple[int, ...]:
            return struct.unpack(">qqqq", client.get(group[7]) or b"")

        merge(1, w)
        assert row() == (w, 3, 0, 0)
        merge(1, w)  # a retry (the marker is set)
        assert row() == (w, 3, 0, 0)
        merge(2, w + 1)
        assert row() == (w + 1, 3, w, 3)
        merge(3, w)  # late: the record counts window w + 1 now
        assert row() == (w + 1, 3, w, 3)
        assert client.hgetall(group[1]) == {b"a": b"0"} and client.hgetall(group[2]) == {b"0": b"a"}
    finally:
        client.close()


def test_the_window_read_is_the_rate_columns_window(server: EmbeddedRedis) -> None:
    """RTM.WINDOW answers, per slot of a rate column, its packets in one window as
    ranking.window_packets reads them from the whole column: the newest window's, the
    older one's, or 0; a partial row at the end left out, a missing column empty. A
    malformed call or a key of another type is refused."""
    client = redis.Redis.from_url(server.url)
    try:
        w = T0 // 10_000
        rng = np.random.default_rng(7)
        rows = np.zeros((5000, 4), dtype=np.int64)
        rows[:, 0] = w - rng.integers(0, 3, 5000)
        rows[:, 2] = rows[:, 0] - rng.integers(1, 3, 5000)
        rows[:, 1], rows[:, 3] = rng.integers(0, 2**40, (2, 5000))
        rows[::7] = 0  # free slots
        column = rows.astype(">i8").tobytes() + b"\x01" * 20  # (a row being written)
        client.set("w:rate", column)
        for window in range(w - 5, w + 2):
            answer = client.execute_command("RTM.WINDOW", "w:rate", window)
            got = np.frombuffer(answer, dtype=">i8").astype(np.int64)
            expected = ranking.window_packets(ranking.column(column, "rate", 5000), window)
            assert got.tolist() == expected.tolist(), window
        assert client.execute_command("RTM.WINDOW", "w:none", w) == b""
        client.hset("w:hash", "a", 1)
        for call, said in (
            (("w:rate",), "wrong number of arguments"),
            (("w:rate", w, 1), "wrong number of arguments"),
            (("w:rate", "soon"), "window must be an integer"),
            (("w:hash", w), "WRONGTYPE"),
        ):
            with pytest.raises(redis.ResponseError, match=said):
                client.execute_command("RTM.WINDOW", *call)
    finally:
        client.close()


def test_the_live_read_marks_free_slots(server: EmbeddedRedis) -> None:
    """RTM.LIVE answers, per slot of the last_seen column, the figure of another column
    where the slot holds a device (last_seen above 0) and -1 where it is free: zeros past
    the figures' column's end, as ranking.column reads it, a partial row left out, a
    missing last_seen column empty. A malformed call or a key of another type is refused."""
    client = redis.Redis.from_url(server.url)
    try:
        rng = np.random.default_rng(11)
        seen = rng.integers(0, 2**41, 4000)
        seen[::5] = 0  # free slots
        figures = rng.integers(0, 2**40, 4000)
        figures[::3] = 0  # (a device may have sent 0 bytes)
        client.set("l:seen", seen.astype(">i8").tobytes() + b"\x07" * 3)
        for n in (4000, 2500, 0):  # a column as long as last_seen, shorter, missing
            key = f"l:fig{n}"
            if n:
                client.set(key, figures[:n].astype(">i8").tobytes())
            answer = client.execute_command("RTM.LIVE", key, "l:seen")
            got = np.frombuffer(answer, dtype=">i8").astype(np.int64)
            padded = ranking.column(client.get(key), "packets", 4000)
            assert got.tolist() == np.where(seen > 0, padded, -1).tolist(), n
        assert client.execute_command("RTM.LIVE", "l:fig4000", "l:none") == b""
        client.hset("l:hash", "a", 1)
        for call, said in (
            (("l:fig4000",), "wrong number of arguments"),
            (("l:fig4000", "l:seen", "x"), "wrong number of arguments"),
            (("l:hash", "l:seen"), "WRONGTYPE"),
            (("l:fig4000", "l:hash"), "WRONGTYPE"),
        ):
            with pytest.raises(redis.ResponseError, match=said):
                client.execute_command("RTM.LIVE", *call)
    finally:
        client.close()


async def _snapshot(raw: redis.asyncio.Redis, prefix: str = "") -> dict[bytes, tuple[Any, int]]:
    """Every key of a Redis: its value (records and columns byte for byte) and its expiry
    (ms since the epoch, as TIME + PTTL: Redis 6.2 has no PEXPIRETIME; -1: none).
    `prefix`: only a store's keys (its records, its batches' markers, its index group)."""
    out: dict[bytes, tuple[Any, int]] = {}
    seconds, micros = await raw.time()
    now = seconds * 1000 + micros // 1000
    keys = [k async for k in raw.scan_iter(match=f"{prefix}:*" if prefix else None, count=1000)]
    if prefix:
        keys += [k async for k in raw.scan_iter(match=f"{{{prefix}}}:*", count=1000)]
    for key in keys:
        ttl = int(await raw.pttl(key))
        out[key] = (await _value(raw, key), now + ttl if ttl > 0 else ttl)
    return out


def _same(a: dict[bytes, tuple[Any, int]], b: dict[bytes, tuple[Any, int]]) -> None:
    """Two snapshots hold the same keys and values, expiring at the same times (to the
    quarter second their reading allows)."""
    assert a.keys() == b.keys()
    for key, (value, expires) in a.items():
        assert value == b[key][0], key
        assert abs(expires - b[key][1]) < 250 if expires > 0 else expires == b[key][1], key


def _aof_bytes(data: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(data.rglob("*.aof*")) if p.is_file())


def test_a_restart_replays_the_merges_and_a_rewritten_aof_needs_no_module(
    tmp_path: Path,
) -> None:
    """A merge reaches the AOF as RTM.APPLY6 (its arguments and the time it read), not as
    what it wrote: restarted, Redis replays it into the same bytes, slots and columns, the
    records and markers expiring when they would have (not a retention or a TTL after the
    restart), including a record merged again after it expired (Redis writes its DEL
    first). Without the module that AOF cannot be read, and the launcher says why and what
    to do; once rewritten
    (BGREWRITEAOF) it holds plain values, opens without the module, and a store that merged
    with it goes on with the script."""
    data = tmp_path / "redis"
    first = EmbeddedRedis(data).start()
    reading = ValueStats(count=1, sum=2.0, min=2.0, max=2.0, last=2.0, last_ts=T0)

    def flush(packets: int, *devices: str) -> FlushDelta:
        return FlushDelta(
            devices={
                d: DeviceDelta(packets=packets, bytes=10, first_seen=T0, last_seen=T0,
                               kinds={"k": packets}, values={"v": reading})
                for d in devices
            },
            packets=packets * len(devices),
            bytes=10 * len(devices),
        )  # fmt: skip

    async def read(store: RedisStore, device_id: str = "a") -> int:
        record = await store.get_device(device_id)
        assert record is not None
        return record.packets

    async def snapshot(url: str) -> dict[bytes, tuple[Any, int]]:
        async with redis.asyncio.Redis.from_url(url) as raw:
            return await _snapshot(raw)

    async def rewrite(url: str) -> None:
        async with redis.asyncio.Redis.from_url(url) as raw:
            await raw.bgrewriteaof()
            for _ in range(200):
                state = await raw.info("persistence")
                if not (state["aof_rewrite_in_progress"] or state["aof_rewrite_scheduled"]):
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("BGREWRITEAOF did not finish in 10 s")

    async def run() -> None:
        store = RedisStore.from_url(first.url, retention_s=3600)
        short = RedisStore.from_url(first.url, "short", retention_s=1)
        try:
            await store.apply(store.plan(flush(2, "a", "b", "c"), "i", 1))
            await short.apply(short.plan(flush(1, "e", "f"), "i", 1))
            await asyncio.sleep(1.2)  # e and f expire; e is merged into again
            await short.apply(short.plan(flush(5, "e"), "i", 2))
            assert store.merge_module is True and short.merge_module is True
            assert await read(short, "e") == 5  # (a new record: the old one had expired)
            before = await snapshot(first.url)
            assert before[b"rtm:d:{a}"][1] > T0 and before[b"short:d:{e}"][1] > T0
            aof = _aof_bytes(data)
            # (and none of what it wrote: a record's key is only in its call's arguments)
            assert aof.count(b"\r\nrtm.apply6\r\n") == 3 and b"\r\nEVAL\r\n" not in aof
            assert aof.count(b"rtm:d:{a}") == 1 and aof.count(b"short:d:{e}") == 3  # (+ DEL)
            first.stop()
            again = EmbeddedRedis(data, port=first.port, password=first.password).start()
            try:
                after = await snapshot(again.url)
                assert b"short:d:{f}" not in after  # (expired, and deleted, here or there)
                before.pop(b"short:d:{f}", None)
                _same(after, before)
            finally:
                again.stop()
            plain = EmbeddedRedis(
                data, port=first.port, password=first.password, merge_module=False
            )
            with pytest.raises(EmbeddedRedisError, match=r"RTM\.APPLY6.*without the module.*BGREW"):
                plain.start()
            again.start()
            try:
                await rewrite(again.url)
            finally:
                again.stop()
            assert b"rtm.apply6" not in _aof_bytes(data)
            plain.start()
            try:
                _same(await snapshot(plain.url), before)
                other = RedisStore.from_url(plain.url)
                assert await read(other) == 2
                await other.aclose()
                # the same store, on a new connection (the flusher retries one that broke),
                # and the module is gone
                await store.client.connection_pool.disconnect()
                await store.apply(store.plan(flush(2, "a"), "i", 2))
                assert await read(store) == 4
                assert store.merge_module is False
            finally:
                plain.stop()
        finally:
            await short.aclose()
            await store.aclose()

    try:
        asyncio.run(run())
    finally:
        first.stop()


def test_a_redis_restarted_without_the_module_says_why_it_cannot_come_back(
    tmp_path: Path,
) -> None:
    """The service restarts a Redis that exits. One restarted without the module exits while
    it replays an AOF of merges, and not_ready() (GET /ready, the log) says why and what to
    do, as start() does, not a bare exit code."""
    # appendfsync always: Redis writes the merge to its AOF before it replies. At everysec
    # it holds the write back (up to 2 s) while a background fsync runs, replies meanwhile,
    # and the SIGKILL below took the merge with it: the restart replayed no RTM.APPLY6 and
    # came back (a CI run on a busy disk).
    server = EmbeddedRedis(tmp_path / "redis", extra_config={"appendfsync": "always"}).start()
    delta = DeviceDelta(packets=1, bytes=10, first_seen=T0, last_seen=T0, kinds={"k": 1})

    async def main() -> None:
        store = RedisStore.from_url(server.url)
        try:
            flush = FlushDelta(devices={"a": delta}, packets=1, bytes=10)
            await store.apply(store.plan(flush, "i", 1))
            assert store.merge_module is True
        finally:
            await store.aclose()
        server.merge_module = None  # its next start goes without
        supervise = asyncio.create_task(server.supervise())
        try:
            assert server.pid is not None
            os.kill(server.pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while "RTM.APPLY6" not in " ".join(server.not_ready()):
                assert time.monotonic() < deadline, server.not_ready()
                await asyncio.sleep(0.05)
            (reason,) = server.not_ready()
            assert "this Redis was started without the module" in reason
            assert "BGREWRITEAOF" in reason and server.restarts == 0
        finally:
            supervise.cancel()

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_a_replica_holds_what_the_module_merged(tmp_path: Path) -> None:
    """A replica (a real Redis with the module) replays what a merge replicates, RTM.APPLY6,
    and holds the same records, expiry times and index groups as the Redis that merged:
    records new, grown in place and shrunk, retries, and records that never expire."""
    master = EmbeddedRedis(tmp_path / "master").start()
    replica = EmbeddedRedis(
        tmp_path / "replica",
        extra_config={"replicaof": f"{master.host} {master.port}", "masterauth": master.password},
    ).start()

    async def run() -> None:
        store = RedisStore.from_url(master.url, retention_s=3600)
        kept = RedisStore.from_url(master.url, "kept", retention_s=0)  # (records never expire)
        raw = redis.asyncio.Redis.from_url(master.url)
        copy = redis.asyncio.Redis.from_url(replica.url)
        try:
            flush = FlushDelta(devices={d: _names(d, 0, 1, 1, 0) for d in ("a", "b")})
            assert await kept.apply(kept.plan(flush, "i", 1)) == 0
            assert kept.merge_module is True
            ids = [f"d{i}" for i in range(50)]
            for second in range(4):  # records new, grown in place, and shrunk (spans)
                flush = FlushDelta(
                    devices={d: _names(d, i % 3, 1 + i % 2, i % 3, 20 * second)
                             for i, d in enumerate(ids[: 20 + 10 * second])}
                )  # fmt: skip
                plan = store.plan(flush, "i", second + 1)
                assert await store.apply(plan) == 0
                assert await store.apply(plan) == 0  # (a retry: the figures, no merge)
            assert store.merge_module is True
            await _caught_up(raw, copy)
            copied = await _snapshot(copy)
            _same(copied, await _snapshot(raw))
            assert len(copied) > 60 and copied[kept.layout.device("a").encode()][1] == -1
            stats = await copy.info("commandstats")
            # a call each (the retries' too: they write the figures to the rows), and none
            # of what they wrote (a record's SET and expiry, the slots, the rows)
            assert stats["cmdstat_rtm.apply6"]["calls"] == 9
            assert not {"eval", "zadd", "hset", "lpop", "pexpireat"} & {k[8:] for k in stats}
        finally:
            await copy.aclose()
            await raw.aclose()
            await kept.aclose()
            await store.aclose()

    try:
        asyncio.run(run())
    finally:
        replica.stop()
        master.stop()


async def _caught_up(raw: redis.asyncio.Redis, copy: redis.asyncio.Redis) -> None:
    """Once the replica `copy` has applied everything its master `raw` had written."""
    offset = (await raw.info("replication"))["master_repl_offset"]
    await raw.execute_command("WAIT", 1, 10_000)
    for _ in range(100):
        info = await copy.info("replication")
        if info.get("master_link_status") == "up" and info["slave_repl_offset"] >= offset:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the replica did not catch up: {info}")


def _names(device_id: str, start: int, kinds: int, names: int, second: int) -> DeviceDelta:
    """A delta of `kinds` kinds and `names` value names numbered from `start`."""
    stats = ValueStats(count=1, sum=1.0, min=1.0, max=1.0, last=1.0, last_ts=1)
    ms = T0 + 1000 * second
    return DeviceDelta(
        packets=kinds + names, bytes=10 * (kinds + names), first_seen=ms, last_seen=ms,
        kinds={f"k{start + i}": 1 for i in range(kinds)},
        values={f"v{start + i}": stats for i in range(names)},
    )  # fmt: skip


def test_a_record_written_in_place_takes_the_memory_a_set_gives_it(
    server: EmbeddedRedis,
) -> None:
    """The module writes a record where it is (no delete and insert in Redis' tables per
    merge). A record that grows by a rate bucket per merge is cut back to its size, not
    left with the room Redis keeps past a grown string (twice its size): it takes the
    memory the same bytes SET anew take, and its TTL is the script's. (One that shrinks
    keeps its room, up to its length: Redis' rule for a cut string.)"""

    async def main() -> None:
        async with RedisStore.from_url(server.url, "inplace", retention_s=3600) as s:
            raw = redis.asyncio.Redis.from_url(server.url)
            key = s.layout.device("a")
            sizes = []
            for second in range(12):  # one more second bucket each time, until they fold
                flush = FlushDelta(devices={"a": _names("a", 0, 2, 2, second)})
                assert await s.apply(s.plan(flush, "i", second + 1)) == 0
                record = await raw.get(key)
                assert record is not None
                sizes.append(len(record))
                await raw.set("inplace:copy", record)
                usage, fresh = await raw.memory_usage(key), await raw.memory_usage("inplace:copy")
                assert usage is not None and fresh is not None
                assert usage <= fresh + 16, (second, len(record), usage, fresh)
                assert 3_500_000 < await raw.pttl(key) <= 3_600_000
            assert sizes == sorted(sizes) and len(set(sizes)) > 5  # it grew, merge by merge
            got = await s.get_device("a")
            assert got is not None and got.packets == 12 * 4
            await raw.aclose()

    asyncio.run(main())


def test_a_full_record_never_stalls_a_flush(server: EmbeddedRedis) -> None:
    """A device whose names outgrow its record (several instances, or one restarted, each
    admit its 64 kinds and 64 value names anew) is still merged: the record keeps what fits
    in RECORD_NAMES_MAX and drops the rest, counting it; its packets and bytes, and every
    other device of the flush, are counted exactly; the module and the script leave the
    same bytes and count the same. (Before, every retry of such a flush was refused: the
    pipeline stalled for good.)"""
    rounds = RECORD_NAMES_MAX // (64 * (2 + 7)) + 3  # past the bound, by instances "i<n>"

    async def main() -> None:
        records = []
        for module in (True, False):
            async with RedisStore.from_url(server.url, f"full{module}", merge_module=module) as s:
                dropped = []
                for n in range(rounds):
                    big = _names("big", 64 * n, 64, 64, n)
                    devices = {"big": big, "x": _names("x", 0, 1, 1, n)}
                    flush = FlushDelta(devices=devices, packets=130, bytes=1300)
                    dropped.append(await s.apply(s.plan(flush, f"i{n}", 1)))
                    assert await s.apply(s.plan(flush, f"i{n}", 1)) == 0  # a retry
                assert s.merge_module is module
                big, x = await s.get_device("big"), await s.get_device("x")
                assert big is not None and x is not None
                assert big.packets == 128 * rounds and big.bytes == 1280 * rounds
                assert x.packets == 2 * rounds and len(x.kinds) == 1
                kinds, names = len(big.kinds), len(big.values)
                assert 2 * kinds + 7 * names <= RECORD_NAMES_MAX
                assert 2 * kinds + 7 * (names + 1) > RECORD_NAMES_MAX  # (filled up to it)
                assert big.kinds == {f"k{i}": 1 for i in range(kinds)}  # the first ones kept
                assert sum(dropped) == 128 * rounds - kinds - names
                assert dropped[0] == 0 and dropped[-1] == 128
                raw = redis.asyncio.Redis.from_url(server.url)
                records.append((await raw.get(s.layout.device("big")), dropped))
                await raw.aclose()
        assert records[0] == records[1]

    asyncio.run(main())


def test_a_record_full_of_names_keeps_what_rate_buckets_fit(server: EmbeddedRedis) -> None:
    """Rate buckets take what names leave of the record (at least 40 when the names were
    merged here; a record written otherwise may leave fewer): past it the record's first,
    oldest, spans, then its first seconds go, counted, the same way in the module and in
    the script; the newest second (this flush's) stays."""
    kinds = 3942  # 7,884 values: room for 5 rate buckets
    record = _record(kinds)

    async def main() -> None:
        seen = []
        for module in (True, False):
            async with RedisStore.from_url(server.url, f"room{module}", merge_module=module) as s:
                raw = redis.asyncio.Redis.from_url(server.url)
                await raw.set(s.layout.device("r"), record)
                dropped = []
                for n, second in enumerate([0, 1, 2, 3, 4, 5, 6, 20, 21, 3, 40]):
                    flush = FlushDelta(devices={"r": _names("r", 0, 1, 0, second)})
                    dropped.append(await s.apply(s.plan(flush, "i", n + 1)))
                assert s.merge_module is module
                got = await s.get_device("r")
                assert got is not None and got.packets == 12 and len(got.kinds) == kinds
                seen.append((await raw.get(s.layout.device("r")), dropped))
                await raw.aclose()
        assert seen[0] == seen[1]
        assert seen[0][1][:5] == [0, 0, 0, 0, 0] and sum(seen[0][1]) > 0
        stored = seen[0][0]
        nf, nc = struct.unpack_from("<HH", stored, 52)
        assert 0 < nf + nc <= 5
        tail = stored[len(stored) - 20 * (nf + nc) :]
        seconds = [struct.unpack_from("<I", tail, 20 * i)[0] for i in range(nf)]
        assert T0 // 1000 + 40 in seconds  # this flush's

    asyncio.run(main())


def test_the_script_too_refuses_a_call_whole(server: EmbeddedRedis) -> None:
    """The script reads and checks every record of a call before it writes anything, as
    the module does: a key of another type, a record cut short or one holding more than a
    merge takes refuses the call, and a retry once the cause is gone merges every device
    (before, the script merged the devices ahead of it and set the marker, so the retry
    skipped the devices after it: their counts were lost)."""
    buckets = _record(spans=2700)  # 8,100 values
    cases = [
        (lambda raw, key: raw.hset(key, "f", "v"), "WRONGTYPE"),
        (lambda raw, key: raw.set(key, b"\x00" * 20), "record is cut short"),
        (lambda raw, key: raw.set(key, TOO_BIG[:70]), "record is cut short"),  # a head, 1 kind
        (lambda raw, key: raw.set(key, TOO_BIG), "more kinds and values than a merge takes"),
        (lambda raw, key: raw.set(key, buckets), "more kinds and values than a merge takes"),
    ]

    async def main() -> None:
        for (n, (spoil, why)), module in itertools.product(enumerate(cases), (False, True)):
            prefix = f"whole{n}{module}"
            async with RedisStore.from_url(server.url, prefix, merge_module=module) as s:
                raw = redis.asyncio.Redis.from_url(server.url)
                ids = ["a", "b", "c", "d"]
                flush = FlushDelta(devices={d: _names(d, 0, 1, 0, 0) for d in ids})
                calls = s.plan(flush, "i", 1)
                assert len([c for c in calls if c[0] == "devices"]) == 1  # (one call)
                await spoil(raw, s.layout.device("c"))
                with pytest.raises(redis.ResponseError, match=why):
                    await s.apply(calls)
                others = [s.layout.device(d) for d in ids if d != "c"]
                assert await raw.exists(*others) == 0
                await raw.delete(s.layout.device("c"))
                assert await s.apply(calls) == 0
                assert await raw.exists(*others, s.layout.device("c")) == 4
                await raw.aclose()

    asyncio.run(main())


def test_a_replay_answers_over_a_record_a_merge_refuses(server: EmbeddedRedis) -> None:
    """A call applied before (a retry, a replayed journal) only reads its records' heads,
    in the module as in the script: a record past what a merge takes, written after the
    call, does not refuse it, and its figures go to the indexes."""

    async def main() -> None:
        for module in (False, True):
            async with RedisStore.from_url(server.url, f"replay{module}", merge_module=module) as s:
                raw = redis.asyncio.Redis.from_url(server.url)
                flush = FlushDelta(devices={d: _names(d, 0, 1, 0, 0) for d in ("a", "b")})
                calls = s.plan(flush, "i", 1)
                assert await s.apply(calls) == 0
                await raw.set(s.layout.device("b"), TOO_BIG)
                with pytest.raises(redis.ResponseError, match="more kinds and values"):
                    await s.apply(s.plan(flush, "i", 2))  # a merge refuses it
                assert await s.apply(calls) == 0  # the replay answers
                assert s.merge_module is module
                got = await s.get_device("a")
                assert got is not None and got.packets == 1
                await raw.aclose()

    asyncio.run(main())


def test_the_record_bound_is_the_one_settings_check(server: EmbeddedRedis) -> None:
    """Settings refuse per-device limits past RECORD_NAMES_MAX values of kinds and value
    names; the module and the script keep names up to exactly that bound and drop (and
    count) one more: the Python constants and the module's cannot drift apart."""
    fits = RECORD_NAMES_MAX // 7
    assert RECORD_NAMES_MAX + 3 * 40 == RECORD_VALUES_MAX  # (the buckets' room)

    async def main() -> None:
        for module in (True, False):
            async with RedisStore.from_url(server.url, f"b{module}", merge_module=module) as s:
                big = FlushDelta(devices={"big": _names("big", 0, 0, fits + 1, 0)})
                assert await s.apply(s.plan(big, "i", 1)) == 1
                assert s.merge_module is module
                record = await s.get_device("big")
                assert record is not None and len(record.values) == fits

    asyncio.run(main())
