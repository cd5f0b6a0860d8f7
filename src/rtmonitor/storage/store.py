"""The Redis store: idempotent commits of flush deltas, and the reads behind the HTTP API."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import heapq
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, cast

import numpy as np
import redis.asyncio as aioredis
import zstandard
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.client import NEVER_DECODE
from redis.crc import key_slot
from redis.exceptions import (
    BusyLoadingError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)

from rtmonitor.model import (
    RATE_WINDOWS_S,
    DeviceRecord,
    FlushDelta,
    IntArray,
    Rates,
    Totals,
    ValueRecord,
    reduce_batches,
)
from rtmonitor.storage import ranking
from rtmonitor.storage.keys import CLUSTER_GROUPS, RATE_WINDOW_S, KeyLayout
from rtmonitor.storage.packing import C_PACK, pack_deltas
from rtmonitor.storage.ranking import BoolArray
from rtmonitor.storage.scripts import (
    FINALIZE,
    FREE_SLOTS,
    MERGE_DEVICES,
    MERGE_GLOBAL,
    PREPARE,
    READ_DEVICES,
    RELEASE,
    WRITE_ROWS,
)
from rtmonitor.storage.wire import discard, lean

logger = logging.getLogger(__name__)
T = TypeVar("T")

SortField = Literal["device_id", "packets", "bytes", "last_seen", "rate"]
# Devices per merge-script call: big enough to amortise the call, small enough that one
# script never blocks Redis for long (a few ms).
GROUP_SIZE = 256
# How long a merge group's marker lives without being written again. It must outlast the
# longest time a flush can wait to be retried or replayed (a Redis outage, a dead instance).
MARKER_TTL_S = 24 * 3600
# How long an instance's claim to replay a dead instance's journal lasts (given back at
# once if the replay fails).
RECOVERY_CLAIM_S = 60
# Merge calls per journal chunk (64 x 256 devices: ~1.5-3 MB before _journal_chunk compresses it).
JOURNAL_CHUNK = 64
# Merge calls per slice, packed and written at once (4 x 256 devices, ~60-200 KB).
APPLY_SLICE = 4
# Slices written ahead of the replies read, all on one connection (_stream): Redis runs
# them in order and has the next ones queued while this process reads a slice's replies
# and packs the slice after, however late the event loop gets to it. At a million devices
# Redis's main thread was sampled waiting for commands ~30% of the load with two slices
# queued (two redis-py pipelines on two connections, or two ahead on one), ~11% with four
# ahead (RESULTS §23). Redis reads a connection ~16 KB at a time between other clients'
# commands, so a read waits behind about one merge call, however many slices are queued.
APPLY_AHEAD = 4
# Merge calls in flight at once against a Redis Cluster (no pipelining of scripts there).
CLUSTER_CONCURRENCY = 64
# The device merge as a command of the rtm Redis module (storage/_merge.c): MERGE_DEVICES
# in C (the same records), writing the index group's rows too (RedisStore._module_call). Its
# name changes with the key layout or the reply (6: the rows of key layout 5; 5: the count
# of what full records dropped), so a Redis holding another release's module is merged
# with the script.
MERGE_COMMAND = "rtm.merge6"
# The rtm module's reads for listings sorted by a number: one window's packets per slot
# (sort=rate), a column's figures with free slots marked (sort=packets, bytes).
WINDOW_COMMAND, LIVE_COMMAND = "rtm.window", "rtm.live"
# A merge call: (script name, keys, args). A flush's plan is a list of them (journaled by
# _journal_chunk).
Call = tuple[str, list[str], list[Any]]
# Width of the rate spans of a device record (scripts.py: older seconds folded together).
SPAN_S = 10
# Batches of silent devices one retention pass frees at most: the recovery loop that runs
# it also sends this instance's heartbeat.
SILENT_PER_PASS = 16
# Lexicographic upper bound for a prefix range: device ids only use ASCII below 0x7f
# (model.ID_CHARS).
_LEX_END = "\x7f"
# Devices a prefix filter may match when a page is ordered by a number (--prefix-sort-max-
# devices): the index can only filter by prefix in id order, so all of them are ranked.
PREFIX_SORT_MAX = 10_000


class LayoutMismatch(Exception):
    """Redis holds this key prefix in another key layout than this version writes."""


class SortTooBroad(Exception):
    """A prefix matches more devices than may be ranked by a number for one page."""

    def __init__(self, matched: int) -> None:
        super().__init__(f"{matched} devices match the prefix")
        self.matched = matched


def _transient(exc: BaseException) -> bool:
    """Whether a Redis error may pass by itself (unreachable, timing out, loading, out of
    memory, read-only), unlike a refusal of what was sent."""
    passing = (OutOfMemoryError, ReadOnlyError, BusyLoadingError)
    return not isinstance(exc, ResponseError) or isinstance(exc, passing)


def _int_columns(blobs: list[bytes]) -> list[IntArray]:
    """The rtm module's RTM.WINDOW or RTM.LIVE replies (a big-endian int64 per slot) as
    native int64 arrays."""
    return [ranking.column(b, "scores", len(b) // 8) for b in blobs]


def _module_missing(exc: ResponseError, command: str = MERGE_COMMAND) -> bool:
    """Whether Redis refused the rtm module's command as unknown (the module is gone), not
    the module one of its calls (Redis' own message, as _stream raises it, or as a redis-py
    pipeline annotates it: "Command # 1 (...) of pipeline caused error: unknown ...")."""
    said = str(exc).lower()
    at = said.find("unknown command")
    return at >= 0 and command in said[at:]


class RedisStore:
    """One Redis (or Redis Cluster) client per process, with the project's key layout."""

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        layout: KeyLayout,
        *,
        group_size: int = GROUP_SIZE,
        marker_ttl: int = MARKER_TTL_S,
        retention_s: int = 0,
        merge_module: bool = True,
    ) -> None:
        self.client = client
        self.layout = layout
        self.cluster = isinstance(client, RedisCluster)
        # Device merges by the rtm module when this Redis has it (None: not asked yet);
        # a Redis Cluster's calls go to many nodes, which may differ: always the script.
        self.merge_module: bool | None = None if merge_module and not self.cluster else False
        # Listings sorted by a number read through the module (RTM.WINDOW, RTM.LIVE) until
        # this Redis says it has no such command.
        self.read_module = self.merge_module is None
        self._group_size = group_size
        self._marker_ttl = marker_ttl
        self.retention_s = retention_s
        self._scripts = {
            "devices": client.register_script(MERGE_DEVICES),
            "global": client.register_script(MERGE_GLOBAL),
            "rows": client.register_script(WRITE_ROWS),
        }
        # Which of them this process loaded into Redis (_pipelined sends them as EVALSHA)
        self._loaded: set[str] = set()
        self._free_slots = client.register_script(FREE_SLOTS)
        self._prepare = client.register_script(PREPARE)
        self._finalize = client.register_script(FINALIZE)
        self._read_devices = client.register_script(READ_DEVICES)
        self._release = client.register_script(RELEASE)
        if not C_PACK:
            logger.warning(
                "the compiled packing scatter (rtmonitor/storage/_pack.c) is not built: "
                "flushes are packed by numpy's indexing, about twice as slowly. Reinstall "
                "with a C compiler and Python's headers (e.g. apt-get install gcc python3-dev)"
            )

    @classmethod
    def from_url(
        cls,
        url: str,
        prefix: str = "rtm",
        *,
        cluster: bool = False,
        retention_s: int = 0,
        groups: int | None = None,
        merge_module: bool = True,
    ) -> Self:
        """Build a store for `url` (redis://, rediss://, unix://); `groups` index groups
        (default: CLUSTER_GROUPS on a cluster, 1 on a single Redis); `merge_module` False:
        merge with the Lua script even where Redis has the rtm module."""
        opts: dict[str, Any] = {
            "decode_responses": True,
            "socket_timeout": 5.0,
            "socket_connect_timeout": 3.0,
            "health_check_interval": 10,
        }
        client: aioredis.Redis | RedisCluster
        if cluster:
            client = RedisCluster.from_url(url, **opts)
        else:
            client = aioredis.Redis.from_url(url, **opts)
            # Chosen by scheme (TCP, TLS, unix socket) before any connection exists.
            pool = client.connection_pool
            pool.connection_class = lean(pool.connection_class)
        # A single Redis is one node: one group keeps the indexes whole and a read one command.
        if groups is None:
            groups = CLUSTER_GROUPS if cluster else 1
        layout = KeyLayout(prefix, groups=groups)
        return cls(client, layout, retention_s=retention_s, merge_module=merge_module)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()

    # --- health ----------------------------------------------------------------------------

    async def ping(self, timeout: float = 1.0) -> str | None:
        """None when Redis answers within `timeout`, else what went wrong."""
        try:
            await asyncio.wait_for(self.client.ping(), timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return None

    async def check_layout(self) -> None:
        """Claim this prefix for LAYOUT_VERSION, or raise LayoutMismatch if Redis holds it in
        another layout (layout 1 had no version key: its totals or devices give it away)."""
        client, layout = cast(aioredis.Redis, self.client), self.layout
        version = layout.layout_version
        found = cast(str | None, await client.get(layout.version))
        # one EXISTS: layout 1's keys share the prefix's hash slot
        if found is None and not await client.exists(*layout.layout1_keys()):
            if await client.set(layout.version, version, nx=True):
                return
            # another instance claimed it first
            found = cast(str | None, await client.get(layout.version))
        if found != version:
            raise LayoutMismatch(
                f"Redis holds the key prefix {layout.prefix!r} in key layout "
                f"{found or 1}, and this version writes layout {version}; there is no "
                "migration: start with another --key-prefix, or delete that prefix's keys "
                "(README: Redis key layout)"
            )

    # --- writes ----------------------------------------------------------------------------
    #
    # One flush of one instance = a list of merge calls (a "plan"), streamed on one
    # connection (RedisStore._stream). Every call is idempotent through its
    # marker (scripts.py), so a plan can be applied again after any failure, by this
    # instance or — from its journal — by another.

    def _groups(self, device_ids: list[str]) -> Iterator[tuple[str, int, IntArray]]:
        """Split devices into merge calls: (marker tag, index under that tag, the devices'
        positions in `device_ids`).

        Standalone: fixed-size chunks (of one index group each). Cluster: each call stays in
        one hash slot, and its marker uses a tag of that slot, so the number of marker keys
        stays bounded.
        """
        size = self._group_size
        layout = self.layout
        if not self.cluster and layout.groups == 1:
            for n, start in enumerate(range(0, len(device_ids), size)):
                yield "g", n, np.arange(start, min(start + size, len(device_ids)))
            return
        by_key: dict[int, list[int]] = {}
        for row, device_id in enumerate(device_ids):
            # a cluster's calls by hash slot, a single Redis' by index group
            key = key_slot(device_id.encode()) if self.cluster else layout.group_of(device_id)
            by_key.setdefault(key, []).append(row)
        for key, rows in by_key.items():
            tag = slot_tag(key) if self.cluster else f"g{key}"
            for n, start in enumerate(range(0, len(rows), size)):
                yield tag, n, np.array(rows[start : start + size], dtype=np.int64)

    def plan(self, delta: FlushDelta, instance: str, seq: int) -> list[Call]:
        """The merge calls that write `delta` as flush number `seq` of `instance` (the
        devices' deltas packed in columns, storage/packing.py)."""
        layout = self.layout
        calls: list[Call] = []
        batch = reduce_batches(delta.batches())
        last_ms = int(batch.last_seen.max()) if batch.entries else 0
        second = (last_ms or int(time.time() * 1000)) // 1000
        gargs: list[Any] = [
            self._marker_ttl,
            seq,
            delta.packets,
            delta.bytes,
            second,
            len(delta.rejected),
        ]
        for reason, count in delta.rejected.items():
            gargs += (reason, count)
        window = second // RATE_WINDOW_S
        ids = batch.device_ids
        groups = list(self._groups(ids))
        order = np.concatenate([rows for *_, rows in groups]) if groups else np.zeros(0, np.int64)
        blob, offsets = pack_deltas(batch, order)
        at = 0
        for tag, n, rows in groups:
            keys = [layout.group_marker(tag, instance, n)]
            keys += layout.device_keys_at(ids, rows)
            part = blob[offsets[at] : offsets[at + len(rows)]]
            at += len(rows)
            args = [self._marker_ttl, seq, self.retention_s * 1000, window, part]
            calls.append(("devices", keys, args))
        g = layout.flush_group(instance, seq)
        gkeys = [
            layout.global_marker(instance, g),
            layout.totals(g),
            layout.rejected(g),
            layout.total_rate(g),
        ]
        calls.append(("global", gkeys, gargs))
        return calls

    async def apply(self, calls: list[Call]) -> int:
        """Run a plan (streamed: _stream), then bring the index groups' columns up to the
        device calls' replies. Raises RedisError if Redis cannot be reached; calling it
        again with the same plan applies only what was not applied (and writes the columns
        again, which changes nothing written before).

        Returns how many kinds, value names and rate buckets the device records had no room
        for (model.RECORD_NAMES_MAX; 0 for calls applied before)."""
        replies, module = await self._run(calls)
        dropped = sum(
            int(reply[-1]) for (name, _, _), reply in zip(calls, replies, strict=True)
            if name == "devices"
        )  # fmt: skip
        if module:  # (the rtm module wrote its calls' rows itself)
            return dropped
        # Python over every device of the flush (~0.1 s for 100,000): off the event loop,
        # like the plan
        rows = await asyncio.to_thread(self._row_calls, calls, replies)
        if self.cluster:
            await self._cluster_calls(rows)
        else:
            await self._pipelined(rows, False)
        return dropped

    def _row_calls(self, calls: list[Call], replies: list[Any]) -> list[Call]:
        """scripts.WRITE_ROWS calls that bring the columns up to the device calls' replies,
        one per device call (whose devices share a hash slot, so an index group), in the
        plan's order (a call's devices take slots in the order the rtm module gives them)."""
        layout = self.layout
        rows: list[Call] = []
        for (name, keys, args), reply in zip(calls, replies, strict=True):
            if name != "devices" or len(keys) < 2:
                continue
            ids = [layout.device_id(key) for key in keys[1:]]
            row_args: list[Any] = [int(args[3])]  # the call's window
            for n, device_id in enumerate(ids):
                row_args.append(device_id)
                row_args += reply[6 * n : 6 * n + 6]
            rows.append(("rows", layout.group_keys(layout.group_of(ids[0])), row_args))
        return rows

    async def _cluster_calls(self, calls: list[Call]) -> list[Any]:
        """Script calls against a Redis Cluster: redis-py does not run scripts inside a
        cluster pipeline, so they go concurrently (each to its slot's node; scripts are
        (re)loaded on NOSCRIPT by redis-py). A failure of any call fails them all."""
        limit = asyncio.Semaphore(CLUSTER_CONCURRENCY)

        async def call(name: str, keys: list[str], args: list[Any]) -> Any:
            async with limit:
                return await self._scripts[name](keys=keys, args=args)

        return list(await asyncio.gather(*(call(*c) for c in calls)))

    async def _run(self, calls: list[Call]) -> tuple[list[Any], bool]:
        """The merge calls' replies, in order, and whether the rtm module made the device
        calls."""
        if self.cluster:  # (a failure of any call fails the plan, which is retried)
            return await self._cluster_calls(calls), False
        if self.merge_module is None:
            self.merge_module = await self._has_merge_module()
        module = self.merge_module  # (another apply may change it meanwhile: recovery's)
        try:
            return await self._pipelined(calls, module), module
        except ResponseError as exc:
            # A Redis restarted without the module (an external one, its AOF rewritten since
            # the module's last merge, README): the script does the same (each call is
            # idempotent, so the calls that went through change nothing when run again).
            if not (module and _module_missing(exc)):
                raise
            logger.warning("Redis no longer has the rtm module (%s): merging with the script", exc)
            self.merge_module = False
            return await self._pipelined(calls, False), False

    async def _pipelined(self, calls: list[Call], module: bool) -> list[Any]:
        """The calls' replies, in order (_stream), their scripts loaded first (once, and
        again if Redis lost them: restarted, SCRIPT FLUSH; each call is idempotent, so the
        calls that went through before a NOSCRIPT change nothing when the plan runs
        again)."""
        names = {name for name, _, _ in calls if not (module and name == "devices")}
        await self._load(names - self._loaded)
        try:
            return await self._stream(calls, module)
        except NoScriptError:
            self._loaded.clear()
            await self._load(names)
            return await self._stream(calls, module)

    async def _load(self, names: set[str]) -> None:
        """SCRIPT LOAD the named scripts (a script Redis holds already is loaded again)."""
        for name in sorted(names):
            await self.client.script_load(self._scripts[name].script)
            self._loaded.add(name)

    async def _stream(self, calls: list[Call], module: bool) -> list[Any]:
        """Run the calls on one connection, APPLY_AHEAD slices written ahead of the replies
        read, and return their replies in order. Not redis-py's pipeline: that writes a
        whole pipeline, then waits for all its replies before the next is even packed.

        The first error Redis answers fails the plan as Redis said it (ResponseError:
        _run), and so does a lost connection; the slices not yet written are not run (up
        to APPLY_AHEAD written may be), and the caller retries the plan whole. The
        connection goes back to the pool dropped (discard; it reconnects when next used)
        unless every reply was read."""
        if not calls:
            return []
        slices = [calls[i : i + APPLY_SLICE] for i in range(0, len(calls), APPLY_SLICE)]
        pool = cast(aioredis.Redis, self.client).connection_pool  # (not a cluster's: _run)
        conn: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]
        replies: list[Any] = []
        whole = False
        try:
            for k in range(min(APPLY_AHEAD, len(slices))):
                packed = self._packed(conn, slices[k], module)
                await conn.send_packed_command(packed, check_health=k == 0)
            for k, part in enumerate(slices):
                for _ in part:  # (a failure: the finally below drops the connection)
                    replies.append(await conn.read_response(disconnect_on_error=False))
                if k + APPLY_AHEAD < len(slices):
                    ahead = self._packed(conn, slices[k + APPLY_AHEAD], module)
                    await conn.send_packed_command(ahead, check_health=False)
            whole = True
        finally:
            # A failure, or our own cancellation, leaves replies unread: the connection
            # cannot serve anyone else. Aborted, so that what it has not sent yet is not
            # sent (the slices already in Redis's hands still run, each call whole).
            if not whole:
                await discard(conn)
            await pool.release(conn)
        return replies

    def _packed(self, conn: AbstractConnection, calls: list[Call], module: bool) -> list[bytes]:
        """A slice's calls in the Redis protocol: device merges as the rtm module's command
        (`module`), the rest as EVALSHA of their scripts (_pipelined loads them)."""
        commands: list[tuple[Any, ...]] = []
        for name, keys, args in calls:
            if module and name == "devices":
                commands.append((MERGE_COMMAND, *self._module_call(keys, args)))
            else:
                sha = self._scripts[name].sha
                commands.append(("EVALSHA", sha, len(keys), *keys, *args))
        return conn.pack_commands(commands)

    def _module_call(self, keys: list[str], args: list[Any]) -> list[Any]:
        """A device merge call (MERGE_DEVICES' keys and args) as RTM.MERGE6's arguments: the
        module also writes the rows of the call's index group (its devices share one),
        which the script leaves to WRITE_ROWS."""
        layout = self.layout
        group = layout.group_keys(layout.group_of(layout.device_id(keys[1])))
        head = [len(keys) + len(group), keys[0], *group]
        return [*head, *keys[1:], *args, layout.device_id_offset]

    async def _has_merge_module(self) -> bool:
        """Whether this Redis has the rtm module's merge (logged once, either way). Asked
        by calling it without arguments: the module refuses the arity, a Redis without it
        the command (redis-py cannot parse COMMAND INFO's reply for an unknown command)."""
        pipe = self.client.pipeline(transaction=False)  # (typed, unlike the client's)
        pipe.execute_command(MERGE_COMMAND)
        try:
            await pipe.execute()
        except ResponseError as exc:
            if "wrong number of arguments" in str(exc):
                logger.info("device merges: the rtm Redis module (%s)", MERGE_COMMAND)
                return True
            why = str(exc)
        else:
            why = f"{MERGE_COMMAND} answered a call without arguments"
        logger.info("device merges: the Lua script (%s)", why)
        return False

    async def commit(self, delta: FlushDelta, instance: str, seq: int) -> int:
        """Write a flush that carries no batch ids (no journal needed); apply's count."""
        return await self.apply(self.plan(delta, instance, seq))

    async def prepare(
        self, flush_id: str, batch_keys: list[str], calls: list[Call]
    ) -> dict[int, str]:
        """Exactly-once step 1: journal `calls` and claim `batch_keys`, atomically.

        The calls go first, JOURNAL_CHUNK to a key (with a TTL, so that chunks of a flush
        that never claims its ids expire), one chunk at a time: a flush of a million
        devices is ~90 MB of journal before compression (_journal_chunk), too much to build
        and send whole. PREPARE then claims the ids, writes the journal's head and keeps
        the chunks, in one step.
        Returns {position in batch_keys: state} for ids already taken ("c" committed, or
        "p:<flush>" pending in another flush); then nothing was claimed.
        """
        layout = self.layout
        chunks = journal_chunks(len(calls))
        for n in range(chunks):
            part = calls[n * JOURNAL_CHUNK : (n + 1) * JOURNAL_CHUNK]
            # Encoded and compressed off the event loop, one chunk at a time (a million
            # devices' whole journal is ~90 MB before compression).
            blob = await asyncio.to_thread(_journal_chunk, part)
            await self.client.set(layout.journal_chunk(flush_id, n), blob, ex=self._marker_ttl)
        head = json.dumps({"batches": batch_keys, "chunks": chunks}, separators=(",", ":"))
        reply = await self._prepare(
            keys=[layout.journal(flush_id), layout.journals, *self._chunk_keys(flush_id, chunks),
                  *batch_keys],
            args=[flush_id, int(time.time() * 1000), head, chunks],
        )  # fmt: skip
        return {int(reply[i]) - 1: str(reply[i + 1]) for i in range(0, len(reply), 2)}

    async def finalize(
        self, flush_id: str, batch_keys: list[str], window_s: int, chunks: int = 0
    ) -> None:
        """Exactly-once step 3: mark the batch ids committed and drop the journal (and its
        `chunks` chunks)."""
        layout = self.layout
        await self._finalize(
            keys=[layout.journal(flush_id), layout.journals, *self._chunk_keys(flush_id, chunks),
                  *batch_keys],
            args=[flush_id, window_s, chunks],
        )  # fmt: skip

    def _chunk_keys(self, flush_id: str, chunks: int) -> list[str]:
        return [self.layout.journal_chunk(flush_id, n) for n in range(chunks)]

    # --- retention ---------------------------------------------------------------------------

    async def expire_silent_devices(self, now_ms: int, batch: int = 1000) -> int:
        """Drop devices silent for longer than the retention from the index groups (their
        records expire by themselves; their slots are freed for new devices), `batch` at a
        time and at most SILENT_PER_PASS batches per call (the next call goes on); the number
        dropped. Idempotent: any instance may run it."""
        if self.retention_s <= 0:
            return 0
        cutoff = now_ms - self.retention_s * 1000
        silent = await self._ranked(
            ("last_seen",),
            lambda c: ranking.silent([g["last_seen"] for g in c], cutoff, SILENT_PER_PASS * batch),
        )
        dropped = 0
        for start in range(0, len(silent), batch):
            part = silent[start : start + batch]
            ids, _ = await self._at(part)
            found = [(g, slot, d) for (g, slot), d in zip(part, ids, strict=True) if d]
            if not found:
                continue
            pipe = self.client.pipeline(transaction=False)
            for _, _, device_id in found:
                pipe.exists(self.layout.device(device_id))
            exists = await pipe.execute()
            by_group: dict[int, list[Any]] = {}
            for (g, slot, device_id), e in zip(found, exists, strict=True):
                if not e:  # (a device whose record lives on sent again: it keeps its slot)
                    by_group.setdefault(g, []).extend((slot, device_id))
            for g, pairs in by_group.items():
                keys = self.layout.group_keys(g)
                dropped += int(await self._free_slots(keys=keys, args=[cutoff, *pairs]))
        return dropped

    # --- recovery of dead instances' journals ----------------------------------------------

    async def heartbeat(self, instance: str, ttl_s: int) -> None:
        await self.client.set(self.layout.alive(instance), "1", ex=ttl_s)

    async def publish_stats(self, instance: str, doc: str, ttl_s: int) -> None:
        """Publish an instance's self-metrics (JSON) for every API process to read; they
        expire with the instance unless it publishes again."""
        now_ms = int(time.time() * 1000)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.set(self.layout.stats(instance), doc, ex=ttl_s)
            pipe.zadd(self.layout.instances, {instance: now_ms})
            # the index forgets instances whose stats expired
            pipe.zremrangebyscore(self.layout.instances, "-inf", now_ms - ttl_s * 1000)
            await pipe.execute()

    async def published_stats(self) -> dict[str, str]:
        """The self-metrics (JSON) of every instance that published them within its TTL."""
        instances = cast(list[str], await self.client.zrange(self.layout.instances, 0, -1))
        if not instances:
            return {}
        docs = cast(
            list[str | None], await self.client.mget([self.layout.stats(i) for i in instances])
        )
        return {i: d for i, d in zip(instances, docs, strict=True) if d is not None}

    async def orphan_journals(self, instance: str) -> list[str]:
        """The oldest journal (flush id) of each instance other than `instance` whose
        heartbeat has expired: flushes that were prepared but never finalized.

        One per instance, the next once it is replayed: an instance's flushes apply in
        sequence order (a merge call skips what its marker says a later flush applied), and
        so must their replays. (An instance may leave two: its flusher prepares the next
        flush while one applies, and two live instances replaying them at once would make
        the earlier one's calls skip.)"""
        client = cast(aioredis.Redis, self.client)
        flush_ids = cast(list[str], await client.zrange(self.layout.journals, 0, -1))
        # (instance, seq, flush id), by instance then sequence
        journals = sorted((o, int(seq), f) for f in flush_ids for o, seq in [f.rsplit(":", 1)])
        owners = sorted({owner for owner, _, _ in journals} - {instance})
        if not owners:
            return []
        pipe = self.client.pipeline(transaction=False)
        for owner in owners:
            pipe.exists(self.layout.alive(owner))
        alive = dict(zip(owners, await pipe.execute(), strict=True))
        oldest: dict[str, str] = {}
        for owner, _, flush_id in journals:
            if alive.get(owner) == 0:
                oldest.setdefault(owner, flush_id)
        return list(oldest.values())

    async def recover(self, flush_id: str, instance: str, window_s: int) -> bool:
        """Replay and finalize a dead instance's journal. False if another instance has
        claimed it (or it is already gone).

        The claim lasts RECOVERY_CLAIM_S (a replay that outlives it may meet another one:
        both are idempotent). A replay that Redis interrupts gives its claim back, so the
        next pass (of any instance) tries again at once rather than after the claim's TTL,
        while the batches of the journal wait for it."""
        claim = self.layout.recovering(flush_id)
        token = f"{instance}:{uuid.uuid4().hex[:12]}"  # this attempt's, not a later one's
        if not await self.client.set(claim, token, nx=True, ex=RECOVERY_CLAIM_S):
            return False
        try:
            return await self._replay(flush_id, window_s)
        except (RedisError, OSError) as exc:
            # Redis failed (a refusal such as WRONGTYPE, or a journal that cannot be read,
            # would fail again: those keep the claim, and are tried once per claim). If
            # Redis is still failing, this fails too, and the TTL ends the claim.
            if _transient(exc):
                with contextlib.suppress(RedisError, OSError):
                    await self._release(keys=[claim], args=[token])
            raise

    async def _replay(self, flush_id: str, window_s: int) -> bool:
        layout = self.layout
        blob = await self.client.get(layout.journal(flush_id))
        if blob is None:
            return False
        journal = json.loads(blob)
        chunks = int(journal.get("chunks", 0))
        if chunks:
            calls: list[Call] = []
            for n in range(chunks):
                # raw bytes (the client decodes replies as str; a chunk holds binary deltas)
                key = layout.journal_chunk(flush_id, n)
                part = await self.client.execute_command("GET", key, **{NEVER_DECODE: True})
                if part is None:  # PREPARE kept every chunk: only a hand could remove one
                    raise LookupError(f"journal {flush_id}: chunk {n} of {chunks} is gone")
                calls += await asyncio.to_thread(_read_chunk, part)  # (~1 ms: off the loop)
        else:  # (a journal written whole, by an earlier version)
            calls = _from_journal(journal["calls"])
        if dropped := await self.apply(calls):
            logger.warning(
                "journal %s: full device records did not take %d new kinds, value names or "
                "rate buckets (their packets are counted)",
                flush_id,
                dropped,
            )
        await self.finalize(flush_id, journal["batches"], window_s, chunks)
        return True

    # --- reads -----------------------------------------------------------------------------

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        """The device's counters and rates, or None if Redis has never seen it."""
        records = await self.get_devices([device_id])
        return records[0] if records else None

    async def list_devices(
        self,
        *,
        prefix: str = "",
        sort: SortField = "device_id",
        descending: bool = False,
        offset: int = 0,
        limit: int = 100,
        max_ranked: int = PREFIX_SORT_MAX,
    ) -> tuple[int, list[DeviceRecord]]:
        """One page of devices: (number matching the filter, their counters); see
        list_ids()."""
        matched, ids = await self.list_ids(
            prefix=prefix,
            sort=sort,
            descending=descending,
            offset=offset,
            limit=limit,
            max_ranked=max_ranked,
        )
        return matched, await self.get_devices(ids)

    async def list_ids(
        self,
        *,
        prefix: str = "",
        sort: SortField = "device_id",
        descending: bool = False,
        offset: int = 0,
        limit: int = 100,
        max_ranked: int = PREFIX_SORT_MAX,
    ) -> tuple[int, list[str]]:
        """One page of device ids: (number matching the filter, the ids in order).

        In id order: O(log N + limit) Redis work (times the index groups, and O(offset +
        limit) with more than one). In a numeric order one figure per slot is read (with
        the rtm module, made of the groups' columns by Redis: _module_scores; else the
        columns whole) and ranked here (ranking.py: O(N) numpy, ~25 ms for a million
        devices; ties go by the device's slot, the order the group first stored them,
        reversed with the order). A prefix with a numeric order ranks only its matches:
        more than `max_ranked` raise SortTooBroad (counted first, in O(log N)). `rate`
        orders by the packets of the last complete aligned 10-second window (the current
        one while that is empty, e.g. just after a start) and lists only devices that sent
        in it.
        """
        page = _Page(prefix, sort, descending, offset, limit)
        if sort == "device_id":
            if self.layout.groups > 1:
                return await self._list_groups(page)
            return await self._list_by_id(page)
        only: list[list[str]] | None = None
        if prefix:
            only = await self._prefix_matches(page, max_ranked)
        return await self._list_ranked(page, only)

    async def _list_by_id(self, page: _Page) -> tuple[int, list[str]]:
        """A page in id order from the one devices set."""
        # decode_responses=True: every reply is str (the type hints allow bytes too).
        client, key, prefix = cast(aioredis.Redis, self.client), self.layout.devices(), page.prefix
        offset, limit, descending = page.offset, page.limit, page.descending
        # Every member of the devices set has score 0, so rank order is id order: the
        # prefix's first rank and size are two O(log N) counts, and a page is a range
        # of ranks (ZRANGEBYLEX with an offset would walk the offset).
        if prefix:
            pipe = self.client.pipeline(transaction=False)
            pipe.zlexcount(key, "-", f"({prefix}")
            pipe.zlexcount(key, f"[{prefix}", f"({prefix}{_LEX_END}")
            first, matched = (int(n) for n in await pipe.execute())
        else:
            # one command: a pipeline costs the loop more turns (see get_devices)
            first, matched = 0, int(await client.zcard(key))
        start = offset if not descending else max(matched - offset - limit, 0)
        stop = min(offset + limit, matched) if not descending else matched - offset
        ids: list[str] = []
        if start < stop:
            ids = cast(list[str], await client.zrange(key, first + start, first + stop - 1))
            if descending:
                ids.reverse()
            if prefix:  # a device added or expired between the calls shifts the ranks
                ids = [d for d in ids if d.startswith(prefix)]
        return matched, ids

    async def _list_groups(self, page: _Page) -> tuple[int, list[str]]:
        """A page in id order from several index groups: each group's first offset +
        limit, merged here."""
        layout, want, desc = self.layout, page.stop, page.descending
        lo, hi = page.lex_range()
        pipe = self.client.pipeline(transaction=False)
        for g in range(layout.groups):
            key = layout.devices(g)
            pipe.zlexcount(key, lo, hi)
            if desc:
                pipe.zrevrangebylex(key, hi, lo, 0, want)
            else:
                pipe.zrangebylex(key, lo, hi, 0, want)
        replies = await pipe.execute()
        matched = sum(int(n) for n in replies[0::2])
        if want <= page.offset:
            return matched, []
        return matched, list(islice(heapq.merge(*replies[1::2], reverse=desc), page.offset, want))

    async def _prefix_matches(self, page: _Page, max_ranked: int) -> list[list[str]]:
        """Per group, the ids a prefix matches, if few enough to rank by a number."""
        layout, groups = self.layout, range(self.layout.groups)
        lo, hi = page.lex_range()
        pipe = self.client.pipeline(transaction=False)
        for g in groups:
            pipe.zlexcount(layout.devices(g), lo, hi)
        matched = sum(int(n) for n in await pipe.execute())
        if matched > max_ranked:
            raise SortTooBroad(matched)
        pipe = self.client.pipeline(transaction=False)
        for g in groups:
            pipe.zrangebylex(layout.devices(g), lo, hi, 0, max_ranked)
        return cast(list[list[str]], await pipe.execute())

    async def _list_ranked(
        self, page: _Page, only: list[list[str]] | None
    ) -> tuple[int, list[str]]:
        """A page in a numeric order, ranked from the columns of every group (of the ids
        in `only`, per group, if given)."""
        field = page.sort
        slots: list[list[int]] | None = None
        if only is not None:
            pipe = self.client.pipeline(transaction=False)
            for g, ids in enumerate(only):
                if ids:
                    pipe.hmget(self.layout.slots(g), ids)
            found = iter(await pipe.execute())
            slots = [
                [int(s) for s in next(found) if s is not None and s.isascii() and s.isdigit()]
                if ids
                else []
                for ids in only
            ]

        def within(live: list[BoolArray]) -> list[BoolArray]:
            """The live slots the prefix matches (all, without one)."""
            if slots is not None:
                for g, matching in enumerate(slots):
                    mask = np.zeros(len(live[g]), np.bool_)
                    mask[[s for s in matching if s < len(mask)]] = True
                    live[g] &= mask
            return live

        def rank(columns: list[dict[str, IntArray]]) -> tuple[int, list[tuple[int, int]]]:
            live = [c["last_seen"] > 0 for c in columns]
            window = self._rate_window(columns, live) if field == "rate" else 0
            live = within(live)
            if field == "rate":
                scores = [ranking.window_packets(c["rate"], window) for c in columns]
                live = [ok & (p > 0) for p, ok in zip(scores, live, strict=True)]
            else:
                scores = [c[field] for c in columns]
            return ranking.page(scores, live, page.offset, page.stop, page.descending)

        def rank_read(scores: list[IntArray]) -> tuple[int, list[tuple[int, int]]]:
            # RTM.WINDOW: a slot with packets in a window has a last_seen, so no column of
            # it is needed; RTM.LIVE: -1 marks a free slot
            live = within([p > 0 if field == "rate" else p >= 0 for p in scores])
            return ranking.page(scores, live, page.offset, page.stop, page.descending)

        read = None
        if self.read_module and field != "last_seen":  # (last_seen: its one column is all)
            read = await self._module_scores(field)
        if read is not None:
            matched, picked = await asyncio.to_thread(rank_read, read)
        else:
            fields = (field,) if field == "last_seen" else (field, "last_seen")
            matched, picked = await self._ranked(fields, rank)
        names, _ = await self._at(picked)
        # (a slot freed and taken by another device since the columns were read: left out)
        return matched, [d for d in names if d is not None and d.startswith(page.prefix)]

    @staticmethod
    def _rate_window(columns: list[dict[str, IntArray]], live: list[BoolArray]) -> int:
        """The window sort=rate ranks by: the last complete one, or the current one if no
        device sent in that one (decided over every device, whatever the page's filter)."""
        current = int(time.time()) // RATE_WINDOW_S
        for c, ok in zip(columns, live, strict=True):
            if bool(((ranking.window_packets(c["rate"], current - 1) > 0) & ok).any()):
                return current - 1
        return current

    async def _module_scores(self, field: str) -> list[IntArray] | None:
        """Each group's scores per slot for a listing sorted by `field`, read by the rtm
        module: for `rate`, RTM.WINDOW's packets in _rate_window's window (the last
        complete one, else the current one); for `packets` and `bytes`, RTM.LIVE's
        figures (-1: a free slot). 8 bytes a slot where the columns the service would
        read are 16 (40 for rate): at a million devices those reads were the slowest under
        load (benchmarks/RESULTS.md, twenty-ninth pass). None where this Redis has no such
        command (then the columns are read and ranked here)."""
        layout, groups = self.layout, range(self.layout.groups)
        if field != "rate":
            calls: list[list[Any]] = [
                [LIVE_COMMAND, layout.column(field, g), layout.column("last_seen", g)]
                for g in groups
            ]
            blobs = await self._module_read(calls)
            return None if blobs is None else await asyncio.to_thread(_int_columns, blobs)
        current = int(time.time()) // RATE_WINDOW_S
        for window in (current - 1, current):
            calls = [[WINDOW_COMMAND, layout.column("rate", g), window] for g in groups]
            blobs = await self._module_read(calls)
            if blobs is None:
                return None
            scores = await asyncio.to_thread(_int_columns, blobs)
            if window == current or any(bool(p.any()) for p in scores):
                return scores
        raise AssertionError("unreachable")

    async def _module_read(self, calls: list[list[Any]]) -> list[bytes] | None:
        """The replies (raw bytes) of the rtm module's read calls, or None if this Redis
        has no such command, or its ACL denies it to the service's user (logged once: from
        then on the columns are read)."""
        pipe = self.client.pipeline(transaction=False)
        for call in calls:
            pipe.execute_command(*call, **{NEVER_DECODE: True})
        try:
            return cast(list[bytes], await pipe.execute())
        except ResponseError as exc:
            if not (_module_missing(exc, str(calls[0][0])) or isinstance(exc, NoPermissionError)):
                raise
            logger.info("listings sorted by a number: the columns, read whole (%s)", exc)
            self.read_module = False
            return None

    async def _ranked(
        self, fields: tuple[str, ...], rank: Callable[[list[dict[str, IntArray]]], T]
    ) -> T:
        """`rank` over every index group's columns `fields` (int64 arrays of the group's
        slot count, the longest of them; a slot past a column's end reads 0), parsed and
        ranked off the event loop (~25 ms of numpy for a million devices)."""
        layout = self.layout
        pipe = self.client.pipeline(transaction=False)
        for g in range(layout.groups):
            for field in fields:
                # raw bytes: the client decodes replies as str
                pipe.execute_command("GET", layout.column(field, g), **{NEVER_DECODE: True})
        replies = iter(cast(list[bytes | None], await pipe.execute()))
        blobs = [{field: next(replies) for field in fields} for _ in range(layout.groups)]

        def parse_and_rank() -> T:
            columns = []
            for group in blobs:
                slots = ranking.slot_count(group)
                columns.append({f: ranking.column(b, f, slots) for f, b in group.items()})
            return rank(columns)

        return await asyncio.to_thread(parse_and_rank)

    async def _at(
        self, picked: list[tuple[int, int]], column: str | None = None
    ) -> tuple[list[str | None], list[int]]:
        """The devices at (group, slot) pairs (None: a slot freed since), and, if `column`
        is named (packets, bytes, last_seen), their figures in it, read in the same round
        trip (one BITFIELD per group: O(pairs), not the whole column)."""
        if not picked:
            return [], []
        by_group: dict[int, list[int]] = {}
        for n, (g, _) in enumerate(picked):
            by_group.setdefault(g, []).append(n)
        pipe = self.client.pipeline(transaction=False)
        for g, positions in by_group.items():
            pipe.hmget(self.layout.slot_ids(g), [picked[n][1] for n in positions])
            if column is not None:
                gets = [x for n in positions for x in ("GET", "i64", f"#{picked[n][1]}")]
                pipe.execute_command("BITFIELD", self.layout.column(column, g), *gets)
        replies = iter(await pipe.execute())
        ids: list[str | None] = [None] * len(picked)
        figures = [0] * len(picked) if column is not None else []
        for positions in by_group.values():
            for n, device_id in zip(positions, next(replies), strict=True):
                ids[n] = device_id
            if column is not None:
                for n, figure in zip(positions, next(replies), strict=True):
                    figures[n] = int(figure)
        return ids, figures

    async def get_devices(self, ids: list[str]) -> list[DeviceRecord]:
        """The counters and rates of `ids` (in that order; unknown ones left out)."""
        if not ids:
            return []
        keys = [self.layout.device(device_id) for device_id in ids]
        replies: list[list[Any]]
        if not self.cluster:
            # One script call, whatever the number of devices: a pipeline costs more turns
            # of the event loop, which under load is most of a GET's time (redis-py hands a
            # pipeline's connection back through asyncio.shield, a task of its own).
            replies = await self._read_devices(keys=keys)
        else:  # one call per device: a script's keys must share a hash slot
            each = await asyncio.gather(*(self._read_devices(keys=[k]) for k in keys))
            replies = [r[0] for r in each]
        now = int(time.time())
        return [
            parse_device(device_id, fields, now)
            for device_id, fields in zip(ids, replies, strict=True)
            if fields
        ]

    async def recently_seen(self, since_ms: int, limit: int) -> list[tuple[str, int]]:
        """Devices with a packet received after `since_ms`: (device, last_seen), newest last
        (ties by slot)."""
        return [(d, ms) for d, ms, _ in await self.recent(since_ms, limit)]

    async def recent(self, since_ms: int, limit: int) -> list[tuple[str, int, int]]:
        """recently_seen() with each device's packets: (device, last_seen, packets)."""
        seen = await self._ranked(
            ("last_seen",), lambda c: ranking.since([g["last_seen"] for g in c], since_ms, limit)
        )
        ids, packets = await self._at([(g, slot) for g, slot, _ in seen], "packets")
        return [
            (d, ms, n) for d, (_, _, ms), n in zip(ids, seen, packets, strict=True) if d is not None
        ]

    async def totals(self) -> Totals:
        """Totals over every device and instance (the sums of the index groups')."""
        layout = self.layout
        pipe = self.client.pipeline(transaction=False)
        for g in range(layout.groups):
            pipe.hgetall(layout.totals(g))
            pipe.zcard(layout.devices(g))
            pipe.hgetall(layout.rejected(g))
            pipe.hgetall(layout.total_rate(g))
        replies = await pipe.execute()
        totals, rejected, buckets = Counter[str](), Counter[str](), Counter[str]()
        for part, into in (
            (replies[0::4], totals),
            (replies[2::4], rejected),
            (replies[3::4], buckets),
        ):
            for fields in part:
                into.update({k: int(v) for k, v in fields.items()})
        return Totals(
            devices=sum(int(n) for n in replies[1::4]),
            packets=totals["packets"],
            bytes=totals["bytes"],
            rejected_by_reason=dict(sorted(rejected.items())),
            rate=rates(buckets, int(time.time())),
        )


