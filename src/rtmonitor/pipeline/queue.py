"""A FIFO between receivers and the aggregator, bounded in packets rather than messages."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueClosed(Exception):
    """The queue no longer accepts items (the service is shutting down)."""


class PacketQueue(Generic[T]):
    """Bounded queue whose capacity counts packets, so a 10,000-packet batch weighs 10,000.

    This is where backpressure starts: when full, put() waits, receivers stop reading
    their gRPC streams, HTTP/2 flow-control windows fill and clients block. Memory stays
    bounded and nothing is dropped silently.
    A single item larger than the whole capacity is still admitted when the queue is empty,
    so an oversized batch cannot deadlock.
    """

    def __init__(self, max_packets: int) -> None:
        if max_packets < 1:
            raise ValueError("max_packets must be >= 1")
        self.max_packets = max_packets
        self._items: deque[T] = deque()
        self._weights: deque[int] = deque()  # each queued item's packets
        self._packets = 0
        self._head = 0  # the ticket of the first queued item (tickets number the puts)
        self._takes = 0  # get_all() calls that took items
        self._putters: deque[tuple[asyncio.Future[None], int]] = deque()
        self._getter: asyncio.Future[None] | None = None
        self._closed = False

    @property
    def packets(self) -> int:
        """Packets currently queued."""
        return self._packets

    @property
    def takes(self) -> int:
        """get_all() calls that took items (the aggregator's wake-ups)."""
        return self._takes

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._items)

    def _fits(self, packets: int) -> bool:
        return self._packets == 0 or self._packets + packets <= self.max_packets

    async def put(self, item: T, packets: int) -> int:
        """Enqueue `item` weighing `packets`, waiting while the queue is full. Returns the
        item's ticket for grow() (puts are numbered in order).

        Cancel-safe: a put cancelled while waiting enqueues nothing.
        """
        if self._closed:
            raise QueueClosed("the pipeline is shutting down")
        if self._putters or not self._fits(packets):
            waiter = asyncio.get_running_loop().create_future()
            entry = (waiter, packets)
            self._putters.append(entry)
            try:
                await waiter
            except BaseException:
                if entry in self._putters:
                    self._putters.remove(entry)
                elif not waiter.cancelled():
                    # We were woken but cancelled before running: pass the turn on.
                    self._wake_putters()
                raise
            if self._closed:
                raise QueueClosed("the pipeline is shutting down")
        self._items.append(item)
        self._weights.append(packets)
        self._packets += packets
        if self._getter is not None and not self._getter.done():
            self._getter.set_result(None)
        return self._head + len(self._items) - 1

    def grow(self, ticket: int, packets: int) -> bool:
        """Account `packets` more to an item already put (its owner adds them to it), if
        the item is still queued (`ticket` from its put: no get_all() took it since) and
        they fit without overtaking a waiting putter. False: put a new item instead.

        StreamPackets' receivers append to their last item this way, so that a packet
        costs neither a queue item nor a wake-up of the aggregator.
        """
        if ticket < self._head or self._putters or self._closed or not self._fits(packets):
            return False
        self._weights[ticket - self._head] += packets
        self._packets += packets
        return True

    async def get_all(self, max_packets: int | Callable[[], int] | None = None) -> list[T]:
        """Wait for at least one item, then take everything queued, or as many of the
        oldest items as weigh at most `max_packets` in all (the room the taker has left;
        a callable is asked once the wait is over), and always at least one, however heavy.

        Returns an empty list only once the queue is closed and drained.
        """
        while not self._items:
            if self._closed:
                return []
            self._getter = asyncio.get_running_loop().create_future()
            try:
                await self._getter
            finally:
                self._getter = None
        items, weights = self._items, self._weights
        if callable(max_packets):
            max_packets = max_packets()
        if max_packets is None or max_packets >= self._packets:
            taken = list(items)
            items.clear()
            weights.clear()
            self._packets = 0
        else:
            taken, packets = [], 0
            while items and (not taken or packets + weights[0] <= max_packets):
                taken.append(items.popleft())
                packets += weights.popleft()
            self._packets -= packets
        self._head += len(taken)
        self._takes += 1
        self._wake_putters()
        return taken

    def _wake_putters(self) -> None:
        # Admit waiting putters in FIFO order while they fit.
        budget = self._packets
        while self._putters:
            waiter, packets = self._putters[0]
            if waiter.done():
                self._putters.popleft()
                continue
            if budget != 0 and budget + packets > self.max_packets:
                break
            self._putters.popleft()
            waiter.set_result(None)
            budget += packets

    def close(self) -> None:
        """Refuse new items; waiting putters get QueueClosed, the getter drains what is left."""
        self._closed = True
        while self._putters:
            waiter, _ = self._putters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        if self._getter is not None and not self._getter.done():
            self._getter.set_result(None)
