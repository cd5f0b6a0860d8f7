"""redis-py's asyncio connections, with two costs taken out of the event loop.

Everything here shares one event loop with gRPC streams and HTTP requests, so what a
command costs the loop is what a GET waits behind under load:

- Packing. redis-py's asyncio connections pack a command in Python, copying the buffer
  built so far once per argument. Here storage/_pack.c packs the same bytes in C in one
  pass (a flush's merge call names hundreds of device keys: ~40 ns each, against ~420
  with hiredis' packer and the copies around it), large values as chunks of their own;
  what it does not take (buffers, wrong types) goes to hiredis' packer, as redis-py's
  synchronous client packs.
- The write timeout. redis-py bounds each write with `asyncio.wait_for`, which on
  Python 3.11 runs the write as a task of its own: extra turns of the loop for every
  command before its reply is even read. `asyncio.timeout` bounds the same write in place.

The subclasses change nothing else. A Redis Cluster client builds its node connections
itself and keeps redis-py's. (Figures: benchmarks/RESULTS.md.)

No public redis-py API does this: the asyncio client has no packer option, and the way
around `wait_for` (`socket_timeout=None`) leaves reads and writes unbounded. So this
relies on redis-py internals (`AbstractConnection.send_packed_command`, `check_health`,
`disconnect(nowait=...)`, `_writer`, `HiredisRespSerializer`, the 6,000-byte cutoff):
pyproject.toml bounds redis to 8.x, and tests/faults/test_wire.py fails if they change.
The store's streamed apply (RedisStore._stream) also takes connections from the pool
itself (`get_connection`, `release`, `pack_commands`, `read_response(disconnect_on_error=
False)`), and drops one with discard() below; tests/integration/test_store.py covers it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import hiredis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

_resp: Callable[..., list[bytes]] | None
try:  # storage/_pack.c; hiredis' packer and the Python below without a compiler
    from rtmonitor.storage._pack import resp as _resp
except ImportError:  # pragma: no cover - a build without a C compiler
    _resp = None

# Arguments longer than this are not copied into the packed command (redis-py's cutoff).
_INLINE_MAX = 6000
# What redis-py sends as a value's bytes.
_BUFFERS = (bytes, bytearray, memoryview)
_PLAIN = frozenset({str, int, float})
# redis-py 8.2 left its constructor untyped (8.1 typed it): the ignore covers both
_HIREDIS = HiredisRespSerializer()  # type: ignore[no-untyped-call,unused-ignore]


class _Lean:
    def pack_command(self, *args: EncodableT) -> list[bytes]:
        """The command in the Redis protocol, as redis-py's synchronous client packs it."""
        name = args[0] if args else None
        if _resp is not None and type(name) is str:
            # In C, in one pass (storage/_pack.c): str, int, float and bytes, the large
            # values as chunks of their own. A name may carry words of its own ("CONFIG
            # GET"), which Redis wants apart.
            try:
                return _resp((*name.encode().split(), *args[1:]), _INLINE_MAX)
            except TypeError:
                pass  # buffers, wrong types (DataError): as below
        if _PLAIN.issuperset(map(type, args)):  # (one C-level pass over the args)
            # Names and numbers, the usual case: straight to hiredis. A name may carry
            # words of its own ("CONFIG GET"), which Redis wants apart.
            name = cast(str, args[0])
            return [hiredis.pack_command(cast(Any, (*name.encode().split(), *args[1:])))]
        if any(  # (from the end: a merge call's deltas come after its hundreds of keys)
            isinstance(a, _BUFFERS) and len(a) > _INLINE_MAX for a in reversed(args)
        ):
            # A large value (a merge call's deltas, a journal chunk: up to a few MB) would
            # be copied into the packed command: it goes as a chunk of its own, as
            # redis-py's packer sends it, and hiredis packs the rest (a merge call has
            # hundreds of keys, which redis-py's packer takes one by one in Python).
            try:
                return _with_large_values(args)
            except TypeError:  # a wrong type: redis-py's own error (DataError)
                return cast(list[bytes], super().pack_command(*args))  # type: ignore[misc]
        # Bytes, buffers, wrong types (DataError): redis-py's own hiredis packer.
        return cast(list[bytes], _HIREDIS.pack(*cast(Any, args)))

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        """Write `command`, as redis-py does, but bounded by a timeout instead of a task."""
        conn = cast(AbstractConnection, self)
        timeout = conn.socket_timeout
        if not conn.is_connected or not timeout:  # (re)connecting: redis-py's own path
            await super().send_packed_command(command, check_health)  # type: ignore[misc]
            return
        if check_health:
            await conn.check_health()  # type: ignore[no-untyped-call]
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        writer = conn._writer
        assert writer is not None  # connected
        try:
            async with asyncio.timeout(timeout):
                writer.writelines(command)
                await writer.drain()
        except BaseException as exc:
            # Like redis-py: the connection is dropped whatever the failure (cancellation
            # included), with redis-py's errors. Unlike redis-py it is aborted, not closed:
            # a close would go on sending the unsent rest, and Redis would run a command
            # its caller was told had failed.
            await discard(conn)
            if isinstance(exc, TimeoutError):  # (before OSError, its base class)
                raise RedisTimeoutError("Timeout writing to socket") from None
            if isinstance(exc, OSError):
                raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc
            raise


