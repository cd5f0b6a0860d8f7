"""The Redis key layout (documented in README "Key layout").

Every key of one device carries the device id as its hash tag ``{device_id}``, so all of
them live in one Redis Cluster hash slot. The indexes and totals are split into index
groups (1 on a single Redis, CLUSTER_GROUPS on a cluster): group n holds the devices whose
hash slot lies in the n-th share of the 16384 slots, under a tag <g> of a slot of that
share, so that, with a cluster's slots assigned in ranges, a group lives on (about) its
devices' node and every node carries its share of each flush's index writes. With one
group, <g> is the prefix (the key names of layout 2). The other global keys share the tag
``{<prefix>}``. Device ids cannot contain braces (validation refuses them), so a tag cannot
be forged.

    <p>:d:{<device>}            string the device's record (packed binary, scripts.py): packets,
                                       bytes, first/last seen, kinds, value statistics,
                                       rate buckets of the last ~61 s (seconds, then
                                       10-second spans), its sort=rate window
    {<p>}:layout                string the key layout version (KeyLayout.layout_version); a
                                       store refuses a Redis written with another layout
    <p>:m:{<tag>}:<inst>:<n>    string highest flush seq of instance <inst> applied to merge
                                       group n ({<tag>}: the group's hash slot) (24 h TTL)
    Per index group (<g>: the prefix with one group, else "<p>.<n>.<k>", see _group_tags):
    {<g>}:devices               zset   the group's devices, score 0 (lexicographic: prefix
                                       filter)
    {<g>}:slot                  hash   device -> its slot in the group's columns
    {<g>}:id                    hash   slot -> device
    {<g>}:free                  list   slots freed by retention, taken again first
    {<g>}:c:packets             string per slot, the device's packets (int64, little-endian,
                                       at 8 * slot); zeros: a free slot
    {<g>}:c:bytes               string per slot, its bytes
    {<g>}:c:last_seen           string per slot, its last_seen ms (> 0: the slot is in use)
    {<g>}:c:rate                string per slot, 4 int64 at 32 * slot: the newest aligned
                                       10-second window (Unix seconds // 10) it sent in and
                                       its packets there, then the same for an older one
    The columns are written by every device merge (the rtm module, or scripts.WRITE_ROWS
    after the script): a few bytes at the device's slot, kept at the highest figure any
    merge reported (totals only grow), so a retry or another instance's older figure
    changes nothing. Sorted listings rank them when read (ranking.py): the sort orders
    are not kept up to date by every merge, which in sorted sets cost a fleet most of its
    Redis time (benchmarks/RESULTS.md, eighth pass).
    {<g>}:totals                hash   packets, bytes    (each of the three: of the flushes
    {<g>}:rejected              hash   reason -> packets  whose turn fell on this group,
    {<g>}:rate                  hash   rate buckets       flush_group; reads add them up)
    {<g>}:m:<inst>              string highest flush seq of <inst> applied to these totals
    Per-flush and per-instance keys, on the prefix's slot (O(batches), not O(devices)):
    {<p>}:b:<producer>:<batch>  string a batch id: "p:<flush>" claimed, "c" committed (TTL =
                                       the dedupe window)
    {<p>}:j:<flush>             string journal of a flush: batch ids and its number of chunks (JSON)
    {<p>}:jc:<flush>:<n>        string chunk n of that journal: JOURNAL_CHUNK merge calls (a JSON
                                       line, then keys and packed deltas raw; one zstd frame)
    {<p>}:journals              zset   flush id -> prepare time (journals not yet finalized)
    {<p>}:alive:<inst>          string heartbeat of a live instance (TTL)
    {<p>}:stats:<inst>          string an ingest instance's self-metrics (JSON, TTL)
    {<p>}:instances             zset   instance -> when it last published its stats (ms)
    {<p>}:recovering:<flush>    string who replays a dead instance's journal (TTL)
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from rtmonitor.model import IntArray

_c_wrapped: Callable[..., list[str]] | None
try:  # head + id + tail in C (storage/_pack.c); a list comprehension without a compiler
    from rtmonitor.storage._pack import wrapped as _c_wrapped
except ImportError:  # pragma: no cover - a build without a C compiler
    _c_wrapped = None

# The columns of an index group, in the order the rtm module takes their keys.
COLUMNS = ("packets", "bytes", "last_seen", "rate")
# The key layout written by this version: 5 = the sorted listings ranked at read time from
# per-group columns (4 kept them in sorted sets; 4 and 5 share the device records, whose
# rate buckets are seconds for the newest 11 and 10-second spans before; 2 had up to 61
# seconds; 1 had a hash and a rate-bucket hash per device and no version key).
LAYOUT_VERSION = "5"
# Slots an index group gives out at most (its rate column then holds 512 MB, Redis' largest
# string: far past --max-devices). The rtm module has the same bound (_merge.c MAX_SLOTS).
MAX_SLOTS = 1 << 24
# Refusal of an index group's key holding another type (the rtm module's words too).
IX_WRONGTYPE = "WRONGTYPE an index key holds the wrong kind of value"
# Index groups on a Redis Cluster (one on a single Redis). Changing it changes key names:
# it is part of the layout version.
CLUSTER_GROUPS = 16
# Width of the aligned windows behind sort=rate: a flush adds its devices' packets to the
# window of its newest receive time; reads rank by the last complete window.
RATE_WINDOW_S = 10


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """Builds every key name from one prefix."""

    prefix: str = "rtm"
    # Index groups: each holds the totals, the device index, the slots and the columns of
    # the devices whose hash slot falls in its share of the slots, under a tag of
    # a slot of that share (so, with the slots split in ranges, on the devices' own node).
    groups: int = 1

    @property
    def layout_version(self) -> str:
        """LAYOUT_VERSION with one group; "<LAYOUT_VERSION>/<groups>" with more (the same
        records, the indexes and totals under other key names). Earlier versions wrote
        "2" and "3/<groups>"."""
        return LAYOUT_VERSION if self.groups == 1 else f"{LAYOUT_VERSION}/{self.groups}"

    def tag(self, group: int) -> str:
        """The hash tag of a group's keys (the prefix itself with one group)."""
        return _group_tags(self.prefix, self.groups)[group]

    def group_of(self, device_id: str) -> int:
        """The index group of a device: its hash slot's share of the slots."""
        if self.groups == 1:
            return 0
        return key_slot(device_id.encode()) * self.groups // REDIS_CLUSTER_HASH_SLOTS

    def flush_group(self, instance: str, seq: int) -> int:
        """The group whose totals a flush adds to: flushes take the groups in turn."""
        return (zlib.crc32(instance.encode()) + seq) % self.groups

    def _in(self, group: int, name: str) -> str:
        return f"{{{self.tag(group)}}}:{name}"

    def device(self, device_id: str) -> str:
        return f"{self.prefix}:d:{{{device_id}}}"

    def device_keys(self, device_ids: Iterable[str]) -> list[str]:
        """device() of each (a fleet's flush names ~100,000: no call per key)."""
        head = f"{self.prefix}:d:{{"
        return [f"{head}{device_id}}}" for device_id in device_ids]

    def device_keys_at(self, device_ids: list[str], rows: IntArray) -> list[str]:
        """device_keys() of device_ids[r] for each r in `rows` (int64), joined in C
        (storage/_pack.c) where it was compiled."""
        head = f"{self.prefix}:d:{{"
        if _c_wrapped is not None:
            return _c_wrapped(head, device_ids, np.ascontiguousarray(rows, np.int64), "}")
        return self.device_keys(map(device_ids.__getitem__, rows.tolist()))

    def device_id(self, device_key: str) -> str:
        """The device of a key built by device()."""
        return device_key[self.device_id_offset : -1]

    @property
    def device_id_offset(self) -> int:
        """Where the id starts in a key built by device() (it ends with the closing brace)."""
        return len(self.prefix) + 4

    @property
    def version(self) -> str:
        return self._global("layout")

    def total_rate(self, group: int = 0) -> str:
        return self._in(group, "rate")

    def group_marker(self, tag: str, instance: str, n: int) -> str:
        return f"{self.prefix}:m:{{{tag}}}:{instance}:{n}"

    def _global(self, name: str) -> str:
        return f"{{{self.prefix}}}:{name}"

    def devices(self, group: int = 0) -> str:
        return self._in(group, "devices")

    def column(self, field: str, group: int = 0) -> str:
        if field not in COLUMNS:
            raise ValueError(f"no column {field!r}")
        return self._in(group, f"c:{field}")

    def slots(self, group: int = 0) -> str:
        return self._in(group, "slot")

    def slot_ids(self, group: int = 0) -> str:
        return self._in(group, "id")

    def free_slots(self, group: int = 0) -> str:
        return self._in(group, "free")

    def group_keys(self, group: int = 0) -> list[str]:
        """An index group's keys as the rtm module and scripts.WRITE_ROWS take them."""
        return [
            self.devices(group),
            self.slots(group),
            self.slot_ids(group),
            self.free_slots(group),
            *(self.column(field, group) for field in COLUMNS),
        ]

    def totals(self, group: int = 0) -> str:
        return self._in(group, "totals")

    def rejected(self, group: int = 0) -> str:
        return self._in(group, "rejected")

    def global_marker(self, instance: str, group: int = 0) -> str:
        return self._in(group, f"m:{instance}")

    def layout1_keys(self) -> tuple[str, str]:
        """Keys only a Redis written in layout 1 (no version key) can hold."""
        return self._global("totals"), self._global("devices")

    def batch(self, producer_id: str, batch_id: int) -> str:
        return self._global(f"b:{producer_id}:{batch_id}")

    def journal(self, flush_id: str) -> str:
        return self._global(f"j:{flush_id}")

    def journal_chunk(self, flush_id: str, n: int) -> str:
        return self._global(f"jc:{flush_id}:{n}")

    @property
    def journals(self) -> str:
        return self._global("journals")

    def alive(self, instance: str) -> str:
        return self._global(f"alive:{instance}")

    def stats(self, instance: str) -> str:
        return self._global(f"stats:{instance}")

    @property
    def instances(self) -> str:
        return self._global("instances")

    def recovering(self, flush_id: str) -> str:
        return self._global(f"recovering:{flush_id}")


@functools.cache
def _group_tags(prefix: str, groups: int) -> tuple[str, ...]:
    """Per group, the first of "<prefix>.<n>.0", "<prefix>.<n>.1", ... whose hash slot lies
    in the group's share of the slots (the prefix itself with one group)."""
    if groups == 1:
        return (prefix,)
    tags = []
    for n in range(groups):
        low = n * REDIS_CLUSTER_HASH_SLOTS // groups
        high = (n + 1) * REDIS_CLUSTER_HASH_SLOTS // groups
        k = 0
        while not low <= key_slot(f"{prefix}.{n}.{k}".encode()) < high:
            k += 1
        tags.append(f"{prefix}.{n}.{k}")
    return tuple(tags)
