"""The live feed behind GET /stream (Server-Sent Events).

One poller per process asks Redis, once per flush interval, which devices received packets
(the last_seen index, so every instance's packets count) and hands the fresh records to the
subscribers. A subscriber keeps only the latest record per device until its client reads
it: a slow or stalled client gets the latest state, never a backlog. What one subscriber
holds is bounded three ways: at most PENDING_MAX devices waiting (more: the next event says
`lagged`), events of at most ~EVENT_MAX_BYTES (the rest follow at once, counted in
`pending`), and a write blocked longer than --stream-send-timeout closes the stream.
--max-stream-subscribers bounds how many there are.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from redis.exceptions import RedisError
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from rtmonitor.model import DeviceRecord, Totals
from rtmonitor.storage.store import RedisStore

logger = logging.getLogger(__name__)

LOOKBACK_MS = 5000  # a flush commits up to a few intervals after receive: look back this far
MAX_CHANGED = 5000  # devices per poll
PENDING_MAX = MAX_CHANGED  # devices one subscriber keeps waiting (one full poll fits)
# Devices of one event stop once their JSON reaches this: what a stalled client pins in its
# socket's buffer is one event, whatever the number or size of the devices.
EVENT_MAX_BYTES = 256 * 1024
# Where the app puts the server's transport for the connection in the ASGI scope (app.py).
TRANSPORT = "rtmonitor.transport"
KEEPALIVE_S = 15.0  # a comment this often keeps proxies from closing an idle stream
REVOKE_CHECK_S = 1.0  # how soon a stream whose token was removed ends


class Render(Protocol):
    """Records to the JSON text of an event's objects (as GET /metrics shows them)."""

    def device_json(self, record: DeviceRecord) -> str: ...

    def totals_json(self, record: Totals) -> str: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamStats:
    """GET /stream on this process: open clients, the limit, clients cut off as slow."""

    subscribers: int = 0
    max_subscribers: int = 0
    disconnected_slow: int = 0


R = TypeVar("R")


class Shared(Generic[R]):
    """One record of a poll (a changed device, the totals), rendered once for all the
    subscribers that send it (a hundred clients of a fat fleet would otherwise each render
    the same JSON)."""

    __slots__ = ("record", "_json")

    def __init__(self, record: R) -> None:
        self.record = record
        self._json: str | None = None

    def json(self, render: Callable[[R], str]) -> str:
        if self._json is None:
            self._json = render(self.record)
        return self._json