@dataclass(frozen=True, slots=True)
class _Page:
    """What list_ids() was asked for."""

    prefix: str
    sort: SortField
    descending: bool
    offset: int
    limit: int

    @property
    def stop(self) -> int:
        return self.offset + max(self.limit, 0)

    def lex_range(self) -> tuple[str, str]:
        """The prefix filter as a ZRANGEBYLEX range (everything without one)."""
        if not self.prefix:
            return "-", "+"
        return f"[{self.prefix}", f"({self.prefix}{_LEX_END}"


def rates(buckets: Mapping[str, str | int], now_s: int) -> Rates:
    """Packets/s and bytes/s over the last 10 and 60 *complete* seconds (the current second
    is still filling up), from rate buckets {"<second>": packets, "<second>b": bytes} (the
    totals' hash; a device's buckets are in its record, see parse_device).

    Looks up each second of the longest window once, rather than walking the hash (which
    keeps up to ~240 fields between prunings); the shorter windows are its newest part."""
    get = buckets.get
    packets_keys, bytes_keys = _rate_keys(now_s)
    packets = [int(v) if v is not None else 0 for v in map(get, packets_keys)]
    nbytes = [int(v) if v is not None else 0 for v in map(get, bytes_keys)]
    return Rates(
        packets_per_s={w: sum(packets[:w]) / w for w in RATE_WINDOWS_S},
        bytes_per_s={w: sum(nbytes[:w]) / w for w in RATE_WINDOWS_S},
    )


