"""The compiled device table (src/rtmonitor/ingest/_devices.c) against a dict: random
operations, fresh and shared strings, removals that shift entries back, batch lookups, and
the same with few hash bits (different ids sharing a hash); references given back."""

from __future__ import annotations

import gc
import sys
import weakref
from itertools import repeat
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from rtmonitor.ingest import columnar, validation
from rtmonitor.ingest._devices import DeviceTable, addresses, distinct

MISSING = object()


def fresh(s: str) -> str:
    """An equal str that is a new object (as protobuf or the row reader makes them)."""
    return s.encode().decode()


def test_the_compiled_device_table_is_built() -> None:
    """The package is built with its C device table: without it a fleet's batches look
    their devices up one dict miss after another, several times slower."""
    assert validation.C_DEVICES and columnar.C_KEYS, (
        "rtmonitor/ingest/_devices.c was not compiled: install a C compiler and Python's "
        "headers (apt-get install gcc python3-dev), then `make clean test`"
    )


# Few distinct ids (so that removals hit), of every str kind: ASCII, Latin-1, UCS-2, UCS-4.
ids = st.sampled_from(
    [f"d{i}" for i in range(40)] + ["", "é", "日本", "😀x", "d1\x00", "long-" + "x" * 200]
)


class AgainstADict(RuleBasedStateMachine):
    """Every operation on a DeviceTable and a dict gives the same answer."""

    def __init__(self) -> None:
        super().__init__()
        self.table: DeviceTable[object] = self.make()
        self.model: dict[str, object] = {}

    def make(self) -> DeviceTable[object]:
        return DeviceTable()

    @rule(key=ids, value=st.integers(0, 5))
    def set(self, key: str, value: int) -> None:
        self.table[fresh(key)] = value
        self.model[key] = value

    @rule(key=ids)
    def pop(self, key: str) -> None:
        assert self.table.pop(fresh(key), MISSING) == self.model.pop(key, MISSING)

    @rule(key=ids)
    def delete(self, key: str) -> None:
        if key in self.model:
            del self.table[fresh(key)]
            del self.model[key]
        else:
            with pytest.raises(KeyError):
                del self.table[fresh(key)]
            with pytest.raises(KeyError):
                self.table.pop(key)

    @rule(key=ids)
    def get(self, key: str) -> None:
        assert self.table.get(fresh(key)) == self.model.get(key)
        assert self.table.get(key, MISSING) == self.model.get(key, MISSING)
        assert (fresh(key) in self.table) == (key in self.model)
        if key in self.model:
            assert self.table[fresh(key)] == self.model[key]

    @rule(keys=st.lists(ids, max_size=60))
    def get_many(self, keys: list[str]) -> None:
        asked = [fresh(k) for k in keys]
        got = self.table.get_many(asked, MISSING)
        assert got == list(map(self.model.get, keys, repeat(MISSING)))

    @rule(pairs=st.lists(st.tuples(ids, st.integers(0, 5)), max_size=30))
    def update(self, pairs: list[tuple[str, int]]) -> None:
        self.table.update((fresh(k), v) for k, v in pairs)
        self.model.update(pairs)

    @invariant()
    def same_contents(self) -> None:
        assert len(self.table) == len(self.model)
        assert dict(self.table.items()) == self.model


class CollidingAgainstADict(AgainstADict):
    """The same with 2-bit hashes: most ids share a hash with others, so every lookup,
    insert and removal compares strings that differ."""

    def make(self) -> DeviceTable[object]:
        return DeviceTable(hash_bits=2)


class FallbackAgainstADict(AgainstADict):
    """The validator's table without the compiled one."""

    def make(self) -> DeviceTable[object]:
        return validation._DictTable()  # type: ignore[return-value]


_STATEFUL = settings(max_examples=150, stateful_step_count=80, deadline=None)
TestAgainstADict = AgainstADict.TestCase
TestAgainstADict.settings = _STATEFUL
TestCollidingAgainstADict = CollidingAgainstADict.TestCase
TestCollidingAgainstADict.settings = _STATEFUL
TestFallbackAgainstADict = FallbackAgainstADict.TestCase
TestFallbackAgainstADict.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)


@given(
    st.lists(st.integers(0, 3000), max_size=400),
    st.lists(st.integers(0, 400)),
    st.sampled_from([64, 4]),
)
@settings(max_examples=60, deadline=None)
def test_many_devices_come_and_go(added: list[int], removed: list[int], bits: int) -> None:
    """Past many resizes and removals (each shifting its probe run back), every id is found
    where a dict finds it, by one lookup and by a batch; with 4-bit hashes, through long
    runs of colliding ids."""
    table: DeviceTable[int] = DeviceTable(hash_bits=bits)
    model: dict[str, int] = {}
    for i in added:
        table[f"dev-{i}"] = i
        model[f"dev-{i}"] = i
    for r in removed:  # mostly ids that are there
        i = added[r % len(added)] if added and r < 350 else r
        assert table.pop(f"dev-{i}", None) == model.pop(f"dev-{i}", None)
    asked = [fresh(f"dev-{i}") for i in range(3001)]
    assert table.get_many(asked, -1) == [model.get(k, -1) for k in asked]
    assert len(table) == len(model)
    assert sorted(table.items()) == sorted(model.items())


def test_a_fleets_batch_is_looked_up_as_a_dict_would() -> None:
    """A batch larger than the lookahead, over a table of 100,000, with absent ids mixed in
    and one id asked twice."""
    table: DeviceTable[int] = DeviceTable()
    table.update((f"dev-{i:06d}", i) for i in range(100_000))
    asked = [fresh(f"dev-{i:06d}") for i in range(0, 120_000, 7)] + ["dev-000007"]
    assert table.get_many(asked, -1) == [int(k[4:]) if int(k[4:]) < 100_000 else -1 for k in asked]
    assert table.get_many([], -1) == []
    assert table.get_many(("dev-000001",), -1) == [1]


