"""Packet validation: a bad packet is rejected and counted by reason, never fatal to a stream."""

from __future__ import annotations

import math
import re
import threading
import weakref
from collections.abc import Collection, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from enum import StrEnum
from itertools import compress, repeat
from operator import is_not
from typing import Protocol, cast

from rtmonitor.ingest.v1.telemetry_pb2 import Packet
from rtmonitor.model import DEVICE_ID_MAX, ID_CHARS, NAME_MAX, Row

try:
    from rtmonitor.ingest._devices import DeviceTable

    C_DEVICES = True  # the compiled device table is built (see setup.py)
except ImportError:  # installed without a C compiler: the table is a dict
    C_DEVICES = False

# Device ids, kinds and value names share one alphabet (model.ID_CHARS: why it is safe).
_DEVICE_ID = _NAME = re.compile(f"[{ID_CHARS}]+")
UNSPECIFIED_KIND = "unspecified"
# a device clock more than a day ahead is broken, and would pin "last" values forever
MAX_CLOCK_AHEAD_MS = 24 * 3600 * 1000
_GOOD_NAMES_MAX = 65_536
_NOTHING: frozenset[str] = frozenset()


def device_id_reason(device_id: str) -> Reason | None:
    """Why a device id is refused, or None."""
    if not device_id:
        return Reason.EMPTY_DEVICE_ID
    if len(device_id) > DEVICE_ID_MAX:
        return Reason.DEVICE_ID_TOO_LONG
    if not _DEVICE_ID.fullmatch(device_id):
        return Reason.INVALID_DEVICE_ID
    return None


def device_ids_ok(device_ids: list[str]) -> bool:
    """True if device_id_reason() is None for every one of these ids: the lengths in one
    C-level pass, the characters by one regular expression over all of them joined."""
    if not device_ids:
        return True
    lengths = list(map(len, device_ids))
    return (
        min(lengths) > 0
        and max(lengths) <= DEVICE_ID_MAX
        and _DEVICE_ID.fullmatch("".join(device_ids)) is not None
    )


def name_ok(name: str) -> bool:
    """Kinds and value names: 1-64 characters of the safe set."""
    return 0 < len(name) <= NAME_MAX and _NAME.fullmatch(name) is not None


class Reason(StrEnum):
    """Why a packet, or a whole message, was not counted (these strings appear in acks,
    /metrics, /stats and logs)."""

    MALFORMED = "malformed_packet"
    EMPTY_DEVICE_ID = "empty_device_id"
    DEVICE_ID_TOO_LONG = "device_id_too_long"
    INVALID_DEVICE_ID = "invalid_device_id"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    BAD_TIMESTAMP = "bad_timestamp"
    INVALID_KIND = "invalid_kind"
    TOO_MANY_VALUES = "too_many_values"
    INVALID_VALUE_NAME = "invalid_value_name"
    NON_FINITE_VALUE = "non_finite_value"
    TOO_MANY_KINDS = "too_many_kinds"
    TOO_MANY_VALUE_NAMES = "too_many_value_names"
    TOO_MANY_DEVICES = "too_many_devices"
    INVALID_COLUMN_INDEX = "invalid_column_index"  # columnar: an index past its dictionary
    # OTLP: a resource without any device id attribute; a data point without a value
    NO_DEVICE_ID = "no_device_id"
    NO_VALUE = "no_value"
    # A device outside the stream's token's device_prefix (auth.py): never validated,
    # never written.
    DEVICE_NOT_PERMITTED = "device_not_permitted"
    # A whole StreamBatches message refused: the stream ends, and the refusal is counted
    # once, as a message (/stats ingest.messages_refused_by_reason), never as the packets
    # the message claims to carry.
    MALFORMED_BATCH = "malformed_batch"
    BATCH_TOO_LARGE = "batch_too_large"
    INVALID_PRODUCER_ID = "invalid_producer_id"
    INVALID_COLUMNS = "invalid_columns"
    # A whole OTLP or HTTP JSON request refused (its answer says why; the client may resend
    # the transient ones: queue_full, commit_timeout, redis_unavailable, shutting_down).
    BODY_TOO_LARGE = "body_too_large"
    MALFORMED_BODY = "malformed_body"
    INVALID_BODY = "invalid_body"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    QUEUE_FULL = "queue_full"
    COMMIT_TIMEOUT = "commit_timeout"
    REDIS_UNAVAILABLE = "redis_unavailable"
    SHUTTING_DOWN = "shutting_down"