@functools.lru_cache(maxsize=4)
def _rate_keys(now_s: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The packets and bytes fields of the complete seconds of the longest window before
    `now_s`, newest first."""
    seconds = range(now_s - 1, now_s - 1 - max(RATE_WINDOWS_S), -1)
    return tuple(map(str, seconds)), tuple(f"{s}b" for s in seconds)


def journal_chunks(calls: int) -> int:
    """The chunks a journal of `calls` merge calls is written in."""
    return -(-calls // JOURNAL_CHUNK)


# A journal chunk in the binary form: this magic line, a JSON line with one entry per call,
# then each device call's keys (joined by newlines: keys never hold one) and its packed
# deltas, raw. JSON with the deltas in base64 cost ~10% of the service's time per device
# merge at a million devices, and a third more bytes in Redis and its AOF.
JOURNAL_MAGIC_RAW = b"RTMJ2\n"
# A chunk as it is stored: this magic line, then the binary form above as one zstd frame
# (level 1, its size and a checksum stated). A chunk's keys repeat the layout's prefix and
# its deltas repeat names and hold small counts as doubles: uncompressed, the journal was a
# quarter of a fleet's AOF, and each chunk one more ~1.5-3 MB value for Redis to allocate,
# write and free. How much smaller depends on the readings: 4.8-8x for two random readings
# per device (uuid4 to sequential ids), ~100x for the bench's regular fleet; ~150-200 ns per
# device, off the event loop (zlib's fastest level packed less in five times as long;
# benchmarks/RESULTS.md, nineteenth pass). Chunks in the binary form (version 2) or in JSON
# are still read. (Version 3, zlib, was main's for an afternoon, never released: not read.)
JOURNAL_MAGIC = b"RTMJ4\n"
# A chunk is at most Redis's largest value (proto-max-bulk-len's default) uncompressed,
# the most one could be before chunks were compressed: written, and read back.
JOURNAL_CHUNK_MAX_BYTES = 512 * 1024 * 1024
# A compressor per thread (one may not be used by two threads at once): chunks are
# compressed in asyncio's worker threads.
_compressors = threading.local()


def _journal_chunk(calls: list[Call]) -> bytes:
    """One chunk of a journal, as it is stored (bytes: redis-py sends them as they are).
    A device call is ["devices", its first 4 args, keys, key bytes, delta bytes] in the JSON
    line; any other call is [name, keys, args]. ValueError past JOURNAL_CHUNK_MAX_BYTES
    uncompressed (before compression, Redis refused such a chunk)."""
    entries: list[list[Any]] = []
    payload: list[bytes] = []
    for name, keys, args in calls:
        if name == "devices":
            joined = "\n".join(keys).encode()
            entries.append([name, args[:4], len(keys), len(joined), len(args[4])])
            payload += (joined, args[4])
        else:
            entries.append([name, keys, args])
    head = json.dumps(entries, separators=(",", ":")).encode()
    raw = b"".join([JOURNAL_MAGIC_RAW, head, b"\n", *payload])
    if len(raw) > JOURNAL_CHUNK_MAX_BYTES:
        raise ValueError(f"a journal chunk of {len(raw)} bytes: more than one may hold")
    compressor = getattr(_compressors, "zstd", None)
    if compressor is None:
        compressor = _compressors.zstd = zstandard.ZstdCompressor(level=1, write_checksum=True)
    return JOURNAL_MAGIC + compressor.compress(raw)


def _inflate(data: bytes) -> bytes:
    """A compressed chunk's binary form; ValueError unless it is one whole zstd frame that
    states a size of at most JOURNAL_CHUNK_MAX_BYTES (as _journal_chunk writes them: one
    of unstated size would be given the bound's memory before it is read)."""
    try:
        size = zstandard.frame_content_size(data)
        if size < 0:
            raise ValueError("a journal chunk's frame states no size")
        if size > JOURNAL_CHUNK_MAX_BYTES:
            raise ValueError(f"a journal chunk inflates past {JOURNAL_CHUNK_MAX_BYTES} bytes")
        return zstandard.ZstdDecompressor().decompress(data, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise ValueError(f"a journal chunk is not one whole zstd frame ({exc})") from None


def _read_chunk(chunk: bytes) -> list[Call]:
    """The calls of a journal chunk: compressed, binary or (an earlier version's) JSON;
    ValueError for one that cannot be read (whatever is wrong with it: a replay stops at
    it, and the recovery loop says so)."""
    try:
        return _parse_chunk(chunk)
    except (TypeError, KeyError, IndexError, AttributeError) as exc:  # (JSON of other shapes)
        raise ValueError(f"a journal chunk is malformed ({exc!r})") from None


def _parse_chunk(chunk: bytes) -> list[Call]:
    if chunk.startswith(JOURNAL_MAGIC):
        chunk = _inflate(chunk[len(JOURNAL_MAGIC) :])
        if not chunk.startswith(JOURNAL_MAGIC_RAW):
            raise ValueError("a journal chunk is cut short or malformed")
    elif not chunk.startswith(JOURNAL_MAGIC_RAW):
        return _from_journal(json.loads(chunk))
    start = len(JOURNAL_MAGIC_RAW)
    end = chunk.index(b"\n", start)
    at = end + 1
    calls: list[Call] = []
    entries = json.loads(chunk[start:end])
    if not isinstance(entries, list):
        raise ValueError("a journal chunk's head is not a list of calls")
    for entry in entries:
        if entry[0] != "devices":
            name, keys, args = entry
            calls.append((name, keys, args))
            continue
        name, head, nkeys, key_bytes, delta_bytes = entry
        keys = chunk[at : at + key_bytes].decode().split("\n")
        at += key_bytes
        deltas = chunk[at : at + delta_bytes]
        at += delta_bytes
        if len(keys) != nkeys or len(deltas) != delta_bytes:
            raise ValueError("a journal chunk is cut short or malformed")
        calls.append((name, keys, [*head, deltas]))
    if at != len(chunk):
        raise ValueError("a journal chunk has bytes past its last call")
    return calls


def _from_journal(calls: list[list[Any]]) -> list[Call]:
    """Calls as earlier versions journaled them in JSON ([name, keys, args], a device call's
    packed deltas in base64)."""
    return [(n, k, [*a[:4], base64.b64decode(a[4])] if n == "devices" else a) for n, k, a in calls]


def parse_device(device_id: str, f: list[Any], now_s: int) -> DeviceRecord:
    """Turn a device's fields, as READ_DEVICES returns them (scripts.py), into a record;
    rates over the complete seconds before `now_s` (exact over the seconds a record keeps
    one by one; older seconds, in 10-second spans, count by the share of each span the
    window covers).

    A reading's sum that left the range of a double (inf, -inf or nan) keeps that value:
    the record says `overflow`."""
    nkinds = int(f[4])
    i = 5 + 2 * nkinds
    kinds = {str(f[j]): int(f[j + 1]) for j in range(5, i, 2)}
    nvalues = int(f[i])
    i += 1
    values: dict[str, ValueRecord] = {}
    for j in range(i, i + 7 * nvalues, 7):
        values[str(f[j])] = ValueRecord(
            count=int(f[j + 1]),
            sum=float(f[j + 2]),
            min=float(f[j + 3]),
            max=float(f[j + 4]),
            last=float(f[j + 5]),
            last_timestamp_ms=int(f[j + 6]),
        )
    i += 7 * nvalues
    seconds_end = i + 1 + 3 * int(f[i])
    packets: dict[int, float] = dict.fromkeys(RATE_WINDOWS_S, 0)
    nbytes: dict[int, float] = dict.fromkeys(RATE_WINDOWS_S, 0)
    for j in range(i + 1, len(f), 3):
        # complete seconds only: a second's age 1..w, or the share of a 10-second span's
        # seconds inside the window (spans hold seconds older than any 10 s window asks for)
        start = int(f[j])
        width = 1 if j < seconds_end else SPAN_S
        for w in RATE_WINDOWS_S:
            inside = min(start + width, now_s) - max(start, now_s - w)
            if inside > 0:
                packets[w] += int(f[j + 1]) * inside / width
                nbytes[w] += int(f[j + 2]) * inside / width
    return DeviceRecord(
        device_id=device_id,
        packets=int(f[0]),
        bytes=int(f[1]),
        first_seen=int(f[2]),
        last_seen=int(f[3]),
        kinds=dict(sorted(kinds.items())),
        values=dict(sorted(values.items())),
        rate=Rates(
            packets_per_s={w: n / w for w, n in packets.items()},
            bytes_per_s={w: n / w for w, n in nbytes.items()},
        ),
    )


@functools.cache
def _slot_tags() -> dict[int, str]:
    """A short string for each of the 16384 Redis Cluster hash slots (computed once)."""
    tags: dict[int, str] = {}
    i = 0
    while len(tags) < 16384:
        tag = f"s{i}"
        tags.setdefault(key_slot(tag.encode()), tag)
        i += 1
    return tags


def slot_tag(slot: int) -> str:
    """A hash tag that maps to `slot`, so a marker key can live beside a slot's devices."""
    return _slot_tags()[slot]