def test_equal_strings_of_any_str_type_are_one_key() -> None:
    class Tagged(str):
        def __hash__(self) -> int:
            return 7  # not str's hash: the table must use str's own

        def __eq__(self, other: object) -> bool:
            return False

    table: DeviceTable[int] = DeviceTable()
    table[Tagged("dev-1")] = 1
    assert table["dev-1"] == 1
    table["dev-1"] = 2
    assert len(table) == 1 and table.get(Tagged("dev-1")) == 2


def test_a_key_that_is_not_a_str_is_refused() -> None:
    table: DeviceTable[int] = DeviceTable()
    for key in (b"dev-1", 1, None):
        with pytest.raises(TypeError, match="a device id is a str"):
            table[key] = 1  # type: ignore[index]
        with pytest.raises(TypeError):
            table.get_many(["dev-1", key], 0)  # type: ignore[list-item]
        assert key not in table
    with pytest.raises(TypeError):
        table.get_many(5, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pairs"):
        table.update([("a", 1, 2)])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="not a mapping"):
        table.update({"ab": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        DeviceTable(x=1)  # type: ignore[call-arg]
    for bits in (0, 65):
        with pytest.raises(ValueError, match="hash_bits"):
            DeviceTable(hash_bits=bits)
        with pytest.raises(ValueError, match="hash_bits"):
            distinct(["a"], bits)
    with pytest.raises(TypeError, match="unhashable"):
        hash(table)
    assert len(table) == 0


def test_references_are_given_back() -> None:
    """Each operation holds what it should and no more: refcounts of a key and a value
    return to where they were, also after refused calls."""
    key, value, other = fresh("dev-refs"), object(), object()
    table: DeviceTable[object] = DeviceTable()
    before = sys.getrefcount(key), sys.getrefcount(value), sys.getrefcount(other)
    for _ in range(100):
        table[key] = value
        table[fresh("dev-refs")] = other  # replaced: the first key object is kept
        table.get_many([key, "absent"], value)
        table.items()
        with pytest.raises(TypeError):
            table.get_many([key, 1], value)  # type: ignore[list-item]
        with pytest.raises(TypeError):
            distinct([key, 1])  # type: ignore[list-item]
        distinct([key, key])
        assert table.pop(key) is other
        table.update([(key, value)])
        del table[key]
    assert (sys.getrefcount(key), sys.getrefcount(value), sys.getrefcount(other)) == before


def test_items_holds_when_a_finalizer_empties_the_table() -> None:
    """items() takes its references before it allocates: an allocation may run the garbage
    collector, whose finalizers may remove entries."""
    table: DeviceTable[object] = DeviceTable()

    class Popper:
        def __del__(self) -> None:
            for k in [k for k, _ in table.items()][:50]:
                table.pop(k, None)

    for i in range(200):
        table[f"dev-{i}"] = i
    threshold = gc.get_threshold()
    try:
        gc.set_threshold(1)
        for _ in range(20):
            a, b = Popper(), Popper()
            a.other, b.other = b, a  # type: ignore[attr-defined]
            del a, b
            pairs = table.items()
            assert all(k == f"dev-{v}" for k, v in pairs)
    finally:
        gc.set_threshold(*threshold)


def test_a_table_in_a_reference_cycle_is_collected() -> None:
    """The table holds its keys and values for the garbage collector to see."""

    class Entry:
        table: Any = None

    table: DeviceTable[Entry] = DeviceTable()
    entry = Entry()
    entry.table = table
    table["dev-1"] = entry
    gone = weakref.ref(entry)
    del table, entry
    gc.collect()
    assert gone() is None


@given(st.lists(ids, max_size=300), st.sampled_from([64, 2]))
@settings(max_examples=200, deadline=None)
def test_distinct_encodes_as_a_dict_does(strings: list[str], bits: int) -> None:
    """The distinct strings in first-appearance order (the same objects), and each one's
    index among them; with 2-bit hashes too (different strings sharing a hash)."""
    asked = [fresh(x) for x in strings]
    table, index = distinct(asked, bits)
    first = {s: i for i, s in reversed(list(enumerate(asked)))}
    assert table == list(dict.fromkeys(strings))
    assert all(t is asked[first[t]] for t in table)
    assert np.frombuffer(index, dtype=np.int64).tolist() == [table.index(x) for x in strings]


def test_distinct_refuses_what_is_not_a_str() -> None:
    assert distinct([]) == ([], bytearray())
    with pytest.raises(TypeError, match="a device id is a str"):
        distinct(["a", b"a"])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        distinct(3)  # type: ignore[arg-type]


def test_addresses_are_the_ids() -> None:
    objects: list[object] = [object() for _ in range(1000)] + [None, "x"]
    got = np.frombuffer(addresses(objects), dtype=np.int64)
    assert got.tolist() == list(map(id, objects))
    assert addresses([]) == b""


def test_without_the_compiled_table_the_validator_uses_a_dict(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An install without a C compiler: the same answers from a dict."""
    monkeypatch.setattr(validation, "C_DEVICES", False)
    table = validation._device_table()
    assert isinstance(table, dict)
    known = validation.Known(None)
    table["dev-1"] = known
    assert table.get_many([fresh("dev-1"), "dev-2"], validation.UNKNOWN) == [
        known,
        validation.UNKNOWN,
    ]
