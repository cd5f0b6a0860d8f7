"""The lean Redis connections (storage/wire.py) against a real Redis: the same bytes as
redis-py's, and a write that stalls still times out and drops its connection."""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    ConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.connection import HiredisRespSerializer
from redis.exceptions import DataError
from redis.exceptions import TimeoutError as RedisTimeoutError

from rtmonitor.storage import wire
from rtmonitor.storage.embedded import EmbeddedRedis
from rtmonitor.storage.store import RedisStore
from rtmonitor.storage.wire import LeanConnection, LeanSSLConnection, LeanUnixConnection

_ARG = st.one_of(
    st.text(),
    st.binary(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
)


def _both_packers(name: str | bytes, *args: Any) -> list[list[bytes]]:
    """The lean packing of the command with storage/_pack.c's packer, and with what wire.py
    packs with where it was not compiled (setup.py builds it optionally)."""
    built = wire._resp
    try:
        wire._resp = None
        fallback = LeanConnection().pack_command(name, *args)
    finally:
        wire._resp = built
    return [LeanConnection().pack_command(name, *args), fallback]


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(["SET", "CONFIG GET", b"EVALSHA", "hset", " CONFIG\tGET ", "RTM.MERGE6"]),
    args=st.lists(_ARG),
)
def test_commands_are_packed_byte_for_byte_as_redis_py_packs_them(
    name: str | bytes, args: list[str | bytes | int | float]
) -> None:
    theirs = b"".join(Connection().pack_command(name, *args))
    for ours in _both_packers(name, *args):
        assert b"".join(ours) == theirs


_LARGE = st.builds(
    lambda n, kind: kind(b"v" * n),
    st.integers(min_value=wire._INLINE_MAX - 2, max_value=wire._INLINE_MAX + 2),
    st.sampled_from([bytes, bytearray, memoryview]),
)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(["EVALSHA", "SCRIPT LOAD", b"rtm.merge6"]),
    args=st.lists(st.one_of(_ARG, st.binary().map(bytearray))),
    large=st.lists(_LARGE, min_size=1, max_size=4),
    data=st.data(),
)
def test_commands_with_large_values_are_packed_as_redis_py_packs_them(
    name: str | bytes, args: list[Any], large: list[Any], data: st.DataObject
) -> None:
    """Values around the cutoff, of each buffer type, anywhere among the other arguments:
    the same bytes as redis-py's packer, and a large bytes value is not copied."""
    for value in large:
        args.insert(data.draw(st.integers(0, len(args))), value)
    theirs = b"".join(Connection().pack_command(name, *args))
    for chunks in _both_packers(name, *args):
        assert b"".join(chunks) == theirs
        for arg in args:
            if type(arg) is bytes and len(arg) > wire._INLINE_MAX:
                assert any(chunk is arg for chunk in chunks)


def test_commands_are_packed_in_c_as_redis_py_packs_them() -> None:
    """storage/_pack.c's packer is built and used (its edges: 64-bit ints, floats as repr(),
    text past ASCII, empty values); what it does not take goes on to hiredis' packer."""
    assert wire._resp is not None
    edges = [2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 0, -0.0, float("inf"), 1e-7, 1e22,
             "", "é€😀", b"", b"\x00\r\n", 12.5]  # fmt: skip
    for name in ["rtm.merge6", " CONFIG  GET ", "SET"]:
        ours = LeanConnection().pack_command(name, *edges)
        assert ours == wire._resp((*name.encode().split(), *edges), wire._INLINE_MAX)
        assert b"".join(ours) == b"".join(Connection().pack_command(name, *edges))
    with pytest.raises(TypeError, match="not bool"):
        wire._resp(("SET", "k", True), wire._INLINE_MAX)
    with pytest.raises(UnicodeEncodeError):  # (as redis-py's encoder: strict UTF-8)
        LeanConnection().pack_command("SET", "k", "\udc80")
    with pytest.raises(UnicodeEncodeError):
        Connection().pack_command("SET", "k", "\udc80")


def test_buffers_and_bad_arguments_are_taken_as_redis_py_takes_them() -> None:
    assert LeanConnection().pack_command("SET", bytearray(b"k"), memoryview(b"v")) == [
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"
    ]
    for bad in (None, True, [1]):
        with pytest.raises(DataError):
            LeanConnection().pack_command("SET", "k", bad)  # type: ignore[arg-type]


def test_the_store_uses_the_lean_twin_of_the_connection_class_of_its_url() -> None:
    for url, expected in [
        ("redis://127.0.0.1:1", LeanConnection),
        ("unix:///tmp/nowhere.sock", LeanUnixConnection),
        ("rediss://127.0.0.1:1", LeanSSLConnection),
    ]:
        store = RedisStore.from_url(url)
        assert isinstance(store.client, aioredis.Redis)
        assert store.client.connection_pool.connection_class is expected


