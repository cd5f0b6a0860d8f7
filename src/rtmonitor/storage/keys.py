"""The Redis key layout (documented in README "Key layout").

Every key of one device carries the device id as its hash tag ``{device_id}``, so all of
them live in one Redis Cluster hash slot; the global keys share the tag ``{<prefix>}``.
Device ids cannot contain braces (validation refuses them), so a tag cannot be forged.

    <p>:d:{<device>}            hash   packets, bytes, first_seen, last_seen,
                                       k:<kind> -> count,
                                       v:<name>:n | :sum | :min | :max | :last | :ts
    <p>:m:{<device>}:<flush>    string idempotency marker of one device-group write (TTL)
    {<p>}:devices               zset   every device, score 0 (lexicographic: prefix filter)
    {<p>}:idx:packets           zset   device -> packets (sort by packets)
    {<p>}:idx:bytes             zset   device -> bytes
    {<p>}:idx:last_seen         zset   device -> last_seen ms
    {<p>}:totals                hash   packets, bytes
    {<p>}:rejected              hash   reason -> packets
    {<p>}:m:<flush>             string idempotency marker of the global write (TTL)
"""

from __future__ import annotations

from dataclasses import dataclass

SORT_INDEXES = ("packets", "bytes", "last_seen")


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """Builds every key name from one prefix."""

    prefix: str = "rtm"

    def device(self, device_id: str) -> str:
        return f"{self.prefix}:d:{{{device_id}}}"

    def device_marker(self, device_id: str, flush_id: str) -> str:
        return f"{self.prefix}:m:{{{device_id}}}:{flush_id}"

    def _global(self, name: str) -> str:
        return f"{{{self.prefix}}}:{name}"

    @property
    def devices(self) -> str:
        return self._global("devices")

    def index(self, field: str) -> str:
        if field not in SORT_INDEXES:
            raise ValueError(f"no index for {field!r}")
        return self._global(f"idx:{field}")

    @property
    def totals(self) -> str:
        return self._global("totals")

    @property
    def rejected(self) -> str:
        return self._global("rejected")

    def global_marker(self, flush_id: str) -> str:
        return self._global(f"m:{flush_id}")