class PacketFields(Protocol):
    """What check() reads of a packet: a protobuf Packet, or a receiver's own record of one
    (the MQTT bridge's JSON packets skip building a protobuf message)."""

    @property
    def device_id(self) -> str: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def timestamp_ms(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def values(self) -> Mapping[str, float]: ...


@dataclass(frozen=True, slots=True)
class Limits:
    """The validation limits (from Settings)."""

    max_payload_bytes: int = 65_536
    max_values_per_packet: int = 64
    max_kinds_per_device: int = 64
    max_value_names_per_device: int = 64
    max_devices: int = 1_000_000


class Vocabulary:
    """What a device has used so far in this process (kinds, value names). Immutable and
    shared: devices of a fleet mostly use the same kinds and names, so 100,000 devices hold
    a handful of these instead of two sets each (~450 B per device)."""

    __slots__ = ("kinds", "names", "__weakref__")

    def __init__(self, kinds: frozenset[str], names: frozenset[str]) -> None:
        self.kinds = kinds
        self.names = names

    def has(self, kinds: Collection[str], names: Collection[str]) -> bool:
        """True if these kinds and names are all known already (nothing to admit)."""
        return self.kinds.issuperset(kinds) and self.names.issuperset(names)


def _admit_new(
    known: frozenset[str], items: Iterable[str], limit: int
) -> tuple[frozenset[str], set[str]]:
    """`known` plus `items` (in order) while there is room, and the ones refused."""
    added: set[str] = set()
    refused: set[str] = set()
    for item in items:
        if item not in known and item not in added:
            if len(known) + len(added) >= limit:
                refused.add(item)
            else:
                added.add(item)
    return (known | added if added else known), refused


_EMPTY = Vocabulary(_NOTHING, _NOTHING)


class Known:
    """A device's entry in the Validator's table: its vocabulary, replaced as it grows.

    The entry stays the same object for as long as the device is known (promotions move
    it, rotations drop it), so its identity names the device: a batch keeps its devices'
    entries, and a flush numbers a fleet's devices by these identities in numpy instead of
    looking their ids up in a dict (model.reduce_batches). Holding the entry keeps its
    identity from being reused."""

    __slots__ = ("vocab",)

    def __init__(self, vocab: Vocabulary | None) -> None:
        self.vocab = vocab


# What entries() gives for a device not in the current generation (never in the table).
UNKNOWN = Known(None)


class _DictTable(dict[str, Known]):
    """The device table without the compiled one: a dict, and get_many() as a C-level pass
    of dict.get (one chain of cache misses after another)."""

    def get_many(self, keys: list[str], default: Known) -> list[Known]:
        return list(map(self.get, keys, repeat(default)))


def _device_table() -> DeviceTable[Known]:
    """A generation's table, device id -> entry. The compiled one looks a fleet's batch up
    several times faster (_devices.c says why); both answer alike."""
    if C_DEVICES:
        return DeviceTable()
    return cast("DeviceTable[Known]", _DictTable())


class Validator:
    """Checks packets against the limits; remembers each device's kinds and value names.

    The per-device limits are enforced per process: N instances admit at most N times
    the limit in the worst case (documented in the README).

    Devices expire from Redis after the retention, and so do their slots here: the table
    has two generations, rotated by rotate() once per retention. A device seen since the
    last rotation is in the current one (a device found in the previous one moves up);
    a rotation drops the previous one, i.e. the devices silent for a whole period. So a
    slot, and the device's kinds and names budgets, are freed after 1-2 retentions of
    silence — never before Redis has expired what the device counted, so a returning
    device cannot hold more kinds or names in Redis than its budget.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        # Held by whoever reads or grows the table: a batch while it is validated and
        # admitted (columnar._validate_and_aggregate), a packet (check: StreamPackets, MQTT),
        # a rotation. A fleet's batches are validated in a worker thread
        # (servicer.DECODE_THREAD_DEVICES) while the event loop does the rest; interleaved,
        # a limit could be passed, or a device's vocabulary lose what another step added.
        self.lock = threading.Lock()
        self._devices = _device_table()  # the current generation
        self._previous = _device_table()  # disjoint from _devices
        # Interned vocabularies; one disappears once no device uses it any more.
        self._vocabularies: weakref.WeakValueDictionary[
            tuple[frozenset[str], frozenset[str]], Vocabulary
        ] = weakref.WeakValueDictionary()
        # Kinds and value names that passed name_ok(): batches look each distinct one up
        # once per batch, so the regex runs once per name, not once per batch. Bounded.
        self._good_names: set[str] = set()

    def _intern(self, kinds: frozenset[str], names: frozenset[str]) -> Vocabulary:
        vocab = self._vocabularies.get((kinds, names))
        if vocab is None:
            vocab = self._vocabularies[(kinds, names)] = Vocabulary(kinds, names)
        return vocab

    def _vocabulary(self, device_id: str) -> Vocabulary | None:
        """The device's vocabulary (None: a new device); one found only in the previous
        generation (its first packet since a rotation) moves up to the current one."""
        known = self._devices.get(device_id)
        if known is None:
            known = self._previous.pop(device_id, None)
            if known is None:
                return None
            self._devices[device_id] = known
        return known.vocab

    def _settle(self, device_id: str, vocab: Vocabulary) -> None:
        """Give one device (in the current generation, or new) this vocabulary."""
        known = self._devices.get(device_id)
        if known is None:
            self._devices[device_id] = Known(vocab)
        else:
            known.vocab = vocab

    def rotate(self) -> int:
        """Start a new generation: devices not seen since the last rotation lose their slot.
        Called once per retention period; returns how many slots were freed."""
        freed = len(self._previous)
        self._previous = self._devices
        self._devices = _device_table()
        return freed

    def device_reason(self, device_id: str) -> Reason | None:
        """Why a device id is refused, or None (a device already admitted is valid)."""
        if device_id in self._devices or device_id in self._previous:
            return None
        return device_id_reason(device_id)

    def name_ok(self, name: str) -> bool:
        """name_ok() with a memory of the names that passed."""
        if name in self._good_names:
            return True
        if not name_ok(name):
            return False
        if len(self._good_names) >= _GOOD_NAMES_MAX:
            self._good_names.clear()
        self._good_names.add(name)
        return True

    @property
    def device_count(self) -> int:
        return len(self._devices) + len(self._previous)

    def check(self, packet: Packet | PacketFields, recv_ms: int) -> Row | Reason:
        """Return the packet as a row ready to aggregate, or the reason it is refused."""
        lim = self.limits
        device_id = packet.device_id
        # A device, kind or value name in the vocabulary passed these checks before: skip
        # the regular expressions (the hot path is a dict and a set lookup). The order of
        # the checks, and so the reason reported, is the same either way.
        vocab = self._vocabulary(device_id)
        if vocab is None and (bad_id := device_id_reason(device_id)) is not None:
            return bad_id
        nbytes = len(packet.payload)
        if nbytes > lim.max_payload_bytes:
            return Reason.PAYLOAD_TOO_LARGE
        ts = packet.timestamp_ms
        if ts == 0:
            ts = recv_ms
        elif ts < 0 or ts > recv_ms + MAX_CLOCK_AHEAD_MS:
            return Reason.BAD_TIMESTAMP
        kind = packet.kind or UNSPECIFIED_KIND
        new_kind = vocab is None or kind not in vocab.kinds
        if new_kind and not name_ok(kind):
            return Reason.INVALID_KIND
        values: dict[str, float] | None = None
        new_names: set[str] | None = None
        readings = packet.values
        if readings:
            read = self._readings(readings, vocab)
            if isinstance(read, Reason):
                return read
            values, new_names = read
        # Stateful limits last, and the vocabulary changes only once the packet is admitted,
        # so a refused packet leaves no trace (no phantom device, kind or value name).
        if vocab is None or new_kind or new_names:
            refused = self._remember(device_id, vocab, kind if new_kind else None, new_names)
            if refused is not None:
                return refused
        return (device_id, kind, nbytes, ts, values)

    def _readings(
        self, readings: Mapping[str, float], vocab: Vocabulary | None
    ) -> tuple[dict[str, float], set[str] | None] | Reason:
        """A packet's readings as a dict and the value names new to its device, or why
        they are refused (the stateless checks: count, names, finite values)."""
        if len(readings) > self.limits.max_values_per_packet:
            return Reason.TOO_MANY_VALUES
        # Keys, then lookups: protobuf's (upb) maps do this faster than items().
        values = {name: readings[name] for name in readings}
        new_names: set[str] | None = None
        if vocab is None or not vocab.names.issuperset(values):
            new_names = values.keys() - vocab.names if vocab is not None else set(values)
        for name, value in values.items():
            if new_names and name in new_names and not name_ok(name):
                return Reason.INVALID_VALUE_NAME
            if not math.isfinite(value):
                return Reason.NON_FINITE_VALUE
        return values, new_names

    def _remember(
        self,
        device_id: str,
        vocab: Vocabulary | None,
        new_kind: str | None,
        new_names: set[str] | None,
    ) -> Reason | None:
        """Admit a new device, kind or value names within the per-device limits (None), or
        the limit that refuses the packet (then nothing is remembered)."""
        lim = self.limits
        if vocab is None:
            if self.device_count >= lim.max_devices:
                return Reason.TOO_MANY_DEVICES
            vocab = _EMPTY
        if new_kind is not None and len(vocab.kinds) >= lim.max_kinds_per_device:
            return Reason.TOO_MANY_KINDS
        if new_names and len(vocab.names) + len(new_names) > lim.max_value_names_per_device:
            return Reason.TOO_MANY_VALUE_NAMES
        self._settle(
            device_id,
            self._intern(
                vocab.kinds | {new_kind} if new_kind is not None else vocab.kinds,
                vocab.names | new_names if new_names else vocab.names,
            ),
        )
        return None

    def entries(self, device_ids: list[str]) -> list[Known]:
        """Each device's entry in the current generation, or UNKNOWN (a new device, or one
        only in the previous generation): a batch looks its devices up in one C call,
        without a Python call per device."""
        return self._devices.get_many(device_ids, UNKNOWN)

    def known(self, device_ids: list[str], entries: list[Known]) -> list[Known]:
        """`entries` (of entries()) with each UNKNOWN one looked up again, after admission:
        the device's entry now, or UNKNOWN if it was not admitted."""
        if UNKNOWN not in entries:
            return entries
        if entries.count(UNKNOWN) * 8 >= len(entries):
            # many new devices (a fleet's first batches): all of them again, a batch at a
            # time, costs less than these one by one
            return self._devices.get_many(device_ids, UNKNOWN)
        get = self._devices.get
        pairs = zip(device_ids, entries, strict=True)
        return [e if e is not UNKNOWN else get(d, UNKNOWN) for d, e in pairs]

    def promote(self, device_ids: list[str]) -> list[Vocabulary | None]:
        """Devices missing from the current generation: each one's vocabulary, moved up from
        the previous generation, or None for a new device (what admit() does first)."""
        found = list(map(self._previous.pop, device_ids, repeat(None)))
        if found.count(None) < len(found):
            moved = map(is_not, found, repeat(None))
            pairs = compress(zip(device_ids, found, strict=True), moved)
            self._devices.update(cast("Iterable[tuple[str, Known]]", pairs))
        return [k.vocab if k is not None else None for k in found]

    @property
    def room(self) -> int:
        """How many more devices --max-devices admits."""
        return max(self.limits.max_devices - self.device_count, 0)

    def extend(
        self, vocab: Vocabulary | None, kinds: Collection[str], names: Collection[str]
    ) -> tuple[Vocabulary, AbstractSet[str], AbstractSet[str]]:
        """`vocab` (None: a new device's) grown by these kinds and names within the
        per-device limits, in order: (the new vocabulary, the kinds refused, the value names
        refused). Depends on nothing else, so devices sharing a vocabulary and a batch's
        kinds and names share the answer."""
        lim = self.limits
        if vocab is None:
            vocab = _EMPTY
        if vocab.has(kinds, names):
            return vocab, _NOTHING, _NOTHING
        known_kinds, refused_kinds = _admit_new(vocab.kinds, kinds, lim.max_kinds_per_device)
        known_names, refused_names = _admit_new(vocab.names, names, lim.max_value_names_per_device)
        return self._intern(known_kinds, known_names), refused_kinds, refused_names

    def settle(self, device_ids: list[str], vocab: Vocabulary) -> None:
        """Give these (admitted) devices this vocabulary: a known device's entry is changed
        in place, a new device gets one. The devices are looked up a batch at a time, as
        entries() does: one by one, a fleet's batch spent most of its admission on these
        lookups (benchmarks/RESULTS.md, twenty-eighth pass)."""
        entries = self._devices.get_many(device_ids, UNKNOWN)
        if entries.count(UNKNOWN) == len(entries):  # new devices (a fleet's first batches)
            new = device_ids
        else:  # devices learning a kind or a value name, perhaps some new ones
            new = []
            for device_id, entry in zip(device_ids, entries, strict=True):
                if entry is UNKNOWN:
                    new.append(device_id)
                else:
                    entry.vocab = vocab
        if new:
            self._devices.update(zip(new, map(Known, repeat(vocab, len(new))), strict=True))

    def admit(
        self, device_id: str, kinds: Collection[str], names: Collection[str]
    ) -> tuple[Reason | None, AbstractSet[str], AbstractSet[str]]:
        """The stateful limits for a whole columnar batch of one device (first-seen order):
        (a reason refusing every packet of the device, or None; the kinds refused; the value
        names refused). The vocabulary grows only by what is admitted."""
        vocab = self._vocabulary(device_id)
        if vocab is not None and vocab.has(kinds, names):
            return None, _NOTHING, _NOTHING  # the steady state: nothing new
        if vocab is None and self.device_count >= self.limits.max_devices:
            return Reason.TOO_MANY_DEVICES, _NOTHING, _NOTHING
        grown, refused_kinds, refused_names = self.extend(vocab, kinds, names)
        self._settle(device_id, grown)
        return None, refused_kinds, refused_names
