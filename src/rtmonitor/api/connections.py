"""HTTP connections: how many may be open, and how long one may wait without a request.

This sits below FastAPI, in uvicorn's protocol: every open connection holds a file
descriptor whether or not it ever sends a request, and without these bounds idle or
trickling connections alone exhaust the process's open-file limit.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

# A refused connection is answered (503) when its request arrives, or closed after this
# long; more than REFUSING_MAX of them waiting are closed at once, unanswered.
REFUSE_GRACE_S = 1.0
REFUSING_MAX = 16
# A response the client does not read stays in the transport's buffer, in memory. Past the
# budget of unsent bytes, connections whose buffer did not shrink for this long are reset
# (a close would wait for the client to read it), the largest first.
STALLED_S = 1.0


class ConnectionGuard:
    """At most `max_connections` open; none waits longer than `idle_timeout` for a request.

    A connection waits from when it opens or its last response ends until its next
    request's headers are complete, so a connection that trickles its headers is closed
    like a silent one. Past the limit, the connection waiting longest is closed to make
    room; if every one is busy (a request in flight, a live /stream), the new one gets 503.
    """

    def __init__(
        self,
        max_connections: int,
        idle_timeout: float,
        max_unsent_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.max_unsent_bytes = max_unsent_bytes
        self.unsent_bytes = 0  # at the last sweep
        self.stalled_reset = 0
        self._clock = clock
        # connection -> since when it waits for a request; oldest first (the sweep moves
        # a busy one to the end), so the first idle one is the longest waiting.
        self._open: dict[_Guarded, float] = {}
        self._refusing: dict[_Guarded, float] = {}
        self.idle_closed = 0
        self.evicted = 0
        self.refused = 0
        self._refusal = _refusal(max_connections)

    def protocol_class(self) -> type[asyncio.Protocol]:
        """uvicorn's HTTP protocol (`http=` of its Config), reporting to this guard."""
        return type("GuardedHttpProtocol", (_Guarded, AutoHTTPProtocol), {"guard": self})

    def opened(self, conn: _Guarded) -> None:
        self._open[conn] = self._clock()
        while len(self._open) > self.max_connections:
            victim = next((c for c in self._open if c is not conn and not _busy(c)), None)
            if victim is None:
                self._refuse(conn)
                return
            self.evicted += 1
            self._close(victim)

    def closed(self, conn: _Guarded) -> None:
        self._open.pop(conn, None)
        self._refusing.pop(conn, None)

    def responded(self, conn: _Guarded) -> None:
        """A response ended: the connection waits for its next request from now on."""
        if conn in self._open:
            del self._open[conn]  # (to the end: the order stays longest-waiting first)
            self._open[conn] = self._clock()

    def sweep(self) -> None:
        """Close connections that waited too long for a request (called about once a second)."""
        now = self._clock()
        self._reset_stalled(now)
        for conn, since in list(self._open.items()):
            if _busy(conn):
                del self._open[conn]
                self._open[conn] = now
            elif now - since >= self.idle_timeout:
                self.idle_closed += 1
                self._close(conn)
        for conn, since in list(self._refusing.items()):
            if now - since >= REFUSE_GRACE_S:
                self._close(conn)

    def _reset_stalled(self, now: float) -> None:
        """Past --http-max-unsent-bytes of responses waiting in buffers, reset the
        connections whose clients stopped reading, largest buffer first."""
        total = 0
        stalled: list[tuple[int, _Guarded]] = []
        for conn in self._open:
            unsent = conn.transport.get_write_buffer_size()
            if not unsent or unsent < conn.unsent:
                conn.stalled_since = now  # empty, or the client is reading
            elif now - conn.stalled_since >= STALLED_S:
                stalled.append((unsent, conn))
            conn.unsent = unsent
            total += unsent
        for unsent, conn in sorted(stalled, key=lambda p: p[0], reverse=True):
            if total <= self.max_unsent_bytes:
                break
            total -= unsent
            self.stalled_reset += 1
            self._close(conn)
        self.unsent_bytes = total

    def refusal(self, conn: _Guarded) -> None:
        """Answer a refused connection's request with 503, then close it."""
        conn.transport.write(self._refusal)
        self._close(conn)

    def stats(self) -> dict[str, int]:
        return {
            "connections": len(self._open),
            "max_connections": self.max_connections,
            "idle_closed": self.idle_closed,
            "evicted": self.evicted,
            "refused": self.refused,
            "unsent_bytes": self.unsent_bytes,
            "max_unsent_bytes": self.max_unsent_bytes,
            "stalled_reset": self.stalled_reset,
        }

    def _refuse(self, conn: _Guarded) -> None:
        self.refused += 1
        del self._open[conn]
        if len(self._refusing) >= REFUSING_MAX:
            self._close(conn)
            return
        # Answered when its request arrives: closing now, with the request unread, would
        # reset the connection before the client reads why.
        conn.refusing = True
        self._refusing[conn] = self._clock()

    def _close(self, conn: _Guarded) -> None:
        self.closed(conn)
        if conn.transport.get_write_buffer_size():
            # close() would keep the socket and the unsent response until the client reads
            # it, which a hostile client never does: reset it instead.
            conn.transport.abort()
        else:
            conn.transport.close()


class _Guarded(asyncio.Protocol):
    """Mixed in before uvicorn's HTTP protocol: tells the guard about the connection."""

    guard: ConnectionGuard
    transport: asyncio.Transport
    refusing = False
    unsent = 0  # the transport's unsent bytes at the last sweep
    stalled_since = 0.0  # since when they have not shrunk

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.guard.opened(self)

    def data_received(self, data: bytes) -> None:
        if self.refusing:
            if not self.transport.is_closing():
                self.guard.refusal(self)
            return
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.closed(self)
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        # (uvicorn's h11 and httptools protocols both call it when a response has ended;
        # the sweep alone, once a second, missed quick requests: a client sending one
        # every 200 ms was closed as idle, sometimes with its next request in flight)
        super().on_response_complete()  # type: ignore[misc]
        self.guard.responded(self)


def _busy(conn: Any) -> bool:
    """A request is in flight (uvicorn's h11 and httptools protocols keep it in `cycle`)."""
    cycle = getattr(conn, "cycle", None)
    return cycle is not None and not cycle.response_complete


def _refusal(max_connections: int) -> bytes:
    body = json.dumps(
        {
            "detail": f"too many open HTTP connections (--http-max-connections, at most "
            f"{max_connections} here) and none is idle; retry later"
        }
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "retry-after: 1\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body
