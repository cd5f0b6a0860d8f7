"""A byte budget shared by every stream of the process: messages received, not yet processed."""

from __future__ import annotations

import asyncio
from collections import deque


class ByteBudget:
    """Bytes of received messages that are not processed yet, across all streams.

    A stream takes a message's bytes when it arrives and gives them back once it is
    processed; past the limit it waits, first come first served, and a stream that would
    read its next message waits too while anyone is waiting (`turn`). A waiting stream is
    not read, so its HTTP/2 window closes and its client's sends block: backpressure, not
    a refusal. One message always fits when nothing else is held, whatever its size.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.waits = 0  # times a stream had to wait: how often the limit was reached
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        """Streams waiting for bytes or for their turn to read."""
        return len(self._waiters)

    def _fits(self, n: int) -> bool:
        return self.used == 0 or self.used + max(n, 1) <= self.limit

    async def acquire(self, n: int) -> None:
        """Take n bytes, waiting behind earlier waiters while they do not fit."""
        if not self._waiters and self._fits(n):
            self.used += n
            return
        self.waits += 1
        future = asyncio.get_running_loop().create_future()
        entry = (n, future)
        self._waiters.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(n)  # granted, but our task was cancelled before it resumed
            else:
                if entry in self._waiters:  # _wake() skips, and drops, a cancelled one
                    self._waiters.remove(entry)
                self._wake()  # we may have been the head that blocked smaller ones
            raise

    async def turn(self) -> None:
        """Wait until reading another message is allowed (nobody waits, budget not full)."""
        if self._waiters or self.used >= self.limit:
            await self.acquire(0)

    def release(self, n: int) -> None:
        """Give back n bytes taken by acquire()."""
        self.used -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            n, future = self._waiters.popleft()
            if not future.done():
                self.used += n
                future.set_result(None)
