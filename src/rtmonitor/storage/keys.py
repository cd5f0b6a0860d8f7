"""The Redis key layout (documented in README "Key layout").

Every key of one device carries the device id as its hash tag ``{device_id}``, so all of
them live in one Redis Cluster hash slot; the global keys share the tag ``{<prefix>}``.
Device ids cannot contain braces (validation refuses them), so a tag cannot be forged.

    <p>:d:{<device>}            string the device's record (MessagePack, scripts.py): packets,
                                       bytes, first/last seen, kinds, value statistics,
                                       rate buckets of the last ~61 s, its sort=rate window
    {<p>}:layout                string the key layout version (LAYOUT_VERSION); a store refuses
                                       a Redis written with another layout
    {<p>}:rate                  hash   the same for all devices together
    <p>:m:{<tag>}:<inst>:<n>    string highest flush seq of instance <inst> applied to merge
                                       group n ({<tag>}: the group's hash slot) (24 h TTL)
    {<p>}:devices               zset   every device, score 0 (lexicographic: prefix filter)
    {<p>}:idx:packets           zset   device -> packets (sort by packets)
    {<p>}:idx:bytes             zset   device -> bytes
    {<p>}:idx:last_seen         zset   device -> last_seen ms
    {<p>}:rw:<window>           zset   device -> packets committed in the aligned 10-second
                                       window <window> = Unix seconds // 10 (sort by rate;
                                       30 s TTL)
    The sorted sets are written once per flush by bulk ZADDs (GT: scores are the devices'
    totals, which only grow, so a retry or another instance's older figure changes nothing).
    {<p>}:totals                hash   packets, bytes
    {<p>}:rejected              hash   reason -> packets
    {<p>}:m:<inst>              string highest flush seq of <inst> applied to the global keys
    {<p>}:b:<producer>:<batch>  string a batch id: "p:<flush>" claimed, "c" committed (TTL =
                                       the dedupe window)
    {<p>}:j:<flush>             string journal of a flush: batch ids and merge calls (JSON)
    {<p>}:journals              zset   flush id -> prepare time (journals not yet finalized)
    {<p>}:alive:<inst>          string heartbeat of a live instance (TTL)
    {<p>}:stats:<inst>          string an ingest instance's self-metrics (JSON, TTL)
    {<p>}:instances             zset   instance -> when it last published its stats (ms)
    {<p>}:recovering:<flush>    string who replays a dead instance's journal (TTL)
"""

from __future__ import annotations

from dataclasses import dataclass

SORT_INDEXES = ("packets", "bytes", "last_seen")
# The key layout written by this version: 2 = one MessagePack record per device (1, before
# it, had a hash and a rate-bucket hash per device and no version key).
LAYOUT_VERSION = "2"
# Width of the aligned windows behind sort=rate: a flush adds its devices' packets to the
# window of its newest receive time; reads rank by the last complete window.
RATE_WINDOW_S = 10


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """Builds every key name from one prefix."""

    prefix: str = "rtm"

    def device(self, device_id: str) -> str:
        return f"{self.prefix}:d:{{{device_id}}}"

    def device_id(self, device_key: str) -> str:
        """The device of a key built by device()."""
        return device_key[len(self.prefix) + 4 : -1]

    @property
    def version(self) -> str:
        return self._global("layout")

    @property
    def total_rate(self) -> str:
        return self._global("rate")

    def group_marker(self, tag: str, instance: str, n: int) -> str:
        return f"{self.prefix}:m:{{{tag}}}:{instance}:{n}"

    def _global(self, name: str) -> str:
        return f"{{{self.prefix}}}:{name}"

    @property
    def devices(self) -> str:
        return self._global("devices")

    def index(self, field: str) -> str:
        if field not in SORT_INDEXES:
            raise ValueError(f"no index for {field!r}")
        return self._global(f"idx:{field}")

    def rate_window(self, window: int) -> str:
        return self._global(f"rw:{window}")

    @property
    def totals(self) -> str:
        return self._global("totals")

    @property
    def rejected(self) -> str:
        return self._global("rejected")

    def global_marker(self, instance: str) -> str:
        return self._global(f"m:{instance}")

    def batch(self, producer_id: str, batch_id: int) -> str:
        return self._global(f"b:{producer_id}:{batch_id}")

    def journal(self, flush_id: str) -> str:
        return self._global(f"j:{flush_id}")

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
