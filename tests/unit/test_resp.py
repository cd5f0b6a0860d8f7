"""storage/_pack.c's resp(): a command in the Redis protocol, byte for byte as redis-py's
packer writes it, with large values as chunks of their own (not copied). Run under
AddressSanitizer too (make test-asan)."""

from __future__ import annotations

import sys
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.connection import Encoder, PythonRespSerializer

from rtmonitor.storage._pack import resp

_CUTOFF = 6000
_ITEM = st.one_of(
    st.text(),
    st.binary(max_size=64),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.integers(min_value=-(2**63) - 2, max_value=-(2**63) + 2),
    st.integers(min_value=2**63 - 2, max_value=2**63 + 2),
    st.floats(allow_nan=False),
    st.integers(min_value=_CUTOFF - 2, max_value=_CUTOFF + 2).map(lambda n: b"v" * n),
)


def theirs(items: tuple[str | int | float | bytes, ...]) -> bytes:
    encoder = Encoder("utf-8", "strict", False)
    # (a bytes name is not split into words by redis-py: resp() never splits)
    return b"".join(PythonRespSerializer(_CUTOFF, encoder.encode).pack(b"N", *items))[
        len(b"*%d\r\n$1\r\nN\r\n" % (len(items) + 1)) :
    ]


@settings(max_examples=500, deadline=None)
@given(items=st.lists(_ITEM, max_size=40))
def test_resp_packs_as_redis_py(items: list[str | int | float | bytes]) -> None:
    chunks = resp(items, _CUTOFF)
    packed = b"".join(chunks)
    header = b"*%d\r\n" % len(items)
    assert packed.startswith(header)
    assert packed[len(header) :] == theirs(tuple(items))
    assert resp(tuple(items), _CUTOFF) == chunks  # (a tuple as a list)
    bigs = [i for i in items if type(i) is bytes and len(i) > _CUTOFF]
    # each large value is a chunk of its own, the very object; the rest packed between
    assert [c for c in chunks if len(c) > _CUTOFF and c.startswith(b"v")] == bigs
    assert all(any(c is big for c in chunks) for big in bigs)
    assert len(chunks) == 2 * len(bigs) + 1


def test_what_resp_does_not_take() -> None:
    for bad in (True, None, bytearray(b"x"), memoryview(b"x"), [1], 1j):
        with pytest.raises(TypeError, match="resp\\(\\) takes str, int, float and bytes"):
            resp(["SET", bad], _CUTOFF)
    with pytest.raises(TypeError, match="a list or a tuple"):
        resp(5, _CUTOFF)  # type: ignore[arg-type]
    with pytest.raises(UnicodeEncodeError):
        resp(["SET", "\udc80"], _CUTOFF)
    assert resp([], _CUTOFF) == [b"*0\r\n"]
    # nothing leaks, on the error path or not: the items' references, the text made of
    # numbers (an int past 64 bits, a float), the chunks
    big, name = 2**70, "x" * 40
    items: list[object] = [name, big, 1.5, b"v" * (_CUTOFF + 1), None]
    before = (sys.getrefcount(big), sys.getrefcount(name))
    tracemalloc.start()
    for n in range(2000):
        if n == 1000:
            start = tracemalloc.get_traced_memory()[0]
        try:  # (not pytest.raises: what it keeps of each exception would count)
            resp(items, _CUTOFF)  # type: ignore[arg-type]
        except TypeError:
            pass
        resp(items[:-1], _CUTOFF)  # type: ignore[arg-type]
    grown = tracemalloc.get_traced_memory()[0] - start
    tracemalloc.stop()
    assert (sys.getrefcount(big), sys.getrefcount(name)) == before
    assert grown < 20_000, grown  # (a str of 2**70 leaked per call: ~70 KB)