class Subscriber:
    """One client: the latest record of each changed device matching its prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.pending: dict[str, Shared[DeviceRecord]] = {}
        self.totals: Shared[Totals] | None = None
        # Devices that changed while PENDING_MAX others were already waiting: not kept, so
        # the next event says so ("lagged") and the client re-reads GET /metrics.
        self.lagged = False
        self.closed = False
        self.ready = asyncio.Event()

    def offer(self, records: Sequence[Shared[DeviceRecord]], totals: Shared[Totals]) -> None:
        pending = self.pending
        for shared in records:
            device_id = shared.record.device_id
            if device_id.startswith(self.prefix):
                if device_id in pending or len(pending) < PENDING_MAX:
                    pending[device_id] = shared  # newer replaces older
                else:
                    self.lagged = True
        before, now = (self.totals.record if self.totals else None), totals.record
        moved = before is None or (before.packets, before.rejected, before.devices) != (
            now.packets,
            now.rejected,
            now.devices,
        )
        self.totals = totals
        if pending or moved or self.lagged:  # nothing new: no event (keep-alives cover it)
            self.ready.set()

    def close(self) -> None:
        """The client went away: wake whoever waits for the next event."""
        self.closed = True
        self.ready.set()

    def take(self, render: Render) -> str:
        """The next event: the pending devices that fit in EVENT_MAX_BYTES (the others stay
        pending, counted in `pending`, and go in the next event at once) and the totals."""
        self.ready.clear()
        parts: list[str] = []
        taken: list[str] = []
        size = 0
        for device_id, shared in self.pending.items():
            if size >= EVENT_MAX_BYTES:
                break
            part = shared.json(render.device_json)
            parts.append(part)
            taken.append(device_id)
            size += len(part) + 1
        for device_id in taken:
            del self.pending[device_id]
        if self.pending:
            self.ready.set()
        totals = "null" if self.totals is None else self.totals.json(render.totals_json)
        lagged = json.dumps(self.lagged)
        self.lagged = False
        data = (
            f'{{"totals":{totals},"pending":{len(self.pending)},"lagged":{lagged},'
            f'"devices":[{",".join(parts)}]}}'
        )
        return f"event: update\ndata: {data}\n\n"


class ChangeFeed:
    """Polls for changed devices while anyone listens; fans them out."""

    def __init__(self, store: RedisStore, interval: float, max_subscribers: int = 100) -> None:
        self.store = store
        self.interval = interval
        self.max_subscribers = max_subscribers
        self.subscribers: set[Subscriber] = set()
        self.disconnected_slow = 0  # streams closed because their writes stayed blocked
        self._task: asyncio.Task[None] | None = None
        # device -> (packets already published, its last_seen): a device is published
        # again when the packets index moves past it. Its last_seen alone misses packets
        # received in the same millisecond but committed by a later flush.
        self._sent: dict[str, tuple[int, int]] = {}

    @property
    def full(self) -> bool:
        return len(self.subscribers) >= self.max_subscribers

    def subscribe(self, prefix: str) -> Subscriber:
        sub = Subscriber(prefix)
        self.subscribers.add(sub)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="change-feed")
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def stats(self) -> StreamStats:
        return StreamStats(
            subscribers=len(self.subscribers),
            max_subscribers=self.max_subscribers,
            disconnected_slow=self.disconnected_slow,
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def poll_once(self) -> None:
        now = int(time.time() * 1000)
        recent = await self.store.recent(now - LOOKBACK_MS, MAX_CHANGED)
        seen = [(d, ms) for d, ms, _ in recent]
        changed = [d for d, _, n in recent if n > self._sent.get(d, (-1, 0))[0]]
        records, totals = await asyncio.gather(self.store.get_devices(changed), self.store.totals())
        last_seen = dict(seen)
        for record in records:
            d = record.device_id
            self._sent[d] = (record.packets, last_seen[d])
        if len(self._sent) > 4 * MAX_CHANGED:  # forget devices gone quiet
            cutoff = now - 2 * LOOKBACK_MS
            self._sent = {d: v for d, v in self._sent.items() if v[1] >= cutoff}
        shared = [Shared(record) for record in records]
        shared_totals = Shared(totals)
        for sub in list(self.subscribers):
            sub.offer(shared, shared_totals)

    async def _run(self) -> None:
        while self.subscribers:
            try:
                await self.poll_once()
            except (RedisError, OSError) as exc:
                logger.warning("live feed: Redis unavailable (%s); retrying", exc)
            except Exception:  # never die silently
                logger.exception("live feed poll failed")
            await asyncio.sleep(self.interval)


class EventStream(Response):
    """GET /stream's response, written as a raw ASGI response so that every write is
    bounded in time: Starlette's StreamingResponse awaits the server's send, which waits
    as long as the client does not read (transport flow control)."""

    media_type = "text/event-stream"

    def __init__(
        self,
        feed: ChangeFeed,
        sub: Subscriber,
        render: Render,
        send_timeout: float,
        allowed: Callable[[], bool] | None = None,
    ) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.feed, self.sub, self.renderer, self.send_timeout = feed, sub, render, send_timeout
        # False once the client's token is no longer valid (removed from the auth file):
        # checked every REVOKE_CHECK_S, then the stream ends.
        self.allowed = allowed
        self.revoked = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sub = self.sub

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            sub.close()

        watcher = asyncio.create_task(watch(), name="stream-disconnect")
        if (allowed := self.allowed) is not None:
            revoke = asyncio.create_task(self._watch_token(allowed), name="stream-token")
            watcher.add_done_callback(lambda _: revoke.cancel())
        try:
            await self._send(send, {"type": "http.response.start", "status": 200,
                                    "headers": self.raw_headers})  # fmt: skip
            await self._write(send, "retry: 2000\n\n")
            while not sub.closed:
                try:
                    await asyncio.wait_for(sub.ready.wait(), KEEPALIVE_S)
                except TimeoutError:
                    await self._write(send, ": keep-alive\n\n")
                    continue
                if not sub.closed:
                    await self._write(send, sub.take(self.renderer))
            if self.revoked:  # the client is still there: say why, and end the response
                await self._write(send, "event: error\ndata: token revoked: log in again\n\n")
                await self._send(send, {"type": "http.response.body", "body": b""})
        except _Blocked:
            self.feed.disconnected_slow += 1
            # Closing would wait for the unread data to drain, which never happens: abort
            # (the server then sees a disconnect). Without the transport (another server
            # than uvicorn) the server closes the connection itself, as for any response
            # cut short.
            if (transport := scope.get(TRANSPORT)) is not None:
                _reset_on_close(transport)
                transport.abort()
                await asyncio.sleep(0)  # let the server see connection_lost first
            logger.warning(
                "GET /stream from %s closed: a write stayed blocked for %gs "
                "(--stream-send-timeout); the client is not reading",
                _peer(scope),
                self.send_timeout,
            )
        finally:
            watcher.cancel()
            self.feed.unsubscribe(sub)

    async def _watch_token(self, allowed: Callable[[], bool]) -> None:
        while not self.sub.closed:
            await asyncio.sleep(REVOKE_CHECK_S)
            if not allowed():
                self.revoked = True
                self.sub.close()

    async def _write(self, send: Send, text: str) -> None:
        await self._send(
            send, {"type": "http.response.body", "body": text.encode(), "more_body": True}
        )

    async def _send(self, send: Send, message: Message) -> None:
        try:
            async with asyncio.timeout(self.send_timeout):
                await send(message)
        except TimeoutError:
            raise _Blocked from None


class _Blocked(Exception):
    """A write to a stream's client did not complete within --stream-send-timeout."""


def _reset_on_close(transport: Any) -> None:
    """Make the close send RST: a graceful close would leave the unread data in the kernel's
    buffer (megabytes) until the client reads it or the orphan retries run out."""
    sock = transport.get_extra_info("socket")
    with contextlib.suppress(AttributeError, OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"