async def discard(conn: AbstractConnection) -> None:
    """Drop a connection that cannot be used again (replies left unread): aborted, so that
    what it has not sent yet is not sent (a close would send it first)."""
    writer = conn._writer
    if writer is not None:
        writer.transport.abort()
    await conn.disconnect(nowait=True)


def _with_large_values(args: tuple[EncodableT, ...]) -> list[bytes]:
    """The command in the Redis protocol: the values over _INLINE_MAX bytes as chunks of
    their own (not copied), the runs of arguments between them packed by hiredis."""
    name = args[0]
    # a name may carry words of its own ("SCRIPT LOAD"), as in _Lean.pack_command
    words = (name.encode() if isinstance(name, str) else bytes(cast(bytes, name))).split()
    items = [*words, *args[1:]]
    out: list[bytes] = [b"*%d\r\n" % len(items)]
    # Where the buffers are, found by C-level searches of the items' types: a merge call
    # has hundreds of keys and one or two buffers, and a Python step per item cost more
    # than hiredis' packing of them.
    types = list(map(type, items))
    start = 0
    for at in sorted(i for kind in _BUFFERS for i in _positions(types, kind)):
        item = cast(bytes | bytearray | memoryview, items[at])
        if len(item) > _INLINE_MAX:
            _pack_run(out, items[start:at])
            value = item if isinstance(item, bytes) else bytes(item)
            out += (b"$%d\r\n" % len(value), value, b"\r\n")
            start = at + 1
        elif not isinstance(item, bytes):
            items[at] = bytes(item)
    _pack_run(out, items[start:])
    return out


def _positions(types: list[type], kind: type) -> Iterator[int]:
    """Where `kind` is in `types` (list.index: a C loop between two finds)."""
    at = -1
    while True:
        try:
            at = types.index(kind, at + 1)
        except ValueError:
            return
        yield at


def _pack_run(out: list[bytes], run: list[Any]) -> None:
    """Append `run` packed by hiredis, without its own "*<n>" header."""
    if run:
        packed: bytes = hiredis.pack_command(tuple(run))
        out.append(packed[packed.index(b"\r\n") + 2 :])


class LeanConnection(_Lean, Connection):
    """TCP."""


class LeanUnixConnection(_Lean, UnixDomainSocketConnection):
    """Unix socket (the embedded Redis)."""


class LeanSSLConnection(_Lean, SSLConnection):
    """TLS (rediss://)."""


_LEAN: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: LeanConnection,
    UnixDomainSocketConnection: LeanUnixConnection,
    SSLConnection: LeanSSLConnection,
}


def lean(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """The lean twin of one of redis-py's connection classes (others as they are)."""
    return _LEAN.get(connection_class, connection_class)