def test_a_stalled_write_times_out_and_drops_its_connection(
    redis_server: EmbeddedRedis,
) -> None:
    """Redis stopped (SIGSTOP) stops reading: a large write fills the socket buffers and
    stalls. It must fail with redis-py's TimeoutError within the socket timeout, the
    next command must work on a fresh connection once Redis runs again, and the failed
    command must never run."""
    pid = redis_server.pid
    assert pid is not None

    async def main() -> None:
        pool = ConnectionPool(
            connection_class=LeanConnection,
            host=redis_server.host,
            port=redis_server.port,
            password=redis_server.password,
            socket_timeout=0.5,
        )
        client = aioredis.Redis(connection_pool=pool)
        try:
            assert await client.ping()
            os.kill(pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(RedisTimeoutError, match="writing"):
                    await client.set("big", b"x" * (64 << 20))
                assert time.monotonic() - started < 5
            finally:
                os.kill(pid, signal.SIGCONT)
            assert await client.set("small", b"y")
            assert await client.get("small") == b"y"
            # The connection was aborted, not closed: the unsent rest of the command is
            # never delivered, so Redis never runs it.
            await asyncio.sleep(0.5)
            assert await client.exists("big") == 0
        finally:
            await client.aclose()
            await pool.aclose()

    asyncio.run(main())


def test_a_large_value_is_sent_as_it_is_not_copied() -> None:
    big = b"j" * 100_000
    chunks = LeanConnection().pack_command("EVALSHA", "sha", 1, "key", big)
    assert any(chunk is big for chunk in chunks)
    assert b"".join(chunks) == b"".join(Connection().pack_command("EVALSHA", "sha", 1, "key", big))
    # a merge call: hundreds of keys, the deltas, numbers after them (and buffers, values
    # of two words in the name): the same bytes as redis-py's packer
    keys = [f"rtm:d:{{dev-{i:06d}}}" for i in range(300)]
    call = ("EVALSHA", "sha", 300, *keys, 86400, 7, 0, 179, big, 5, 1.25, bytearray(b"ba"))
    chunks = LeanConnection().pack_command(*call)
    assert any(chunk is big for chunk in chunks)
    assert b"".join(chunks) == b"".join(Connection().pack_command(*call))
    assert b"".join(LeanConnection().pack_command("SCRIPT LOAD", big)) == b"".join(
        Connection().pack_command("SCRIPT LOAD", big)
    )
    with pytest.raises(DataError):
        LeanConnection().pack_command("SET", "k", None, big)


# --- the redis-py internals storage/wire.py relies on ----------------------------------------
# wire.py overrides redis-py's asyncio write path; these fail when an upgrade of redis-py
# (pyproject.toml bounds it to the majors checked) changes what it overrides or calls.


_NO_DEFAULT = inspect.Parameter.empty


def _params(func: Any) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(func).parameters.values()]


def test_the_overridden_write_path_has_the_signatures_wire_py_expects() -> None:
    send = AbstractConnection.send_packed_command
    assert inspect.iscoroutinefunction(send)
    assert _params(send) == [
        ("self", _NO_DEFAULT),
        ("command", _NO_DEFAULT),
        ("check_health", True),
    ]
    assert inspect.iscoroutinefunction(AbstractConnection.check_health)
    assert _params(AbstractConnection.check_health) == [("self", _NO_DEFAULT)]
    assert inspect.iscoroutinefunction(AbstractConnection.disconnect)
    assert ("nowait", False) in _params(AbstractConnection.disconnect)
    assert isinstance(inspect.getattr_static(AbstractConnection, "is_connected"), property)
    for cls in (Connection, UnixDomainSocketConnection, SSLConnection):
        assert cls.send_packed_command is AbstractConnection.send_packed_command, cls
        assert cls.pack_command is AbstractConnection.pack_command, cls


def test_redis_py_still_writes_through_a_task_and_packs_in_python() -> None:
    """The two costs wire.py takes out: if redis-py drops either, so can wire.py."""
    assert "asyncio.wait_for(" in inspect.getsource(AbstractConnection.send_packed_command)
    assert "hiredis" not in inspect.getsource(AbstractConnection.pack_command)


def test_the_packers_and_the_cutoff_wire_py_mirrors() -> None:
    assert Connection()._buffer_cutoff == wire._INLINE_MAX
    assert _params(HiredisRespSerializer.pack)[1][0] == "args"
    # Buffers are turned into bytes before hiredis sees them (redis-py 8.0 and later).
    assert HiredisRespSerializer().pack("CONFIG SET", bytearray(b"k"), memoryview(b"v")) == [
        b"*4\r\n$6\r\nCONFIG\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"
    ]
    with pytest.raises(DataError):
        HiredisRespSerializer().pack("SET", "k", None)


def test_a_connected_connection_writes_through_a_stream_writer(
    redis_server: EmbeddedRedis,
) -> None:
    """After connect, `_writer` is the StreamWriter wire.py writes to and aborts; after
    `disconnect(nowait=True)` the connection reports itself unconnected."""

    async def main() -> None:
        conn = LeanConnection(
            host=redis_server.host,
            port=redis_server.port,
            password=redis_server.password,
            socket_timeout=5,
        )
        assert conn.socket_timeout == 5
        assert not conn.is_connected and conn._writer is None
        await conn.connect()
        try:
            assert conn.is_connected
            assert isinstance(conn._writer, asyncio.StreamWriter)
            assert callable(conn._writer.transport.abort)
            await conn.send_command("PING")
            assert await conn.read_response() == b"PONG"
        finally:
            await conn.disconnect(nowait=True)
        assert not conn.is_connected and conn._writer is None

    asyncio.run(main())
