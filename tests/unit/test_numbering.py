"""The flush's numbering of its device keys (src/rtmonitor/_model.c, model._number_ids)
against a dict and against the sort it replaces: keys that share a slot, a table that
grows, a fleet's ids."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtmonitor import model
from rtmonitor._model import number_ids
from rtmonitor.ingest._devices import addresses


def test_the_compiled_numbering_is_built() -> None:
    """Without it a flush sorts a fleet's keys, several times slower."""
    assert model.C_NUMBERING, (
        "rtmonitor/_model.c was not compiled: install a C compiler and Python's headers "
        "(apt-get install gcc python3-dev), then `make clean test`"
    )


def _numbered_by_a_dict(keys: list[int]) -> tuple[list[int], list[int]]:
    first: dict[int, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    number = {k: n for n, k in enumerate(first)}
    return list(first.values()), [number[k] for k in keys]


# Few distinct keys: extremes, and keys that share a slot of the first table (their
# Fibonacci hash's top 10 bits: 909), so that probing runs.
int64s = st.sampled_from(
    [0, 1, -1, 2**63 - 1, -(2**63), 16, 5184, 10352, 46384, 51552, 56720, *range(32, 672, 16)]
)


@given(st.lists(int64s, max_size=400), st.booleans())
@settings(max_examples=200, deadline=None)
def test_number_ids_numbers_as_a_dict_does(keys: list[int], compiled: bool) -> None:
    """Each distinct key's first position, in first-appearance order, and each key's number
    among them: the same from the C hash pass and from the sort used without it."""
    want = _numbered_by_a_dict(keys)
    array = np.array(keys, dtype=np.int64)
    if compiled:
        firsts, numbers = number_ids(array.data, 10)
        got = np.frombuffer(firsts, dtype=np.int64), np.frombuffer(numbers, dtype=np.int64)
    else:
        got = model._number_by_sort(array)
    assert (got[0].tolist(), got[1].tolist()) == want


def test_number_ids_grows_with_a_fleet() -> None:
    """Tens of thousands of distinct keys (the table grows many times), each seen several
    times in a random order: the numbering of a fleet's flush."""
    rng = np.random.default_rng(7)
    objects = [object() for _ in range(50_000)]
    ids = np.frombuffer(addresses(objects), dtype=np.int64)
    keys = ids[rng.integers(0, len(ids), 300_000)]
    firsts, numbers = number_ids(keys.data, 10)  # a table of 1,024 slots that grows
    assert (np.frombuffer(firsts, dtype=np.int64).tolist(),
            np.frombuffer(numbers, dtype=np.int64).tolist()) == _numbered_by_a_dict(
        keys.tolist())  # fmt: skip
    assert number_ids(keys.data) == (firsts, numbers)  # (a first table for them all)
    assert number_ids(np.zeros(0, np.int64).data) == (bytearray(), bytearray())
    # only int64s: not bytes, int32s or doubles that happen to be 8 bytes per pair
    for wrong in (b"12345678", np.zeros(2, np.int32), np.zeros(1, np.float64)):
        with pytest.raises(TypeError, match="native int64s"):
            number_ids(wrong)
    with pytest.raises(TypeError):
        number_ids([1, 2])  # type: ignore[arg-type]
    for bits in (9, 23):
        with pytest.raises(ValueError, match="table_bits is 10 to 22"):
            number_ids(keys.data, bits)
